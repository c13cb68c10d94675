"""Chat templates and loss masks: one conversation -> (token ids, which of them are trained on).

Every template is a Jinja chat template of the kind Hugging Face tokenizers carry in
`tokenizer_config.json` (`messages`, `add_generation_prompt`, `bos_token`, `eos_token`), plus the
token that ends an assistant turn. The same Jinja text is written into the fine-tuned model's
tokenizer config, so training, `minilab eval` and any HF-compatible server format prompts
identically and stop at the same end-of-turn token.

Masks come from rendering prefixes: the text of an assistant turn is what rendering
`messages[:i+1]` adds beyond rendering `messages[:i]` with the generation prompt. That works for
our built-in templates and for a model's own template alike, without parsing the template.
Each piece is tokenized on its own and the ids are concatenated, which is also how serving sees
the prompt (tokenized up to the generation prompt, then generated token by token).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from minilab.errors import ConfigError, MinilabError
from minilab.tokenization import (
    CHAT_END,
    CHATML_TEMPLATE,
    EOS_TOKEN,
    chat_template_source,
    guess_end_token,
    render_chat,
    token_text,
)

IGNORE = -100
ROLES = ("system", "user", "assistant")

# Instruction-style templates end an assistant turn with the tokenizer's eos; the header of the
# response is emitted with the user turn, so `add_generation_prompt` needs no extra text.
_INSTRUCT = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] + '\\n\\n' }}"
    "{% elif m['role'] == 'user' %}{{ '### Instruction:\\n' + m['content'] + '\\n\\n### Response:\\n' }}"
    "{% else %}{{ m['content'] + eos_token + '\\n\\n' }}{% endif %}"
    "{% endfor %}"
)
_CHAT = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] + '\\n\\n' }}"
    "{% elif m['role'] == 'user' %}{{ 'Human: ' + m['content'] + '\\n\\nAssistant: ' }}"
    "{% else %}{{ m['content'] + eos_token + '\\n\\n' }}{% endif %}"
    "{% endfor %}"
)
_ALPACA_PREAMBLE = ("Below is an instruction that describes a task. "
                    "Write a response that appropriately completes the request.")
_ALPACA = (
    "{% if messages and messages[0]['role'] == 'system' %}{{ messages[0]['content'] + '\\n\\n' }}"
    "{% else %}{{ '" + _ALPACA_PREAMBLE + "\\n\\n' }}{% endif %}"
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}{{ '### Instruction:\\n' + m['content'] + '\\n\\n### Response:\\n' }}"
    "{% elif m['role'] == 'assistant' %}{{ m['content'] + eos_token + '\\n\\n' }}{% endif %}"
    "{% endfor %}"
)
BUILTIN = {"chatml": CHATML_TEMPLATE, "instruct": _INSTRUCT, "chat": _CHAT, "alpaca": _ALPACA}


@dataclass(frozen=True)
class ChatTemplate:
    """A Jinja chat template with the token that ends an assistant turn."""

    name: str
    jinja: str
    end_token: str
    bos_token: str = ""
    eos_token: str = ""

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
        return render_chat(self.jinja, messages, add_generation_prompt=add_generation_prompt,
                           bos_token=self.bos_token, eos_token=self.eos_token)

    def segments(self, messages: list[dict[str, str]]) -> list[tuple[str, bool]]:
        """(text, trained_on) pieces whose concatenation is `render(messages)`; trained pieces are
        assistant turns up to and including the end-of-turn token (not the newline after it)."""
        out: list[tuple[str, bool]] = []
        done = ""
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = self.render(messages[:i], add_generation_prompt=True)
            through = self.render(messages[: i + 1])
            if not before.startswith(done) or not through.startswith(before):
                raise MinilabError(f"chat template '{self.name}' does not render conversations "
                                   "prefix-consistently; the assistant spans cannot be located")
            out.append((before[len(done):], False))
            turn = through[len(before):]
            cut = turn.rfind(self.end_token)
            end = cut + len(self.end_token) if cut >= 0 else len(turn)
            out += [(turn[:end], True), (turn[end:], False)]
            done = through
        out.append((self.render(messages)[len(done):], False))
        return [(text, trained) for text, trained in out if text]


def resolve_template(name: str, tokenizer_dir: str | None = None) -> ChatTemplate:
    """`chatml`, `instruct`, `chat`, `alpaca`, or `model` (the tokenizer's own chat_template)."""
    cfg = _tokenizer_config(tokenizer_dir)
    bos, eos = token_text(cfg.get("bos_token")), token_text(cfg.get("eos_token")) or EOS_TOKEN
    if name == "model":
        jinja = chat_template_source(cfg, tokenizer_dir)
        if not jinja:
            raise ConfigError(f"{tokenizer_dir}: the tokenizer has no chat_template; pick chatml, "
                              "instruct, chat or alpaca", key="template")
        return ChatTemplate("model", jinja, guess_end_token(jinja, eos), bos, eos)
    if name not in BUILTIN:
        raise ConfigError(f"unknown template '{name}' (choose chatml, instruct, chat, alpaca, model)",
                          key="template")
    return ChatTemplate(name, BUILTIN[name], CHAT_END if name == "chatml" else eos, bos, eos)


def _tokenizer_config(tokenizer_dir: str | None) -> dict[str, Any]:
    import json
    from pathlib import Path

    if not tokenizer_dir:
        return {}
    path = Path(tokenizer_dir) / "tokenizer_config.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def encode_conversation(tokenizer: Any, template: ChatTemplate, messages: list[dict[str, str]]
                        ) -> tuple[list[int], list[bool]]:
    """(ids, trained) of a templated conversation; `tokenizer` is a `tokenizers.Tokenizer`.
    Special tokens written in the text (`<|im_end|>`) map to their ids."""
    ids: list[int] = []
    mask: list[bool] = []
    for text, trained in template.segments(messages):
        piece = tokenizer.encode(text, add_special_tokens=False).ids
        ids += piece
        mask += [trained] * len(piece)
    return ids, mask


def labels_from_mask(ids: list[int], mask: list[bool]) -> list[int]:
    """Hugging Face-style labels (unshifted): the token id where it is trained on, else IGNORE.
    The loss at position t predicts labels[t + 1]; batching does the shift."""
    return [i if m else IGNORE for i, m in zip(ids, mask, strict=True)]


def validate_messages(messages: Any) -> list[dict[str, str]]:
    """Messages as [{role, content}] with roles system/user/assistant, or MinilabError."""
    if not isinstance(messages, list) or not messages:
        raise MinilabError("no messages")
    out = []
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise MinilabError(f"bad message {str(m)[:80]!r} (need role in {ROLES} and string content)")
        out.append({"role": m["role"], "content": m["content"]})
    return out
