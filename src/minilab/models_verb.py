"""`minilab models`: list, show and remove models in the registry (the library is `registry.py`)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from minilab.errors import MinilabError
from minilab.fsutil import format_params, human_bytes
from minilab.registry import ENV_VAR, list_models, models_root, removal_plan, remove_model, show_model, verify_manifest


def add_arguments(p: argparse.ArgumentParser) -> None:
    from minilab.cliargs import flag

    def models_dir(parser: argparse.ArgumentParser, default: Any) -> None:
        # Accepted before and after the subcommand; SUPPRESS on the subparsers keeps them from
        # resetting a value given before the subcommand.
        flag(parser, "--models-dir", metavar="DIR", default=default,
             help=f"registry root (default: ${ENV_VAR} or ./models)")

    models_dir(p, None)
    sub = p.add_subparsers(dest="models_cmd", metavar="COMMAND", required=True)
    ls = sub.add_parser("list", help="list registered models")
    ls.add_argument("--json", action="store_true", help="print JSON instead of a table")
    show = sub.add_parser("show", help="a model's manifest and files")
    show.add_argument("name", help="registry name or model directory")
    show.add_argument("--json", action="store_true", help="print JSON")
    show.add_argument("--verify", action="store_true", help="re-hash the files and compare with the manifest")
    rm = sub.add_parser("rm", help="remove a model from the registry")
    rm.add_argument("name", help="registry name")
    rm.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation")
    flag(rm, "--delete-files", action="store_true",
         help="also delete a linked directory outside the registry root")
    for sp in (ls, show, rm):
        models_dir(sp, argparse.SUPPRESS)


def _print_table(rows: list[dict[str, Any]], root: Path) -> None:
    if not rows:
        print(f"no models in {root}")
        return
    table = [("name", "type", "params", "size", "parent", "created")]
    for r in rows:
        size = "missing" if r["missing"] else human_bytes(r["size_bytes"])
        params = format_params(r["params"]) if isinstance(r["params"], int) else "?"
        created = (r["created"] or "")[:16].replace("T", " ")
        table.append((r["name"], r["type"], params, size, r["parent"] or "-", created))
    widths = [max(len(str(row[i])) for row in table) for i in range(len(table[0]))]
    for row in table:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def _print_show(info: dict[str, Any]) -> None:
    m = info["manifest"]
    params = m.get("params")
    lines = [("name", info["name"]), ("path", f"{info['path']} ({'linked' if info['linked'] else 'copy'})"),
             ("type", m.get("training_type")),
             ("params", f"{format_params(params)} ({params:,})" if isinstance(params, int) else params),
             ("parent", m.get("parent")), ("parent fp", m.get("parent_fingerprint")),
             ("lineage", " -> ".join(s.get("name", "?") for s in m.get("lineage", [])) or None),
             ("fingerprint", m.get("fingerprint")), ("tokenizer", m.get("tokenizer_sha256")),
             ("data", ", ".join(str(d.get("name", d)) if isinstance(d, dict) else str(d)
                                for d in m.get("data", [])) or None),
             ("metrics", json.dumps(m["metrics"]) if m.get("metrics") else None),
             ("created", m.get("created")),
             ("versions", ", ".join(f"{k} {v}" for k, v in (m.get("versions") or {}).items()) or None)]
    for key, value in lines:
        if value is not None:
            print(f"{key:<12}{value}")
    print(f"files       {len(info['files'])}, {human_bytes(info['size_bytes'])}")
    for f in info["files"]:
        print(f"  {human_bytes(f['size']):>10}  {f['path']}")


def _confirm(question: str) -> bool:
    try:
        return input(f"{question} [y/N] ").strip().lower() in ("y", "yes")
    except EOFError:
        return False


def main(args: argparse.Namespace) -> int:
    root = models_root(args.models_dir)
    if args.models_cmd == "list":
        rows = list_models(root)
        if args.json:
            print(json.dumps(rows, indent=2))
        else:
            _print_table(rows, root)
        return 0
    if args.models_cmd == "show":
        info = show_model(args.name, root)
        problems = verify_manifest(info["path"]) if args.verify else []
        if args.json:
            print(json.dumps({**info, **({"problems": problems} if args.verify else {})}, indent=2))
        else:
            _print_show(info)
            if args.verify:
                print("verify      " + ("ok" if not problems else "; ".join(problems)))
        return 1 if problems else 0
    # rm
    path, deletes = removal_plan(args.name, root, args.delete_files)
    what = f" and delete {path}" if deletes else f" (keeping {path})"
    if not args.yes:
        if not sys.stdin.isatty():
            raise MinilabError(f"refusing to remove '{args.name}' without confirmation: pass --yes")
        if not _confirm(f"remove '{args.name}' from the registry{what}?"):
            print("not removed")
            return 1
    result = remove_model(args.name, root, delete_files=args.delete_files)
    kept = "deleted its files" if result["deleted_files"] else f"kept {result['path']}"
    print(f"removed '{args.name}' ({kept})")
    return 0
