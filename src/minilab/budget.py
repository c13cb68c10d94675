"""The training time budget (`minilab pretrain --time-budget 10m`): the run's length derived from
the clock instead of `max_steps`, and the LR schedule sized to that length.

How a budgeted run goes:

1. Setup as usual (data checks, model, preflight: its disk estimate assumes `planning_steps`).
2. `probe`, before the first step, leaves no trace: forward/backward passes on random tokens and
   an AdamW step at lr 0 on zeroed gradients (its state cleared after), an eval-sized forward,
   and a write of the weights' size to a temporary file, each timed.
3. The plan: the largest `max_steps` whose time (the steps, the evals and checkpoints that fall
   in them, the final eval and export) fits what the setup left of the budget (`fit_steps`);
   warmup and decay are sized to it (`training.Schedule`).
4. Re-plans from the measured pace (the mean step time since the last plan, the mean eval and
   save times so far), the warmup kept. The warmup's lr depends only on its own length, so both
   shapes re-plan once real steps have measured the pace (the probe misses per-step costs such
   as data loading and the metrics line): cosine at the end of its warmup (its only re-plan, as
   after warmup its lr depends on the length at every step), wsd after its warmup (at most
   halfway to the decay). wsd's stable lr does not depend on the length either, so it re-plans
   again halfway to each new decay start, up to `REPLANS` times, `RECENT_STEPS` apart at least.
5. The run ends at `max_steps` with the lr at its final value, never cut mid-schedule; its record
   (budget, measured times, every plan, elapsed against the budget) goes to metrics.jsonl, the
   final model's manifest and the run's result.

Time is counted by a `Ledger` of laps (setup, step, eval, save, export) that together cover the
run's wall time. It is saved with the schedule in every checkpoint, and a resumed run continues
both: it never re-derives the schedule (the resumed process's own setup, and the steps redone
since the checkpoint, are not counted). `FAKE_SECONDS` is the tests' seam: with it every lap of a
kind lasts a fixed time, so plans, re-plans and a killed-and-resumed run are deterministic.
"""

from __future__ import annotations

import logging
import math
import os
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from minilab.errors import MinilabError
from minilab.training import OptimConfig, Schedule

log = logging.getLogger("minilab.pretrain")
clock = time.perf_counter
# Tests: every lap of a kind lasts FAKE_SECONDS[kind] (setup, step, eval, save, export), and the probe
# reports them too (or FAKE_SECONDS["probe_step"] etc. where given: a probe that misjudges the pace).
FAKE_SECONDS: dict[str, float] | None = None
REPLANS = 6  # wsd re-plans at most, each halfway from the last plan to its decay start
RECENT_STEPS = 8  # re-plans at least this many steps apart; the step time is the mean since the last
PLANNING_STEPS_PER_SECOND = 100  # the preflight's assumption before anything is measured

_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([smh]?)\s*$")


def parse_duration(value: str | float | int) -> float:
    """'90s', '10m', '1.5h', '600' or a number of seconds -> seconds (> 0); ValueError otherwise."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ValueError(f"expected a duration like 90s, 10m or 1.5h, or a number of seconds, got {value!r}")
    if isinstance(value, str):
        m = _DURATION.match(value)
        if not m:
            raise ValueError(f"expected a duration like 90s, 10m or 1.5h, or a number of seconds, got {value!r}")
        seconds = float(m.group(1)) * _UNITS[m.group(2) or "s"]
    else:
        seconds = float(value)
    if not (math.isfinite(seconds) and seconds > 0):
        raise ValueError(f"must be a positive duration, got {value!r}")
    return seconds


def check_time_budget(value: Any) -> str | None:
    """The config field check of `time_budget` (an error message, or None)."""
    try:
        parse_duration(value)
    except ValueError as e:
        return str(e)
    return None


def planning_steps(seconds: float) -> int:
    """The steps the preflight's disk estimate assumes for a budget, before any is measured."""
    return max(1, int(seconds * PLANNING_STEPS_PER_SECOND))


