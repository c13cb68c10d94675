"""`minilab run RECIPE`: plan, run (skipping what is cached), resume, summarise.

State lives in `<workdir>/.state/<stage>.json`: written as `running` (with the fingerprint)
before a stage starts and `done` (with a fresh run id, wall time, outputs, key metric) after it
finishes, atomically. So on the next run:

- done, same fingerprint, same upstream run ids, output present -> cached (not rerun);
- running or failed with the same fingerprint (the process was killed, or crashed) -> a training
  stage resumes from its newest complete checkpoint, any other stage reruns;
- anything else (new, config or input files changed, an upstream stage reran, --force/--from)
  -> the stage's folder is replaced and it runs, and everything downstream of it reruns too.

A stage's fingerprint covers its kind, its config (references resolved to paths), the
fingerprints of the stages it reads, digests of the user files it names, and minilab's version.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from minilab.errors import MinilabError
from minilab.fsutil import write_json_atomic
from minilab.recipe.refs import BUILTIN_REFS
from minilab.recipe.spec import Recipe, Stage, external_inputs, fingerprint, load_recipe, placeholder
from minilab.recipe.stages import build_config, jsonable
from minilab.recipe.summary import Row, fmt_seconds, print_summary, print_table
from minilab.stage import get as get_stage

log = logging.getLogger("minilab.recipe")

TRAINING_OUTPUT = ("merge", "dpo", "sft", "quantize", "pretrain")  # which stage's model to chat with, in order


@dataclass
class Step:
    stage: Stage
    action: str                 # cached | run | resume | skip
    reason: str
    fingerprint: str = ""
    fp_config: dict[str, Any] = field(default_factory=dict)


class Runner:
    def __init__(self, recipe: Recipe, *, force: list[str] | None = None, from_stage: str | None = None,
                 until: str | None = None):
        self.recipe = recipe
        names = [s.name for s in recipe.stages]
        for flag_name, value in (("--force", force or []), ("--from", [from_stage] if from_stage else []),
                                 ("--until", [until] if until else [])):
            for v in value:
                if v not in names:
                    raise MinilabError(f"{flag_name} {v}: no such stage in {recipe.path} "
                                       f"(stages: {', '.join(names)})")
        self.force = set(force or [])
        self.from_index = names.index(from_stage) if from_stage else None
        self.until_index = names.index(until) if until else None
        if self.from_index is not None and self.until_index is not None and self.until_index < self.from_index:
            raise MinilabError(f"--until {until} comes before --from {from_stage}")
        self.state_dir = recipe.workdir / ".state"
        self.last_rows: list[Row] = []

    # ---- state files ------------------------------------------------------------------------------
    def state(self, name: str) -> dict[str, Any] | None:
        import json

        path = self.state_dir / f"{name}.json"
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            return None  # written atomically, so this is damage from outside: treat the stage as new

    def write_state(self, name: str, data: dict[str, Any]) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.state_dir / f"{name}.json", data)

    def _upstream_runs(self, stage: Stage) -> dict[str, str | None]:
        return {d: (self.state(d) or {}).get("run_id") for d in stage.deps}

    def _output_of(self, stage: Stage) -> Path:
        return get_stage(stage.kind).output_path(self.recipe.stage_dir(stage.name), stage.config)

    # ---- plan -----------------------------------------------------------------------------------------
    def plan(self) -> list[Step]:
        recipe, steps = self.recipe, {}
        source = str(recipe.path)
        for s in recipe.stages:
            _cfg, fp_cfg = build_config(recipe, s, lambda ref, attr: placeholder(recipe, ref, attr), source)
            upstream = {d: steps[d].fingerprint for d in s.deps}
            fp = fingerprint(s.kind, fp_cfg, upstream, external_inputs(fp_cfg, recipe.workdir))
            action, reason = self._decide(s, fp, steps)
            steps[s.name] = Step(s, action, reason, fp, fp_cfg)
        return list(steps.values())

    def _decide(self, s: Stage, fp: str, steps: dict[str, Step]) -> tuple[str, str]:
        st = self.state(s.name)
        if self.until_index is not None and s.index > self.until_index:
            return "skip", f"after --until {self.recipe.stages[self.until_index].name}"
        if self.from_index is not None and s.index < self.from_index:
            if not st or st.get("status") != "done":
                raise MinilabError(f"stage {s.name} comes before --from {self.recipe.stages[self.from_index].name} "
                                   "and has not completed; run without --from first")
            return "skip", "before --from"
        if s.name in self.force:
            return "run", "forced (--force)"
        if self.from_index is not None:
            return "run", "--from"
        rerun = [d for d in s.deps if steps[d].action in ("run", "resume")]
        if rerun:
            return "run", f"upstream {rerun[0]} reruns"
        if st is None:
            return "run", "new"
        if st.get("fingerprint") != fp:
            return "run", "config or input files changed"
        if st.get("status") != "done":
            what = "was interrupted" if st.get("status") == "running" else "failed"
            if get_stage(s.kind).trains:
                from minilab.checkpoint import checkpoint_step, latest_checkpoint

                ckpt = latest_checkpoint(self.recipe.stage_dir(s.name) / "checkpoints")
                if ckpt is not None:
                    return "resume", f"{what}: resumes from step {checkpoint_step(ckpt)}"
            return "run", f"{what}: reruns"
        if st.get("upstream_runs", {}) != self._upstream_runs(s):
            return "run", "an upstream stage was rerun since"
        if not self._output_of(s).exists():
            return "run", "its output is missing"
        return "cached", "unchanged"

    # ---- run ------------------------------------------------------------------------------------------
    def run(self, steps: list[Step]) -> list[Row]:
        rows: list[Row] = []
        todo = [st for st in steps if st.action in ("run", "resume")]
        n = 0
        for step in steps:
            s = step.stage
            out = self._output_of(s)
            if step.action in ("cached", "skip"):
                prev = self.state(s.name) or {}
                status = "cached" if prev.get("status") == "done" else "skipped"
                rows.append(Row(s.name, s.kind, status, None, str(out) if out.exists() else "",
                                _size(out), prev.get("metric", "") if status == "cached" else step.reason))
                continue
            n += 1
            print(f"\n== [{n}/{len(todo)}] {s.name} ({s.kind}): {'resuming' if step.action == 'resume' else 'running'}"
                  f" — {step.reason}", flush=True)
            prev = self.state(s.name) or {}
            stale = [*prev.get("registered", []), *prev.get("stale_names", [])]
            if step.action == "run":
                self._wipe(s)
            t0 = time.perf_counter()
            started = datetime.now(UTC).isoformat(timespec="seconds")
            base = {"kind": s.kind, "fingerprint": step.fingerprint, "config": step.fp_config,
                    "upstream_runs": self._upstream_runs(s), "started": started, "stale_names": stale}
            self.write_state(s.name, {**base, "status": "running"})
            try:
                cfg, _ = build_config(self.recipe, s, self._lookup, str(self.recipe.path))
                result = get_stage(s.kind).execute(cfg)
            except BaseException as e:
                self.write_state(s.name, {**base, "status": "failed", "error": f"{type(e).__name__}: {e}"[:2000]})
                rows.append(Row(s.name, s.kind, "failed", time.perf_counter() - t0, "", None, str(e)[:80]))
                self.last_rows = rows + [Row(x.stage.name, x.stage.kind, "not run", None, "", None, "")
                                         for x in steps[steps.index(step) + 1:]]
                raise
            wall = time.perf_counter() - t0
            self._drop_names([n for n in stale if n not in _registered(result)])
            base["stale_names"] = []
            line = get_stage(s.kind).key_metric(result, cfg)
            self.write_state(s.name, {**base, "status": "done", "run_id": uuid.uuid4().hex, "wall_s": round(wall, 2),
                                      "finished": datetime.now(UTC).isoformat(timespec="seconds"),
                                      "output": str(out), "metric": line, "registered": _registered(result),
                                      "result": jsonable(result)})
            rows.append(Row(s.name, s.kind, "resumed" if step.action == "resume" else "ran", wall, str(out),
                            _size(out), line))
            print(f"   {s.name}: done in {fmt_seconds(wall)}{' — ' + line if line else ''}", flush=True)
        self.last_rows = rows
        return rows

    def _lookup(self, ref: str, attr: str | None) -> str:
        if attr == "name" and ref not in BUILTIN_REFS:
            names = (self.state(ref) or {}).get("registered") or []
            if not names:
                raise MinilabError(f"${{{ref}.name}}: stage {ref} registered no model (is register false?)")
            return names[0]
        return placeholder(self.recipe, ref, attr)

    def _drop_names(self, names: list[str]) -> None:
        """Remove registry names whose model a rerun replaced. Done after the new model is
        registered, so its version number is new (a name never comes back for other weights)."""
        from minilab import registry

        for name in names:
            with contextlib.suppress(MinilabError, OSError):
                registry.remove_model(name, self.recipe.models_dir)

    def _wipe(self, s: Stage) -> None:
        """Before a fresh run: remove the stage's folder (its registry names go once the new run is done)."""
        from minilab.fsutil import remove_path, stale_leftovers

        d = self.recipe.stage_dir(s.name)
        # What a killed atomic write left beside it (a temporary or a half-replaced old copy); a
        # write still running in another process is left alone.
        leftovers = stale_leftovers(d.parent, s.name)
        if d.exists():
            shutil.rmtree(d)
        for leftover in leftovers:
            remove_path(leftover)

    def final_model(self) -> str | None:
        """What to chat with: the recipe's `final_model`, else the last model-making stage's output
        (its registry name when it has one)."""
        if self.recipe.final_model:
            from minilab.recipe.refs import substitute

            return substitute(self.recipe.final_model, self._lookup)
        for kind in TRAINING_OUTPUT:
            for s in reversed(self.recipe.stages):
                st = self.state(s.name) or {}
                if s.kind == kind and st.get("status") == "done":
                    names = st.get("registered") or []
                    return names[0] if names else st.get("output")
        return None


