"""`minilab eval`: perplexity, bits per byte, multiple choice with baselines, generations, a report.

    minilab eval --model_path runs/tiny/final --data_dirs data/packed/tinystories \\
        --output_dir runs/tiny/eval [--text FILE ...] [--mc FILE ...] [--prompts FILE] [--limit N] [--seed S]

Writes `<output_dir>/results.json` (every number), `report.md` (the numbers beside their
baselines and confidence intervals, the generations, the training curves) and `plots/*.png`.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from minilab.config import DEVICE, SEED, to_dict
from minilab.errors import ConfigError, MinilabError
from minilab.fsutil import read_json_if_present, read_user_text, text_lines
from minilab.stage import Stage

log = logging.getLogger("minilab.eval")

DEFAULT_PROMPTS = ["Once upon a time", "The weather today is", "In a small village there lived"]


@dataclass
class EvalConfig:
    """What to evaluate and how."""

    model_path: str = field(default="", metadata={"help": "model directory or registry name"})
    output_dir: str = field(default="", metadata={"help": "where to write results.json, report.md, plots/"})
    data_dirs: list[str] = field(default_factory=list, metadata={
        "help": "packed datasets: perplexity on their val split"})
    text_files: list[str] = field(default_factory=list, metadata={
        "help": "raw UTF-8 text files: sliding-window perplexity"})
    dpo_dirs: list[str] = field(default_factory=list, metadata={
        "help": "preference datasets (minilab dpo-data): win rate vs the reference, chosen/rejected perplexity"})
    dpo_beta: float = field(default=0.1, metadata={"help": "beta of the implicit reward for --dpo"})
    mc_files: list[str] = field(default_factory=list, metadata={
        "help": "multiple-choice JSONL files (BoolQ or generic shape)"})
    prompts_file: str | None = field(default=None, metadata={
        "help": "prompts for generations: one per line, or JSONL with a 'prompt' key; default a few built-in ones"})
    limit: int | None = field(default=None, metadata={"help": "multiple choice: items drawn at random per file"})
    seed: int = field(default=1234, metadata={"help": "seed of item sampling and sampled generations",
                                                        **SEED})
    split: str = field(default="val", metadata={"help": "packed split to score"})
    val_tokens: int = field(default=0, metadata={"help": "packed data: score at most this many tokens (0 = all)"})
    max_length: int | None = field(default=None, metadata={"help": "text: window length; default max_seq_len"})
    stride: int | None = field(default=None, metadata={"help": "text: window stride; default max_length // 2"})
    batch_size: int = field(default=8, metadata={"help": "windows per forward pass on packed data"})
    max_new_tokens: int = field(default=48, metadata={"help": "generations: new tokens per prompt"})
    temperature: float | None = field(default=None, metadata={
        "help": "sampled generations: temperature (default: what the model's verb samples with, `minilab chat`'s "
                "for a chat model, `minilab generate`'s otherwise; minilab.sampling)"})
    top_k: int | None = field(default=None, metadata={"help": "sampled generations: top-k (None = off)"})
    top_p: float | None = field(default=None, metadata={
        "help": "sampled generations: nucleus p (default: as temperature; 1 = off)"})
    repetition_penalty: float | None = field(default=None, metadata={
        "help": "sampled generations: CTRL repetition penalty (default: as temperature; 1 = off)"})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda, cuda:1, mps", **DEVICE})
    dtype: str | None = field(default=None, metadata={"help": "weights dtype (float32, bfloat16); default as stored"})

    def validate(self) -> None:
        if not self.model_path:
            raise ConfigError("required: the model to evaluate (--model-path DIR|NAME)", key="model_path")
        if self.limit is not None and self.limit < 1:
            raise ConfigError("must be ≥ 1", key="limit")
        if self.stride is not None and self.stride < 1:
            raise ConfigError("must be ≥ 1", key="stride")
        if self.max_length is not None and self.max_length < 2:
            raise ConfigError("must be ≥ 2", key="max_length")
        if self.batch_size < 1 or self.max_new_tokens < 0:
            raise ConfigError("batch_size must be ≥ 1 and max_new_tokens ≥ 0", key="batch_size")
        if self.temperature is not None and self.temperature < 0:
            raise ConfigError("must be ≥ 0", key="temperature")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ConfigError("must be within (0, 1]", key="top_p")
        if self.repetition_penalty is not None and self.repetition_penalty <= 0:
            raise ConfigError("must be > 0", key="repetition_penalty")


def read_prompts(path: str | None) -> list[str]:
    """Prompts from a text file (one per non-empty line) or JSONL ({"prompt": ...}); defaults if None."""
    if path is None:
        return list(DEFAULT_PROMPTS)
    p = Path(path)
    if not p.is_file():
        raise MinilabError(f"{p}: prompts file not found")
    prompts = []
    for lineno, line in text_lines(read_user_text(p)):
        if not line.strip():
            continue
        if p.suffix == ".jsonl":
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise MinilabError(f"{p}:{lineno}: invalid JSON: {e.msg}") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
                raise MinilabError(f"{p}:{lineno}: expected an object with a string 'prompt'")
            prompts.append(obj["prompt"])
        else:
            prompts.append(line.rstrip("\r"))
    if not prompts:
        raise MinilabError(f"{p}: no prompts")
    return prompts


def chat_formatter(model_dir: Path):
    """For a chat-tuned model (its manifest records the template it was trained with): a function
    wrapping a prompt as one user turn plus the generation prompt; None for plain models."""
    chat = read_json_if_present(model_dir / "manifest.json").get("chat")
    tok_cfg = read_json_if_present(model_dir / "tokenizer_config.json")
    jinja = tok_cfg.get("chat_template")
    if not chat or not isinstance(jinja, str):
        return None
    from minilab.finetune.templates import ChatTemplate
    from minilab.tokenization import EOS_TOKEN

    template = ChatTemplate(chat["template"], jinja, chat["end_token"], "",
                            str(tok_cfg.get("eos_token") or EOS_TOKEN))
    return lambda p: template.render([{"role": "user", "content": p}], add_generation_prompt=True)


def distinct_ngrams(ids: list[int], n: int = 4) -> float | None:
    """Distinct token n-grams / all n-grams of one text (1.0: no phrase repeats; a loop scores
    low); None when it has fewer than n tokens."""
    grams = [tuple(ids[i:i + n]) for i in range(len(ids) - n + 1)]
    return len(set(grams)) / len(grams) if grams else None


def sampling_of(cfg: EvalConfig, chat: bool) -> dict[str, Any]:
    """The sampled generations' settings: the config's, else the defaults of the verb a user would
    run this model with (`minilab chat` for a chat model, `minilab generate` otherwise)."""
    from minilab.sampling import CHAT_SAMPLING, GENERATE_SAMPLING

    base = CHAT_SAMPLING if chat else GENERATE_SAMPLING
    pick = {k: base[k] if getattr(cfg, k) is None else getattr(cfg, k)
            for k in ("temperature", "top_p", "repetition_penalty")}
    return {**pick, "top_p": None if pick["top_p"] == 1.0 else pick["top_p"], "top_k": cfg.top_k}


def generations(model, tokenizer, cfg: EvalConfig, stops: list[int], fmt=None) -> dict[str, Any]:
    """Greedy and seeded sampled continuations of each prompt (in the chat format with `fmt`), with
    whether each ended at a stop token before the token budget and its distinct 4-grams."""
    from minilab.generate import decode, encode, generate, new_token_budget

    pick = sampling_of(cfg, chat=fmt is not None)
    prompts = [fmt(raw) if fmt is not None else raw for raw in read_prompts(cfg.prompts_file)]
    ids = [encode(tokenizer, p) for p in prompts]
    kw = dict(max_new_tokens=cfg.max_new_tokens, stop_token_ids=stops)
    greedy = generate(model, ids, temperature=0.0, **kw)
    items = []
    for i, (prompt, g) in enumerate(zip(prompts, greedy, strict=True)):
        # Seed per prompt (seed + i): adding a prompt does not change the others' samples.
        sampled = generate(model, [ids[i]], seed=cfg.seed + i, **pick, **kw)[0]
        budget = new_token_budget(model, ids[i], cfg.max_new_tokens)
        items.append({"prompt": prompt, "greedy": decode(tokenizer, g), "greedy_stopped": len(g) < budget,
                      "greedy_distinct4": distinct_ngrams(g), "sampled": decode(tokenizer, sampled),
                      "sampled_stopped": len(sampled) < budget, "sampled_distinct4": distinct_ngrams(sampled),
                      "seed": cfg.seed + i})
    summary = {}
    for how in ("greedy", "sampled"):
        d4 = [it[f"{how}_distinct4"] for it in items if it[f"{how}_distinct4"] is not None]
        summary[how] = {"stopped": sum(it[f"{how}_stopped"] for it in items),
                        "distinct4": sum(d4) / len(d4) if d4 else None}
    return {"max_new_tokens": cfg.max_new_tokens, "items": items, "summary": summary,
            "sampling": {"seed": cfg.seed, **pick}}


def _output_dir(cfg: EvalConfig, model_dir: Path) -> Path:
    if cfg.output_dir:
        return Path(cfg.output_dir)
    run_dir = read_json_if_present(model_dir / "manifest.json").get("run_dir")
    if run_dir:
        return Path(run_dir) / "eval"
    raise ConfigError("required: where to write the report (--output-dir DIR)", key="output_dir")


def run(cfg: EvalConfig) -> dict[str, Any]:
    """Evaluate `cfg.model_path`; write the report; return the results (as in results.json)."""
    from minilab.evaluate import multiple_choice, perplexity, report
    from minilab.loading import load_model_for_inference
    from minilab.registry import resolve_model_dir
    from minilab.tokenization import load_tokenizer, model_stop_ids
    from minilab.training import resolve_device

    model_dir = resolve_model_dir(cfg.model_path)
    out_dir = _output_dir(cfg, model_dir)
    tok_file = model_dir / "tokenizer.json"
    if not tok_file.is_file():
        raise MinilabError(f"{model_dir}: no tokenizer.json (export the model with its tokenizer)")
    manifest = read_json_if_present(model_dir / "manifest.json")
    if cfg.data_dirs:
        from minilab.data.packed import check_tokenizer_match
        from minilab.tokenization import encoding_fingerprint

        # Scoring data packed with another tokenizer gives meaningless numbers: refuse. A chat
        # template set by fine-tuning changes no token id, so the data it was pretrained on still fits.
        check_tokenizer_match(cfg.data_dirs, manifest.get("tokenizer_sha256"), encoding_fingerprint(model_dir))
    device = resolve_device(cfg.device)
    model = load_model_for_inference(model_dir, dtype=cfg.dtype, device=device)
    tokenizer = load_tokenizer(model_dir)
    stops = model_stop_ids(model_dir, tokenizer)
    prefix = stops[0] if stops else None  # packed documents follow an eos: texts start the same way
    mc_cfg = model.config
    results: dict[str, Any] = {
        "created": datetime.now(UTC).isoformat(timespec="seconds"), "seed": cfg.seed, "config": to_dict(cfg),
        "model": {"path": str(model_dir), "name": manifest.get("name"), "params": model.num_params(),
                  "vocab_size": mc_cfg.vocab_size, "max_seq_len": mc_cfg.max_seq_len,
                  "tokenizer_sha256": manifest.get("tokenizer_sha256")},
        "perplexity": [], "multiple_choice": [], "generations": None}
    for d in cfg.data_dirs:
        r = perplexity.packed_perplexity(model, d, split=cfg.split, max_tokens=cfg.val_tokens,
                                         batch_size=cfg.batch_size, tokenizer=tokenizer)
        results["perplexity"].append({"source": f"{d} ({cfg.split})", "kind": "packed", **r})
        log.info("%s: perplexity %.3f over %d tokens", d, r["perplexity"], r["tokens"])
    for f in cfg.text_files:
        r = perplexity.text_perplexity(model, tokenizer, perplexity.read_text_file(f), max_length=cfg.max_length,
                                       stride=cfg.stride, prefix_id=prefix)
        results["perplexity"].append({"source": f, "kind": "text", **r})
        log.info("%s: perplexity %.3f, %.4f bits/byte", f, r["perplexity"], r["bits_per_byte"])
    for f in cfg.mc_files:
        r = multiple_choice.evaluate_file(model, tokenizer, f, limit=cfg.limit, seed=cfg.seed, prefix_id=prefix)
        results["multiple_choice"].append(r)
        b, a = r["baselines"], r["accuracy"]["per_byte"]
        log.info("%s: accuracy %.3f [%.3f, %.3f] (per byte; chance %.3f, majority %.3f) on %d items", f,
                 a["accuracy"], *a["ci95"], b["chance"], b["majority"]["accuracy"], r["n_items"])
    if cfg.max_new_tokens > 0:
        results["generations"] = generations(model, tokenizer, cfg, stops, chat_formatter(model_dir))
    if cfg.dpo_dirs:
        from minilab.evaluate.preference import preference_eval

        del model  # the policy/reference pair is loaded afresh (adapters kept switchable)
        results["preference"] = preference_eval(model_dir, cfg.dpo_dirs, beta=cfg.dpo_beta, device=device)
    written = report.write_report(out_dir, results, report.find_metrics(model_dir))
    log.info("report: %s (%d plots)", written["report"], len(written["plots"]))
    return results


# ---- CLI ----------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    from minilab.cliargs import add_config_flags, flag

    flag(p, "--model-path", metavar="DIR|NAME", help="model directory or registry name")
    flag(p, "--data-dirs", nargs="+", metavar="DIR", help="packed datasets (perplexity on their val split)")
    flag(p, "--output-dir", metavar="DIR", help="report directory (default <run>/eval for pretrained models)")
    p.add_argument("--text", nargs="+", metavar="FILE", dest="text_files",
                   help="raw text files (perplexity, bits/byte)")
    p.add_argument("--mc", nargs="+", metavar="FILE", dest="mc_files", help="multiple-choice JSONL files")
    p.add_argument("--dpo", nargs="+", metavar="DIR", dest="dpo_dirs",
                   help="preference datasets: win rate vs the reference, perplexity on chosen vs rejected")
    p.add_argument("--prompts", metavar="FILE", dest="prompts_file", help="prompts for generations")
    p.add_argument("--limit", type=int, metavar="N", help="multiple choice: N items drawn at random per file")
    p.add_argument("--seed", type=int, metavar="S", help="seed of sampling (items and generations)")
    p.add_argument("--device", help="auto (default), cpu, cuda, mps")
    add_config_flags(p, "Keys: those of EvalConfig (model_path, data_dirs, text_files, mc_files, stride, ...).")


def main(args: argparse.Namespace) -> int:
    from minilab.cliargs import config_from_args

    cfg = config_from_args(EvalConfig, args, ("model_path", "data_dirs", "output_dir", "text_files", "mc_files",
                                              "dpo_dirs", "prompts_file", "limit", "seed", "device"))
    results = run(cfg)
    for r in results["perplexity"]:
        bpb = r.get("bits_per_byte")
        print(f"{r['source']}: perplexity {r['perplexity']:.3f} over {r['tokens']:,} tokens"
              + (f", {bpb:.4f} bits/byte" if bpb is not None else ""))
    for r in results.get("preference", []):
        ppl = r["perplexity"]
        print(f"{r['data']}: win rate vs reference {r['win_rate']:.3f} on {r['pairs']} pairs; perplexity chosen "
              f"{ppl['policy']['chosen']:.2f} / rejected {ppl['policy']['rejected']:.2f} (reference "
              f"{ppl['reference']['chosen']:.2f} / {ppl['reference']['rejected']:.2f})")
    for r in results["multiple_choice"]:
        a, b = r["accuracy"]["per_byte"], r["baselines"]
        print(f"{r['file']}: accuracy {a['accuracy']:.3f} [{a['ci95'][0]:.3f}, {a['ci95'][1]:.3f}] per byte "
              f"(chance {b['chance']:.3f}, majority {b['majority']['accuracy']:.3f}), {r['n_items']} items")
    print(f"report: {Path(_output_dir(cfg, Path(results['model']['path']))) / 'report.md'}")
    return 0


# ---- the recipe stage ---------------------------------------------------------------------------
def _metric(r: dict[str, Any], cfg: EvalConfig) -> str:
    parts = []
    for p in r.get("perplexity", [])[:1]:
        parts.append(f"ppl {p['perplexity']:.2f}")
        if p.get("bits_per_byte") is not None:
            parts.append(f"{p['bits_per_byte']:.3f} bits/byte")
    for m in r.get("multiple_choice", [])[:1]:
        parts.append(f"mc acc {m['accuracy']['per_byte']['accuracy']:.3f}")
    if r.get("preference"):
        pref = r["preference"]
        win = pref.get("win_rate") if isinstance(pref, dict) else None
        if win is not None:
            parts.append(f"win rate {win:.3f}")
    gens = r.get("generations") or {}
    if gens.get("items") and not parts:
        n, s = len(gens["items"]), gens["summary"]
        parts.append(f"{s['greedy']['stopped']}/{n} greedy and {s['sampled']['stopped']}/{n} sampled answers end "
                     "at a stop token")
    return ", ".join(parts) or "report written"


def _report_section(d: Path) -> dict[str, Any]:
    """The recipe report's section of an eval stage: its report, plots and a few results."""
    if not (d / "results.json").is_file():
        return {}
    sec: dict[str, Any] = {"links": [d / "report.md"], "text": []}
    sec["plots"] = sorted((d / "plots").glob("*.png")) if (d / "plots").is_dir() else []
    res = json.loads((d / "results.json").read_text(encoding="utf-8"))
    for p in res.get("perplexity", []):
        sec["text"].append(f"perplexity {p['perplexity']:.3f} on {p['source']} ({p['tokens']:,} tokens)")
    gens = (res.get("generations") or {}).get("items") or (res.get("generations") or {}).get("greedy") or []
    for g in gens[:3] if isinstance(gens, list) else []:
        if isinstance(g, dict) and "prompt" in g:
            sec["text"].append(f"{g['prompt']!r} -> {str(g.get('greedy', g.get('text', '')))[:160]!r}")
    return sec


STAGE = Stage("eval", EvalConfig, run=run, metric=_metric, report=_report_section,
              required={"model_path": "the model to evaluate (e.g. ${pretrain})"})
