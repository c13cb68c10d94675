"""GGUF export through llama.cpp's own `gguf` package, and the `minilab export` verb.

    minilab export my-model --format gguf --output my-model.gguf [--outtype f16]
    minilab export my-model --adapter adapters/run1 --format hf --output merged/

What goes in the file (architecture `llama`, or `qwen3` for a QK-norm model, as llama.cpp's
`convert_hf_to_gguf.py` writes them):
- the hyperparameters (`llama.*` / `qwen3.*`: context, widths, heads, RMSNorm eps, RoPE base, key/value
  lengths, RoPE scaling: `linear` as type + factor, `llama3` as a `rope_freqs` tensor);
- the tokenizer: byte-level BPE as `tokenizer.ggml.model = gpt2` with the GPT-2 pre-tokenizer, the
  vocabulary in id order with token types (special tokens CONTROL), the merges, bos/eos/unk/pad
  and the end-of-turn token (`eot_token_id`), and the chat template, so `llama-cli -cnv` and
  Ollama chat with the model's own format;
- the tensors under llama.cpp's names (`blk.N.attn_q.weight`, ...). A tied head is not written:
  llama.cpp uses `token_embd` as the output when `output.weight` is absent.

**For `llama`, Q and K are permuted.** Our weights (like transformers') use the rotate-half RoPE
layout, where a head's dimension i is paired with i + hd/2. llama.cpp's LLAMA RoPE rotates adjacent
pairs (2i, 2i+1), the layout of Meta's original checkpoints. `permute_qk` reorders each head's
output rows from the first layout to the second: exactly llama.cpp's `LlamaModel.permute`
(reshape(n_head, 2, hd/2, in) -> swapaxes(1, 2) -> reshape). llama.cpp runs `qwen3` with NEOX
RoPE, which is rotate-half: its Q and K go unpermuted (and its per-head q/k norms, which act
before RoPE, must not be permuted either), as `convert_hf_to_gguf.py` writes Qwen3.
`tests/test_export.py` checks both by running the GGUF tensors through an independent numpy
forward pass with the architecture's RoPE and comparing the logits with ours.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from minilab.config import models_dir_field, recipe_output_dir_field
from minilab.errors import ConfigError, MinilabError
from minilab.fsutil import read_json_if_present
from minilab.owned import EXPORT_MARKER, check_output
from minilab.stage import Stage, weights_estimate

GGUF_MAGIC = b"GGUF"  # the first 4 bytes of every GGUF file

log = logging.getLogger("minilab.export")

_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight", "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight", "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight", "self_attn.k_norm.weight": "attn_k_norm.weight"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "minilab_tokenizer.json",
                   "chat_template.jinja")
_TOP_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
              "lm_head.weight": "output.weight"}


@dataclass
class ExportStageConfig:
    """`minilab export` as a recipe stage: a GGUF file in the stage's folder, or the folder (`stage_output`)."""

    model: str = field(default="", metadata={"help": "model to export: ${merge}, a directory or a registry name"})
    output_dir: str = recipe_output_dir_field()
    format: Literal["gguf", "hf"] = field(default="gguf", metadata={"help": "gguf file or transformers directory"})
    outtype: Literal["f32", "f16"] = field(default="f32", metadata={"help": "gguf: weight matrices' type"})
    dtype: str | None = field(default=None, metadata={"help": "hf: weights dtype (default as stored)"})
    adapter: str | None = field(default=None, metadata={"help": "PEFT adapters merged in first"})
    check: bool = field(default=True, metadata={
        "help": "hf: prove transformers loads the export with our logits; gguf: read it back with gguf's reader"})
    models_dir: str | None = models_dir_field(": where model names are looked up", recipe_stage=True)

    def validate(self) -> None:
        if not self.model:
            raise ConfigError("required: the model to export (e.g. ${merge})", key="model")


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Rotate-half (HF) row layout -> adjacent-pair (llama.cpp / Meta) layout, per head. w: (n_head*hd, in)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """The inverse of `permute_qk`."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_name(name: str) -> str:
    """llama.cpp's tensor name for one of ours (`model.layers.3.mlp.up_proj.weight` -> `blk.3.ffn_up.weight`)."""
    if name in _TOP_NAMES:
        return _TOP_NAMES[name]
    parts = name.split(".")
    if parts[:2] == ["model", "layers"] and ".".join(parts[3:]) in _LAYER_NAMES:
        return f"blk.{parts[2]}.{_LAYER_NAMES['.'.join(parts[3:])]}"
    raise MinilabError(f"no GGUF name for tensor {name}")


