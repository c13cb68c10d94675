"""`minilab corpus`: raw sources -> cleaned, filtered, deduplicated JSONL shards.

For every document of every source, in order: clean (`clean.clean_text`), apply the quality
rules (`clean.QualityFilter`), drop exact and near duplicates across all sources
(`dedup.Deduplicator`), then sample/upsample by the source's weight and stop at its token budget.
Survivors stream into `shard-NNNNN.jsonl[.gz|.zst]` of bounded size, so memory stays flat apart
from the dedup index.

The output directory appears only when complete (`fsutil.atomic_dir`): a crash or Ctrl-C leaves
no half-written shard or manifest, and a re-run starts cleanly. `manifest.json` lists every shard
and input file with its SHA-256, documents and characters kept, and drops per reason;
`DATACARD.md` says the same for people, with examples of what each rule dropped.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import itertools
import logging
import random
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from minilab import __version__
from minilab.config import SEED, to_dict
from minilab.data.clean import QualityConfig
from minilab.data.dedup import DedupConfig
from minilab.data.sources import SourceConfig
from minilab.errors import ConfigError, MinilabError
from minilab.stage import Stage

log = logging.getLogger("minilab.corpus")

CHARS_PER_TOKEN = 4  # rough English average for BPE vocabularies; used only for budgets and reports


@dataclass
class CorpusConfig:
    """A corpus: its sources, cleaning, filters, dedup and output format."""

    output_dir: str = field(metadata={"help": "directory to write shards, manifest and DATACARD.md into"})
    sources: list[SourceConfig] = field(default_factory=list, metadata={"help": "inputs (see SourceConfig)"})
    name: str | None = field(default=None, metadata={"help": "corpus name (default: output folder name)"})
    fix_encoding: bool = field(default=True, metadata={"help": "repair mojibake with ftfy"})
    quality: QualityConfig = field(default_factory=QualityConfig, metadata={
        "help": "quality filters a document must pass (quality.min_chars, ...)"})
    dedup: DedupConfig = field(default_factory=DedupConfig, metadata={
        "help": "exact and near-duplicate removal (dedup.exact, dedup.near, ...)"})
    shard_max_bytes: int = field(default=64 << 20, metadata={"help": "uncompressed bytes per shard"})
    compression: Literal["none", "gzip", "zstd"] = field(default="none",
                                                         metadata={"help": "shard compression"})
    seed: int = field(default=1234, metadata={"help": "seed for weight-based sampling", **SEED})
    strict: bool = field(default=False, metadata={"help": "stop at the first unreadable input"})
    force: bool = field(default=False, metadata={"help": "replace an existing output directory"})
    analyze_only: bool = field(default=False, metadata={"help": "print statistics, write nothing"})
    examples_per_reason: int = field(default=3, metadata={"help": "dropped examples shown in the data card"})
    workers: int = field(default=0, metadata={
        "help": "processes that clean, filter and fingerprint documents (0 = all CPU cores); the output "
                "is the same for any number", "min": 0})

    def validate(self) -> None:
        if not self.sources:
            raise ConfigError("give at least one source (--source PATH, or --source default)", key="sources")
        if not 0 < self.dedup.threshold <= 1:
            raise ConfigError("must be in (0, 1]", key="dedup.threshold")
        for i, s in enumerate(self.sources):
            if s.weight <= 0:
                raise ConfigError("must be > 0", key=f"sources[{i}].weight")


class _Stats:
    """Counts and dropped examples, overall and per source."""

    def __init__(self, examples: int):
        self.examples = examples
        self.read: Counter[str] = Counter()
        self.kept: Counter[str] = Counter()
        self.chars: Counter[str] = Counter()
        self.dropped: dict[str, Counter[str]] = defaultdict(Counter)
        self.dropped_examples: dict[str, list[dict[str, str]]] = defaultdict(list)

    def drop(self, source: str, reason: str, where: str, text: str) -> None:
        self.dropped[source][reason] += 1
        if len(self.dropped_examples[reason]) < self.examples:
            self.dropped_examples[reason].append({"where": where, "text": text[:300]})

    def totals(self) -> dict[str, Any]:
        dropped: Counter[str] = Counter()
        for c in self.dropped.values():
            dropped.update(c)
        chars = sum(self.chars.values())
        return {"documents_read": sum(self.read.values()), "documents_kept": sum(self.kept.values()),
                "characters_kept": chars, "approx_tokens": chars // CHARS_PER_TOKEN,
                "dropped": dict(dropped.most_common())}


# Documents handed to a worker at a time: small enough to keep memory flat, large enough that
# passing them between processes costs little next to the work on them.
_CHUNK_DOCS, _CHUNK_CHARS = 256, 1 << 20
_worker: tuple[Any, ...] = ()


def _init_worker(cfg: CorpusConfig) -> None:
    from minilab.data.clean import QualityFilter

    global _worker
    _worker = (QualityFilter(cfg.quality), cfg.dedup, cfg.fix_encoding)


def _prepare(texts: list[str]) -> list[tuple[str, str | None, Any]]:
    """(clean text, drop reason or None, dedup fingerprint) of each raw text: the per-document work
    that depends on nothing else, so it runs in any worker process."""
    from minilab.data.clean import clean_text
    from minilab.data.dedup import fingerprint

    quality, dedup, fix_encoding = _worker
    out = []
    for raw in texts:
        text = clean_text(raw, fix_encoding)
        reason = "empty" if not text else quality.check(text)
        out.append((text, reason, None if reason else fingerprint(text, dedup)))
    return out


def _chunks(docs: Iterator[tuple[str, str]]) -> Iterator[list[tuple[str, str]]]:
    chunk: list[tuple[str, str]] = []
    chars = 0
    for doc in docs:
        chunk.append(doc)
        chars += len(doc[0])
        if len(chunk) >= _CHUNK_DOCS or chars >= _CHUNK_CHARS:
            yield chunk
            chunk, chars = [], 0
    if chunk:
        yield chunk


class _Workers:
    """The worker pool, started only once a source has more than one chunk of documents (a small
    corpus is done before a pool would have started)."""

    def __init__(self, cfg: CorpusConfig, workers: int, stack: contextlib.ExitStack):
        self.cfg, self.workers, self.stack = cfg, workers, stack
        self.pool: Any = None
        self.local = False

    def prepared(self, docs: Iterator[tuple[str, str]]) -> Iterator[tuple[str, str, str, str | None, Any]]:
        """(raw, where, text, reason, fingerprint) for each document, in input order."""
        from minilab.parallel import ordered_map, worker_pool

        chunks = _chunks(docs)
        head = list(itertools.islice(chunks, 2))
        pool = None
        if len(head) > 1 and self.workers > 1:
            if self.pool is None:
                self.pool = self.stack.enter_context(worker_pool(self.workers, _init_worker, (self.cfg,)))
            pool = self.pool
        elif not self.local:
            _init_worker(self.cfg)
            self.local = True
        pending: collections.deque[list[tuple[str, str]]] = collections.deque()

        def texts() -> Iterator[list[str]]:  # raw texts and places stay here; workers get the texts
            for chunk in itertools.chain(head, chunks):
                pending.append(chunk)
                yield [raw for raw, _ in chunk]

        for results in ordered_map(pool, _prepare, texts(), 2 * self.workers):
            for (raw, where), (text, reason, fp) in zip(pending.popleft(), results, strict=True):
                yield raw, where, text, reason, fp


def _process(cfg: CorpusConfig, writer, rejects) -> _Stats:
    """Run every source through clean -> quality -> dedup -> weight/budget -> writer.

    Cleaning, quality rules and dedup fingerprints run in `cfg.workers` processes; sampling, the
    dedup index and writing stay here, in input order, so the output is the same for any number
    of workers.
    """
    from minilab.data.dedup import Deduplicator
    from minilab.data.sources import ReadMeter, iter_source
    from minilab.parallel import resolve_workers
    from minilab.progress import ByteProgress

    dedup = Deduplicator(cfg.dedup)
    stats = _Stats(cfg.examples_per_reason)
    rng = random.Random(cfg.seed)
    meter, read = ReadMeter(), 0
    with contextlib.ExitStack() as stack:
        workers = _Workers(cfg, resolve_workers(cfg.workers), stack)
        bar = stack.enter_context(ByteProgress(_input_bytes(cfg)))
        for src in cfg.sources:
            label = src.label()
            budget = src.max_tokens * CHARS_PER_TOKEN
            for raw, where, text, reason, fp in workers.prepared(iter_source(src, rejects, meter)):
                stats.read[label] += 1
                read += 1
                if read % _CHUNK_DOCS == 0:
                    bar.update(meter.bytes, read)
                if reason is None and src.weight < 1 and rng.random() >= src.weight:
                    reason = "sampled_out"  # before dedup, so sampled-out text does not block later copies
                reason = reason or dedup.check_fingerprint(fp)
                if reason:
                    stats.drop(label, reason, where, text or raw)
                    continue
                # weight > 1 upsamples: whole copies, plus one more with the fractional probability
                copies = int(src.weight) + (rng.random() < src.weight % 1) if src.weight >= 1 else 1
                for _ in range(copies):
                    if writer is not None:
                        writer.write({"text": text, "source": label, "where": where})
                    stats.kept[label] += 1
                    stats.chars[label] += len(text)
                if budget and stats.chars[label] >= budget:
                    log.info("source %s reached its budget of %d tokens", label, src.max_tokens)
                    break
        bar.update(meter.bytes, read)
    return stats


def _input_bytes(cfg: CorpusConfig) -> int | None:
    """Bytes of all the sources' files as stored; None when a source is not files (default, hf:)."""
    from minilab.data.sources import source_files

    total = 0
    for src in cfg.sources:
        files = source_files(src)
        if not files:
            return None
        total += sum(p.stat().st_size for p in files)
    return total