class Ledger:
    """Where the run's time went: seconds and counts of laps per kind. A lap lasts from the end
    of the previous one to now, so the laps cover the run's wall time once."""

    def __init__(self, state: dict[str, Any] | None = None):
        state = state or {}
        self.seconds = {k: float(v) for k, v in state.get("seconds", {}).items()}
        self.counts = {k: int(v) for k, v in state.get("counts", {}).items()}
        self.last = clock()

    def lap(self, kind: str, seconds: float | None = None) -> float:
        """Close a lap of `kind` (its length measured, or `seconds` when known otherwise)."""
        now = clock()
        d = now - self.last if seconds is None else seconds
        self.last = now
        if FAKE_SECONDS is not None:
            d = FAKE_SECONDS[kind]
        self.seconds[kind] = self.seconds.get(kind, 0.0) + d
        self.counts[kind] = self.counts.get(kind, 0) + 1
        return d

    def restart(self) -> None:
        """Stop counting the time since the last lap (a resumed process's setup)."""
        self.last = clock()

    @property
    def elapsed(self) -> float:
        return sum(self.seconds.values())

    def mean(self, kind: str, default: float) -> float:
        n = self.counts.get(kind, 0)
        return self.seconds[kind] / n if n else default

    def state(self) -> dict[str, Any]:
        return {"seconds": dict(self.seconds), "counts": dict(self.counts)}


@dataclass
class Pace:
    """Seconds of one step, one eval, one checkpoint save and the final export."""

    step: float
    eval: float
    save: float
    export: float


def count_due(done: int, n: int, every: int) -> int:
    """Steps in (done, n] after which a periodic event runs: every `every` steps, and after the last."""
    if n <= done:
        return 0
    return n // every - done // every + (1 if n % every else 0)


def remaining_seconds(done: int, n: int, pace: Pace, eval_every: int, ckpt_every: int) -> float:
    """Time from step `done` to the end of a run of `n` steps: steps, evals, saves, export."""
    return ((n - done) * pace.step + count_due(done, n, eval_every) * pace.eval
            + count_due(done, n, ckpt_every) * pace.save + pace.export)


def fit_steps(done: int, seconds: float, pace: Pace, eval_every: int, ckpt_every: int) -> int:
    """The largest run length n > done whose rest fits in `seconds`, or `done` if no step fits."""
    per_step = pace.step + pace.eval / eval_every + pace.save / ckpt_every
    n = done + max(1, int((seconds - pace.export - pace.eval - pace.save) / max(per_step, 1e-12)))
    while n > done and remaining_seconds(done, n, pace, eval_every, ckpt_every) > seconds:
        n -= 1
    while remaining_seconds(done, n + 1, pace, eval_every, ckpt_every) <= seconds:
        n += 1
    return n