def gguf_tensors(model: Any, outtype: str = "f32") -> dict[str, np.ndarray]:
    """llama.cpp name -> array, Q/K permuted for `llama`; matrices in `outtype`, norms always f32."""
    cfg = model.config
    permute = cfg.architecture == "llama"  # qwen3 is NEOX (rotate-half) RoPE in llama.cpp: as ours
    out: dict[str, np.ndarray] = {}
    for name, t in model.state_dict().items():
        if cfg.tie_embeddings and name == "lm_head.weight":
            continue
        a = t.detach().float().cpu().numpy()
        if permute and name.endswith("q_proj.weight"):
            a = permute_qk(a, cfg.n_head)
        elif permute and name.endswith("k_proj.weight"):
            a = permute_qk(a, cfg.n_kv_head)
        if outtype == "f16" and a.ndim == 2:
            a = a.astype(np.float16)
        out[gguf_name(name)] = np.ascontiguousarray(a)
    if (cfg.rope_scaling or {}).get("rope_type") == "llama3":
        from minilab.model import rope_inv_freq

        plain = rope_inv_freq(cfg.replace(rope_scaling=None))
        out["rope_freqs.weight"] = (plain / rope_inv_freq(cfg)).float().numpy()  # llama.cpp divides by these
    return out


# ---- tokenizer -----------------------------------------------------------------------------------
def tokenizer_metadata(model_dir: Path, vocab_size: int) -> dict[str, Any]:
    """Vocabulary, token types, merges, special ids and chat template of a byte-level BPE tokenizer."""
    from gguf import TokenType

    from minilab.tokenization import CHAT_END, tokenizer_json

    tok_json = tokenizer_json(model_dir)
    if not tok_json:
        raise MinilabError(f"{model_dir}: no tokenizer.json to put in the GGUF file")
    bpe, pre = tok_json.get("model", {}), tok_json.get("pre_tokenizer") or {}
    if bpe.get("type") != "BPE" or pre.get("type") != "ByteLevel" or not pre.get("use_regex", True) \
            or tok_json.get("normalizer"):
        raise MinilabError(f"{model_dir}: GGUF export supports byte-level BPE tokenizers with the GPT-2 "
                           f"pre-tokenizer and no normalizer (this one: model {bpe.get('type')}, pre-tokenizer "
                           f"{pre.get('type')}); llama.cpp would tokenize others differently")
    id_to_tok = {i: t for t, i in bpe["vocab"].items()}
    added = {a["id"]: a for a in tok_json.get("added_tokens", [])}
    for i, a in added.items():
        id_to_tok[i] = a["content"]
    tokens, types = [], []
    for i in range(vocab_size):  # a model vocab padded beyond the tokenizer gets unused placeholders
        if i in id_to_tok:
            tokens.append(id_to_tok[i])
            a = added.get(i)
            types.append(TokenType.CONTROL if a and a.get("special") else
                         TokenType.USER_DEFINED if a else TokenType.NORMAL)
        else:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in bpe.get("merges", [])]
    cfg = read_json_if_present(model_dir / "tokenizer_config.json")
    meta = read_json_if_present(model_dir / "minilab_tokenizer.json")
    ids = {}
    for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
        name = cfg.get(key)
        name = name.get("content") if isinstance(name, dict) else name
        if name is not None and name in tokens:
            ids[key] = tokens.index(name)
    eot = meta.get("chat_end_token") or (CHAT_END if CHAT_END in tokens else None)
    if eot in tokens:
        ids["eot_token"] = tokens.index(eot)
    return {"tokens": tokens, "types": types, "merges": merges, "ids": ids,
            "chat_template": cfg.get("chat_template"),
            "add_bos": bool(cfg.get("add_bos_token", False)), "add_eos": bool(cfg.get("add_eos_token", False))}