def _source_entries(cfg: CorpusConfig, stats: _Stats) -> list[dict[str, Any]]:
    """Manifest entries per source: settings, input files with SHA-256, counts."""
    from minilab.data.sources import file_format, source_files
    from minilab.fsutil import sha256_file

    entries = []
    for src in cfg.sources:
        label = src.label()
        entry: dict[str, Any] = {**to_dict(src), "name": label, "documents_read": stats.read[label],
                                 "documents_kept": stats.kept[label], "characters_kept": stats.chars[label],
                                 "dropped": dict(stats.dropped[label])}
        if src.path == "default" or src.format == "default":
            from minilab.data.default_corpus import provenance

            entry.update(provenance())
        else:
            entry["files"] = [{"path": str(p), "format": file_format(p, src)[0], "sha256": sha256_file(p),
                               "bytes": p.stat().st_size} for p in source_files(src)]
        entries.append(entry)
    return entries


def run(cfg: CorpusConfig) -> dict[str, Any]:
    """Build the corpus described by `cfg`; returns its manifest (not written with analyze_only)."""
    from minilab.data.datacard import write_datacard
    from minilab.data.shards import ShardWriter
    from minilab.data.sources import Rejects, read_paths
    from minilab.fsutil import atomic_dir, write_json_atomic
    from minilab.owned import check_output

    out = Path(cfg.output_dir)
    name = cfg.name or out.name
    if not cfg.analyze_only:
        reading = tuple(p for s in cfg.sources for p in read_paths(s))
        for src in reading:  # a folder source is read whole, recursively: the next run would read this output
            if src.is_dir() and out.resolve() != src.resolve() and out.resolve().is_relative_to(src.resolve()):
                raise MinilabError(f"{out}: lies inside the source folder {src}, so a later run would read this "
                                   "output back as input; choose an --output-dir outside it")
        check_output(out, cfg.force, {"corpus"}, reading=reading)
    t0 = time.perf_counter()
    if cfg.analyze_only:
        rejects = Rejects(None, cfg.strict)
        stats = _process(cfg, None, rejects)
        return _manifest(cfg, name, stats, rejects, [], time.perf_counter() - t0)
    with atomic_dir(out, overwrite=cfg.force) as tmp:
        rejects = Rejects(tmp / "rejects.jsonl", cfg.strict)
        writer = ShardWriter(tmp, cfg.shard_max_bytes, cfg.compression)
        try:
            stats = _process(cfg, writer, rejects)
        finally:
            rejects.close()
        shards = writer.close()
        manifest = _manifest(cfg, name, stats, rejects, shards, time.perf_counter() - t0)
        write_json_atomic(tmp / "manifest.json", manifest)
        write_datacard(tmp / "DATACARD.md", manifest, stats.dropped_examples)
    return manifest


