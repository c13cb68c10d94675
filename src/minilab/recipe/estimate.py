"""The recipe's disk and memory estimate (`minilab run RECIPE --dry-run`), from the planner.

Training stages (pretrain, sft, dpo) get the planner's peak memory and the bytes their
checkpoints, logs and final model take; data stages are estimated from their inputs
(sources' sizes, the corpus' approximate token count); merge, export and quantize from the
model's parameter count. Models are built on the `meta` device: nothing is allocated. A value
that cannot be known before an upstream stage runs (a hub dataset's size) is shown as unknown.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from minilab.recipe.spec import Recipe, placeholder
from minilab.recipe.stages import KINDS, build_config

log = logging.getLogger("minilab.recipe")


def _vocab_of(recipe: Recipe, tokenizer_dir: str) -> int:
    """The vocabulary size of a tokenizer folder, or of the recipe stage that will write it."""
    tok = Path(tokenizer_dir) / "tokenizer.json"
    if tok.is_file():
        from minilab.tokenization import load_tokenizer

        return load_tokenizer(tok).get_vocab_size()
    for s in recipe.stages:
        if s.kind == "tokenizer" and str(recipe.stage_dir(s.name)) == str(tokenizer_dir):
            return int(s.config.get("vocab_size", 32768))
        if s.kind in ("pretrain", "sft", "dpo") and str(tokenizer_dir).startswith(str(recipe.stage_dir(s.name))):
            return _vocab_of(recipe, str(s.config.get("tokenizer_dir", "")))
    return 32768


def _packed_seq_len(recipe: Recipe, packed_dir: str) -> int:
    m = Path(packed_dir) / "manifest.json"
    if m.is_file():
        return int(json.loads(m.read_text(encoding="utf-8")).get("seq_len", 1024))
    for s in recipe.stages:
        if s.kind == "pack" and str(recipe.stage_dir(s.name)) == str(packed_dir):
            return int(s.config.get("seq_len", 1024))
    return 1024


def _finetune_seq_len(recipe: Recipe, data_dirs: list[str]) -> int:
    """The longest row of SFT/DPO data (what the run pads its batches to): from the datasets'
    manifests once they exist, else from the recipe stages that will write them."""
    lengths = []
    for d in data_dirs:
        m = Path(d) / "manifest.json"
        if m.is_file():
            lengths.append(int(json.loads(m.read_text(encoding="utf-8")).get("max_len", 512)))
            continue
        stage = next((s for s in recipe.stages if s.kind in ("sft-data", "dpo-data")
                      and str(recipe.stage_dir(s.name)) == str(d)), None)
        lengths.append(int(stage.config.get("max_len", 512)) if stage is not None else 512)
    return max(lengths, default=512)


def _meta_model(recipe: Recipe, ref: str, cfgs: dict[str, Any]):
    """The model a stage reads (an upstream pretrain's output, or any model the planner resolves), on meta."""
    from minilab.model import build_model

    for s in recipe.stages:
        out = str(KINDS[s.kind].output_path(recipe.stage_dir(s.name), s.config))
        if ref != out:
            continue
        cfg = cfgs.get(s.name)
        if s.kind == "pretrain" and cfg is not None:
            from minilab.pretrain import build_run_model

            seq = cfg.seq_len or _packed_seq_len(recipe, cfg.data_dirs[0])
            return build_model(build_run_model(cfg, _vocab_of(recipe, cfg.tokenizer_dir), seq), "meta")
        if s.kind in ("sft", "dpo", "merge", "export", "quantize") and cfg is not None:
            base = getattr(cfg, "base_model", None) or getattr(cfg, "model", None)
            return _meta_model(recipe, base, cfgs) if base else None
    from minilab.planner.resolve import build_meta, resolve_model

    return build_meta(resolve_model(ref, recipe.models_dir))


def _target(device: str) -> str:
    """Where a stage's config runs it: cuda, or cpu (`auto` is cuda when this machine has one)."""
    if device == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return "cuda" if device.startswith("cuda") else "cpu"


def _sources_bytes(cfg: Any) -> int | None:
    from minilab.fsutil import dir_size

    total = 0
    for src in cfg.sources:
        p = Path(getattr(src, "path", src) or "")
        if not p.exists():
            return None  # the built-in default or a hub dataset: known once fetched
        total += p.stat().st_size if p.is_file() else dir_size(p)
    return total


def stage_estimate(recipe: Recipe, s, cfg: Any, cfgs: dict[str, Any]) -> dict[str, Any]:
    """{"disk": bytes | None, "memory": bytes | None, "note": str} for one stage."""
    from minilab.planner.anatomy import inspect_model

    kind = s.kind
    if kind == "corpus":
        return {"disk": _sources_bytes(cfg), "memory": None, "note": "about the size of the sources"}
    if kind == "tokenizer":
        return {"disk": cfg.vocab_size * 120, "memory": None, "note": "tokenizer.json"}
    if kind == "pack":
        m = Path(cfg.corpus_dir) / "manifest.json"
        if m.is_file():
            tokens = int(json.loads(m.read_text(encoding="utf-8")).get("approx_tokens", 0))
            return {"disk": tokens * 2, "memory": None, "note": f"~{tokens:,} tokens x 2 bytes"}
        return {"disk": None, "memory": None, "note": "known once the corpus exists"}
    if kind == "pretrain":
        from minilab.planner.disk import estimate_pretrain

        model = _meta_model(recipe, str(recipe.stage_dir(s.name) / "final"), cfgs)
        seq = cfg.seq_len or _packed_seq_len(recipe, cfg.data_dirs[0])
        est = estimate_pretrain(model, cfg.batch_size, seq, cfg.precision, cfg.keep_last, cfg.max_steps,
                                cfg.ckpt_every, target=_target(cfg.device))
        return {"disk": est["disk"], "memory": est["memory"], "device": _target(cfg.device),
                "note": f"{est['params'] / 1e6:.1f} M params"}
    if kind in ("sft", "dpo"):
        from minilab.finetune.common import planner_settings
        from minilab.planner.disk import estimate_finetune

        model = _meta_model(recipe, cfg.base_model, cfgs)
        if model is None:
            return {"disk": None, "memory": None, "note": "base model unknown"}
        an = inspect_model(model)
        target = _target(cfg.device)
        seq = _finetune_seq_len(recipe, cfg.data_dirs)
        settings = planner_settings(cfg, base16=False, model_type=getattr(model.config, "model_type", "llama"))
        est = estimate_finetune(an, batch_size=cfg.batch_size * (2 if kind == "dpo" else 1), seq_len=seq,
                                keep_last=cfg.keep_last, target=target, **settings)
        return {"disk": est["disk"], "memory": est["memory"], "device": target,
                "note": f"{cfg.method}, base {an.params / 1e6:.1f} M params"}
    if kind in ("merge", "export", "quantize"):
        model = _meta_model(recipe, cfg.model, cfgs)
        if model is None:
            return {"disk": None, "memory": None, "note": ""}
        params = sum(p.numel() for p in model.parameters())
        per = 1 if kind == "quantize" else (2 if getattr(cfg, "outtype", "f32") == "f16" else 4)
        return {"disk": params * per, "memory": params * 4 * 2, "note": f"{params / 1e6:.1f} M params"}
    return {"disk": None, "memory": None, "note": ""}


def estimate(recipe: Recipe, steps) -> dict[str, Any]:
    """Per-stage estimates for the stages that will run, and the totals."""
    cfgs = {}
    for s in recipe.stages:
        cfgs[s.name], _ = build_config(recipe, s, lambda ref, attr: placeholder(recipe, ref, attr), str(recipe.path))
    rows = []
    for st in steps:
        if st.action not in ("run", "resume"):
            continue
        try:
            e = stage_estimate(recipe, st.stage, cfgs[st.stage.name], cfgs)
        except Exception as err:  # an estimate must never stop a dry run
            log.debug("estimate of %s failed", st.stage.name, exc_info=True)
            e = {"disk": None, "memory": None, "note": f"not estimated ({type(err).__name__}: {err})"[:100]}
        rows.append({"stage": st.stage.name, "kind": st.stage.kind, **e})
    disk = sum(r["disk"] or 0 for r in rows)
    peak = {dev: max((r["memory"] or 0 for r in rows if r.get("device", "cpu") == dev), default=0)
            for dev in ("cpu", "cuda")}
    unknown = [r["stage"] for r in rows if r["disk"] is None]
    return {"stages": rows, "disk": disk, "peak_memory": peak["cpu"], "peak_gpu_memory": peak["cuda"],
            "unknown_disk": unknown}


def print_estimate(est: dict[str, Any], workdir: Path) -> None:
    from minilab.fsutil import human_bytes
    from minilab.planner.machine import available_ram, free_disk, free_vram
    from minilab.recipe.summary import print_table

    if not est["stages"]:
        print("\nnothing to run: every stage is cached")
        return
    print("\nestimate (planner; stages that will run):")
    hb = lambda v: human_bytes(v) if v is not None else "unknown"  # noqa: E731
    print_table(["stage", "kind", "disk", "peak memory", "note"],
                [[r["stage"], r["kind"], hb(r["disk"]), hb(r["memory"]), r["note"]] for r in est["stages"]])
    probe, free = free_disk(workdir)
    ram, vram = available_ram(), free_vram()
    unknown = f" + unknown for {', '.join(est['unknown_disk'])}" if est["unknown_disk"] else ""
    print(f"\ndisk: {human_bytes(est['disk'])}{unknown} to write; {human_bytes(free)} free at {probe}")
    print(f"memory: peak {human_bytes(est['peak_memory'])} of RAM (the largest CPU stage; stages run one at a time); "
          f"{human_bytes(ram) if ram else 'unknown'} available")
    short = []
    if est["peak_gpu_memory"]:
        have = f"{human_bytes(vram)} free" if vram is not None else "no CUDA GPU on this machine"
        print(f"GPU memory: peak {human_bytes(est['peak_gpu_memory'])} (the largest CUDA stage); {have}")
        if vram is not None and est["peak_gpu_memory"] > vram:
            short.append("GPU memory")
    if est["disk"] > free:
        short.append("disk")
    if ram and est["peak_memory"] > ram:
        short.append("memory")
    caveat = " (for the stages that could be estimated)" if unknown else ""
    print(f"verdict: {'does not fit: ' + ' and '.join(short) + ' short' if short else 'fits' + caveat}")
