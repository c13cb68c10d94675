"""OpenAI wire format: request schemas, JSON errors, and response / stream-chunk builders.

Only what minilab can honour is accepted: one choice (`n=1`), no logprobs, no presence or
frequency penalties (our CTRL `repetition_penalty` and `top_k` are accepted as extensions, as
vLLM does; so is `truncation`, the field and meaning of OpenAI's Responses API, on chat
requests). Anything else the official client may send is ignored, as OpenAI ignores unknown
fields. Errors have OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from minilab.inference import SamplingParams
from minilab.sampling import MAX_SEED


class ApiError(Exception):
    """An error answered as OpenAI-style JSON with `status`."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Text(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[_Text]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)  # OpenAI's default and range
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0)
    repetition_penalty: float = Field(default=1.0, gt=0.0)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)  # what torch.Generator takes
    n: int = Field(default=1, ge=1, le=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = Field(default=0.0, ge=0.0, le=0.0)
    frequency_penalty: float = Field(default=0.0, ge=0.0, le=0.0)
    logprobs: bool | int | None = Field(default=None)
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> str | list[str] | None:
        if isinstance(v, list) and len(v) > 4:
            raise ValueError("at most 4 stop sequences")
        return v

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, v: Any) -> Any:
        if v:
            raise ValueError("logprobs are not supported")
        return v

    def sampling(self, max_tokens: int) -> SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return SamplingParams(max_tokens=max_tokens, temperature=self.temperature,
                              top_p=self.top_p if self.top_p < 1.0 else None, top_k=self.top_k or None,
                              repetition_penalty=self.repetition_penalty, stop=stop, seed=self.seed)

    def wants_usage_chunk(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)  # the newer name for max_tokens
    # OpenAI's Responses API name for it: "auto" drops the oldest turns and caps max_tokens to what
    # fits the context (`minilab.conversation`), reported under "minilab"; "disabled" answers 413/422
    truncation: Literal["auto", "disabled"] = "disabled"

    def requested_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int]
    max_tokens: int | None = Field(default=16, ge=1)  # OpenAI's completions default
    echo: bool = False

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v: Any) -> Any:
        if isinstance(v, list) and v and isinstance(v[0], str) and len(v) != 1:
            raise ValueError("one prompt per request (n=1, no batches of prompts)")
        return v


def parse(model: type[BaseModel], data: Any) -> Any:
    """Validate `data` against `model`; the first problem as a 422 naming its field."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        param = ".".join(str(p) for p in err["loc"]) or None
        raise ApiError(422, f"{param}: {err['msg']}" if param else err["msg"], param=param,
                       code="invalid_value") from None


# ---- responses ------------------------------------------------------------------------------------
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chat_response(rid: str, model: str, text: str, finish: str, prompt_tokens: int, n: int,
                  extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """A whole chat completion; `extra` (what `truncation: "auto"` did) goes under "minilab"."""
    out = {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
           "system_fingerprint": None,
           "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                        "finish_reason": finish}],
           "usage": usage(prompt_tokens, n)}
    if extra is not None:
        out["minilab"] = extra
    return out


def chat_chunk(rid: str, model: str, created: int, delta: dict[str, Any], finish: str | None,
               with_usage: bool, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    chunk = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
             "system_fingerprint": None,
             "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
    if with_usage:
        chunk["usage"] = None  # OpenAI: null on every chunk but the last, usage-only one
    if extra is not None:
        chunk["minilab"] = extra
    return chunk


def completion_response(rid: str, model: str, text: str, finish: str | None, created: int,
                        usage_counts: dict[str, int] | None) -> dict[str, Any]:
    """A whole completion (with usage) or, with `usage_counts=None`, one stream chunk."""
    out: dict[str, Any] = {"id": rid, "object": "text_completion", "created": created, "model": model,
                           "system_fingerprint": None,
                           "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}
    if usage_counts is not None:
        out["usage"] = usage_counts
    return out


def usage_chunk(rid: str, model: str, created: int, obj: str, counts: dict[str, int]) -> dict[str, Any]:
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [], "usage": counts}
