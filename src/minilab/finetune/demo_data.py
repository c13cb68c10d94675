"""Built-in fine-tuning data: real conversations from the `chatterbot-corpus` wheel (BSD-3).

The wheel (about 1.7 MB, a dependency of minilab) ships short English dialogues as YAML
(`chatterbot_corpus/data/english/*.yml`, lists of alternating utterances). Each dialogue
becomes a user/assistant conversation; nothing is fetched at run time.

No real preference data is reachable offline, so the DPO demo pairs are *constructed* from
these real answers: chosen = the real answer; rejected = the real answer to a different
question (alternating with the real answer cut to its first third). The data card says so.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from minilab.errors import MinilabError

LICENSE = "BSD-3-Clause (chatterbot-corpus by Gunther Cox)"


def _data_dir() -> Path:
    try:
        import chatterbot_corpus
    except ImportError:
        raise MinilabError("the built-in demo data needs the chatterbot-corpus package "
                           "(pip install chatterbot-corpus)") from None
    return Path(chatterbot_corpus.__file__).parent / "data" / "english"


def dialogues() -> Iterator[tuple[str, list[str]]]:
    """(category, utterances) of every English dialogue, files in sorted order."""
    import yaml

    for f in sorted(_data_dir().glob("*.yml")):
        doc = yaml.safe_load(f.read_text(encoding="utf-8")) or {}
        for conv in doc.get("conversations") or []:
            turns = [str(t).strip() for t in conv if isinstance(t, str | int | float) and str(t).strip()]
            if len(turns) >= 2:
                yield f.stem, turns


def demo_conversations() -> list[dict[str, Any]]:
    """Dialogues as `{"messages": [...]}` records; odd trailing utterances are dropped so every
    conversation ends with an assistant turn."""
    out = []
    for _, turns in dialogues():
        turns = turns[: len(turns) // 2 * 2]
        out.append({"messages": [{"role": "user" if i % 2 == 0 else "assistant", "content": t}
                                 for i, t in enumerate(turns)]})
    return out


def demo_pairs(seed: int = 0) -> list[dict[str, Any]]:
    """Constructed preference pairs from first exchanges: chosen is the real answer, rejected is
    another question's answer (even pairs) or the real answer cut to its first third (odd pairs)."""
    # One pair per distinct question: the corpus repeats some questions with other answers, which
    # would make contradictory pairs.
    seen: dict[str, str] = {}
    for _, turns in dialogues():
        seen.setdefault(turns[0], turns[1])
    firsts = list(seen.items())
    rng = random.Random(seed)
    pairs = []
    for i, (question, answer) in enumerate(firsts):
        if i % 2 == 0 or len(answer.split()) < 3:
            other = answer
            while other == answer:
                other = firsts[rng.randrange(len(firsts))][1]
            rejected, how = other, "answer_to_other_question"
        else:
            words = answer.split()
            rejected, how = " ".join(words[: max(1, len(words) // 3)]), "truncated_answer"
        pairs.append({"prompt": question, "chosen": answer, "rejected": rejected, "constructed": how})
    return pairs


def provenance() -> dict[str, Any]:
    import importlib.metadata

    try:
        version = importlib.metadata.version("chatterbot-corpus")
    except importlib.metadata.PackageNotFoundError:
        version = None
    return {"package": "chatterbot-corpus", "version": version, "license": LICENSE,
            "files": "chatterbot_corpus/data/english/*.yml"}
