"""The built-in default corpus: Jane Austen's six novels, fetched on first use from Debian.

`minilab corpus --source default` must work with no hub access and no files from the user, and
we do not commit other people's text into the repository. Debian packages the novels for R as
`r-cran-janeaustenr` (Project Gutenberg texts; the novels are in the public domain, the R
package is MIT-licensed). On first use we `apt-get download` that package (no root needed, no
install), unpack the .deb in Python (ar + tar.xz), read R's lazy-load database with
`minilab.data.rdata`, and cache the novels as plain text under `$MINILAB_CACHE/default-corpus/`
(default `~/.cache/minilab`) with a provenance record that the data card quotes.

Documents are chapters (about 270 in all, ~4 M characters, ~0.75 M words), with the R
vector's hard-wrapped lines re-joined into paragraphs.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from minilab.errors import MinilabError

log = logging.getLogger("minilab.default_corpus")

PACKAGE = "r-cran-janeaustenr"
NOVELS = {"sensesensibility": "Sense and Sensibility (1811)", "prideprejudice": "Pride and Prejudice (1813)",
          "mansfieldpark": "Mansfield Park (1814)", "emma": "Emma (1815)",
          "northangerabbey": "Northanger Abbey (1817)", "persuasion": "Persuasion (1817)"}
LICENSE = ("public domain (the novels, 1811-1817; Project Gutenberg texts); R package janeaustenr "
           "by Julia Silge, MIT licence; Debian packaging MIT")
_CHAPTER = re.compile(r"^\s*chapter\s+([0-9]+|[ivxlc]+)\b", re.IGNORECASE)


def cache_dir() -> Path:
    from minilab.fsutil import cache_root

    return cache_root() / "default-corpus" / "janeaustenr"


def _ar_members(data: bytes) -> dict[str, bytes]:
    """Members of a Unix ar archive (the container of a .deb)."""
    if data[:8] != b"!<arch>\n":
        raise MinilabError("downloaded package is not a .deb (ar) archive")
    pos, out = 8, {}
    while pos + 60 <= len(data):
        header = data[pos:pos + 60]
        name = header[:16].decode().strip().rstrip("/")
        size = int(header[48:58].decode().strip())
        out[name] = data[pos + 60:pos + 60 + size]
        pos += 60 + size + (size % 2)  # members are 2-byte aligned
    return out


def extract_novels(deb_path: Path) -> tuple[dict[str, list[str]], str]:
    """The novels' line vectors from the .deb, and its version (from the control file)."""
    from minilab.data.rdata import read_lazyload_db

    members = _ar_members(deb_path.read_bytes())
    data_name = next((n for n in members if n.startswith("data.tar")), None)
    control_name = next((n for n in members if n.startswith("control.tar")), None)
    if data_name is None or control_name is None:
        raise MinilabError(f"{deb_path}: no data/control archive inside the .deb")
    version = "unknown"
    with tarfile.open(fileobj=io.BytesIO(members[control_name])) as tf:
        control = tf.extractfile(next(m for m in tf.getmembers() if m.name.endswith("control")))
        for line in control.read().decode().splitlines():
            if line.startswith("Version:"):
                version = line.split(":", 1)[1].strip()
    with tempfile.TemporaryDirectory() as tmp, tarfile.open(fileobj=io.BytesIO(members[data_name])) as tf:
        wanted = [m for m in tf.getmembers() if "/janeaustenr/data/Rdata.rd" in m.name and m.isfile()]
        for m in wanted:
            (Path(tmp) / Path(m.name).name).write_bytes(tf.extractfile(m).read())
        db = read_lazyload_db(Path(tmp) / "Rdata")
    novels = {k: v for k, v in db.items() if k in NOVELS}
    if len(novels) != len(NOVELS):
        raise MinilabError(f"{deb_path}: expected the six novels, found {sorted(db)}")
    return novels, version