class TimeBudget:
    """A run's budget, its ledger and its plans; `Schedule`s out (see the module docstring).
    `agree` maps numbers to the same numbers on every rank (torchrun), so every rank plans alike."""

    def __init__(self, seconds: float, optim: OptimConfig, eval_every: int, ckpt_every: int, agree=None):
        self.seconds, self.optim = seconds, optim
        self.eval_every, self.ckpt_every = eval_every, ckpt_every
        self.agree = agree or (lambda values: values)
        self.ledger = Ledger()
        self.schedule: Schedule | None = None
        self.probe: dict[str, float] = {}
        self.plans: list[dict[str, Any]] = []
        self.next_replan: int | None = None

    # ---- plans --------------------------------------------------------------------------------
    def first_plan(self, probe: dict[str, float]) -> Schedule:
        """Close the setup lap and fix max_steps from the probe's times (`probe`: step, eval,
        save, export seconds); the step-0 eval is still to come."""
        self.ledger.lap("setup")
        self.probe = self.agree(dict(probe))
        pace = Pace(**{k: self.probe[k] for k in ("step", "eval", "save", "export")})
        elapsed = self.agree({"elapsed": self.ledger.elapsed})["elapsed"]
        n = fit_steps(0, self.seconds - elapsed - pace.eval, pace, self.eval_every, self.ckpt_every)
        if n < 1:
            raise MinilabError(
                f"time_budget {self.seconds:g}s is too short: the setup took {elapsed:.1f} s and one step "
                f"(~{pace.step:.3g} s) with its eval (~{pace.eval:.3g} s), checkpoint (~{pace.save:.3g} s) and "
                f"export (~{pace.export:.3g} s) do not fit the rest; raise time_budget")
        return self._adopt(0, Schedule.of(n, self.optim), pace, elapsed)

    def maybe_replan(self, step: int) -> Schedule | None:
        """At the start of step `step`: the run's new schedule when a re-plan is due, else None."""
        if self.next_replan is None or step < self.next_replan:
            return None
        p, led, last = self.probe, self.ledger, self.plans[-1]
        recent = led.counts.get("step", 0) - last["ledger_steps"]  # the pace since the last plan follows drift
        step_s = ((led.seconds["step"] - last["ledger_step_s"]) / recent if recent > 0
                  else led.mean("step", p["step"]))
        pace = Pace(**self.agree({"step": step_s, "eval": led.mean("eval", p["eval"]),
                                  "save": led.mean("save", p["save"]), "export": p["export"]}))
        elapsed = self.agree({"elapsed": self.ledger.elapsed})["elapsed"]
        n = max(step + 1, fit_steps(step, self.seconds - elapsed, pace, self.eval_every, self.ckpt_every))
        warmup, shape = self.schedule.warmup, self.schedule.shape
        decay_start = max(step, warmup, n - Schedule.decay_steps(n, self.optim)) if shape == "wsd" else n
        return self._adopt(step, Schedule(n, warmup, decay_start, shape), pace, elapsed)

    def _adopt(self, step: int, schedule: Schedule, pace: Pace, elapsed: float) -> Schedule:
        self.schedule = schedule
        self.plans.append({"step": step, **schedule.to_dict(), "elapsed_s": elapsed,
                           **{f"{k}_s": v for k, v in asdict(pace).items()},
                           "ledger_steps": self.ledger.counts.get("step", 0),
                           "ledger_step_s": self.ledger.seconds.get("step", 0.0)})
        wsd, warmup = schedule.shape == "wsd", schedule.warmup
        if len(self.plans) == 1:  # the probe's plan: re-plan once real steps have measured the pace
            nxt = max(RECENT_STEPS, min(warmup, schedule.decay_start // 2)) if wsd else warmup
            due = nxt >= RECENT_STEPS and nxt < schedule.decay_start
        else:  # wsd: halfway to the decay start, while the stable phase lasts
            nxt = step + (schedule.decay_start - step) // 2
            due = wsd and len(self.plans) <= REPLANS and nxt - step >= RECENT_STEPS
        self.next_replan = nxt if due else None
        return schedule

    # ---- checkpoints and records --------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps: the schedule and every decision, and the ledger so far."""
        return {"seconds": self.seconds, "schedule": self.schedule.to_dict(), "next_replan": self.next_replan,
                "plans": self.plans, "probe": self.probe, "ledger": self.ledger.state()}

    def load(self, state: dict[str, Any] | None, save_seconds: float | None, ckpt: Path) -> Schedule:
        """Continue the budget a checkpoint saved (its own save counted as a lap)."""
        if state is None:
            raise MinilabError(f"{ckpt} was trained without a time budget; resume without time_budget")
        if state["seconds"] != self.seconds:
            raise MinilabError(f"{ckpt} was planned for time_budget {state['seconds']:g}s, not {self.seconds:g}s; "
                               "resume with the run's own time_budget (its schedule is saved, not re-derived)")
        self.schedule = Schedule(**state["schedule"])
        self.next_replan, self.plans, self.probe = state["next_replan"], state["plans"], state["probe"]
        self.ledger = Ledger(state["ledger"])
        self.ledger.lap("save", save_seconds if save_seconds is not None else self.probe["save"])
        return self.schedule

    def summary(self) -> dict[str, Any]:
        """The run's record: budget, measured times, derived schedule, plans, elapsed vs budget."""
        led = self.ledger
        return {"time_budget_s": self.seconds, "elapsed_s": led.elapsed,
                "elapsed_fraction": led.elapsed / self.seconds, **self.schedule.to_dict(),
                "replans": len(self.plans) - 1, "plans": self.plans,
                **{f"{k}_s": led.seconds.get(k, 0.0) for k in ("setup", "step", "eval", "save", "export")},
                "mean_step_s": led.mean("step", self.probe.get("step", 0.0))}


# ---- the hooks of a budgeted run ------------------------------------------------------------------
class BudgetHooks:
    """What a training run (`PretrainRun`) does for its `budget` (a `TimeBudget`, or None): plan
    before the first step, re-plan before a step, laps, records. Uses the run's `schedule`,
    `metrics`, `info`, `device` and `step`."""

    budget: TimeBudget | None

    def agree(self, values: dict[str, float]) -> dict[str, float]:
        """The ranks' mean of each number (the same on every rank), so every rank plans alike."""
        if not self.info.enabled:
            return values
        from minilab import distributed

        return {k: distributed.all_reduce_sum(v, self.info, self.device) / self.info.world_size
                for k, v in values.items()}

    def lap(self, kind: str) -> None:
        if self.budget is not None:
            self.budget.ledger.lap(kind)

    def start_budget(self) -> None:
        """Before the first step: a fresh budgeted run probes and plans; a resumed one goes on."""
        if self.budget is None:
            return
        if self.budget.schedule is not None:
            self.budget.ledger.restart()  # a resumed process's own setup is not counted
            return
        self.schedule = self.budget.first_plan(probe(self))
        self.note_plan()

    def load_budget(self, meta: dict[str, Any], ckpt: Path) -> None:
        """On resume: the saved schedule and ledger, never re-derived."""
        if self.budget is not None:
            self.schedule = self.budget.load(meta.get("time_budget"), meta.get("save_seconds"), ckpt)
        elif meta.get("time_budget") is not None:
            raise MinilabError(f"{ckpt} was planned for time_budget {meta['time_budget']['seconds']:g}s; "
                               "resume with the run's own time_budget")

    def note_plan(self) -> None:
        plan = self.budget.plans[-1]
        self.metrics.write("plan", **plan, time_budget_s=self.budget.seconds)
        log.info(f"time budget {self.budget.seconds:g}s: {plan['max_steps']} steps (warmup {plan['warmup']}, "
                 f"decay from step {plan['decay_start']}) at ~{plan['step_s']:.3g} s a step, planned at step "
                 f"{plan['step']}")

    def before_step(self) -> None:
        if self.budget is not None and self.budget.maybe_replan(self.step) is not None:
            self.schedule = self.budget.schedule
            self.note_plan()


# ---- the probe ------------------------------------------------------------------------------------
def _timed(fn, device: torch.device, reps: int) -> float:
    """Mean seconds of `fn()` over `reps` calls, after one untimed call (allocations, compile)."""
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = clock()
    for _ in range(reps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (clock() - t0) / reps


def write_seconds(directory: Path, nbytes: int, cap: int = 256 * 2**20) -> float:
    """Seconds to write and flush `nbytes` to a file in `directory` (timed up to `cap` bytes,
    scaled beyond), the file removed after."""
    path = directory / f".time-budget-probe.{os.getpid()}.tmp"
    chunk = bytes(min(nbytes, cap, 16 * 2**20))
    todo, t0 = min(nbytes, cap), clock()
    try:
        with open(path, "wb") as f:
            written = 0
            while written < todo:
                written += f.write(chunk[:todo - written])
            f.flush()
            os.fsync(f.fileno())
        seconds = clock() - t0
    finally:
        path.unlink(missing_ok=True)
    return seconds * nbytes / max(1, todo)


def probe(run) -> dict[str, float]:
    """Seconds of one optimizer step, one eval, one checkpoint save and the final export of a
    pretraining `run` (a `PretrainRun`: its model, optimizer and `validate()`), measured on random
    tokens (the eval on its own validation windows) without changing the weights, the optimizer's
    state, the data position or any generator's state."""
    from minilab.optimizers import reset_state
    from minilab.training import optimizer_step, set_lr, token_step

    cfg, model, device = run.cfg, run.model, run.device
    gen = torch.Generator().manual_seed(0)
    shape = (cfg.batch_size, run.seq_len)
    x = torch.randint(model.config.vocab_size, shape, generator=gen)
    micro = [(x, torch.randint(model.config.vocab_size, shape, generator=gen))] * cfg.grad_accum

    def step():
        token_step(run.train_model, micro, cfg.precision, device, None, run.info)
        for p in model.parameters():
            if p.grad is not None:
                p.grad.zero_()  # with lr 0 and zero gradients the AdamW step changes no weight
        set_lr(run.optimizer, 0.0)
        optimizer_step(model, run.optimizer, None, cfg.optim.grad_clip)  # clip, step, zero_grad

    step_s = _timed(step, device, 2)
    reset_state(run.optimizer)  # the first real step starts the optimizer afresh
    t0 = clock()
    run.validate()  # a real eval: fresh seeded reader, no gradient, nothing kept
    eval_s = clock() - t0
    weights = 4 * model.num_params()  # fp32 weights; a checkpoint adds AdamW's two moments
    if run.info.is_main:  # the export's HF config needs transformers: imported now, as part of the setup
        from minilab.hf import to_hf_config

        to_hf_config(model.config)
    export_s = write_seconds(run.out, weights) if run.info.is_main else 0.0
    if run.info.enabled:  # rank 0 writes: its time, on every rank
        from minilab import distributed

        export_s = distributed.all_reduce_sum(export_s, run.info, device)
    measured = {"step": step_s, "eval": eval_s, "save": 3 * export_s, "export": export_s}
    if FAKE_SECONDS is not None:  # tests: `probe_KIND` if given (a probe that misjudges), else KIND
        return {k: FAKE_SECONDS.get(f"probe_{k}", FAKE_SECONDS[k]) for k in measured}
    return measured
