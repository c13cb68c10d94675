"""Speedrun: time-to-quality on this machine, minilab's recommended CPU recipe against nanoGPT's.

Both systems train on the same packed tokens (the built-in corpus by default, any `minilab pack`
directory with `--data`, or a text file with `--text`, built with minilab's own corpus ->
tokenizer -> pack stages into a cache dir) for each time budget (default 2, 5 and 10 minutes),
each run with its full LR schedule sized to the budget. Runs alternate between the systems (who
goes first flips every pair) so machine noise falls on both, and both get the same number of
threads (OMP_NUM_THREADS = all cores by CPU affinity, or `--threads`).

One evaluator scores every final model on the same held-out windows (fixed, seeded positions in
the packed val split, non-overlapping), in fp32 under no_grad with the same batches: bits per byte
= total target-token NLL / ln 2 / UTF-8 bytes of the target tokens as the tokenizer decodes them
(`minilab.evaluate.perplexity.summarize`). nanoGPT trains on minilab's token ids, so both models
predict the same targets; neither tool's own eval is used.

    PYTHONPATH=src python benchmarks/speedrun.py --nanogpt-dir ../nanoGPT          # 2, 5, 10 min x 2 seeds
    PYTHONPATH=src python benchmarks/speedrun.py --nanogpt-dir ../nanoGPT --quick  # smoke run (~5 min)
    python benchmarks/speedrun.py --budgets 1 2 --seeds 1 --data data/packed/mine --nanogpt-dir ../nanoGPT
    python benchmarks/speedrun.py --text my.txt --nanogpt-dir ../nanoGPT

The peer is nanoGPT's README CPU recipe (config/train_shakespeare_char.py with --device=cpu
--compile=False --batch_size=12 --n_layer=4 --n_head=4 --n_embd=128 --dropout=0.0) at
block_size 256 (minilab's seq_len), run from a checkout (`--nanogpt-dir`, never copied: its
train.py runs in a subprocess and its model.py is imported only to score ckpt.pt). Without a
valid checkout the peer is skipped with a message and minilab's figures are still reported.

Schedules: a short calibration run of each system measures its median step time; a budget of B
seconds gets max_steps = B / step time (nanoGPT: max_iters = lr_decay_iters, warmup 5% of it,
the README recipe's 100 of 2000); minilab's runs get `time_budget` (`minilab_schedule`) and size
themselves. `--variant NAME:KEY=VALUE,...` adds an ablation of minilab's recipe to the rotation
(`vocab_size=N` trains it on the text re-tokenized with an N-token tokenizer, scored on that
data's own held-out windows: bits per byte compare across vocabularies). Prints a table (budget x
system -> held-out bpb, tokens seen, steps, seconds), the bpb ratio minilab / nanoGPT per budget,
the time minilab needs to reach nanoGPT's largest-budget bpb, and one JSON line; `--scaling-out
FILE` also writes the minilab systems' measured scaling, which `minilab plan --budget` plans
from. See docs/speedrun.md.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.util
import io
import json
import math
import os
import pickle
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

SEQ_LEN = 256
DEFAULT_VOCAB = 4096  # the demo tokenizer's size; a `vocab_size=N` variant trains on its own re-tokenized copy
# minilab's recommended CPU recipe (src/minilab/recipes/demo.yaml, pretrain): the one place to change it.
# Every lever kept won at equal CPU time on two seeds (docs/speedrun.md, "Ablations"): Muon, lr 8e-3,
# warmup-stable-decay.
MINILAB_RECIPE = {"arch": "micro", "batch_size": 16, "seq_len": SEQ_LEN, "model": {"qk_norm": True},
                  "optim": {"lr": 8.0e-3, "optimizer": "muon", "schedule": "wsd"}}
# nanoGPT's README CPU recipe on top of config/train_shakespeare_char.py, block_size raised to 256.
NANOGPT_CONFIG = "config/train_shakespeare_char.py"
NANOGPT_RECIPE = {"device": "cpu", "compile": False, "block_size": SEQ_LEN, "batch_size": 12, "n_layer": 4,
                  "n_head": 4, "n_embd": 128, "dropout": 0.0}
NANOGPT_WARMUP_FRAC = 100 / 2000  # the README recipe: warmup_iters 100 of max_iters 2000
NANOGPT_FILES = ("train.py", "model.py", "configurator.py", NANOGPT_CONFIG)
SYSTEMS = ("minilab", "nanogpt")


# ---- the one evaluator --------------------------------------------------------------------------
def heldout_windows(packed_dir: str | Path, n_windows: int, seq_len: int = SEQ_LEN, seed: int = 0) -> np.ndarray:
    """(N, seq_len + 1) token windows at fixed positions of the packed val split: a seeded choice of
    N slots among the split's non-overlapping windows (fewer when the split is short)."""
    from minilab.data.packed import open_split

    tokens, _offsets, _manifest = open_split(packed_dir, "val")
    slots = len(tokens) // (seq_len + 1)
    if slots < 1:
        raise SystemExit(f"{packed_dir}: val split has {len(tokens)} tokens, fewer than one window of {seq_len + 1}")
    picks = np.sort(np.random.default_rng(seed).choice(slots, size=min(n_windows, slots), replace=False))
    return np.stack([np.asarray(tokens[s * (seq_len + 1):(s + 1) * (seq_len + 1)], dtype=np.int64) for s in picks])


