"""The recipe's disk and memory estimate (`minilab run RECIPE --dry-run`), from the planner.

Training stages (pretrain, sft, dpo) get the planner's peak memory and the bytes their
checkpoints, logs and final model take; data stages are estimated from their inputs
(sources' sizes, the corpus' approximate token count); merge, export and quantize from the
model's parameter count. Models are built on the `meta` device: nothing is allocated. A value
that cannot be known before an upstream stage runs (a hub dataset's size) is shown as unknown.

Each stage kind estimates itself (`Stage.estimate`, in its own module); this module gives it the
`Context` to ask the rest of the recipe through, adds the rows up and prints the verdict.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from minilab.recipe.spec import Recipe, placeholder
from minilab.recipe.stages import build_config
from minilab.stage import get as get_stage

log = logging.getLogger("minilab.recipe")


class Context:
    """What a stage's estimate may ask about the rest of the recipe (`Stage.estimate(ctx, cfg)`):
    facts about folders that an earlier stage will write, and the models stages read or write,
    answered from the files once they exist, else from the recipe stages that will write them."""

    def __init__(self, recipe: Recipe, cfgs: dict[str, Any]):
        self.recipe, self.cfgs = recipe, cfgs

    def _planned(self, folder: str, key: str):
        """The recipe stage that writes `folder` and declares `key` among its output facts."""
        return next((s for s in self.recipe.stages if key in get_stage(s.kind).output_facts
                     and str(self.recipe.stage_dir(s.name)) == str(folder)), None)

    def vocab_of(self, tokenizer_dir: str) -> int:
        """The vocabulary size of a tokenizer folder, or of the recipe stage that will write it."""
        recipe = self.recipe
        tok = Path(tokenizer_dir) / "tokenizer.json"
        if tok.is_file():
            from minilab.tokenization import load_tokenizer

            return load_tokenizer(tok).get_vocab_size()
        for s in recipe.stages:
            st = get_stage(s.kind)
            if "vocab_size" in st.output_facts and str(recipe.stage_dir(s.name)) == str(tokenizer_dir):
                return int(s.config.get("vocab_size", 32768))
            # a training stage's output holds the tokenizer it was given
            if st.trains and str(tokenizer_dir).startswith(str(recipe.stage_dir(s.name))):
                return self.vocab_of(str(s.config.get("tokenizer_dir", "")))
        return 32768

    def packed_seq_len(self, packed_dir: str) -> int:
        m = Path(packed_dir) / "manifest.json"
        if m.is_file():
            return int(json.loads(m.read_text(encoding="utf-8")).get("seq_len", 1024))
        stage = self._planned(packed_dir, "seq_len")
        return int(stage.config.get("seq_len", 1024)) if stage is not None else 1024

    def finetune_seq_len(self, data_dirs: list[str]) -> int:
        """The longest row of SFT/DPO data (what the run pads its batches to): from the datasets'
        manifests once they exist, else from the recipe stages that will write them."""
        lengths = []
        for d in data_dirs:
            m = Path(d) / "manifest.json"
            if m.is_file():
                lengths.append(int(json.loads(m.read_text(encoding="utf-8")).get("max_len", 512)))
                continue
            stage = self._planned(d, "max_len")
            lengths.append(int(stage.config.get("max_len", 512)) if stage is not None else 512)
        return max(lengths, default=512)

    def meta_model(self, ref: str):
        """The model a stage reads (an upstream stage's output, or any model the planner resolves), on meta."""
        recipe = self.recipe
        for s in recipe.stages:
            st = get_stage(s.kind)
            if ref != str(st.output_path(recipe.stage_dir(s.name), s.config)):
                continue
            cfg = self.cfgs.get(s.name)
            if st.meta_model is not None and cfg is not None:
                return st.meta_model(self, cfg)
            if st.model_input is not None and cfg is not None:
                base = getattr(cfg, st.model_input, None)
                return self.meta_model(base) if base else None
        from minilab.planner.resolve import build_meta, resolve_model

        return build_meta(resolve_model(ref, recipe.models_dir))

    @staticmethod
    def target(device: str) -> str:
        """Where a stage's config runs it: cuda, or cpu (`auto` is cuda when this machine has one)."""
        if device == "auto":
            import torch

            return "cuda" if torch.cuda.is_available() else "cpu"
        return "cuda" if device.startswith("cuda") else "cpu"


def estimate(recipe: Recipe, steps) -> dict[str, Any]:
    """Per-stage estimates for the stages that will run, and the totals."""
    cfgs = {}
    for s in recipe.stages:
        cfgs[s.name], _ = build_config(recipe, s, lambda ref, attr: placeholder(recipe, ref, attr), str(recipe.path))
    ctx = Context(recipe, cfgs)
    rows = []
    for st in steps:
        if st.action not in ("run", "resume"):
            continue
        try:
            e = get_stage(st.stage.kind).plan(ctx, cfgs[st.stage.name])
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
