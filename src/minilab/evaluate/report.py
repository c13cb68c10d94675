"""The evaluation report: `results.json`, `report.md` and PNG plots a person can open.

Plots use matplotlib's object-oriented API with an explicit Agg canvas (`Figure` +
`FigureCanvasAgg`) and never pyplot: nothing global is switched (no backend selection, no
figure registry that leaks memory), and it works on machines without a display.

Training curves come from the run's `metrics.jsonl` (written by the training loop: kind "train"
with step/tokens/loss/lr/tokens_per_s, kind "eval" with val_loss). The run directory is found
from the model directory's manifest (`run_dir`, set by `minilab pretrain` for `<run>/final/`),
else the model directory's parent or the directory itself when it holds a metrics.jsonl.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from minilab.fsutil import atomic_path, write_json_atomic, write_text_atomic

log = logging.getLogger("minilab.eval")


# ---- training metrics ---------------------------------------------------------------------------
def find_metrics(model_dir: str | Path) -> Path | None:
    """The metrics.jsonl of the run that produced `model_dir`, or None."""
    model_dir = Path(model_dir)
    candidates = []
    manifest = model_dir / "manifest.json"
    if manifest.is_file():
        try:
            run_dir = json.loads(manifest.read_text(encoding="utf-8")).get("run_dir")
        except (json.JSONDecodeError, AttributeError):
            run_dir = None  # a broken manifest only costs us the plots
        if run_dir:
            candidates.append(Path(run_dir) / "metrics.jsonl")
    candidates += [model_dir.parent / "metrics.jsonl", model_dir / "metrics.jsonl"]
    return next((c for c in candidates if c.is_file()), None)


def read_metrics(path: str | Path) -> dict[str, list[dict[str, Any]]]:
    """Records of metrics.jsonl grouped by kind; an unreadable line (a crash mid-write) is skipped."""
    groups: dict[str, list[dict[str, Any]]] = {"train": [], "eval": []}
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict):
                groups.setdefault(str(rec.get("kind")), []).append(rec)
    return groups


# ---- plots --------------------------------------------------------------------------------------
def _new_figure(title: str, xlabel: str, ylabel: str):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)  # attaches itself as fig.canvas: rendering goes through Agg
    ax = fig.add_subplot()
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    return fig, ax


def _save(fig, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


def _series(records: list[dict[str, Any]], x: str, y: str) -> tuple[list[float], list[float]]:
    pts = [(r[x], r[y]) for r in records if isinstance(r.get(x), (int, float)) and isinstance(r.get(y), (int, float))]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_training(metrics: dict[str, list[dict[str, Any]]], plots_dir: Path) -> list[Path]:
    """loss.png (train and val loss vs tokens), lr.png (LR vs step), throughput.png (tokens/s vs
    step); each only when the metrics hold its data."""
    written = []
    train, evals = metrics.get("train", []), metrics.get("eval", [])
    tx, ty = _series(train, "tokens", "loss")
    vx, vy = _series(evals, "tokens", "val_loss")
    if ty or vy:
        fig, ax = _new_figure("Loss", "tokens seen", "cross-entropy (nats/token)")
        if ty:
            ax.plot(tx, ty, label="train", linewidth=1)
        if vy:
            ax.plot(vx, vy, "o-", label="validation")
        ax.legend()
        written.append(_save(fig, plots_dir / "loss.png"))
    for key, name, title, ylabel in (("lr", "lr.png", "Learning-rate schedule", "learning rate"),
                                     ("tokens_per_s", "throughput.png", "Throughput", "tokens / s")):
        x, y = _series(train, "step", key)
        if y:
            fig, ax = _new_figure(title, "optimizer step", ylabel)
            ax.plot(x, y, linewidth=1)
            written.append(_save(fig, plots_dir / name))
    return written


def plot_multiple_choice(mc: list[dict[str, Any]], plots_dir: Path) -> Path | None:
    """Accuracy (per-byte normalised) with its 95% CI beside chance and majority, one group per file."""
    if not mc:
        return None
    fig, ax = _new_figure("Multiple choice (accuracy, 95% CI)", "", "accuracy")
    names = [Path(r["file"]).stem for r in mc]
    xs = list(range(len(mc)))
    acc = [r["accuracy"]["per_byte"]["accuracy"] for r in mc]
    err = [[a - r["accuracy"]["per_byte"]["ci95"][0] for a, r in zip(acc, mc, strict=True)],
           [r["accuracy"]["per_byte"]["ci95"][1] - a for a, r in zip(acc, mc, strict=True)]]
    ax.bar([x - 0.25 for x in xs], acc, width=0.25, yerr=err, capsize=4, label="model (per-byte)")
    ax.bar(xs, [r["baselines"]["chance"] for r in mc], width=0.25, label="chance")
    ax.bar([x + 0.25 for x in xs], [r["baselines"]["majority"]["accuracy"] for r in mc], width=0.25,
           label="majority class")
    ax.set_xticks(xs, names)
    ax.set_ylim(0, 1)
    ax.legend()
    return _save(fig, plots_dir / "multiple_choice.png")


# ---- markdown -----------------------------------------------------------------------------------
def _fmt(v: Any, digits: int = 4) -> str:
    return "–" if v is None else f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def _perplexity_md(ppl: list[dict[str, Any]]) -> list[str]:
    lines = ["## Perplexity", "", "| source | tokens scored | mean NLL (nats) | perplexity | bits per byte |",
             "|---|---:|---:|---:|---:|"]
    for r in ppl:
        lines.append(f"| {r['source']} | {r['tokens']:,} | {_fmt(r['mean_nll'])} | {_fmt(r['perplexity'], 2)} "
                     f"| {_fmt(r.get('bits_per_byte'))} |")
    return [*lines, ""]


def _mc_md(mc: list[dict[str, Any]]) -> list[str]:
    lines = ["## Multiple choice", ""]
    for r in mc:
        maj, chance = r["baselines"]["majority"], r["baselines"]["chance"]
        sample = (f"{r['n_items']} items drawn at random (seed {r['seed']}) from {r['n_in_file']}"
                  if r["sampled"] else f"all {r['n_items']} items")
        lines += [f"### {Path(r['file']).name}", "", f"{sample}. Baselines: chance {chance:.3f}, "
                  f"majority class ('{maj['answer']}') {maj['accuracy']:.3f}.", "",
                  "| scoring | accuracy | 95% CI (Wilson) | vs majority |", "|---|---:|---|---|"]
        for norm, a in r["accuracy"].items():
            lo, hi = a["ci95"]
            verdict = ("above" if lo > maj["accuracy"] else "below" if hi < maj["accuracy"]
                       else "not distinguishable")
            lines.append(f"| {norm} | {a['accuracy']:.3f} ({a['correct']}/{r['n_items']}) | "
                         f"[{lo:.3f}, {hi:.3f}] | {verdict} |")
        lines.append("")
    return lines


def _generations_md(gens: dict[str, Any]) -> list[str]:
    s, n = gens["sampling"], len(gens["items"])
    lines = ["## Generations", "",
             f"Greedy, and sampled with seed {s['seed']}, temperature {s['temperature']}, top-k {s['top_k']}, "
             f"top-p {s['top_p']}, repetition penalty {s['repetition_penalty']}; at most {gens['max_new_tokens']} "
             "new tokens.", "", "| decoding | ended at a stop token | distinct 4-grams (mean) |", "|---|---|---|"]
    for how, f in gens["summary"].items():
        d4 = "-" if f["distinct4"] is None else f"{f['distinct4']:.3f}"
        lines.append(f"| {how} | {f['stopped']}/{n} | {d4} |")
    lines.append("")
    end = {True: " (ended at a stop token)", False: " (ran to the token limit)"}
    for g in gens["items"]:
        lines += [f"**Prompt:** `{g['prompt']}`", "", f"- greedy{end[g['greedy_stopped']]}: {g['greedy']!r}",
                  f"- sampled{end[g['sampled_stopped']]}: {g['sampled']!r}", ""]
    return lines


def _training_md(metrics: dict[str, list[dict[str, Any]]] | None, plots: list[Path], out_dir: Path) -> list[str]:
    lines = ["## Training", ""]
    if not metrics:
        return [*lines, "No metrics.jsonl found for this model (not trained by `minilab pretrain`?).", ""]
    train, evals = metrics.get("train", []), metrics.get("eval", [])
    if train:
        last = train[-1]
        lines.append(f"Last train step {last.get('step')}: loss {_fmt(last.get('loss'))} after "
                     f"{last.get('tokens', 0):,} tokens.")
    if evals:
        last = evals[-1]
        epochs = last.get("epochs")
        if isinstance(epochs, dict):  # tokens seen / tokens in each dataset
            epochs = ", ".join(f"{Path(str(k)).name} {_fmt(v, 3)}" for k, v in epochs.items())
        lines.append(f"Last validation: loss {_fmt(last.get('val_loss'))}, perplexity {_fmt(last.get('val_ppl'), 2)}"
                     f", epochs {_fmt(epochs, 3)}.")
    lines.append("")
    lines += [f"![{p.stem}]({p.relative_to(out_dir).as_posix()})" for p in plots]
    return [*lines, ""]


def render_markdown(results: dict[str, Any], metrics: dict[str, list[dict[str, Any]]] | None,
                    plots: list[Path], out_dir: Path) -> str:
    m = results["model"]
    lines = [f"# Evaluation: {m['path']}", "", f"{m.get('params', 0):,} parameters, vocab {m.get('vocab_size')}, "
             f"max_seq_len {m.get('max_seq_len')}. Evaluated {results['created']} with seed {results['seed']}.", ""]
    if results.get("perplexity"):
        lines += _perplexity_md(results["perplexity"])
    if results.get("multiple_choice"):
        lines += _mc_md(results["multiple_choice"])
        lines += [f"![{p.stem}]({p.relative_to(out_dir).as_posix()})" for p in plots if p.stem == "multiple_choice"]
        lines.append("")
    if results.get("generations"):
        lines += _generations_md(results["generations"])
    lines += _training_md(metrics, [p for p in plots if p.stem != "multiple_choice"], out_dir)
    return "\n".join(lines)


def write_report(out_dir: str | Path, results: dict[str, Any], metrics_path: Path | None) -> dict[str, Any]:
    """Write plots/*.png, results.json, report.md and mc/<file>.jsonl (per-item scores) into
    `out_dir`; returns the paths written."""
    out_dir = Path(out_dir)
    plots_dir = out_dir / "plots"
    metrics = read_metrics(metrics_path) if metrics_path is not None else None
    plots = plot_training(metrics, plots_dir) if metrics else []
    mc = results.get("multiple_choice") or []
    if (mc_plot := plot_multiple_choice(mc, plots_dir)) is not None:
        plots.append(mc_plot)
    for i, r in enumerate(mc):  # per-item detail goes beside the summary, not into results.json
        items = r.pop("items", [])
        r["items_file"] = f"mc/{i:02d}-{Path(r['file']).stem}.jsonl"  # the index: two files may share a name
        write_text_atomic(out_dir / r["items_file"], "".join(json.dumps(i) + "\n" for i in items))
    results["plots"] = [p.relative_to(out_dir).as_posix() for p in plots]
    results["metrics_file"] = str(metrics_path) if metrics_path else None
    write_json_atomic(out_dir / "results.json", results)
    write_text_atomic(out_dir / "report.md", render_markdown(results, metrics, plots, out_dir))
    return {"results": out_dir / "results.json", "report": out_dir / "report.md", "plots": plots}