def write_gguf(model: Any, model_dir: Path, out: Path, *, name: str, outtype: str = "f32") -> Path:
    """Write `model` (its tokenizer read from `model_dir`) as a llama.cpp GGUF file, atomically."""
    import gguf

    from minilab.fsutil import atomic_path

    if outtype not in ("f32", "f16"):
        raise MinilabError(f"--outtype must be f32 or f16, got {outtype!r}")
    cfg = model.config
    tok = tokenizer_metadata(model_dir, cfg.vocab_size)
    with atomic_path(out) as tmp:
        w = gguf.GGUFWriter(str(tmp), cfg.architecture)  # the keys below are written as `<arch>.*`
        w.add_name(name)
        w.add_file_type(gguf.LlamaFileType.ALL_F32 if outtype == "f32" else gguf.LlamaFileType.MOSTLY_F16)
        w.add_vocab_size(cfg.vocab_size)
        w.add_context_length(cfg.max_seq_len)
        w.add_embedding_length(cfg.d_model)
        w.add_block_count(cfg.n_layer)
        w.add_feed_forward_length(cfg.intermediate_size)
        w.add_head_count(cfg.n_head)
        w.add_head_count_kv(cfg.n_kv_head)
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
        w.add_rope_dimension_count(cfg.head_dim)
        w.add_rope_freq_base(float(cfg.rope_theta))
        w.add_layer_norm_rms_eps(float(cfg.norm_eps))
        scaling = cfg.rope_scaling or {}
        if scaling.get("rope_type") == "linear":
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(float(scaling["factor"]))
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("gpt-2")
        w.add_token_list(tok["tokens"])
        w.add_token_types(tok["types"])
        w.add_token_merges(tok["merges"])
        for key, tid in tok["ids"].items():
            getattr(w, f"add_{key}_id")(tid)
        w.add_add_bos_token(tok["add_bos"])
        w.add_add_eos_token(tok["add_eos"])
        if tok["chat_template"]:
            w.add_chat_template(tok["chat_template"])
        for tname, array in gguf_tensors(model, outtype).items():
            w.add_tensor(tname, array)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return out


# ---- the `export` verb ---------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    from minilab.cliargs import flag

    p.add_argument("model", metavar="MODEL", help="registry name or model directory")
    p.add_argument("--format", choices=["gguf", "hf"], required=True,
                   help="gguf: one llama.cpp/Ollama file; hf: a transformers LlamaForCausalLM directory "
                   "(Qwen3ForCausalLM for a qk_norm model)")
    p.add_argument("--output", "-o", required=True, help="output file (gguf) or directory (hf)")
    p.add_argument("--adapter", metavar="DIR", help="PEFT adapters merged into the weights first")
    p.add_argument("--outtype", choices=["f32", "f16"], default="f32", help="gguf: weight matrices' type")
    p.add_argument("--dtype", default=None, help="hf: weights dtype (float32, bfloat16, float16; default as stored)")
    flag(p, "--force", action="store_true", help="replace an existing output")


def check_gguf_output(out: Path, force: bool) -> None:
    """A GGUF output is one file: an existing one is replaced only with `force` and only when it is
    a GGUF file (its first 4 bytes are b'GGUF'); a folder, a link or any other file never is."""
    if not (out.exists() or out.is_symlink()):
        return
    if not force:
        raise MinilabError(f"{out} already exists; pass --force to replace it, or choose another --output")
    try:
        with open(out, "rb") as f:
            magic = f.read(4)
    except OSError:
        magic = b""
    if out.is_symlink() or not out.is_file() or magic != GGUF_MAGIC:
        raise MinilabError(f"{out}: not a GGUF file, so --force does not replace it; remove it yourself or "
                           "choose another --output")


