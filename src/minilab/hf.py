"""Hugging Face interop: our `Transformer` <-> a standard `LlamaForCausalLM` (or, with QK-norm,
`Qwen3ForCausalLM`) directory.

Our parameter names and RoPE layout are exactly those of `LlamaForCausalLM`, so conversion is
only a config mapping plus reading/writing safetensors: no renaming, no permuting, and no
transformers model is ever instantiated (export and import stay fast and use no extra memory).
Qwen3 is Llama plus a per-head RMSNorm of queries and keys before RoPE (`self_attn.q_norm` /
`k_norm`, the names our `qk_norm` option uses), so a `qk_norm` model is written as Qwen3 and a
Qwen3 checkpoint (without sliding-window attention) loads as a `qk_norm` model.
`tests/test_hf.py` checks logits against transformers itself in both directions.

Config spellings: transformers 5 writes RoPE as `rope_parameters: {rope_type, rope_theta, ...}`;
older files have a top-level `rope_theta` and an optional `rope_scaling` dict (`type` or
`rope_type`). `from_hf_config` reads both with transformers' own precedence and defaults
(`rope_scaling` wins over `rope_parameters`; missing `rms_norm_eps` is 1e-6, not our 1e-5).

Weights are read only from safetensors or, for `pytorch_model.bin`, with
`torch.load(weights_only=True)`, which refuses arbitrary pickled objects.
"""

from __future__ import annotations

import json
import pickle
import shutil
import zipfile
from pathlib import Path
from typing import Any

import torch

from minilab.config import read_json_object
from minilab.errors import ConfigError, MinilabError
from minilab.fsutil import atomic_dir, write_json_atomic
from minilab.model import ModelConfig, Transformer, build_model, rope_inv_freq
from minilab.tokenization import load_tokenizer, special_token_ids

# Files a tokenizer dir may hold that must never overwrite the model's own files.
_MODEL_FILES = {"config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json",
                "pytorch_model.bin", "pytorch_model.bin.index.json"}
_ROPE_KEYS = {"linear": ("factor",),
              "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}
# Keys old checkpoints carry that hold no learned state (HF ignores them on load, as we do).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


# ---- config mapping ----------------------------------------------------------------------------
HF_CLASSES = {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM"}  # by ModelConfig.architecture


def to_hf_config(cfg: ModelConfig):
    """The transformers config (`LlamaConfig`, or `Qwen3Config` with QK-norm) computing the same
    function as a model built from `cfg`."""
    from huggingface_hub.errors import StrictDataclassError
    from transformers import LlamaConfig, Qwen3Config

    scaling = dict(cfg.rope_scaling or {})
    kind = scaling.pop("rope_type", scaling.pop("type", "default"))
    common = dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_kv_head,
        head_dim=cfg.head_dim, max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps,
        rope_parameters={"rope_type": kind, "rope_theta": float(cfg.rope_theta), **scaling},
        tie_word_embeddings=bool(cfg.tie_embeddings), initializer_range=cfg.init_std, hidden_act="silu",
        attention_bias=False,
        # LlamaConfig defaults to bos=1, eos=2: wrong for our tokenizers; save_hf_dir fills them in.
        bos_token_id=None, eos_token_id=None, pad_token_id=None,
        architectures=[HF_CLASSES[cfg.architecture]])
    try:
        if cfg.architecture == "qwen3":
            return Qwen3Config(**common, use_sliding_window=False, sliding_window=None)
        return LlamaConfig(**common, mlp_bias=False)
    except (StrictDataclassError, ValueError, TypeError) as e:  # the configs are strict dataclasses
        # e.g. d_model % n_head != 0, which we allow (explicit head_dim) but LlamaConfig refuses.
        msg = " ".join(str(e.__cause__ or e).split())
        raise MinilabError(f"cannot express this model as a transformers {cfg.architecture} config: {msg}") from None


def _require(config: dict, key: str, source: str) -> Any:
    if key not in config:
        raise ConfigError("required key is missing", source=source, key=key)
    return config[key]


def _check_model_type(config: dict, source: str) -> bool:
    """Accept Llama, Mistral and Qwen3 where their sliding window never bites (then the math is
    Llama's, plus QK-norm for Qwen3). Returns whether the model has QK-norm."""
    model_type = config.get("model_type")
    archs = config.get("architectures") or []
    if model_type is None:
        model_type = {cls: mt for mt, cls in HF_CLASSES.items()}.get(next(iter(archs), None))
    if model_type == "llama":
        return False
    if model_type in ("mistral", "qwen3"):
        # Mistral's default window is 4096; Qwen3 uses its window only with use_sliding_window
        window = config.get("sliding_window", 4096) if model_type == "mistral" or \
            config.get("use_sliding_window", False) else None
        max_pos = config.get("max_position_embeddings", 4096 * 32)
        if window is None or window >= max_pos:
            return model_type == "qwen3"
        raise ConfigError(f"{model_type} sliding_window={window} < max_position_embeddings={max_pos} is not "
                          "Llama attention; load it with transformers.AutoModelForCausalLM instead",
                          source=source, key="sliding_window")
    raise ConfigError(f"unsupported model_type {model_type!r} (architectures {archs}); minilab loads Llama-"
                      "architecture models (llama, mistral, qwen3) only, use transformers.AutoModelForCausalLM "
                      "for others", source=source, key="model_type")


def _rope_from_hf(config: dict, source: str) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling) from either spelling, with transformers' precedence and defaults."""
    params = dict(config.get("rope_scaling") or config.get("rope_parameters") or {})
    theta = float(params.pop("rope_theta", config.get("rope_theta", 10000.0)))
    kind = params.pop("rope_type", params.pop("type", "default"))
    if params.get("partial_rotary_factor", 1.0) != 1.0 or config.get("partial_rotary_factor", 1.0) != 1.0:
        raise ConfigError("partial rotary embeddings are not supported", source=source,
                          key="partial_rotary_factor")
    if kind == "default":
        return theta, None
    if kind not in _ROPE_KEYS:
        raise ConfigError(f"RoPE type {kind!r} is not supported (default, linear, llama3); load it with "
                          "transformers.AutoModelForCausalLM instead", source=source, key="rope_scaling")
    if kind == "llama3":
        # As transformers: a top-level original_max_position_embeddings wins, then the dict's, then max pos.
        params["original_max_position_embeddings"] = config.get(
            "original_max_position_embeddings",
            params.get("original_max_position_embeddings", config.get("max_position_embeddings", 2048)))
    scaling: dict[str, Any] = {"rope_type": kind}
    for key in _ROPE_KEYS[kind]:
        if key not in params:
            raise ConfigError(f"RoPE type {kind!r} needs '{key}'", source=source, key="rope_scaling")
        scaling[key] = params[key]
    return theta, scaling