def target_bytes(tokenizer, windows: np.ndarray) -> int:
    """UTF-8 bytes of every window's target tokens (all but the first) as the tokenizer decodes
    them (special tokens decode to nothing: scored, 0 bytes, as in `minilab eval`)."""
    return sum(len(tokenizer.decode(w[1:].tolist(), skip_special_tokens=True).encode("utf-8")) for w in windows)


def heldout_bpb(logits_fn: Callable, windows: np.ndarray, n_bytes: int, batch_size: int = 16) -> dict:
    """Bits per byte (and mean NLL, perplexity) of a model on `windows`: `logits_fn` maps a (B, T)
    long tensor of inputs to (B, T, V) logits; every target token of every window is scored."""
    import torch
    import torch.nn.functional as F

    from minilab.evaluate.perplexity import summarize

    total, scored = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(windows), batch_size):
            w = torch.from_numpy(windows[i:i + batch_size])
            x, y = w[:, :-1].contiguous(), w[:, 1:].contiguous()
            logits = logits_fn(x).float()
            total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum"))
            scored += y.numel()
    return summarize(total, scored, n_bytes)


def minilab_logits(model_dir: str | Path) -> Callable:
    from minilab.hf import load_hf_dir

    model = load_hf_dir(model_dir, dtype="float32").eval()
    return lambda x: model(x)


def nanogpt_logits(nanogpt_dir: str | Path, ckpt_path: str | Path) -> Callable:
    """Logits of a nanoGPT checkpoint through the checkout's own model.py (loaded safely:
    weights_only=True; ckpt.pt holds only tensors and plain Python values)."""
    import torch

    spec = importlib.util.spec_from_file_location("nanogpt_model", Path(nanogpt_dir) / "model.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    with contextlib.redirect_stdout(io.StringIO()):  # GPT() prints its parameter count
        model = mod.GPT(mod.GPTConfig(**ckpt["model_args"]))
    model.load_state_dict({k.removeprefix("_orig_mod."): v for k, v in ckpt["model"].items()})
    model.eval()
    # GPT.forward returns only the last position's logits without targets; with them, all of them.
    return lambda x: model(x, torch.zeros_like(x))[0]


# ---- data ---------------------------------------------------------------------------------------
class Heldout:
    """Packed tokens with their tokenizer, and the held-out windows (with their UTF-8 bytes) that
    every model trained on them is scored on: one per vocabulary in the run."""

    def __init__(self, packed: Path, tokenizer_dir: Path, n_windows: int):
        from minilab.tokenization import load_tokenizer

        tokenizer = load_tokenizer(tokenizer_dir)
        self.packed, self.tokenizer_dir, self.vocab_size = packed, tokenizer_dir, tokenizer.get_vocab_size()
        self.windows = heldout_windows(packed, n_windows)
        self.n_bytes = target_bytes(tokenizer, self.windows)

    def bpb(self, logits_fn: Callable) -> dict:
        return heldout_bpb(logits_fn, self.windows, self.n_bytes)


def minilab_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "minilab", *args]


