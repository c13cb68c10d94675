"""The tokenizer seam: the one place minilab opens a tokenizer file, spells a special token, picks
eos / pad / stop / end-of-turn ids, or renders a chat template.

Why one module: a tool that computes "the eos" in five places ends up training one chat format
and serving another. Here training (`sft`, `dpo`), evaluation, export and serving ask the same
functions, in the same priority order, so a model stops where it was taught to.

- **Loading**: `load_tokenizer` (the one `Tokenizer.from_file`), checked against the encoding
  fingerprint it recorded; `tokenizer_json` for readers of the raw file (GGUF export).
- **Fingerprints**: `tokenizer_fingerprint`, a SHA-256 over the tokenizer's *content* (the
  canonical JSON of the model, normaliser, pre-tokeniser and special tokens, and the chat
  template), never its path or a timestamp, so a copy keeps its identity; `encoding_fingerprint`,
  the same hash without the chat template: what decides the token ids of a text (a model whose
  template changed in SFT can still be scored on the data it was pretrained on).
- **Special tokens**: the defaults `minilab tokenizer` trains with, the name tables other
  tokenizers are searched with, and the id functions built on them.
- **Chat templates**: Jinja in `ImmutableSandboxedEnvironment`, as transformers renders them
  (templates come with downloaded models, so they are untrusted code); one compiled template per
  source, shared by fine-tuning (loss masks) and inference (prompts).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

from minilab.errors import MinilabError
from minilab.fsutil import read_json_if_present

META = "minilab_tokenizer.json"

# ---- special tokens --------------------------------------------------------------------------------
# What `minilab tokenizer` trains with (ids 0.. in this order) and what a missing eos defaults to.
BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, UNK_TOKEN = "<s>", "</s>", "<pad>", "<unk>"
CHAT_START, CHAT_END = "<|im_start|>", "<|im_end|>"
# ChatML: the same template Qwen and SmolLM use, so chat data and servers need no custom code.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# eos-like tokens generation stops at when a tokenizer has them (in this order after its own eos).
EOS_NAMES = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "<|eos|>", "<|im_end|>")
# End-of-turn tokens a chat template may write; the first one in the vocabulary ends a reply.
END_OF_TURN_NAMES = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>")
# The end of an assistant turn in a model's own (non-ChatML) template, when it visibly writes one.
TURN_END_GUESSES = ("<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>")
# Padding: the first of these in the vocabulary (padded positions are never targets).
PAD_NAMES = ("<pad>", "</s>", "<|endoftext|>", "<eos>")
# A tokenizer without config files: the special tokens' usual spellings (HF export).
SPECIAL_FALLBACKS = {"bos_token": ("<s>", "<|begin_of_text|>", "<bos>", "<|bos|>"),
                     "eos_token": ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "<|eos|>"),
                     "pad_token": ("<pad>", "<|pad|>")}

# tokenizer_config keys that change how text is encoded or decoded; the rest (model_max_length,
# tokenizer_class, ...) do not change token ids and stay out of the fingerprint.
_FINGERPRINT_KEYS = ("bos_token", "eos_token", "pad_token", "unk_token", "additional_special_tokens",
                     "extra_special_tokens", "chat_template", "add_bos_token", "add_eos_token")
_REDO = "copy the tokenizer directory again, or re-create it with `minilab tokenizer`"


# ---- loading and fingerprints -------------------------------------------------------------------------
def _read_json(path: Path) -> Any:
    """A tokenizer file's JSON; a truncated or damaged file is a one-line error naming it."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise MinilabError(f"{path}: not valid JSON ({e}); the file is truncated or damaged: {_REDO}") from None


def load_tokenizer(path: str | Path, verify: bool = True):
    """The `tokenizers.Tokenizer` of a tokenizer (or model) directory's tokenizer.json, or of that
    file itself: the one place minilab loads one. A missing, truncated or garbage file is a
    one-line `MinilabError`. With `verify`, a directory that records its encoding fingerprint in
    `minilab_tokenizer.json` must still encode alike: the token ids are what a changed file would
    silently remap. (Not the full `sha256`: a model directory copies that file, and fine-tuning
    legitimately sets another chat template there, which the model's manifest records.)"""
    from tokenizers import Tokenizer

    path = Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise MinilabError(f"{file.parent}: no tokenizer.json (not a fast tokenizer directory)")
    try:
        tok = Tokenizer.from_file(str(file))
    except Exception as e:  # the Rust parser's error: truncated JSON, not a tokenizer, unknown model
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise MinilabError(f"{file}: cannot be loaded as a tokenizer ({first[:160]}); the file is truncated "
                           f"or damaged: {_REDO}") from None
    recorded = _read_json(file.parent / META).get("encoding_sha256") if verify and (file.parent / META).is_file() \
        else None
    if recorded and encoding_fingerprint(file.parent) != recorded:
        raise MinilabError(f"{file}: its vocabulary or encoding differs from the fingerprint recorded in {META} "
                           f"({recorded[:12]}…); the file changed after training: {_REDO}")
    return tok