def from_hf_config(config_dict: dict, source: str) -> ModelConfig:
    """A `ModelConfig` from a HF `config.json` mapping; anything we would compute differently is
    a one-line `ConfigError` naming `source` (the file) and the key."""
    qk_norm = _check_model_type(config_dict, source)
    for key in ("attention_bias", "mlp_bias"):
        if config_dict.get(key, False):
            raise ConfigError("biases are not supported (minilab's Llama has none)", source=source, key=key)
    act = config_dict.get("hidden_act", "silu")
    if act not in ("silu", "swish"):  # transformers maps both names to SiLU
        raise ConfigError(f"activation {act!r} is not supported (silu only)", source=source, key="hidden_act")
    tie = config_dict.get("tie_word_embeddings", False)
    if not isinstance(tie, bool):
        raise ConfigError(f"expected true or false, got {tie!r}", source=source, key="tie_word_embeddings")
    n_head = _require(config_dict, "num_attention_heads", source)
    d_model = _require(config_dict, "hidden_size", source)
    theta, scaling = _rope_from_hf(config_dict, source)
    cfg = ModelConfig(
        vocab_size=_require(config_dict, "vocab_size", source),
        n_layer=_require(config_dict, "num_hidden_layers", source),
        n_head=n_head,
        n_kv_head=config_dict.get("num_key_value_heads") or n_head,
        d_model=d_model,
        head_dim=config_dict.get("head_dim") or d_model // n_head,
        intermediate_size=_require(config_dict, "intermediate_size", source),
        max_seq_len=config_dict.get("max_position_embeddings", 2048),
        rope_theta=theta, rope_scaling=scaling,
        norm_eps=float(config_dict.get("rms_norm_eps", 1e-6)),
        tie_embeddings=tie,
        qk_norm=qk_norm,
        init_std=float(config_dict.get("initializer_range", 0.02)),
    )
    try:
        cfg.validate()
    except ConfigError as e:
        raise ConfigError(str(e), source=source) from None
    return cfg


