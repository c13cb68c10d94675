"""`minilab du`: where the disk went: minilab's data, tokenizers, runs, models, its own cache and
the Hugging Face hub cache, by category, largest first, each with its largest entries; and the
leftovers of killed writes (`leftover temp`: hidden temporaries whose process is gone, which
`minilab cleanup` removes), already counted in their category."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from minilab.fsutil import cache_root, dir_size, find_stale_leftovers, hf_hub_cache, human_bytes

LEFTOVERS = "leftover temp"


def categories(root: str | os.PathLike = ".", models_dir: str | None = None) -> list[tuple[str, Path]]:
    from minilab.registry import models_root

    base = Path(root)
    return [("data", base / "data"), ("tokenizers", base / "tokenizers"), ("runs", base / "runs"),
            ("models", models_root(models_dir)), ("minilab cache", cache_root())]  # where the corpus is cached


def usage(root: str | os.PathLike = ".", models_dir: str | None = None, top: int = 5) -> list[dict[str, Any]]:
    """One row per category: path, bytes, and its `top` largest children; largest first."""
    rows = []
    for name, path in categories(root, models_dir):
        if not path.is_dir():
            continue
        children = sorted(((dir_size(c) if c.is_dir() else c.stat().st_size, c.name) for c in path.iterdir()
                           if not c.is_symlink()), reverse=True)
        rows.append({"category": name, "path": str(path), "bytes": sum(s for s, _ in children),
                     "largest": [{"name": n, "bytes": s} for s, n in children[:top]]})
    leftovers = sorted(((dir_size(p) if p.is_dir() else p.stat().st_size, p)
                        for _, path in categories(root, models_dir) if path.is_dir()
                        for p in find_stale_leftovers(path)), key=lambda t: (-t[0], str(t[1])))
    hub = hf_hub_cache()
    if hub.is_dir():
        from huggingface_hub import scan_cache_dir

        info = scan_cache_dir(hub)
        repos = sorted(info.repos, key=lambda r: -r.size_on_disk)
        rows.append({"category": "hf hub cache", "path": str(hub), "bytes": info.size_on_disk,
                     "largest": [{"name": f"{r.repo_type}:{r.repo_id}", "bytes": r.size_on_disk} for r in repos[:top]]})
    rows = sorted(rows, key=lambda r: -r["bytes"])
    if leftovers:  # last, and not added to the total: these bytes are inside the categories above
        rows.append({"category": LEFTOVERS, "path": str(Path(root)), "bytes": sum(s for s, _ in leftovers),
                     "largest": [{"name": str(p), "bytes": s} for s, p in leftovers[:top]]})
    return rows


def add_arguments(p: argparse.ArgumentParser) -> None:
    from minilab.cliargs import flag

    p.add_argument("root", nargs="?", default=".", help="project directory holding data/, runs/ ... (default .)")
    flag(p, "--models-dir", metavar="DIR", help="registry root (default $MINILAB_MODELS_DIR or ./models)")
    p.add_argument("--top", type=int, default=5, help="largest entries shown per category")
    p.add_argument("--json", action="store_true")


def main(args: argparse.Namespace) -> int:
    rows = usage(args.root, args.models_dir, args.top)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for r in rows:
        print(f"{human_bytes(r['bytes']):>10}  {r['category']:<14} {r['path']}")
        for c in r["largest"]:
            print(f"{'':>12}{human_bytes(c['bytes']):>10}  {c['name']}")
    print(f"{human_bytes(sum(r['bytes'] for r in rows if r['category'] != LEFTOVERS)):>10}  total"
          + ("; leftover temp is counted above, `minilab cleanup PATH` removes it"
             if rows and rows[-1]["category"] == LEFTOVERS else ""))
    return 0
