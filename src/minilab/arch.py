"""Architecture presets (`configs/architectures/*.json`) and the `minilab arch` verb.

A preset is data, not code: a JSON file of `ModelConfig` keys (keys starting with `_` are
comments). `load_architecture` accepts a preset name, a path to such a file, or a mapping, plus
dotted overrides. The printed parameter counts are computed from a model built on the `meta`
device, so they are the true counts, never labels.
"""

from __future__ import annotations

import argparse
import json
from importlib import resources
from pathlib import Path
from typing import Any

from minilab.config import apply_overrides, from_dict, read_config_file
from minilab.errors import ConfigError
from minilab.fsutil import format_params
from minilab.model import ModelConfig, build_model


def presets_dir() -> Path:
    return Path(str(resources.files("minilab") / "configs" / "architectures"))


def preset_names() -> list[str]:
    return sorted(p.stem for p in presets_dir().glob("*.json"))


def _strip_comments(data: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in data.items() if not str(k).startswith("_")}


def architecture_data(name_or_path: str | Path) -> tuple[dict[str, Any], str]:
    """The raw mapping of a preset name or file, and a source label for errors."""
    path = Path(name_or_path)
    if path.suffix in (".json", ".yaml", ".yml") or path.exists():
        return _strip_comments(read_config_file(path)), str(path)
    candidate = presets_dir() / f"{name_or_path}.json"
    if not candidate.is_file():
        raise ConfigError(f"unknown architecture preset '{name_or_path}' (presets: {', '.join(preset_names())}; "
                          "or give a path to a JSON file)", key="arch")
    return _strip_comments(read_config_file(candidate)), str(candidate)


def load_architecture(arch: str | Path | dict[str, Any], overrides: list[str] | None = None,
                      **fields: Any) -> ModelConfig:
    """A `ModelConfig` from a preset name, a file, or a mapping, with `key=value` overrides and
    keyword fields (e.g. `vocab_size=tokenizer_vocab`) applied last."""
    if isinstance(arch, dict):
        data, source = _strip_comments(arch), "architecture"
    else:
        data, source = architecture_data(arch)
    data = apply_overrides(data, overrides)
    data.update(fields)
    return from_dict(ModelConfig, data, source=source)


def preset_table() -> list[dict[str, Any]]:
    rows = []
    for name in preset_names():
        cfg = load_architecture(name)
        model = build_model(cfg, device="meta")
        costs = model.costs()
        rows.append({"name": name, "size": format_params(costs["params"]), **costs,
                     "config": {k: v for k, v in vars(cfg).items()}})
    return rows


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", nargs="?", help="a preset name or JSON file; all presets when omitted")
    p.add_argument("--set", dest="overrides", metavar="KEY=VALUE", action="append", default=[],
                   help="override an architecture key (e.g. --set n_layer=8)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def main(args: argparse.Namespace) -> int:
    if args.name:
        cfg = load_architecture(args.name, args.overrides)
        model = build_model(cfg, device="meta")
        rows = [{"name": args.name, "size": format_params(model.num_params()), **model.costs(),
                 "config": dict(vars(cfg))}]
    else:
        rows = preset_table()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'preset':<10}{'params':>14}{'size':>7}{'embed':>12}{'attn':>12}{'mlp':>12}{'head':>12}"
          f"{'GFLOP/tok(train)':>18}{'KV B/tok bf16':>15}")
    for r in rows:
        g = r["params_by_group"]
        print(f"{r['name']:<10}{r['params']:>14,}{r['size']:>7}{g['embeddings']:>12,}{g['attention']:>12,}"
              f"{g['mlp']:>12,}{g['head']:>12,}{r['flops_per_token_train'] / 1e9:>18.3f}"
              f"{r['kv_bytes_per_token']['bfloat16']:>15,}")
    return 0