# ---- export -------------------------------------------------------------------------------------
def _copy_tokenizer(tokenizer_dir: Path, out: Path, ids: dict[str, int], max_len: int) -> None:
    """Copy every plain file of `tokenizer_dir`; add a minimal tokenizer_config.json if there is
    none, so `AutoTokenizer.from_pretrained(out)` works on the export."""
    if not tokenizer_dir.is_dir():
        raise MinilabError(f"{tokenizer_dir}: tokenizer directory not found")
    for f in sorted(tokenizer_dir.iterdir()):
        if f.is_file() and not f.name.startswith(".") and f.name not in _MODEL_FILES:
            shutil.copy2(f, out / f.name)
    if (out / "tokenizer.json").is_file() and not (out / "tokenizer_config.json").is_file():
        tok = load_tokenizer(out, verify=False)  # a copy of the one read above
        cfg: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_len}
        for key, tid in ids.items():
            cfg[key.removesuffix("_id")] = tok.id_to_token(tid)
        write_json_atomic(out / "tokenizer_config.json", cfg)


def _write_extra(out: Path, name: str, content: Any) -> None:
    if not name or Path(name).is_absolute() or ".." in Path(name).parts or name in _MODEL_FILES:
        raise MinilabError(f"extra file name {name!r} must be a relative path that is not a model file")
    target = out / name
    target.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, Path):
        shutil.copy2(content, target)
    elif isinstance(content, bytes):
        target.write_bytes(content)
    elif isinstance(content, str):
        target.write_text(content, encoding="utf-8")
    else:  # dicts, lists: JSON
        target.write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def save_hf_dir(model: Transformer, out_dir: str | Path, *, tokenizer_dir: str | Path | None = None,
                dtype: torch.dtype | str | None = None, extra_files: dict[str, Any] | None = None,
                overwrite: bool = False) -> Path:
    """Write `model` as a standard `LlamaForCausalLM` directory (with QK-norm: `Qwen3ForCausalLM`):
    config.json, model.safetensors, generation_config.json, tokenizer files, atomically (a failure
    leaves no half directory).

    `dtype` converts the weights (default: as they are). `extra_files` maps relative names to
    str/bytes/Path (copied)/JSON-able content. A tied head is stored once, as transformers does.
    """
    from safetensors.torch import save_file

    if not isinstance(model, Transformer):
        raise TypeError(f"save_hf_dir expects a minilab Transformer, got {type(model).__name__} "
                        "(merge LoRA adapters first with merge_and_unload())")
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise MinilabError(f"{out} already exists; pass --force to replace it, or choose another output directory")
    cfg = model.config
    target = resolve_dtype(dtype)
    tensors: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        if cfg.tie_embeddings and name == "lm_head.weight":
            continue  # tied: transformers stores only model.embed_tokens.weight
        t = t.detach().to("cpu")
        tensors[name] = (t.to(target) if target is not None else t).contiguous()
    stored = target or next(iter(tensors.values())).dtype
    tok_dir = Path(tokenizer_dir) if tokenizer_dir is not None else None
    ids = special_token_ids(tok_dir) if tok_dir is not None else {}

    hf_cfg = to_hf_config(cfg)
    for key, value in ids.items():
        setattr(hf_cfg, key, value)
    config = json.loads(hf_cfg.to_json_string(use_diff=True))
    config.update(architectures=[HF_CLASSES[cfg.architecture]], model_type=cfg.architecture, dtype=_dtype_name(stored))
    gen = {"_from_model_config": True, **ids, "transformers_version": config.get("transformers_version")}
    with atomic_dir(out, overwrite=overwrite) as tmp:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        write_json_atomic(tmp / "config.json", config)
        write_json_atomic(tmp / "generation_config.json", gen)
        if tok_dir is not None:
            _copy_tokenizer(tok_dir, tmp, ids, cfg.max_seq_len)
        for name, content in (extra_files or {}).items():
            _write_extra(tmp, name, content)
    return out


