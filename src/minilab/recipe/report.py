"""The recipe report: `<workdir>/report.md` and `report.html`, one page for the whole run.

The summary table, then one section per stage: its status and metric, the plots of every
training stage (loss against tokens, learning rate, throughput, from its metrics.jsonl) and the
eval stages' results with their plots and sample generations (linked to their own report.md).
"""

from __future__ import annotations

import html
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from minilab.fsutil import write_text_atomic
from minilab.stage import get as get_stage


def _sections(runner, rows) -> list[dict[str, Any]]:
    from minilab.evaluate.report import plot_training, read_metrics

    work = runner.recipe.workdir
    out = []
    for r in rows:
        stage = runner.recipe.stage(r.stage)
        d = runner.recipe.stage_dir(r.stage)
        sec: dict[str, Any] = {"row": r, "kind": stage.kind, "plots": [], "links": [], "text": []}
        metrics = d / "metrics.jsonl"
        st = get_stage(stage.kind)
        if st.trains and metrics.is_file():
            sec["plots"] = plot_training(read_metrics(metrics), work / "report-plots" / r.stage)
        if st.report is not None:
            sec.update(st.report(d))
        out.append(sec)
    return out


def write_report(runner, rows, total_s: float) -> Path:
    """Write report.md and report.html into the work directory; returns report.md's path."""
    from minilab.recipe.summary import fmt_seconds, summary_rows

    work = runner.recipe.workdir
    work.mkdir(parents=True, exist_ok=True)
    sections = _sections(runner, rows)
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    title = f"minilab recipe {runner.recipe.name}"
    head = ["stage", "status", "time", "output", "size", "key metric"]
    table = summary_rows(rows)

    rel = lambda p: os.path.relpath(p, work)  # noqa: E731
    md = [f"# {title}", "", f"{runner.recipe.description}".strip(), "",
          f"Recipe `{runner.recipe.path}`, work directory `{work}`, written {when}; "
          f"this run took {fmt_seconds(total_s)}.",
          "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    md += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in table]
    for sec in sections:
        r = sec["row"]
        md += ["", f"## {r.stage} ({sec['kind']}): {r.status}", ""]
        if r.metric:
            md.append(f"{r.metric}")
        md += [f"- {t}" for t in sec["text"]]
        md += [f"- [{rel(p)}]({rel(p)})" for p in sec["links"]]
        md += [f"![{Path(p).stem}]({rel(p)})" for p in sec["plots"]]
    md_path = work / "report.md"
    write_text_atomic(md_path, "\n".join(md) + "\n")

    e = html.escape
    h = ["<!doctype html><html><head><meta charset='utf-8'>", f"<title>{e(title)}</title>",
         "<style>body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
         "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px;text-align:left}"
         "img{max-width:520px;margin:4px}code{background:#f4f4f4}</style></head><body>",
         f"<h1>{e(title)}</h1><p>{e(runner.recipe.description)}</p>",
         f"<p>Recipe <code>{e(str(runner.recipe.path))}</code>, work directory <code>{e(str(work))}</code>, "
         f"written {e(when)}; this run took {e(fmt_seconds(total_s))}.</p>",
         "<table><tr>" + "".join(f"<th>{e(c)}</th>" for c in head) + "</tr>"]
    h += ["<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in table]
    h.append("</table>")
    for sec in sections:
        r = sec["row"]
        h.append(f"<h2>{e(r.stage)} ({e(sec['kind'])}): {e(r.status)}</h2>")
        if r.metric:
            h.append(f"<p>{e(r.metric)}</p>")
        if sec["text"] or sec["links"]:
            h.append("<ul>" + "".join(f"<li>{e(t)}</li>" for t in sec["text"])
                     + "".join(f"<li><a href='{e(rel(p))}'>{e(rel(p))}</a></li>" for p in sec["links"]) + "</ul>")
        h += [f"<img src='{e(rel(p))}' alt='{e(Path(p).stem)}'>" for p in sec["plots"]]
    h.append("</body></html>")
    write_text_atomic(work / "report.html", "\n".join(h) + "\n")
    return md_path