def _download_deb(dest: Path) -> Path:
    apt = shutil.which("apt-get")
    if apt is None:
        raise MinilabError("the built-in default corpus is fetched with apt-get (Debian/Ubuntu), which is "
                           "not available here; give your own text with --source PATH instead")
    proc = subprocess.run([apt, "download", PACKAGE], cwd=dest, capture_output=True, text=True)
    debs = list(dest.glob(f"{PACKAGE}_*.deb"))
    if (proc.returncode != 0 or not debs) and hasattr(os, "geteuid") and os.geteuid() == 0:
        # A fresh machine or container often has empty package lists; as root we can fill them.
        log.info("apt-get download failed; running `apt-get update` once and retrying")
        subprocess.run([apt, "update", "-qq"], capture_output=True, text=True)
        proc = subprocess.run([apt, "download", PACKAGE], cwd=dest, capture_output=True, text=True)
        debs = list(dest.glob(f"{PACKAGE}_*.deb"))
    if proc.returncode != 0 or not debs:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise MinilabError(f"could not download {PACKAGE} with apt-get ({last}); run `apt-get update` "
                           "or give your own text with --source PATH")
    return debs[0]


def ensure_cached() -> Path:
    """The cache folder with the novels as .txt and provenance.json, fetching them if needed."""
    from minilab.fsutil import atomic_dir, sha256_file, write_json_atomic

    target = cache_dir()
    if (target / "provenance.json").is_file():
        return target
    log.info("fetching the default corpus (%s) with apt-get download ...", PACKAGE)
    with tempfile.TemporaryDirectory() as dl:
        deb = _download_deb(Path(dl))
        novels, version = extract_novels(deb)
        deb_sha = sha256_file(deb)
        with atomic_dir(target, overwrite=True) as tmp:
            files = {}
            for key, lines in novels.items():
                path = tmp / f"{key}.txt"
                path.write_text("\n".join(x or "" for x in lines) + "\n", encoding="utf-8")
                files[key] = {"title": NOVELS[key], "file": path.name, "sha256": sha256_file(path)}
            write_json_atomic(tmp / "provenance.json", {
                "name": "Jane Austen's novels (janeaustenr)", "license": LICENSE,
                "provenance": (f"Debian package {PACKAGE} {version} (pool/main/r/{PACKAGE}/{deb.name}, "
                               f"sha256 {deb_sha}), fetched with `apt-get download` and read from its "
                               "R lazy-load database data/Rdata.rdb; upstream "
                               "https://cran.r-project.org/package=janeaustenr"),
                "debian_package": PACKAGE, "debian_version": version, "deb_sha256": deb_sha, "files": files})
    return target


def chapters(lines: list[str]) -> Iterator[tuple[int, str]]:
    """(first line number, text) per chapter; hard-wrapped lines are joined into paragraphs."""
    start, paras, para = 1, [], []

    def flush_para():
        if para:
            paras.append(" ".join(para))
            para.clear()

    for i, line in enumerate(lines, 1):
        if _CHAPTER.match(line):
            flush_para()
            if paras:
                yield start, "\n\n".join(paras)
            start, paras = i, []
        if line.strip():
            para.append(line.strip())
        else:
            flush_para()
    flush_para()
    if paras:
        yield start, "\n\n".join(paras)


def iter_default() -> Iterator[tuple[str, str]]:
    """(chapter text, 'janeaustenr/<novel>.txt:<line>') for every chapter of the six novels."""
    root = ensure_cached()
    for key in NOVELS:
        lines = (root / f"{key}.txt").read_text(encoding="utf-8").splitlines()
        for line, text in chapters(lines):
            yield text, f"janeaustenr/{key}.txt:{line}"


def provenance() -> dict[str, Any]:
    """Licence, provenance and file hashes of the cached default corpus, for manifests and cards."""
    meta = json.loads((ensure_cached() / "provenance.json").read_text(encoding="utf-8"))
    files = [{"path": f"janeaustenr/{f['file']}", "sha256": f["sha256"],
              "bytes": (cache_dir() / f["file"]).stat().st_size} for f in meta["files"].values()]
    return {"license": meta["license"], "provenance": meta["provenance"], "files": files}
