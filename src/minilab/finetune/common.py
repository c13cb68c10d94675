"""What the SFT and DPO loops share: the model being tuned, its checkpoints, its eval generations,
and writing the result into the registry.

`Tuning` is composition, not a base class: each loop (sft.py, dpo.py) owns its steps and calls
these pieces. Checkpoints hold only the trainable parameters (`TrainableView`) with their
optimizer state, RNG states and the data position, so a LoRA checkpoint is megabytes, not a copy
of the frozen base.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from minilab import __version__, distributed
from minilab.config import DEVICE, SEED, models_dir_field, to_dict
from minilab.errors import ConfigError, MinilabError
from minilab.finetune.models import (
    TrainableView,
    apply_method,
    default_targets,
    enable_gradient_checkpointing,
    load_base,
    peft_of,
    peft_target,
)
from minilab.owned import write_run_marker
from minilab.run_skeleton import TrainingRun
from minilab.stage import Stage
from minilab.training import MetricsLog, OptimConfig, check_finite_weights, make_optimizer, optimizer_step

log = logging.getLogger("minilab.finetune")

DEFAULT_PROMPTS = ["Hello, how are you?", "What is your favorite book?", "Tell me a joke."]


@dataclass
class LoraSettings:
    r: int = field(default=8, metadata={"help": "LoRA rank"})
    alpha: int = field(default=16, metadata={"help": "LoRA alpha (scale = alpha / r)"})
    dropout: float = field(default=0.0, metadata={"help": "dropout on the LoRA input"})
    target_modules: list[str] | None = field(default=None, metadata={
        "help": "module names to adapt; default every attention and MLP projection of the architecture"})

    def as_peft(self) -> dict[str, Any]:
        out: dict[str, Any] = {"r": self.r, "lora_alpha": self.alpha, "lora_dropout": self.dropout}
        if self.target_modules:
            out["target_modules"] = list(self.target_modules)
        return out


@dataclass
class TuneConfig:
    """Settings every fine-tuning loop has (SFTConfig and DPOConfig embed these fields; each names
    the verb its `data_dirs` come from), and the checks their `validate` shares."""

    base_model: str = field(default="", metadata={"help": "registry name, model directory, or hub id"})
    output_dir: str = field(default="", metadata={"help": "run directory (checkpoints, metrics, final/)"})
    method: Literal["lora", "qlora", "full"] = field(default="lora", metadata={
        "help": "lora (adapters), qlora (adapters on a 4-bit NF4 base), full (every weight)"})
    lora: LoraSettings = field(default_factory=LoraSettings, metadata={
        "help": "adapter shape for lora and qlora (lora.r, lora.alpha, ...); method=full ignores it"})
    backend: Literal["auto", "minilab", "transformers"] = field(default="auto", metadata={
        "help": "auto: Llama models run as minilab models, others through transformers"})
    dtype: str | None = field(default=None, metadata={"help": "base weights dtype; default as stored"})
    precision: Literal["fp32", "bf16", "fp16"] = field(default="fp32", metadata={
        "help": "fp32, or bf16/fp16 autocast (pure 16-bit when the base weights are 16-bit: see dtype)"})
    gradient_checkpointing: bool | None = field(default=None, metadata={
        "help": "recompute each block's activations in backward (less memory, ~30% slower); "
                "default: on for qlora (as PEFT's prepare_model_for_kbit_training), off otherwise"})
    device: str = field(default="auto", metadata={
        "help": "auto (cuda when available, else cpu), cpu, cuda, cuda:1 ...; under torchrun each rank "
                "uses cuda:LOCAL_RANK", **DEVICE})
    batch_size: int = field(default=8, metadata={
        "help": "examples per micro-batch on each process (SFT: rows; DPO: pairs, each run as chosen + "
                "rejected); also the eval batch size"})
    grad_accum: int = field(default=1, metadata={
        "help": "micro-batches per optimizer step (examples per step = batch_size × grad_accum × processes)"})
    max_steps: int = field(default=200, metadata={
        "help": "optimizer steps in total (a resumed run continues up to it); the lr schedule spans them"})
    eval_every: int = field(default=50, metadata={
        "help": "steps between validation evals (val loss, eval_prompts answers); also before the first "
                "step and after the last"})
    eval_batches: int = field(default=4, metadata={
        "help": "batches of batch_size val examples scored per dataset at each eval (the first ones, the "
                "same every time)", "min": 1})
    ckpt_every: int = field(default=100, metadata={
        "help": "steps between checkpoints (trainable weights + optimizer state); one also after the last step"})
    keep_last: int = field(default=2, metadata={
        "help": "newest checkpoints kept; the one with the best val loss is kept as well"})
    seed: int = field(default=1337, metadata={
        "help": "random seed: adapter initialisation, dropout and the order training rows are drawn in", **SEED})
    eval_prompts: list[str] = field(default_factory=lambda: list(DEFAULT_PROMPTS), metadata={
        "help": "prompts answered (greedy) at every eval, to watch answers improve"})
    max_new_tokens: int = field(default=32, metadata={
        "help": "most tokens generated per eval_prompts answer (greedy; stops earlier at end of turn)"})
    dataset_name: str | None = field(default=None, metadata={"help": "dataset field of the registry name"})
    register: bool = field(default=True, metadata={
        "help": "enter <output_dir>/final into the registry under a generated name; false: only write it"})
    models_dir: str | None = models_dir_field(", also where a base model name is looked up")
    data_dirs: list[str] = field(default_factory=list, metadata={"help": "prepared datasets"})
    data_weights: list[float] | None = field(default=None, metadata={
        "help": "sampling weight per dataset; default proportional to their sizes"})

    def check_required(self) -> None:
        for key in ("base_model", "output_dir", "data_dirs"):
            if not getattr(self, key):
                raise ConfigError("required", key=key)

    def check_positive(self) -> None:
        for key in ("batch_size", "grad_accum", "max_steps", "eval_every", "ckpt_every", "keep_last"):
            if getattr(self, key) <= 0:
                raise ConfigError("must be positive", key=key)


def planner_settings(cfg: TuneConfig, base16: bool, model_type: str,
                     grad_checkpointing: bool | None = None) -> dict[str, Any]:
    """The planner's view of a fine-tuning config (`estimate_finetune`'s method, precision, LoRA
    and checkpointing arguments): autocast is the planner's "-mixed" unless the base weights are
    16-bit themselves; LoRA targets as the run resolves them (None: every linear)."""
    targets = cfg.lora.target_modules or default_targets(model_type)
    if grad_checkpointing is None:
        grad_checkpointing = cfg.method == "qlora" if cfg.gradient_checkpointing is None else cfg.gradient_checkpointing
    return {"method": cfg.method,
            "precision": cfg.precision if cfg.precision == "fp32" or base16 else f"{cfg.precision}-mixed",
            "lora_rank": cfg.lora.r, "lora_targets": None if targets == "all-linear" else list(targets),
            "grad_checkpointing": grad_checkpointing}


class Tuning:
    """The model being fine-tuned with its optimizer, checkpoints and output."""

    def __init__(self, cfg: TuneConfig, optim: OptimConfig, info: distributed.DistInfo, device: torch.device,
                 stage: str):
        from minilab.planner.anatomy import inspect_model
        from minilab.registry import read_manifest

        self.cfg, self.optim, self.info, self.device, self.stage = cfg, optim, info, device, stage
        self.out = Path(cfg.output_dir)
        torch.manual_seed(cfg.seed)  # LoRA init: identical on every rank, reproducible
        # QLoRA loads the full-precision base into host memory: only its 4-bit layers and the rest
        # go to the device (apply_method), so the GPU never holds the base in full precision.
        self.base = load_base(cfg.base_model, backend=cfg.backend, dtype=cfg.dtype, registry_root=cfg.models_dir,
                              device=torch.device("cpu") if cfg.method == "qlora" else device)
        self.base_params = sum(p.numel() for p in self.base.model.parameters())
        self.anatomy = inspect_model(peft_target(self.base))  # for the planner, before any adapter
        self.grad_checkpointing = planner_settings(cfg, False, self.base.model_type)["grad_checkpointing"]
        if self.grad_checkpointing:
            enable_gradient_checkpointing(self.base)
        self.base_manifest = read_manifest(self.base.path)
        self.tokenizer_sha = self.base_manifest.get("tokenizer_sha256") or _fingerprint(self.base.tokenizer_dir)
        self.model = apply_method(self.base, cfg.method, cfg.lora.as_peft(), device)
        self.peft = peft_of(self.model)
        self.optimizer = make_optimizer(self.model, optim, device)
        self.scaler = torch.amp.GradScaler("cuda") if cfg.precision == "fp16" else None
        self.view = TrainableView(self.model)
        self.train_model = distributed.wrap(self.model, info, device)
        self.metrics = MetricsLog(self.out / "metrics.jsonl", enabled=info.is_main)
        self.ckpt_dir = self.out / "checkpoints"
        trainable = sum(p.numel() for p in self.view.parameters())
        log.info("%s fine-tuning of %s (%s backend): %s trainable of %s parameters", cfg.method,
                 cfg.base_model, self.base.backend, f"{trainable:,}", f"{self.base_params:,}")

    # ---- resources --------------------------------------------------------------------------
    def preflight(self, seq_len: int, rows_per_example: int = 1) -> dict[str, int]:
        """Check the planner's memory and disk estimate against what is free before anything is
        written (a one-line error otherwise). `rows_per_example`: DPO runs chosen and rejected."""
        from minilab.planner.disk import estimate_finetune
        from minilab.planner.machine import preflight

        resident = sum(t.numel() * t.element_size() for t in [*self.model.parameters(), *self.model.buffers()])
        trainable = sum(p.numel() for p in self.view.parameters())
        base16 = any(p.dtype in (torch.bfloat16, torch.float16) for p in self.base.model.parameters())
        plan = estimate_finetune(
            self.anatomy, batch_size=self.cfg.batch_size * rows_per_example, seq_len=seq_len,
            keep_last=self.cfg.keep_last, target=self.device.type, weights_held=resident, trainable=trainable,
            final_bytes=4 * trainable if self.cfg.method != "full" else resident,
            **planner_settings(self.cfg, base16, self.base.model_type, self.grad_checkpointing))
        preflight(plan, self.out, self.device,
                  hint="lower batch_size (raise grad_accum) or set gradient_checkpointing=true")
        return plan

    # ---- steps and checkpoints -----------------------------------------------------------------
    def optimizer_step(self) -> float:
        return optimizer_step(self.model, self.optimizer, self.scaler, self.optim.grad_clip)

    def save(self, step: int, meta: dict[str, Any], metric: float | None) -> None:
        from minilab.checkpoint import save_checkpoint

        check_finite_weights(self.view.parameters(), step, self.ckpt_dir, self.info, self.device)
        if self.info.is_main:
            save_checkpoint(self.ckpt_dir, step, model=self.view, optimizer=self.optimizer,
                            meta={**meta, "tokenizer_sha256": self.tokenizer_sha, "minilab_version": __version__},
                            keep_last=self.cfg.keep_last, keep_best=True, metric=metric, scaler=self.scaler)
        distributed.barrier(self.info)

    def restore(self, resume: str | None) -> dict[str, Any] | None:
        from minilab.checkpoint import load_checkpoint
        from minilab.training import find_resume_checkpoint

        ckpt = find_resume_checkpoint(self.ckpt_dir, self.out, resume, self.info.is_main)
        if self.info.is_main:  # before the first checkpoint: a run killed early is still known as minilab's
            write_run_marker(self.out, self.stage)
        if ckpt is None:
            return None
        meta = load_checkpoint(ckpt, model=self.view, optimizer=self.optimizer, restore_rng=True,
                               map_location=self.device, scaler=self.scaler)
        if meta.get("tokenizer_sha256") != self.tokenizer_sha:
            raise MinilabError(f"{ckpt} was trained with tokenizer {meta.get('tokenizer_sha256')}, not "
                               f"{self.tokenizer_sha}; resume with the run's own base model")
        log.info(f"resumed from {ckpt} at step {meta['step']}")
        return meta

    # ---- eval generations ------------------------------------------------------------------------
    @torch.no_grad()
    def answer(self, template, prompts: list[str], max_new_tokens: int) -> list[dict[str, str]]:
        """Greedy answers to `prompts`, each formatted as a one-turn conversation by `template`;
        generation stops at the template's end-of-turn token (or eos)."""
        from minilab.generate import generate
        from minilab.tokenization import chat_stop_ids, load_tokenizer

        tok = load_tokenizer(self.base.tokenizer_dir)
        stops = chat_stop_ids(tok, template.end_token, template.eos_token)
        was = self.model.training
        self.model.eval()
        out = []
        for p in prompts:
            ids = tok.encode(template.render([{"role": "user", "content": p}], add_generation_prompt=True),
                             add_special_tokens=False).ids
            if self.base.backend == "minilab":
                new = generate(self.model, [ids], max_new_tokens=max_new_tokens, stop_token_ids=stops)[0]
            else:
                new = self._hf_generate(ids, max_new_tokens, stops)
            out.append({"prompt": p, "answer": tok.decode(new, skip_special_tokens=True)})
        self.model.train(was)
        return out

    def _hf_generate(self, ids: list[int], max_new_tokens: int, stops: list[int]) -> list[int]:
        inner = self.model.inner
        x = torch.tensor([ids], device=self.device)
        y = inner.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens,
                           do_sample=False, eos_token_id=stops, pad_token_id=stops[0] if stops else 0)
        new = y[0, len(ids):].tolist()
        return new[: next((i for i, t in enumerate(new) if t in stops), len(new))]

    # ---- output -----------------------------------------------------------------------------------
    def finish(self, training_type: str, template, data: list[dict[str, Any]], dataset: str,
               metrics: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
        """Write `<output_dir>/final/` and register it: adapters (PEFT files in adapters/) for
        LoRA/QLoRA, a full HF model for full fine-tuning; tokenizer with the training template."""
        from minilab import registry
        from minilab.fsutil import atomic_dir

        cfg = self.cfg
        final = self.out / "final"
        adapters = self.peft is not None
        ttype = "lora" if adapters and training_type == "sft" else training_type
        arch = self.base.model.config.architecture if self.base.backend == "minilab" else self.base.model_type
        name = None
        if cfg.register:
            # Named before the old entry goes, so a version number is never reused for other weights.
            name = registry.make_name(arch, self.base_params, dataset, ttype, root=cfg.models_dir)
            registry.release_path(final, cfg.models_dir)  # an extended run: the old name's weights go
        with atomic_dir(final, overwrite=True) as tmp:
            if adapters:
                self.peft.save_pretrained(str(tmp / "adapters"))
                _set_adapter_base(tmp / "adapters", self._base_ref())
            else:
                self._save_full(tmp)
            write_chat_tokenizer(self.base.tokenizer_dir, tmp, template)
        fields = dict(training_type=ttype, parent=self._registered_base(),
                      base_model={"name": cfg.base_model, "path": str(self.base.path.resolve()),
                                  "fingerprint": self.base_manifest.get("fingerprint") or _dir_fingerprint(
                                      self.base.path), "backend": self.base.backend,
                                  "model_type": self.base.model_type},
                      method=cfg.method, chat={"template": template.name, "end_token": template.end_token},
                      data=data, tokenizer_sha256=_fingerprint(final), config=config, metrics=metrics,
                      params=self.base_params, run_dir=str(self.out.resolve()))
        if cfg.register:
            registry.write_manifest(final, name=name, **fields)
            registry.register(final, name, root=cfg.models_dir, link=True)
        else:
            registry.write_manifest(final, name=None, **fields)
        return {"final_dir": str(final), "name": name}

    def _save_full(self, tmp: Path) -> None:
        from minilab.hf import save_hf_dir

        if self.base.backend == "minilab":
            save_hf_dir(self.model, tmp, overwrite=True)
        else:
            self.model.inner.save_pretrained(str(tmp))

    def _registered_base(self) -> str | None:
        name = self.base_manifest.get("name")
        return name if isinstance(name, str) else None

    def _base_ref(self) -> str:
        """How adapter_config.json names the base: registry name, else hub id, else absolute path."""
        if self._registered_base():
            return self._registered_base()
        given = Path(self.cfg.base_model).expanduser()
        return str(given.resolve()) if given.exists() else self.cfg.base_model


def run_tuning(run_class: type[TuningRun], cfg: TuneConfig, resume: str | None, dry_run: bool) -> dict[str, Any]:
    """Run `run_class` (SFTRun, DPORun) on every rank of this launch; with `dry_run`, only its plan."""
    from minilab.training import resolve_device

    info, device = distributed.init(resolve_device(cfg.device))
    try:
        job = run_class(cfg, info, device)
        return {"plan": job.plan} if dry_run else job.fit(resume)
    finally:
        distributed.shutdown()


class TuningRun(TrainingRun):
    """The training-run skeleton over a `Tuning` (`self.tune`): SFTRun and DPORun. Both resume,
    checkpoint and finish alike (trainable weights, sampler position, registry output); each
    supplies its steps, evals and `final_metrics`."""

    @property
    def model(self):
        return self.tune.model

    @property
    def optimizer(self):
        return self.tune.optimizer

    @property
    def metrics(self):
        return self.tune.metrics

    @property
    def ckpt_dir(self) -> Path:
        return self.tune.ckpt_dir

    def restore(self, resume: str | None) -> None:
        meta = self.tune.restore(resume)
        if meta is None:
            return
        self.sampler.load_state_dict(meta["data_state"])
        self.load_progress(meta)

    def save(self) -> None:
        val = self.val_meta()
        self.tune.save(self.step, {"config": to_dict(self.cfg), "tokens_seen": self.tokens_seen,
                                   "data_state": self.sampler.state_dict(), **val},
                       metric=val["val_loss"])

    def final_metrics(self) -> dict[str, Any]:
        """What the model manifest's metrics hold besides the last eval, tokens seen and steps."""
        return {}

    def finish_run(self) -> dict[str, Any]:
        from minilab.finetune.rows import data_records

        cfg = self.cfg
        if not self.info.is_main:
            return {"final_dir": None, "name": None, **self.last_eval}
        dataset = cfg.dataset_name or Path(cfg.data_dirs[0]).name
        result = self.tune.finish(self.tune.stage, self.template, data_records(cfg.data_dirs), dataset,
                                  {**self.last_eval, "tokens_seen": self.tokens_seen, "steps": self.step,
                                   **self.final_metrics()}, to_dict(cfg))
        return {**result, **self.last_eval}


def _set_adapter_base(adapters: Path, base: str) -> None:
    from minilab.fsutil import write_json_atomic

    path = adapters / "adapter_config.json"
    cfg = json.loads(path.read_text(encoding="utf-8"))
    cfg["base_model_name_or_path"] = base
    write_json_atomic(path, cfg)


def write_chat_tokenizer(tokenizer_dir: Path, out: Path, template) -> None:
    """Copy the tokenizer files; its chat_template becomes the training template and the
    generation config stops at both eos and the end-of-turn token."""
    from minilab.fsutil import write_json_atomic
    from minilab.tokenization import chat_stop_ids, load_tokenizer

    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tokenizer_dir / name).is_file() and not (out / name).is_file():
            shutil.copy2(tokenizer_dir / name, out / name)
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8")) if cfg_path.is_file() else {}
    cfg["chat_template"] = template.jinja
    write_json_atomic(cfg_path, cfg)
    (out / "chat_template.jinja").unlink(missing_ok=True)  # would shadow the config's template
    tok = load_tokenizer(out, verify=False)  # its template was just rewritten
    stops = chat_stop_ids(tok, template.end_token, template.eos_token)
    gen_path = out / "generation_config.json"
    gen = json.loads(gen_path.read_text(encoding="utf-8")) if gen_path.is_file() else {}
    gen["eos_token_id"] = stops
    write_json_atomic(gen_path, gen)


