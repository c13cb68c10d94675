"""Filesystem helpers: atomic writes, content hashes, sizes.

Every file minilab writes goes to a temporary sibling first and is renamed into place, so a
crash or Ctrl-C never leaves a half-written manifest, checkpoint or model that a later stage
would trust.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# What an atomic write leaves beside its output X when its process dies before the `finally` runs
# (SIGKILL, power loss): the temporary `.X.<pid>-<random>.tmp`, or the replaced old copy
# `.X.old-<pid>` / the half-removed `.X.deleting-<pid>`. The pid tells a live writer's (left alone)
# from a dead one's (removed by the next write of X, listed by `du`, removed by `cleanup`).
LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?:(?P<pid>\d+)-[^.]+\.tmp|(?P<kind>old|deleting)-(?P<pid2>\d+))$")


def temp_prefix(path: Path) -> str:
    """The prefix of `path`'s temporary siblings: `.NAME.PID-`."""
    return f".{path.name}.{os.getpid()}-"


def leftover_pid(name: str, output: str | None = None) -> int | None:
    """The writer's pid if `name` is a leftover of an atomic write (of `output` when given), else None."""
    m = LEFTOVER.match(name)
    if m is None or (output is not None and m["name"] != output):
        return None
    return int(m["pid"] or m["pid2"])


def pid_alive(pid: int) -> bool:
    """True if a process `pid` exists on this machine (one we may not signal counts as alive)."""
    if pid <= 0:
        return False  # 0 and negatives would signal process groups
    try:
        os.kill(pid, 0)
    except PermissionError:
        return True
    except (ProcessLookupError, OverflowError):
        return False
    return True


def stale_leftovers(directory: str | os.PathLike, output: str | None = None) -> list[Path]:
    """Leftovers of atomic writes in `directory` (of `output` only, when given) whose writer is dead.
    A replaced old copy `.X.old-PID` counts only while X exists: a writer killed between its two
    renames left it as the last copy of X."""
    directory = Path(directory)
    try:
        names = sorted(os.listdir(directory))
    except OSError:
        return []
    found = []
    for n in names:
        m = LEFTOVER.match(n)
        if m is None or (output is not None and m["name"] != output) or pid_alive(int(m["pid"] or m["pid2"])):
            continue
        if m["kind"] == "old" and not os.path.lexists(directory / m["name"]):
            continue
        found.append(directory / n)
    return found


def find_stale_leftovers(root: str | os.PathLike, max_depth: int | None = None) -> list[Path]:
    """Leftovers of dead writers anywhere below `root` (`max_depth` levels of folders at most; symlinks
    not followed; a leftover folder is not searched)."""
    root = Path(root)
    found: list[Path] = []
    for parent, dirs, files in os.walk(root):
        here = Path(parent)
        stale = set(stale_leftovers(here)) if any(leftover_pid(n) is not None for n in dirs + files) else set()
        found += sorted(stale)
        depth = len(here.relative_to(root).parts)
        dirs[:] = [] if max_depth is not None and depth >= max_depth else \
            [d for d in sorted(dirs) if here / d not in stale and leftover_pid(d) is None]
    return found


def remove_path(path: Path) -> None:
    """Remove a file, a symlink or a directory tree; already gone is fine."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _remove_stale_leftovers(path: Path) -> None:
    """Before writing `path`: remove what dead writers of `path` left beside it."""
    for p in stale_leftovers(path.parent, path.name):
        remove_path(p)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_leftovers(path)
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path), suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
        _remove_stale_leftovers(path)  # now also an old copy a writer killed mid-replace left
    finally:
        tmp_path.unlink(missing_ok=True)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def read_json_if_present(path: str | os.PathLike) -> dict[str, Any]:
    """A JSON object file that may be absent (a model's tokenizer_config.json, manifest.json, the
    registry index): {} when it is missing; a file that is not a JSON object is a one-line error
    naming it, never read as empty (a caller that rewrites it would lose what it held)."""
    from minilab.errors import MinilabError

    path = Path(path)
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        where = f"line {e.lineno}: " if isinstance(e, json.JSONDecodeError) else ""
        raise MinilabError(f"{path}: {where}invalid JSON: {getattr(e, 'msg', e)}") from None
    if not isinstance(data, dict):
        raise MinilabError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def read_user_text(path: str | os.PathLike) -> str:
    """A text file the user wrote (JSON, JSON Lines, prompts): UTF-8, a byte-order mark (as some editors
    write) dropped; anything else a one-line error naming the file."""
    from minilab.errors import MinilabError

    try:
        return Path(path).read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise MinilabError(f"{path}: not UTF-8 text (byte {e.start}); save it as UTF-8") from None


def text_lines(text: str) -> Iterator[tuple[int, str]]:
    """(line number, line) of a JSON Lines or line-per-item text: only \\n ends a line (str.splitlines()
    also splits at U+2028, U+0085 and others, which json.dumps(ensure_ascii=False) writes raw inside
    strings); a trailing \\r is JSON whitespace, and stripped by callers of plain text."""
    return enumerate(text.split("\n"), 1)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside `path`; move it onto `path` only if the block succeeds.

    With `overwrite`, an existing `path` is replaced only after the new one is complete, so a
    failure at any point leaves the old directory as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and not overwrite:
        raise FileExistsError(path)
    _remove_stale_leftovers(path)
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(path), suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
        _remove_stale_leftovers(path)  # now also an old copy a writer killed mid-replace left
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def cache_root() -> Path:
    """minilab's own cache: `$MINILAB_CACHE`, else `~/.cache/minilab` (read at call time). What is
    cached there (the built-in corpus) and what `minilab du` reports both come from here."""
    return Path(os.environ.get("MINILAB_CACHE") or Path.home() / ".cache" / "minilab").expanduser()


def hf_hub_cache() -> Path:
    """The hub cache huggingface_hub uses, by its own rules (HF_HUB_CACHE, else the legacy
    HUGGINGFACE_HUB_CACHE, else HF_HOME/hub with HF_HOME defaulting to $XDG_CACHE_HOME/huggingface,
    then ~/.cache/huggingface), read at call time: importing huggingface_hub freezes its constants,
    and `du`/`cache` stay light by not importing it for a path."""
    env = os.environ
    home = env.get("HF_HOME", os.path.join(env.get("XDG_CACHE_HOME", os.path.join(os.path.expanduser("~"), ".cache")),
                                           "huggingface"))
    home = os.path.expandvars(os.path.expanduser(home))
    hub = env.get("HF_HUB_CACHE", env.get("HUGGINGFACE_HUB_CACHE", os.path.join(home, "hub")))
    return Path(os.path.expandvars(os.path.expanduser(hub)))


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def dir_size(path: str | os.PathLike) -> int:
    """Bytes on disk of the files below `path` (symlinks not followed)."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            p = os.path.join(root, name)
            if not os.path.islink(p):
                total += os.path.getsize(p)
    return total


def format_params(n: int) -> str:
    """Human size for names: 1_812_352 -> '1.8M', 23_000_000 -> '23M', 1_100_048_384 -> '1.1B'.
    Here, not in `model`, so the registry lists models without importing torch."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            v = n / scale
            text = f"{v:.1f}" if v < 10 else f"{v:.0f}"
            return text.removesuffix(".0") + unit
    return str(n)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
