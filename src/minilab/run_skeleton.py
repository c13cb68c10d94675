"""The training-run skeleton pretrain, SFT and DPO share: restore -> (train_step, eval, save)* ->
finish, with the bookkeeping of step, tokens seen, best and last val loss.

`TrainingRun` owns the loop and that bookkeeping; each run (`PretrainRun`, `SFTRun`, `DPORun`)
supplies its setup and the steps: `train_step`, `log_step` (its metrics record and progress bar),
`evaluate`-backed `run_eval`, `save`, `finish_run`, and the objects the loop reads: `cfg`, `info`,
`model`, `optimizer`, `metrics`, `ckpt_dir`. The numerics live in `minilab.training`.
"""

from __future__ import annotations

import time
from typing import Any

from minilab.host_memory import reuse_freed_memory
from minilab.training import Schedule, check_finite_loss, checkpoint_val_meta, eval_due, set_lr


class TrainingRun:
    """The loop of one training run; subclasses supply the steps (see the module docstring)."""

    progress_label = "train"
    final_metric = "val_loss"  # a final eval runs unless last_eval holds it for the last step

    def init_progress(self) -> None:
        self.step, self.tokens_seen, self.best, self.last_eval = 0, 0, float("inf"), {}
        self.eval_step = -1  # the step self.last_eval measured
        self.t_last = self.t_step = time.perf_counter()  # end of the last step, start of this one
        self.schedule = Schedule.of(self.cfg.max_steps, self.cfg.optim)  # a time budget replaces it

    def load_progress(self, meta: dict[str, Any]) -> None:
        """Continue the counters of the checkpoint `meta`; drop what the killed run logged later."""
        self.step, self.tokens_seen, self.best = meta["step"], meta["tokens_seen"], meta["best_val_loss"]
        self.last_eval = {"val_loss": meta["val_loss"]} if meta.get("val_loss") is not None else {}
        self.eval_step = meta.get("val_step", -1)
        self.metrics.truncate_after(self.step)

    def note_eval(self, result: dict[str, float]) -> None:
        """Keep an eval of the current weights (stops the run on a nan/inf val loss)."""
        self.last_eval = result
        check_finite_loss(result.get("val_loss"), "val loss", self.step, self.ckpt_dir)
        self.eval_step = self.step
        if "val_loss" in result:
            self.best = min(self.best, result["val_loss"])

    def val_meta(self) -> dict[str, Any]:
        """The val fields of the checkpoint of this step (see `checkpoint_val_meta`)."""
        return checkpoint_val_meta(self.last_eval, self.eval_step, self.step, self.best)

    # ---- hooks a run may override --------------------------------------------------------------
    def before_loop(self) -> None:
        """After restore, before the first step (DPO: the reference scores; pretrain: MFU's peak)."""

    @property
    def max_steps(self) -> int:
        """The run's length: `cfg.max_steps`, or what a time budget derived (`self.schedule`)."""
        return self.schedule.max_steps

    def before_step(self) -> None:
        """At the start of each step, before its lr is read (pretrain: a time budget's re-plan)."""

    def checkpoint_due(self) -> bool:
        return self.step % self.cfg.ckpt_every == 0 or self.step == self.max_steps

    def after_step(self) -> None:
        """After the step's eval and checkpoint (pretrain: the simulated crash)."""

    # ---- the loop ---------------------------------------------------------------------------------
    def fit(self, resume: str | None) -> dict[str, Any]:
        """The run, freed host memory kept for the next step while it lasts (`minilab.host_memory`)."""
        with reuse_freed_memory():
            return self._fit(resume)

    def _fit(self, resume: str | None) -> dict[str, Any]:
        from minilab.progress import StepProgress

        cfg = self.cfg
        self.restore(resume)
        self.before_loop()
        self.model.train()
        self.t_last = time.perf_counter()
        with StepProgress(self.max_steps, self.step, description=self.progress_label,
                          enabled=self.info.is_main) as bar:
            if self.step == 0:
                self.run_eval(bar)  # the starting point
            while self.step < self.max_steps:
                self.before_step()
                bar.set_total(self.max_steps)
                lr = self.schedule.lr(self.step, cfg.optim)
                set_lr(self.optimizer, lr)
                self.t_step, before = time.perf_counter(), self.tokens_seen
                loss, norm, extra = self.train_step()
                self.step += 1
                check_finite_loss(loss, "train loss", self.step, self.ckpt_dir)
                self.log_step(bar, lr, loss, norm, extra, self.tokens_seen - before)
                if eval_due(self.step, cfg.eval_every, self.max_steps):
                    self.run_eval(bar)
                if self.checkpoint_due():
                    self.save()
                self.after_step()
        if self.eval_step != self.step or self.final_metric not in self.last_eval:  # e.g. resumed at the end
            self.run_eval(None)
        return self.finish_run()

    def step_seconds(self) -> float:
        """Seconds since the end of the previous step (so a step's share of evals and saves counts)."""
        now = time.perf_counter()
        seconds, self.t_last = now - self.t_last, now
        return seconds