def _registered(result: Any) -> list[str]:
    name = result.get("name") if isinstance(result, dict) else None
    return [name] if isinstance(name, str) and name else []


def _size(path: Path) -> int | None:
    from minilab.fsutil import dir_size

    if not path.exists():
        return None
    return path.stat().st_size if path.is_file() else dir_size(path)


@contextlib.contextmanager
def workdir_lock(workdir: Path):
    """One `minilab run` per work directory at a time."""
    import fcntl

    state = workdir / ".state"
    state.mkdir(parents=True, exist_ok=True)
    with open(state / "lock", "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            raise MinilabError(f"another `minilab run` is working in {workdir} (pid {f.read().strip() or '?'}); "
                               "wait for it, or give this run another --workdir") from None
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# ---- printing -------------------------------------------------------------------------------------
def print_plan(runner: Runner, steps: list[Step]) -> None:
    print(f"recipe {runner.recipe.name} ({runner.recipe.path}) in {runner.recipe.workdir}")
    print_table(["#", "stage", "kind", "action", "why"],
                [[str(i + 1), st.stage.name, st.stage.kind, st.action, st.reason] for i, st in enumerate(steps)])


def resolve_recipe_path(ref: str) -> Path:
    """A recipe file, or the name of a shipped recipe (`demo` -> recipes/demo.yaml)."""
    p = Path(ref).expanduser()
    if p.exists():
        return p
    shipped = Path(__file__).resolve().parent.parent / "recipes"
    for cand in (shipped / ref, shipped / f"{ref}.yaml", shipped / f"{ref}.yml", shipped / f"{ref}.json"):
        if cand.is_file():
            return cand
    names = sorted(f.stem for f in shipped.glob("*.yaml")) if shipped.is_dir() else []
    raise MinilabError(f"recipe {ref}: no such file (shipped recipes: {', '.join(names) or 'none'})")


