"""What of a conversation fits a model's context: the one rule `minilab chat` and the server's
`truncation: "auto"` share.

    fit = fit_conversation(engine, messages, requested=128)
    engine.stream(fit.ids, SamplingParams(max_tokens=fit.max_tokens), chat=True)
    if fit.notice: print(fit.notice)

Small models have short contexts (the demo's is 256 tokens), so a conversation outgrows one in a
few turns. The rule, in order:

1. The leading system messages and the latest exchange (the last user message and whatever
   follows it) are always kept; earlier exchanges (a user message and the replies after it) are
   dropped whole, oldest first, until the prompt leaves `min_reply` tokens for the answer
   (`min(64, context // 4)`, or the request's own max_tokens when that is smaller).
2. The reply budget is then capped to what remains: `min(requested, context - prompt)`.
3. If the kept messages alone fill the context, nothing can be answered: `ContextFull`.

History is kept in preference to reply length (the reply gets the minimum room, not all it asked
for), because a conversation that forgets its last turn stops being one; a capped reply says so
with finish_reason "length" and the notice.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

SYSTEM_ROLES = ("system", "developer")


class ContextFull(ValueError):
    """Even the kept messages (system + latest exchange) fill the context."""

    def __init__(self, n_prompt: int, context: int):
        super().__init__(f"the prompt has {n_prompt} tokens; this model's context is {context} tokens "
                         "(including the reply)")
        self.n_prompt, self.context = n_prompt, context


@dataclass
class Fit:
    """The prompt that fits and what was done to get it."""

    ids: list[int]
    max_tokens: int
    context: int
    dropped_messages: int = 0  # oldest user/assistant messages left out
    requested: int | None = None  # max_tokens asked for (None: all that fits)

    @property
    def capped(self) -> bool:
        return self.requested is not None and self.max_tokens < self.requested

    @property
    def notice(self) -> str | None:
        """One line for the user when messages were dropped or the reply capped, else None."""
        parts = []
        if self.dropped_messages:
            n = self.dropped_messages
            parts.append(f"{n} older message{'s' if n != 1 else ''} dropped to fit the model's "
                         f"{self.context}-token context")
        if self.capped:
            parts.append(f"reply limited to {self.max_tokens} tokens (asked for {self.requested})")
        return "; ".join(parts) or None

    def report(self) -> dict:
        """What the API returns under `minilab.truncation`."""
        return {"dropped_messages": self.dropped_messages, "max_tokens": self.max_tokens,
                "requested_max_tokens": self.requested, "context_length": self.context, "notice": self.notice}


def min_reply_tokens(context: int) -> int:
    """The reply room kept by dropping turns: 64 tokens, or a quarter of a shorter context."""
    return max(1, min(64, context // 4))


def default_reply_tokens(context: int) -> int:
    """The reply budget a chat asks for when the user names none: half the context, at most 256
    (so one rambling reply cannot push the whole history out of a short context)."""
    return max(1, min(256, context // 2))


def exchanges(messages: Sequence[dict]) -> tuple[list[dict], list[list[dict]]]:
    """(leading system messages, the rest cut into exchanges: each starts at a user message)."""
    head = 0
    while head < len(messages) and messages[head]["role"] in SYSTEM_ROLES:
        head += 1
    groups: list[list[dict]] = []
    for m in messages[head:]:
        if m["role"] == "user" or not groups:
            groups.append([])
        groups[-1].append(m)
    return list(messages[:head]), groups


def fit_messages(render: Callable[[list[dict]], list[int]], messages: Sequence[dict], context: int,
                 requested: int | None, min_reply: int | None = None) -> Fit:
    """The rule above over any `render` (messages -> prompt ids). `requested=None`: the reply
    may take all that remains, as OpenAI's API does without max_tokens."""
    room = min_reply_tokens(context) if min_reply is None else min_reply
    if requested is not None:
        room = min(room, requested)
    system, groups = exchanges(messages)
    dropped = 0
    while True:
        ids = render(system + [m for g in groups for m in g])
        if len(ids) + room <= context or len(groups) <= 1:
            break
        dropped += len(groups.pop(0))
    if len(ids) >= context:
        raise ContextFull(len(ids), context)
    fits = context - len(ids)
    max_tokens = fits if requested is None else min(requested, fits)
    return Fit(ids, max_tokens, context, dropped, requested)


def fit_conversation(engine, messages: Sequence[dict], requested: int | None, min_reply: int | None = None) -> Fit:
    """`fit_messages` with `engine`'s chat template and context length."""
    return fit_messages(engine.chat_prompt, messages, engine.context_length, requested, min_reply)