def build_packed(source: str, root: Path, vocab_size: int = DEFAULT_VOCAB) -> Path:
    """corpus -> tokenizer (BPE, 4096 by default: the demo's) -> pack (seq 256, 5% val) with
    minilab's stages, into `root` (kept: a second run reuses it)."""
    packed = root / "packed"
    if (packed / "manifest.json").is_file():
        return packed
    steps = [("corpus", "--source", source, "--output-dir", str(root / "corpus"), "--force"),
             ("tokenizer", "--corpus-dir", str(root / "corpus"), "--output-dir", str(root / "tokenizer"),
              "--vocab-size", str(vocab_size), "--force"),
             ("pack", "--corpus-dir", str(root / "corpus"), "--tokenizer-dir", str(root / "tokenizer"),
              "--output-dir", str(packed), "--seq-len", str(SEQ_LEN), "--val-fraction", "0.05", "--force")]
    for step in steps:
        print(f"[data] minilab {' '.join(step)}", flush=True)
        if subprocess.run(minilab_cmd(step[0], "--log-level", "warning", *step[1:])).returncode != 0:
            raise SystemExit(f"minilab {step[0]} failed (its error is above); the data in {root} is incomplete")
    return packed


def prepare_data(a: argparse.Namespace, vocab_size: int | None = None) -> tuple[Path, Path, dict]:
    """(packed dir, tokenizer dir, packed manifest) from --data, --text or the built-in corpus;
    `vocab_size` (a variant's) re-tokenizes the text with a tokenizer of that size."""
    from minilab.data.packed import check_packed
    from minilab.fsutil import cache_root

    if vocab_size is not None and a.data:
        raise SystemExit("a vocab_size variant re-tokenizes the text: use --text FILE or the built-in corpus, "
                         "not --data")
    vocab = vocab_size or DEFAULT_VOCAB
    suffix = "" if vocab == DEFAULT_VOCAB else f"-v{vocab}"
    if a.data:
        packed = Path(a.data)
    elif a.text:
        text = Path(a.text)
        if not text.is_file():
            raise SystemExit(f"--text {text}: file not found")
        digest = hashlib.sha256(text.read_bytes()).hexdigest()[:16]
        packed = build_packed(str(text.resolve()), cache_root() / "speedrun" / f"text-{digest}{suffix}", vocab)
    else:
        packed = build_packed("default", cache_root() / "speedrun" / f"default{suffix}", vocab)
    if not (packed / "manifest.json").is_file():
        raise SystemExit(f"--data {packed}: no manifest.json (not a `minilab pack` directory)")
    manifest = check_packed(packed)
    tok = Path(a.tokenizer_dir or manifest.get("tokenizer_dir", ""))
    if not (tok / "tokenizer.json").is_file():
        raise SystemExit(f"{packed}/manifest.json: tokenizer_dir {str(tok)!r} has no tokenizer.json; "
                         "pass --tokenizer-dir")
    return packed, tok, manifest


# ---- the two systems ----------------------------------------------------------------------------
def steps_for(budget_s: float, step_s: float) -> int:
    return max(1, round(budget_s / step_s))


def minilab_schedule(budget_s: float, step_s: float) -> dict:
    """minilab's schedule keys for a budget: its own `time_budget` (seconds: the run derives
    max_steps from its own pace, setup and export included), evals and checkpoints kept to the end
    (`step_s` only bounds "never")."""
    never = 10 * steps_for(budget_s, step_s)
    return {"time_budget": budget_s, "eval_every": never, "ckpt_every": never}


def thread_env(threads: int) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


def run_logged(cmd: list[str], log: Path, env: dict, cwd: Path | None = None) -> float:
    """Run a training command, output to `log`; its wall seconds. A failure names the log."""
    t0 = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=cwd).returncode
    if rc != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-5:]
        raise SystemExit(f"{cmd[1]} {' '.join(cmd[2:4])} failed (exit {rc}); see {log}:\n  " + "\n  ".join(tail))
    return time.perf_counter() - t0