# ---- CLI ------------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    from minilab.cliargs import flag

    p.add_argument("recipe", metavar="RECIPE", help="recipe file (YAML/JSON) or a shipped recipe's name (demo)")
    flag(p, "--workdir", metavar="DIR", help="where stage outputs go (default: the recipe's workdir, runs/<name>)")
    flag(p, "--models-dir", metavar="DIR", help="registry root (default: the recipe's, $MINILAB_MODELS_DIR, models/)")
    p.add_argument("--force", metavar="STAGE", action="append", default=[],
                   help="rerun this stage (and everything after it that uses it); repeatable")
    p.add_argument("--from", dest="from_stage", metavar="STAGE",
                   help="rerun from this stage on (the stages before it must have completed)")
    p.add_argument("--until", metavar="STAGE", help="stop after this stage")
    flag(p, "--dry-run", action="store_true",
         help="print the plan (what is cached, what runs and why) and the disk/memory estimate; run nothing")
    p.add_argument("--set", dest="overrides", metavar="KEY=VALUE", action="append", default=[],
                   help="override a recipe key, dotted (e.g. --set stages.sft.max_steps=50); repeatable")


def main(args: argparse.Namespace) -> int:
    recipe = load_recipe(resolve_recipe_path(args.recipe), workdir=args.workdir, models_dir=args.models_dir,
                         overrides=args.overrides)
    runner = Runner(recipe, force=args.force, from_stage=args.from_stage, until=args.until)
    steps = runner.plan()
    print_plan(runner, steps)
    if args.dry_run:
        from minilab.recipe.estimate import estimate, print_estimate

        print_estimate(estimate(recipe, steps), recipe.workdir)
        return 0
    t0 = time.perf_counter()
    failed: BaseException | None = None
    with workdir_lock(recipe.workdir):
        try:
            rows = runner.run(steps)
        except (MinilabError, KeyboardInterrupt) as e:
            rows, failed = runner.last_rows, e
    print_summary(rows)
    from minilab.recipe.report import write_report

    report = write_report(runner, rows, time.perf_counter() - t0)
    print(f"\ntotal {fmt_seconds(time.perf_counter() - t0)}; report: {report}")
    if failed is not None:
        if isinstance(failed, KeyboardInterrupt):
            raise failed
        print("re-run the same command to continue: finished stages are kept, an interrupted training stage resumes")
        raise failed
    model = runner.final_model()
    if model:
        md = f" --models-dir {recipe.models_dir}" if recipe.models_dir and not Path(model).exists() else ""
        print(f"chat with it:  minilab chat {model}{md}")
        print(f"serve it:      minilab serve {model}{md}   (OpenAI-compatible API and a chat page on 127.0.0.1)")
    return 0