# ---- import -------------------------------------------------------------------------------------
def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """torch.dtype from a dtype or its name ('bfloat16', 'torch.float16'); None and 'auto' -> None."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).removeprefix("torch.")
    if name == "auto":
        return None
    value = getattr(torch, name, None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise ConfigError(f"unknown floating-point dtype {dtype!r} (e.g. float32, bfloat16, float16)",
                          key="dtype")
    return value


def _weight_files(path: Path) -> list[Path]:
    """The weight files of a HF directory, safetensors preferred, shards via their index."""
    for single, index in (("model.safetensors", "model.safetensors.index.json"),
                          ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        if (path / single).is_file():
            return [path / single]
        if (path / index).is_file():
            try:
                weight_map = json.loads((path / index).read_text(encoding="utf-8"))["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise MinilabError(f"{path / index}: not a valid shard index ({e})") from None
            shards = [path / str(name) for name in sorted(set(weight_map.values()))]
            for shard in shards:
                if shard.parent != path:  # a shard name like ../x would read outside the model dir
                    raise MinilabError(f"{path / index}: shard name {shard.name!r} is not a plain file name")
                if not shard.is_file():
                    raise MinilabError(f"{shard}: shard listed in {index} is missing")
            return shards
    raise MinilabError(f"{path}: no weights found (expected model.safetensors, a sharded "
                       "model.safetensors.index.json, or pytorch_model.bin)")


def _read_weights(files: list[Path]) -> dict[str, torch.Tensor]:
    """All tensors of `files` on CPU. Never unpickles arbitrary objects."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            if f.name.endswith(".safetensors"):
                part = load_file(str(f), device="cpu")
            else:
                # mmap avoids a second copy in RAM, but only the zip format (torch >= 1.6) supports it.
                part = torch.load(f, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(f))
        except (SafetensorError, OSError, RuntimeError, ValueError, EOFError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise MinilabError(f"{f}: cannot read weights (truncated or corrupt?): {first}") from None
        except pickle.UnpicklingError:  # weights_only met something other than tensors and containers
            raise MinilabError(f"{f}: refusing to load: it pickles objects other than tensors, which could run "
                               "code; convert it to safetensors from a trusted environment") from None
        if not isinstance(part, dict):
            raise MinilabError(f"{f}: expected a mapping of tensor names to tensors")
        tensors.update(part)
    return tensors


def _check_names(model: Transformer, tensors: dict[str, torch.Tensor], where: Path) -> None:
    """Missing/unexpected names and shape mismatches as one line each, naming a few offenders."""
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        expected.pop("lm_head.weight")
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing:
        more = f" (+{len(missing) - 3} more)" if len(missing) > 3 else ""
        raise MinilabError(f"{where}: missing tensors {', '.join(missing[:3])}{more}")
    if unexpected:
        more = f" (+{len(unexpected) - 3} more)" if len(unexpected) > 3 else ""
        raise MinilabError(f"{where}: unexpected tensors {', '.join(unexpected[:3])}{more} "
                           "(not a plain Llama checkpoint?)")
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != tuple(shape):
            raise MinilabError(f"{where}: tensor {name} has shape {tuple(tensors[name].shape)}, "
                               f"config.json implies {tuple(shape)}")


def read_hf_config(path: str | Path) -> ModelConfig:
    """The `ModelConfig` of the HF directory `path` (its config.json)."""
    cfg_file = Path(path) / "config.json"
    if not cfg_file.is_file():
        raise MinilabError(f"{cfg_file}: not found (is {path} a Hugging Face model directory?)")
    return from_hf_config(read_json_object(cfg_file), str(cfg_file))


def load_hf_dir(path: str | Path, *, dtype: torch.dtype | str | None = None,
                device: torch.device | str | None = None) -> Transformer:
    """A `Transformer` from any Llama-architecture (or Qwen3) HF directory, weights exactly as stored.

    `dtype` None keeps the stored dtype (so a round trip is bitwise); `device` defaults to CPU.
    """
    return load_weights_dir(read_hf_config(path), path, dtype=dtype, device=device)


def load_weights_dir(cfg: ModelConfig, path: str | Path, *, dtype: torch.dtype | str | None = None,
                     device: torch.device | str | None = None) -> Transformer:
    """Build `cfg` and fill it with the weights of directory `path` (HF file names and layout).

    The model is built on `meta` and the loaded tensors are assigned, so nothing is initialised
    twice and peak memory is one copy of the weights.
    """
    path = Path(path)
    files = _weight_files(path)
    tensors = _read_weights(files)
    for name in [n for n in tensors if n.endswith(_IGNORED_SUFFIXES)]:
        del tensors[name]
    if cfg.tie_embeddings:
        tensors.pop("lm_head.weight", None)  # transformers ties after loading: the embedding wins
    model = build_model(cfg, device="meta")
    where = files[0] if len(files) == 1 else path
    _check_names(model, tensors, where)
    target, dev = resolve_dtype(dtype), torch.device(device or "cpu")
    tensors = {k: (v.to(target) if target is not None else v).to(dev) for k, v in tensors.items()}
    if cfg.tie_embeddings:
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]
    model.load_state_dict(tensors, strict=True, assign=True)
    if cfg.tie_embeddings:  # assign replaced the Parameter objects: share them again
        model.lm_head.weight = model.model.embed_tokens.weight
    model.inv_freq = rope_inv_freq(cfg).to(dev)  # a buffer left on meta; RoPE angles stay fp32
    return model