def parse_variant(spec: str) -> tuple[str, dict]:
    """`NAME:KEY=VALUE[,KEY=VALUE...]` -> (NAME, MINILAB_RECIPE with the overrides). Dotted keys
    reach nested sections (`optim.lr=4e-3`); values are read as YAML (`1e-3`, `wsd`, `true`)."""
    import copy

    import yaml

    name, sep, body = spec.partition(":")
    if not sep or not name or name in SYSTEMS or not body:
        raise SystemExit(f"--variant {spec!r}: expected NAME:KEY=VALUE[,KEY=VALUE...] with NAME not one of {SYSTEMS}")
    recipe = copy.deepcopy(MINILAB_RECIPE)
    for item in body.split(","):
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise SystemExit(f"--variant {spec!r}: {item!r} is not KEY=VALUE")
        *parents, leaf = key.split(".")
        node = recipe
        for part in parents:
            node = node.setdefault(part, {})
        try:  # YAML 1.1 reads `4e-3` as a string
            node[leaf] = float(value) if "." in value or "e" in value.lower() else int(value)
        except ValueError:
            node[leaf] = yaml.safe_load(value)
    return name, recipe


class Minilab:
    def __init__(self, packed: Path, tokenizer: Path, threads: int, recipe: dict | None = None,
                 name: str = "minilab"):
        self.packed, self.tokenizer, self.threads = packed, tokenizer, threads
        self.recipe, self.name = recipe or MINILAB_RECIPE, name

    def train(self, workdir: Path, seed: int, schedule: dict) -> dict:
        every = schedule.get("max_steps", 1)  # one eval and one checkpoint, at the end
        cfg = {**self.recipe, "eval_every": every, "ckpt_every": every, **schedule, "data_dirs": [str(self.packed)],
               "tokenizer_dir": str(self.tokenizer), "output_dir": str(workdir / "run"), "seed": 1337 + seed,
               "eval_batches": 1, "keep_last": 1, "register": False, "tensorboard": False}
        (workdir / "config.json").write_text(json.dumps(cfg))
        wall = run_logged(minilab_cmd("pretrain", "--config", str(workdir / "config.json")), workdir / "train.log",
                          thread_env(self.threads))
        rows = [json.loads(line) for line in (workdir / "run" / "metrics.jsonl").read_text().splitlines()]
        train = [r for r in rows if r["kind"] == "train"]
        secs = [(train[i]["tokens"] - (train[i - 1]["tokens"] if i else 0)) / train[i]["tokens_per_s"]
                for i in range(len(train))]
        return {"steps": train[-1]["step"], "tokens": train[-1]["tokens"], "loop_s": sum(secs), "wall_s": wall,
                "step_times": secs, "model": workdir / "run" / "final"}

    def calibrate(self, workdir: Path, steps: int) -> float:
        r = self.train(workdir, 0, {"max_steps": steps})
        return statistics.median(r["step_times"][2:] or r["step_times"])

    def schedule(self, budget_s: float, step_s: float) -> dict:
        return minilab_schedule(budget_s, step_s)

    def logits(self, result: dict) -> Callable:
        return minilab_logits(result["model"])


SEED_PATCH = """# written by minilab's benchmarks/speedrun.py: train.py seeds torch with a fixed 1337 (no flag);
# offset it by the benchmark's seed so seeds vary for both systems (seed 0 = nanoGPT's own 1337).
import torch as _speedrun_torch
_speedrun_torch.manual_seed = (lambda s, _f=_speedrun_torch.manual_seed: _f(s + {offset}))
"""


def nanogpt_problem(nanogpt_dir: str | None, manifest: dict) -> str | None:
    """Why nanoGPT cannot run here (None when it can)."""
    if not nanogpt_dir:
        return "no --nanogpt-dir given"
    missing = [f for f in NANOGPT_FILES if not (Path(nanogpt_dir) / f).is_file()]
    if missing:
        return f"--nanogpt-dir {nanogpt_dir}: not a nanoGPT checkout (no {', '.join(missing)})"
    if manifest["dtype"] != "uint16":
        return (f"the packed data is {manifest['dtype']} (vocabulary > 65536) but nanoGPT's train.py reads "
                "uint16 tokens; re-pack with a smaller vocabulary")
    return None