def _drop_hint(cfg: CorpusConfig, reason: str | None) -> str:
    """What to change when most documents were dropped for `reason` (the most common one)."""
    from minilab.data.clean import RULE_KEYS
    from minilab.data.sources import file_format, source_files

    if reason is None:
        return "check the sources"
    if reason in ("exact_duplicate", "near_duplicate"):
        return (f"most were {reason}s: the sources repeat themselves (dedup.threshold={cfg.dedup.threshold} "
                "sets how similar counts as a near duplicate; dedup.exact / dedup.near turn a check off)")
    if reason == "sampled_out":
        return "most were sampled out: raise the sources' weight (below 1 keeps only that share)"
    if reason == "empty":
        return "most were empty after cleaning: check the sources"
    keys = [f"quality.{k}" for k in RULE_KEYS.get(reason, ())]
    now = ", ".join(repr(getattr(cfg.quality, k.split(".")[1])) for k in keys)
    hint = f"most were dropped as {reason}: loosen {' / '.join(keys)} (now {now}) with --set KEY=VALUE"
    if reason == "too_long":  # one huge document is usually a file of many read as plain text
        txt = [p for s in cfg.sources for p in source_files(s) if file_format(p, s)[0] == "txt"]
        if txt:
            hint += (f", or, if {txt[0]} (read as plain text) holds many documents, name its format: "
                     f"--source jsonl:{txt[0]} (or json:, xml:, parquet:)")
    return hint