def tokenizer_json(tokenizer_dir: Path) -> dict[str, Any]:
    """The raw JSON of a directory's tokenizer.json (vocabulary, merges, added tokens), {} if none:
    for writers of other formats that need the tables themselves (GGUF)."""
    path = tokenizer_dir / "tokenizer.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def tokenizer_fingerprint(tokenizer_dir: str | Path, encoding_only: bool = False) -> str:
    """SHA-256 of a tokenizer directory's content (canonical JSON; independent of path and time).
    `encoding_only` leaves the chat template out (see `encoding_fingerprint`)."""
    tokenizer_dir = Path(tokenizer_dir)
    path = tokenizer_dir / "tokenizer.json"
    if not path.is_file():
        raise MinilabError(f"{tokenizer_dir}: no tokenizer.json (not a fast tokenizer directory)")
    content: dict[str, Any] = {"tokenizer": _read_json(path)}
    cfg_path = tokenizer_dir / "tokenizer_config.json"
    if cfg_path.is_file():
        cfg = _read_json(cfg_path)
        content["config"] = {k: cfg[k] for k in _FINGERPRINT_KEYS
                             if k in cfg and not (encoding_only and k == "chat_template")}
    jinja = tokenizer_dir / "chat_template.jinja"  # transformers 5 may store the template here
    if jinja.is_file() and not encoding_only:
        content["chat_template_file"] = jinja.read_text(encoding="utf-8")
    canonical = json.dumps(content, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def encoding_fingerprint(tokenizer_dir: str | Path) -> str:
    """The fingerprint of what maps text to token ids (vocabulary, merges, normaliser, special
    tokens), without the chat template: equal for two tokenizers that encode every text alike."""
    return tokenizer_fingerprint(tokenizer_dir, encoding_only=True)


def read_tokenizer_meta(tokenizer_dir: str | Path) -> dict[str, Any]:
    """`minilab_tokenizer.json`, checked against the directory's content (edits are caught here)."""
    path = Path(tokenizer_dir) / META
    if not path.is_file():
        raise MinilabError(f"{tokenizer_dir}: no {META}; create the tokenizer with `minilab tokenizer` "
                           "(or adopt an existing one with `minilab tokenizer --from DIR`)")
    meta = _read_json(path)
    actual = tokenizer_fingerprint(tokenizer_dir)
    if meta.get("sha256") != actual:
        raise MinilabError(f"{tokenizer_dir}: tokenizer content hash {actual[:12]}… differs from the "
                           f"recorded {str(meta.get('sha256'))[:12]}…; the files changed after training")
    return meta


# ---- special token ids -----------------------------------------------------------------------------------
def token_text(value: Any) -> str:
    """A special token's text as tokenizer_config.json gives it: a string, or an AddedToken
    serialised by old transformers as {"content": ...}; "" when unset."""
    if isinstance(value, dict):
        return str(value.get("content") or "")
    return value or ""


def tokenizer_stop_ids(tokenizer: Any) -> list[int]:
    """eos-like token ids of a `tokenizers.Tokenizer` or HF tokenizer (those present in its vocab)."""
    ids: list[int] = []
    eos_id = getattr(tokenizer, "eos_token_id", None)  # HF tokenizers know their eos
    if isinstance(eos_id, int):
        ids.append(eos_id)
    for name in EOS_NAMES:
        tid = tokenizer.token_to_id(name) if hasattr(tokenizer, "token_to_id") else \
            tokenizer.convert_tokens_to_ids(name)
        unk = getattr(tokenizer, "unk_token_id", None)
        if isinstance(tid, int) and tid != unk and tid not in ids:
            ids.append(tid)
    return ids


def model_stop_ids(model_dir: Path, tokenizer: Any) -> list[int]:
    """eos ids from generation_config.json / config.json (what transformers would stop on), then
    the tokenizer's eos-like tokens; the first is also the document separator."""
    ids: list[int] = []
    for name in ("generation_config.json", "config.json"):
        eos = read_json_if_present(model_dir / name).get("eos_token_id")
        for tid in eos if isinstance(eos, list) else [eos]:
            if isinstance(tid, int) and tid not in ids:
                ids.append(tid)
    return ids + [t for t in tokenizer_stop_ids(tokenizer) if t not in ids]


def chat_stop_ids(tokenizer: Any, end_token: str, eos_token: str) -> list[int]:
    """The ids a chat-tuned model stops at: its eos (the default eos when unset), then the
    template's end-of-turn token, those in the vocabulary, without repeats."""
    ids = [tokenizer.token_to_id(eos_token or EOS_TOKEN), tokenizer.token_to_id(end_token)]
    return [t for t in dict.fromkeys(ids) if t is not None]


def end_of_turn_id(tokenizer: Any, recorded: str | None, template: str | None) -> int | None:
    """The id ending a reply: the end-of-turn token a tokenizer recorded (`chat_end_token`), else
    the first of `END_OF_TURN_NAMES` the chat `template` writes; None if not in the vocabulary."""
    names = [recorded] if recorded else []
    names += [n for n in END_OF_TURN_NAMES if template and n in template]
    for n in names:
        tid = tokenizer.token_to_id(n)
        if tid is not None:
            return tid
    return None


def guess_end_token(jinja: str, eos: str) -> str:
    """The token ending an assistant turn in a model's own template: one it writes, else eos."""
    if CHAT_END in jinja:
        return CHAT_END
    for token in TURN_END_GUESSES:
        if token in jinja:
            return token
    return eos


def pad_id_of(tokenizer_dir: Path) -> int:
    """The padding id of a tokenizer (or model) directory: the first of `PAD_NAMES` it has, else 0."""
    tok = load_tokenizer(tokenizer_dir)
    for name in PAD_NAMES:
        if (tid := tok.token_to_id(name)) is not None:
            return tid
    return 0  # padded positions are never targets and never attended to by earlier tokens


def special_token_ids(tokenizer_dir: Path) -> dict[str, int]:
    """bos/eos/pad ids of the tokenizer in `tokenizer_dir`, from its HF config files; empty if unknown."""
    tok_file = tokenizer_dir / "tokenizer.json"
    if not tok_file.is_file():
        return {}
    tok = load_tokenizer(tok_file)
    names: dict[str, Any] = {}
    for fname in ("special_tokens_map.json", "tokenizer_config.json"):  # the latter wins
        f = tokenizer_dir / fname
        if f.is_file():
            data = json.loads(f.read_text(encoding="utf-8"))
            names.update({k: data[k] for k in ("bos_token", "eos_token", "pad_token") if data.get(k)})
    # Without config files, fall back on the special tokens' usual spellings.
    ids: dict[str, int] = {}
    for key, candidates in SPECIAL_FALLBACKS.items():
        name = names.get(key)
        name = name.get("content") if isinstance(name, dict) else name
        for cand in ([name] if name else list(candidates)):
            tid = tok.token_to_id(cand)
            if tid is not None:
                ids[key.replace("_token", "_token_id")] = tid
                break
    return ids


# ---- chat templates -----------------------------------------------------------------------------------
def chat_template_source(tok_cfg: dict[str, Any], tokenizer_dir: str | Path | None) -> str | None:
    """A tokenizer's own chat template: tokenizer_config.json's `chat_template`, else
    chat_template.jinja (where transformers 5 may store it); of several named ones, the default."""
    template = tok_cfg.get("chat_template")
    jinja = Path(tokenizer_dir) / "chat_template.jinja" if tokenizer_dir else None
    if not template and jinja is not None and jinja.is_file():
        template = jinja.read_text(encoding="utf-8")
    if isinstance(template, list):  # HF allows named templates; use the default one
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    return template or None


@lru_cache(maxsize=16)
def compile_chat_template(source: str):
    """Jinja in a sandbox, as transformers renders chat templates (templates come with models)."""
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str):  # templates call this on bad input (HF convention)
        raise MinilabError(f"chat template: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(source)
    except TemplateError as e:
        raise MinilabError(f"chat template does not compile: {e}") from None


def render_chat(source: str, messages: Sequence[dict[str, str]], *, add_generation_prompt: bool,
                bos_token: str = "", eos_token: str = "") -> str:
    """`messages` rendered by the chat template `source` (with the assistant turn opened when
    `add_generation_prompt`): the text training, evaluation and serving all tokenize."""
    return compile_chat_template(source).render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                                bos_token=bos_token, eos_token=eos_token)