class NanoGPT:
    """nanoGPT's train.py in a subprocess, cwd a temp dir holding data/speedrun/{train,val}.bin
    (links to the packed files), meta.pkl (vocab_size) and a link to the checkout's configurator.py."""

    name = "nanogpt"

    def __init__(self, nanogpt_dir: str | Path, packed: Path, vocab_size: int, threads: int,
                 recipe: dict | None = None):
        self.dir, self.packed, self.vocab_size, self.threads = Path(nanogpt_dir).resolve(), packed, vocab_size, threads
        self.recipe = recipe or NANOGPT_RECIPE

    def _workdir(self, workdir: Path, seed: int) -> None:
        data = workdir / "data" / "speedrun"
        data.mkdir(parents=True)
        for split in ("train", "val"):
            (data / f"{split}.bin").symlink_to((self.packed / f"{split}.bin").resolve())
        with open(data / "meta.pkl", "wb") as f:
            pickle.dump({"vocab_size": self.vocab_size}, f)
        (workdir / "configurator.py").symlink_to(self.dir / "configurator.py")
        (workdir / "seed.py").write_text(SEED_PATCH.format(offset=int(seed)))

    def train(self, workdir: Path, seed: int, schedule: dict) -> dict:
        self._workdir(workdir, seed)
        n = schedule["max_iters"]
        args = {**self.recipe, **schedule, "eval_interval": n, "eval_iters": 1, "log_interval": 1,
                "always_save_checkpoint": True, "out_dir": str(workdir / "out"), "dataset": "speedrun",
                "dtype": "float32", "wandb_log": False}
        cmd = [sys.executable, str(self.dir / "train.py"), str(self.dir / NANOGPT_CONFIG), "seed.py",
               *(f"--{k}={v}" for k, v in args.items())]
        wall = run_logged(cmd, workdir / "train.log", thread_env(self.threads), cwd=workdir)
        times = [float(t) / 1000 for t in re.findall(r"^iter \d+: loss \S+, time ([\d.]+)ms",
                                                     (workdir / "train.log").read_text(), re.M)]
        # iter n's log line follows the eval + save of the weights after n steps, then one more step
        # nanoGPT trains and never saves: the checkpoint holds n steps (iter_num = n).
        return {"steps": n, "tokens": n * args["batch_size"] * args["block_size"], "loop_s": sum(times),
                "wall_s": wall, "step_times": times, "model": workdir / "out" / "ckpt.pt"}

    def calibrate(self, workdir: Path, steps: int) -> float:
        r = self.train(workdir, 0, self.schedule(0, 1, steps))
        return statistics.median(r["step_times"][2:-1] or r["step_times"])

    def schedule(self, budget_s: float, step_s: float, steps: int | None = None) -> dict:
        n = steps or steps_for(budget_s, step_s)
        return {"max_iters": n, "lr_decay_iters": n, "warmup_iters": round(NANOGPT_WARMUP_FRAC * n)}

    def logits(self, result: dict) -> Callable:
        return nanogpt_logits(self.dir, result["model"])


# ---- the benchmark ------------------------------------------------------------------------------
def time_to_reach(points: list[tuple[float, float]], target: float) -> dict:
    """When a (seconds, bpb) curve first reaches `target`: interpolated linearly in log time
    between the first two budgets that bracket it; `at_most` the first budget's time when that
    already beats it; None (not reached) when no budget does."""
    points = sorted(points)
    if not points:
        return {"seconds": None, "how": "no runs"}
    if points[0][1] <= target:
        return {"seconds": points[0][0], "how": "at_most (the smallest budget already reaches it)"}
    for (t1, b1), (t2, b2) in zip(points, points[1:], strict=False):
        if b2 <= target:
            frac = (b1 - target) / (b1 - b2)
            return {"seconds": math.exp(math.log(t1) + frac * (math.log(t2) - math.log(t1))),
                    "how": "interpolated in log time between budgets"}
    return {"seconds": None, "how": "not reached within the largest budget"}