def _manifest(cfg, name, stats, rejects, shards, seconds) -> dict[str, Any]:
    totals = stats.totals()
    if totals["documents_kept"] == 0:
        why = ", ".join(f"{k} {v}" for k, v in totals["dropped"].items()) or "no documents were read"
        problems = rejects.summary()  # named here: no rejects.jsonl is left behind by a failed run
        raise MinilabError(f"empty corpus after filtering ({why}){'; ' + problems if problems else ''}; "
                           + _drop_hint(cfg, next(iter(totals["dropped"]), None)))
    return {"kind": "minilab.corpus", "name": name, "minilab_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "seconds": round(seconds, 2),
            **totals, "rejects": dict(rejects.counts), "sources": _source_entries(cfg, stats),
            "shards": shards, "config": to_dict(cfg)}


def add_arguments(p: argparse.ArgumentParser) -> None:
    from minilab.cliargs import add_config_flags, flag, int_range

    p.add_argument("--source", action="append", default=[], metavar="PATH",
                   help="file, folder, glob, 'default' (built-in English corpus) or 'hf:ID'; repeatable. "
                        "Formats are recognised by content; FORMAT:PATH names one (txt, jsonl, json, xml, "
                        "parquet), e.g. jsonl:data/dump")
    flag(p, "--output-dir", help="where to write the corpus (e.g. data/corpus/NAME)")
    p.add_argument("--name", help="corpus name (default: the output folder's name)")
    flag(p, "--text-field", help="JSONL/Parquet field holding the text (default 'text')")
    flag(p, "--dedup-threshold", type=float, help="near-duplicate Jaccard threshold (default 0.8)")
    p.add_argument("--compression", choices=["none", "gzip", "zstd"], help="shard compression")
    p.add_argument("--strict", action="store_true", help="stop at the first unreadable input (file:line)")
    flag(p, "--analyze-only", action="store_true", help="print statistics without writing anything")
    p.add_argument("--force", action="store_true", help="replace an existing output directory")
    p.add_argument("--workers", type=int_range(0), help="processes that clean, filter and fingerprint "
                                                         "documents (default 0: all CPU cores)")
    add_config_flags(p, "Keys: those of CorpusConfig (sources, quality.*, dedup.*, ...).")


def main(args: argparse.Namespace) -> int:
    from minilab.cliargs import config_from_args

    extra = {"text_field": args.text_field} if args.text_field else {}
    sources = [{"path": s, **extra} for s in args.source]
    flags: dict[str, Any] = {"sources": sources, "output_dir": args.output_dir, "name": args.name,
                             "compression": args.compression, "strict": args.strict, "force": args.force,
                             "analyze_only": args.analyze_only, "workers": args.workers}
    if args.analyze_only and not args.output_dir:
        flags["output_dir"] = "(analyze-only)"
    overrides = list(args.overrides)
    if args.dedup_threshold is not None:
        overrides.insert(0, f"dedup.threshold={args.dedup_threshold}")
    args.overrides = overrides
    cfg = config_from_args(CorpusConfig, args, flags=flags)
    m = run(cfg)
    print(f"{'analysed' if cfg.analyze_only else 'corpus ' + str(cfg.output_dir)}: "
          f"{m['documents_kept']:,} of {m['documents_read']:,} documents kept, "
          f"{m['characters_kept']:,} characters (~{m['approx_tokens']:,} tokens), {len(m['shards'])} shards")
    for reason, n in m["dropped"].items():
        print(f"  dropped {reason}: {n:,}")
    listed = "" if cfg.analyze_only else f" - listed in {Path(cfg.output_dir) / 'rejects.jsonl'}"
    for reason, n in m["rejects"].items():
        print(f"  input problem ({reason}): {n:,}{listed}")
    return 0


# ---- the recipe stage ---------------------------------------------------------------------------
def _sources_bytes(cfg: CorpusConfig) -> int | None:
    from minilab.fsutil import dir_size

    total = 0
    for src in cfg.sources:
        p = Path(getattr(src, "path", src) or "")
        if not p.exists():
            return None  # the built-in default or a hub dataset: known once fetched
        total += p.stat().st_size if p.is_file() else dir_size(p)
    return total


STAGE = Stage(
    "corpus", CorpusConfig, run=run,
    metric=lambda r, cfg: f"{r['documents_kept']:,} docs, ~{r['approx_tokens']:,} tokens",
    estimate=lambda ctx, cfg: {"disk": _sources_bytes(cfg), "memory": None, "note": "about the size of the sources"})
