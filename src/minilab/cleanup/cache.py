"""`minilab cache ls|rm|prune`: the Hugging Face hub cache, through huggingface_hub's own API.

`scan_cache_dir` reads the cache and `HFCacheInfo.delete_revisions(...)` builds the deletion
plan (which blobs, snapshots and refs go, and the bytes freed); minilab parses nothing by hand.
Every command that deletes is a dry run unless `--yes` is given.

- `ls`: repositories, largest first (type, size, files, revisions, refs, last accessed);
- `rm REPO [REPO ...]`: every revision of the named repositories (repository ids match exactly;
  `--revision HASH` for one: the full hash or a unique prefix of at least 7 hex digits);
- `prune`: detached revisions (no branch or tag points at them: superseded downloads), and with
  `--unused-days N` whole repositories not accessed for N days.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from minilab.errors import MinilabError
from minilab.fsutil import hf_hub_cache, human_bytes

MIN_PREFIX = 7  # hex digits of a --revision prefix, as git's short hashes


def scan() -> Any:
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    cache = hf_hub_cache()
    try:
        return scan_cache_dir(cache)
    except CacheNotFound:
        raise MinilabError(f"no Hugging Face cache at {cache} (set HF_HOME or HF_HUB_CACHE)") from None


def list_repos(info: Any) -> list[dict[str, Any]]:
    rows = [{"repo_id": r.repo_id, "type": r.repo_type, "size": r.size_on_disk, "files": r.nb_files,
             "revisions": len(r.revisions), "refs": sorted(ref for rev in r.revisions for ref in rev.refs),
             "last_accessed": r.last_accessed, "path": str(r.repo_path)} for r in info.repos]
    return sorted(rows, key=lambda x: -x["size"])


def select_revisions(info: Any, repos: list[str] | None = None, revision: str | None = None,
                     detached: bool = False, unused_days: float | None = None) -> list[str]:
    """Commit hashes to delete: of named repos (one revision or all), detached ones, or of
    repositories not accessed for `unused_days`."""
    hashes: list[str] = []
    known = {r.repo_id for r in info.repos}
    for name in repos or []:
        if name not in known:
            raise MinilabError(f"'{name}' is not in the cache at {info.cache_dir or hf_hub_cache()} "
                               f"(cached: {', '.join(sorted(known)) or 'nothing'})")
    if repos and revision is not None:
        return [_match_revision([rev for r in info.repos if r.repo_id in repos for rev in r.revisions], revision)]
    now = time.time()
    for r in info.repos:
        if repos and r.repo_id in repos:
            hashes += [rev.commit_hash for rev in r.revisions]
        elif not repos:
            stale = unused_days is not None and now - r.last_accessed > unused_days * 86400
            hashes += [rev.commit_hash for rev in r.revisions if stale or (detached and not rev.refs)]
    return hashes


def _match_revision(revisions: list[Any], revision: str) -> str:
    """The one commit hash `revision` names: the full hash, or a unique prefix of at least
    MIN_PREFIX hex digits (never '' or a few characters, which would select many)."""
    exact = [rev.commit_hash for rev in revisions if rev.commit_hash == revision]
    if exact:
        return exact[0]
    if len(revision) < MIN_PREFIX or not all(c in "0123456789abcdef" for c in revision):
        raise MinilabError(f"--revision {revision!r}: give a full commit hash or at least {MIN_PREFIX} of its "
                           "leading hex digits (see 'minilab cache ls')")
    found = sorted({rev.commit_hash for rev in revisions if rev.commit_hash.startswith(revision)})
    if not found:
        cached = ", ".join(sorted(rev.commit_hash[:12] for rev in revisions)) or "none"
        raise MinilabError(f"--revision {revision}: no cached revision of the named repositories starts with it "
                           f"(cached: {cached})")
    if len(found) > 1:
        raise MinilabError(f"--revision {revision}: ambiguous, it starts {len(found)} revisions "
                           f"({', '.join(found)}); give more digits")
    return found[0]


def add_arguments(p: argparse.ArgumentParser) -> None:
    from minilab.cliargs import flag, float_range

    sub = p.add_subparsers(dest="cache_cmd", metavar="COMMAND", required=True)
    ls = sub.add_parser("ls", help="cached repositories, largest first")
    ls.add_argument("--json", action="store_true")
    rm = sub.add_parser("rm", help="remove repositories (or one revision) from the cache")
    rm.add_argument("repos", nargs="+", metavar="REPO_ID")
    rm.add_argument("--revision", help=f"only this commit: its full hash or a unique prefix of >= {MIN_PREFIX} "
                                       "hex digits")
    prune = sub.add_parser("prune", help="remove detached revisions and, optionally, long-unused repositories")
    flag(prune, "--unused-days", type=float_range(0), metavar="N", help="also repositories not accessed for N days")
    for sp in (rm, prune):
        sp.add_argument("--yes", "-y", action="store_true", help="delete (default: only show what would go)")
        sp.add_argument("--json", action="store_true")


def main(args: argparse.Namespace) -> int:
    info = scan()
    if args.cache_cmd == "ls":
        rows = list_repos(info)
        if args.json:
            print(json.dumps({"cache_dir": str(hf_hub_cache()), "size": info.size_on_disk, "repos": rows}, indent=2))
            return 0
        for r in rows:
            refs = ",".join(r["refs"]) or "-"
            print(f"{human_bytes(r['size']):>10}  {r['type']:<8} {r['repo_id']:<50} {r['files']:>5} files  "
                  f"{r['revisions']} rev  refs {refs}")
        print(f"{human_bytes(info.size_on_disk)} in {len(rows)} repositories at {hf_hub_cache()}")
        return 0
    if args.cache_cmd == "rm":
        hashes = select_revisions(info, repos=args.repos, revision=args.revision)
    else:
        hashes = select_revisions(info, detached=True, unused_days=args.unused_days)
    strategy = info.delete_revisions(*hashes) if hashes else None
    freed = strategy.expected_freed_size if strategy else 0
    if args.json:
        print(json.dumps({"revisions": hashes, "bytes": freed, "applied": bool(args.yes and strategy)}, indent=2))
    else:
        for h in hashes:
            print(f"delete revision {h}")
        print(f"{len(hashes)} revisions, {'frees' if args.yes else 'would free'} {human_bytes(freed)} ({freed:,} bytes)"
              + ("" if args.yes or not hashes else "; run again with --yes to delete"))
    if args.yes and strategy:
        strategy.execute()
    return 0