def run_pairs(systems: list, budgets: list[float], seeds: int, step_s: dict, root: Path, eval_one: Callable) -> list:
    """Every (budget, seed, system) run, rotating which system goes first (with two: flipping every
    pair) so a noisy stretch of the machine falls on all of them; one progress line each."""
    pairs = [(b, s) for b in budgets for s in range(seeds)]
    total = sum(b for b, _ in pairs) * 60 * len(systems)
    done, rows, t0 = 0.0, [], time.perf_counter()
    for k, (budget, seed) in enumerate(pairs):
        for system in systems[k % len(systems):] + systems[:k % len(systems)]:
            work = root / f"{system.name}-{budget}-{seed}"
            work.mkdir()
            r = system.train(work, seed, system.schedule(budget * 60, step_s[system.name]))
            r["bpb"] = eval_one(system, system.logits(r))["bits_per_byte"]
            shutil.rmtree(work)
            # The machine's speed drifts (other load): this run's median step time sizes the next one.
            step_s[system.name] = statistics.median(r["step_times"][1:-1] or r["step_times"])
            rows.append({"system": system.name, "budget_min": budget, "seed": seed,
                         "loop_over_budget": r["loop_s"] / (budget * 60),
                         **{k: r[k] for k in ("steps", "tokens", "loop_s", "wall_s", "bpb")}})
            done += budget * 60
            elapsed = time.perf_counter() - t0
            print(f"[{len(rows)}/{len(pairs) * len(systems)}] {system.name:8s} {budget:g} min seed {seed}: "
                  f"bpb {r['bpb']:.4f}, {r['steps']} steps, {r['tokens']:,} tokens, loop {r['loop_s']:.0f}s, "
                  f"wall {r['wall_s']:.0f}s; ETA {elapsed / done * (total - done) / 60:.1f} min", flush=True)
    return rows


def summarize_runs(rows: list, budgets: list[float], names: list[str]) -> dict:
    out: dict = {"by_budget": {}, "ratio": {}}
    for b in budgets:
        cell = {}
        for name in names:
            rs = [r for r in rows if r["budget_min"] == b and r["system"] == name]
            cell[name] = {"bpb": statistics.mean(r["bpb"] for r in rs), "bpb_per_seed": [r["bpb"] for r in rs],
                          **{k: statistics.mean(r[k] for r in rs)
                             for k in ("tokens", "steps", "loop_s", "wall_s", "loop_over_budget")}}
        out["by_budget"][str(b)] = cell
        if "nanogpt" in names:
            out["ratio"][str(b)] = cell["minilab"]["bpb"] / cell["nanogpt"]["bpb"]
        variants = [n for n in names if n not in SYSTEMS]
        if variants:  # ablations: each variant's bpb against the recipe's, same budget, same seeds
            out.setdefault("variant_vs_minilab", {})[str(b)] = {
                v: {"delta_bpb": cell[v]["bpb"] - cell["minilab"]["bpb"],
                    "delta_per_seed": [x - y for x, y in zip(cell[v]["bpb_per_seed"], cell["minilab"]["bpb_per_seed"],
                                                             strict=True)]} for v in variants}
    if "nanogpt" in names:
        last = out["by_budget"][str(max(budgets))]
        target = last["nanogpt"]["bpb"]
        points = [(out["by_budget"][str(b)]["minilab"]["loop_s"], out["by_budget"][str(b)]["minilab"]["bpb"])
                  for b in budgets]
        out["minilab_time_to_peer_bpb"] = {"peer_budget_min": max(budgets), "peer_bpb": target,
                                           "peer_loop_s": last["nanogpt"]["loop_s"], **time_to_reach(points, target)}
        reach = out["minilab_time_to_peer_bpb"]["seconds"]
        out["targets"] = {"bpb_10pct_lower_every_budget": all(r <= 0.9 for r in out["ratio"].values()),
                          "peer_largest_budget_bpb_in_half_the_time":
                              reach is not None and reach <= 30 * max(budgets)}
    return out


def model_params(recipe: dict, vocab_size: int) -> int:
    """Parameters of a minilab recipe's model at a vocabulary size (built on the meta device)."""
    from minilab.arch import load_architecture
    from minilab.model import build_model

    cfg = load_architecture(recipe.get("arch", "micro"), **recipe.get("model", {}), vocab_size=vocab_size)
    return build_model(cfg, device="meta").num_params()


def scaling_of(result: dict) -> dict:
    """`minilab plan --budget`'s scaling file (src/minilab/planner/cpu_scaling.json) from a run's
    JSON result: for each minilab system (`recipe`: MINILAB_RECIPE itself) its recipe, vocabulary,
    parameters, training throughput (tokens per second of training loop, over all its runs) and
    (tokens, bpb) at each budget."""
    candidates = []
    for name, recipe in result["recipes"].items():
        runs = [r for r in result["runs"] if r["system"] == name]
        if name == "nanogpt" or not runs:
            continue
        vocab = result["eval"][name]["vocab_size"]
        points = [{"budget_min": b, **{k: statistics.mean(r[k] for r in runs if r["budget_min"] == b)
                                       for k in ("tokens", "loop_s", "bpb")}}
                  for b in sorted({r["budget_min"] for r in runs})]
        candidates.append({"name": "recipe" if name == "minilab" else name, "recipe": recipe, "vocab_size": vocab,
                           "params": model_params(recipe, vocab),
                           "tokens_per_s": sum(r["tokens"] for r in runs) / sum(r["loop_s"] for r in runs),
                           "points": points})
    return {"source": "benchmarks/speedrun.py --scaling-out", "machine": result["machine"],
            "threads": result["threads"], "gemm_gflops": result["gemm_gflops"], "date": time.strftime("%Y-%m-%d"),
            "data": result["data_label"], "seeds": result["seeds"], "candidates": candidates}