def _fingerprint(tokenizer_dir: Path) -> str:
    from minilab.tokenization import tokenizer_fingerprint

    return tokenizer_fingerprint(tokenizer_dir)


def _dir_fingerprint(path: Path) -> str:
    """sha256 over the weight and config files of an unregistered base (its identity)."""
    import hashlib

    from minilab.fsutil import sha256_file

    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in (".json", ".safetensors"))
    text = "".join(f"{sha256_file(p)}  {p.name}\n" for p in files)
    return hashlib.sha256(text.encode()).hexdigest()


# ---- the recipe stages (sft, dpo) ----------------------------------------------------------------
def tuning_stage(kind: str, config: type, run: Any, metric: Any, rows_per_example: int = 1) -> Stage:
    """The Stage of a fine-tuning verb: trains `config.base_model` into <dir>/final, resumably.
    `rows_per_example` is the one definition of how many sequences an example puts in memory,
    read by the run's preflight and the recipe's estimate alike."""
    def estimate(ctx: Any, cfg: TuneConfig) -> dict[str, Any]:
        return _recipe_estimate(ctx, cfg, rows_per_example)

    return Stage(kind, config, run=run, metric=metric, output="final", trains=True, estimate=estimate,
                 model_input="base_model", rows_per_example=rows_per_example)


def _recipe_estimate(ctx: Any, cfg: Any, rows_per_example: int) -> dict[str, Any]:
    from minilab.planner.anatomy import inspect_model
    from minilab.planner.disk import estimate_finetune

    model = ctx.meta_model(cfg.base_model)
    if model is None:
        return {"disk": None, "memory": None, "note": "base model unknown"}
    an = inspect_model(model)
    target = ctx.target(cfg.device)
    seq = ctx.finetune_seq_len(cfg.data_dirs)
    settings = planner_settings(cfg, base16=False, model_type=getattr(model.config, "model_type", "llama"))
    est = estimate_finetune(an, batch_size=cfg.batch_size * rows_per_example, seq_len=seq,
                            keep_last=cfg.keep_last, target=target, **settings)
    return {"disk": est["disk"], "memory": est["memory"], "device": target,
            "note": f"{cfg.method}, base {an.params / 1e6:.1f} M params"}