def export_model(model_ref: str, fmt: str, output: str | Path, *, adapter: str | None = None, outtype: str = "f32",
                 dtype: str | None = None, force: bool = False, registry_root: str | None = None) -> tuple[Path, int]:
    """Export `model_ref` (registry name or directory) as one GGUF file or a transformers
    directory at `output`; returns (path, bytes written)."""
    from minilab.fsutil import dir_size
    from minilab.loading import load_model_for_inference
    from minilab.registry import resolve_model_dir

    src = resolve_model_dir(model_ref, registry_root)
    out = Path(output)
    if fmt == "gguf":
        check_gguf_output(out, force)
    else:
        check_output(out, force, {"export"}, reading=(src, *([adapter] if adapter else [])), flag="--output")
    model = load_model_for_inference(model_ref, adapter_dir=adapter, registry_root=registry_root)
    if getattr(model, "quantization", None):
        raise MinilabError(f"{model_ref} is an int8 model; export its float parent instead")
    if fmt == "gguf":
        name = src.resolve().name if Path(model_ref).exists() else model_ref
        write_gguf(model, src, out, name=name, outtype=outtype)
        return out, out.stat().st_size
    from minilab.hf import save_hf_dir

    with tempfile.TemporaryDirectory() as tmp:  # the tokenizer files only, not the registry manifest
        tok_dir = Path(tmp)
        for f in TOKENIZER_FILES:
            if (src / f).is_file():
                shutil.copy2(src / f, tok_dir / f)
        save_hf_dir(model, out, tokenizer_dir=tok_dir if any(tok_dir.iterdir()) else None, dtype=dtype,
                    overwrite=force, extra_files={EXPORT_MARKER: {"kind": "minilab.export", "format": "hf",
                                                                  "source": str(src.resolve())}})
    return out, dir_size(out)


def main(args: argparse.Namespace) -> int:
    from minilab.fsutil import human_bytes

    out, size = export_model(args.model, args.format, args.output, adapter=args.adapter, outtype=args.outtype,
                             dtype=args.dtype, force=args.force)
    print(f"{out} ({args.format}, {human_bytes(size)})")
    return 0


# ---- the recipe stage ---------------------------------------------------------------------------
def stage_output(stage_dir: Path, config: dict[str, Any]) -> Path:
    """A GGUF export is one file in the stage's folder; an hf export is the folder."""
    return stage_dir / "model.gguf" if config.get("format", "gguf") == "gguf" else stage_dir


def _run_stage(cfg: ExportStageConfig) -> dict[str, Any]:
    stage_dir = Path(cfg.output_dir)
    out = stage_output(stage_dir, {"format": cfg.format})
    stage_dir.mkdir(parents=True, exist_ok=True)
    path, size = export_model(cfg.model, cfg.format, out, adapter=cfg.adapter, outtype=cfg.outtype,
                              dtype=cfg.dtype, force=True, registry_root=cfg.models_dir)
    result: dict[str, Any] = {"format": cfg.format, "path": str(path), "bytes": size}
    if cfg.check and cfg.format == "hf":
        result["transformers_max_abs_diff"] = transformers_parity(path)
    elif cfg.check:
        from gguf import GGUFReader

        result["gguf_tensors"] = len(GGUFReader(str(path)).tensors)
    return result


def transformers_parity(model_dir: Path) -> float:
    """Max |logits difference| between our model and transformers' on the exported directory."""
    import torch
    from transformers import AutoModelForCausalLM

    from minilab.loading import load_model_for_inference

    ours = load_model_for_inference(model_dir, dtype="float32")
    theirs = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    x = torch.randint(0, ours.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (ours(x) - theirs(x).logits).abs().max().item()
    if diff > 1e-4:
        raise MinilabError(f"{model_dir}: transformers' logits differ from ours by {diff:.2e} (> 1e-4)")
    return diff


def _metric(r: dict[str, Any], cfg: ExportStageConfig) -> str:
    from minilab.fsutil import human_bytes

    extra = ""
    if "transformers_max_abs_diff" in r:
        extra = f", transformers parity {r['transformers_max_abs_diff']:.1e}"
    elif "gguf_tensors" in r:
        extra = f", {r['gguf_tensors']} tensors read back"
    return f"{r['format']} {human_bytes(r['bytes'])}{extra}"


def _estimate(ctx: Any, cfg: ExportStageConfig) -> dict[str, Any]:
    return weights_estimate(ctx, cfg.model, 2 if cfg.outtype == "f16" else 4)


STAGE = Stage("export", ExportStageConfig, run=_run_stage, metric=_metric, output=stage_output, model_input="model",
              estimate=_estimate)