def print_table(summary: dict, names: list[str]) -> None:
    print(f"\n{'budget':>7} {'system':8} {'bpb mean':>9} {'per seed':>20} {'tokens':>11} {'steps':>7} "
          f"{'loop s':>7} {'wall s':>7} {'loop/budget':>11}")
    for b, cell in summary["by_budget"].items():
        for name in names:
            c = cell[name]
            seeds = " ".join(f"{x:.4f}" for x in c["bpb_per_seed"])
            print(f"{b + ' min':>7} {name:8} {c['bpb']:9.4f} {seeds:>20} {c['tokens']:11,.0f} {c['steps']:7.0f} "
                  f"{c['loop_s']:7.0f} {c['wall_s']:7.0f} {c['loop_over_budget']:11.2f}")
        if b in summary["ratio"]:
            r = summary["ratio"][b]
            print(f"{'':7} ratio minilab/nanoGPT {r:.3f} ({100 * (1 - r):+.1f}% lower bpb)")
    for b, deltas in summary.get("variant_vs_minilab", {}).items():
        for v, d in deltas.items():
            seeds = " ".join(f"{x:+.4f}" for x in d["delta_per_seed"])
            print(f"{b + ' min':>7} {v} - minilab: {d['delta_bpb']:+.4f} bpb (per seed {seeds})")
    off = [f"{b} min {n}" for b, cell in summary["by_budget"].items() for n in names
           if abs(cell[n]["loop_over_budget"] - 1) > 0.2]
    if off:
        print(f"note: training loops more than 20% off their budget ({', '.join(off)}): the machine's speed "
              "changed between runs; compare bpb at the loop seconds shown, not at the budget")
    t = summary.get("minilab_time_to_peer_bpb")
    if t:
        when = f"{t['seconds'] / 60:.2f} min" if t["seconds"] is not None else "-"
        print(f"\nminilab reaches nanoGPT's {t['peer_budget_min']:g}-min bpb ({t['peer_bpb']:.4f}) in {when} "
              f"({t['how']})")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nanogpt-dir", help="a karpathy/nanoGPT checkout (the peer; skipped without it)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--data", metavar="DIR", help="a `minilab pack` directory (default: the built-in corpus)")
    src.add_argument("--text", metavar="FILE", help="a text file: corpus -> tokenizer -> pack into minilab's cache")
    p.add_argument("--tokenizer-dir", help="tokenizer of --data (default: the one its manifest records)")
    p.add_argument("--budgets", nargs="+", type=float, default=[2, 5, 10], metavar="MIN", help="minutes per run")
    p.add_argument("--seeds", type=int, default=2, help="seeds per budget (default 2)")
    p.add_argument("--threads", type=int, default=0, help="torch threads of both systems (default: all cores)")
    p.add_argument("--eval-windows", type=int, default=128, help="held-out windows of 256 tokens (default 128)")
    p.add_argument("--calib-steps", type=int, default=30, help="steps of each calibration run (default 30)")
    p.add_argument("--variant", action="append", default=[], metavar="NAME:KEY=VALUE,...",
                   help="an ablation: minilab's recipe with these overrides (e.g. wsd:optim.schedule=wsd), trained "
                        "in the same rotation and reported as its bpb difference; repeatable")
    p.add_argument("--scaling-out", metavar="FILE", help="also write the minilab systems' measured scaling "
                   "(throughput, bpb per tokens) for `minilab plan --budget` (src/minilab/planner/cpu_scaling.json)")
    p.add_argument("--quick", action="store_true", help="smoke run: budgets 0.25 0.5 min, 1 seed, 32 windows")
    a = p.parse_args(argv)
    if a.quick:
        a.budgets, a.seeds, a.eval_windows, a.calib_steps = [0.25, 0.5], 1, 32, 15
    if a.seeds < 1 or a.eval_windows < 1 or a.calib_steps < 5 or min(a.budgets) <= 0:
        p.error("--seeds and --eval-windows must be >= 1, --calib-steps >= 5, budgets > 0")
    return a


def main(argv: list[str] | None = None) -> None:
    import platform

    import torch

    from minilab.planner.budget_plan import gemm_rate

    a = parse_args(argv)
    threads = a.threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    packed, tok_dir, manifest = prepare_data(a)
    data = {None: Heldout(packed, tok_dir, a.eval_windows)}  # by vocab_size variant (None: the data's own)
    systems: list = [Minilab(packed, tok_dir, threads)]
    for name, recipe in map(parse_variant, a.variant):
        vocab = recipe.pop("vocab_size", None)
        if vocab not in data:
            v_packed, v_tok, _ = prepare_data(a, int(vocab))
            data[vocab] = Heldout(v_packed, v_tok, a.eval_windows)
        systems.append(Minilab(data[vocab].packed, data[vocab].tokenizer_dir, threads, recipe, name))
    problem = nanogpt_problem(a.nanogpt_dir, manifest)
    if problem:
        print(f"nanoGPT skipped: {problem}; reporting minilab's figures only", flush=True)
    else:
        systems.append(NanoGPT(a.nanogpt_dir, packed, data[None].vocab_size, threads))
    heldout = {s.name: next(d for d in data.values() if d.packed == s.packed) for s in systems}
    names = [s.name for s in systems]
    load0 = os.getloadavg()
    gemm = gemm_rate()  # the pace `minilab plan --budget` scales this run's throughputs by
    for d in data.values():
        print(f"data {d.packed} (vocab {d.vocab_size}); held-out {len(d.windows)} windows x {SEQ_LEN} tokens "
              f"= {d.n_bytes:,} bytes", flush=True)
    print(f"{threads} threads for every system; fp32 matmul {gemm:.1f} GFLOP/s; load {load0[0]:.1f}", flush=True)
    with tempfile.TemporaryDirectory(prefix="speedrun-") as tmp:
        step_s = {}
        for s in systems:
            (Path(tmp) / f"calib-{s.name}").mkdir()
            step_s[s.name] = s.calibrate(Path(tmp) / f"calib-{s.name}", a.calib_steps)
            print(f"[calibration] {s.name}: {step_s[s.name] * 1000:.0f} ms/step", flush=True)
        rows = run_pairs(systems, a.budgets, a.seeds, step_s, Path(tmp), lambda s, fn: heldout[s.name].bpb(fn))
    summary = summarize_runs(rows, a.budgets, names)
    print_table(summary, names)
    result = {"benchmark": "speedrun", "machine": platform.processor() or platform.machine(), "threads": threads,
              "gemm_gflops": gemm, "loadavg_start": load0[0], "loadavg_end": os.getloadavg()[0],
              "data": str(packed), "vocab_size": data[None].vocab_size,
              "data_label": a.data or (Path(a.text).name if a.text else "built-in corpus (Jane Austen's novels)"),
              "eval": {s.name: {"data": str(heldout[s.name].packed), "vocab_size": heldout[s.name].vocab_size,
                                "windows": len(heldout[s.name].windows), "seq_len": SEQ_LEN,
                                "bytes": heldout[s.name].n_bytes} for s in systems},
              "recipes": {**{s.name: s.recipe for s in systems if isinstance(s, Minilab)},
                          "nanogpt": {"config": NANOGPT_CONFIG, **NANOGPT_RECIPE, "warmup_frac": NANOGPT_WARMUP_FRAC}},
              "step_s": step_s, "budgets_min": a.budgets, "seeds": a.seeds, "runs": rows, "peer_skipped": problem,
              **summary}
    print(json.dumps(result))
    if a.scaling_out:
        out = Path(a.scaling_out)
        tmp = out.with_name(f".{out.name}.tmp")
        tmp.write_text(json.dumps(scaling_of(result), indent=1) + "\n")
        tmp.replace(out)
        print(f"scaling written to {out}", flush=True)


if __name__ == "__main__":
    main()
