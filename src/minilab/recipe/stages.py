"""What the recipe adds to a stage kind (`minilab.stage`): its config as a recipe stage, its result as state.

Each kind's config is the same typed dataclass its verb uses (so a recipe stage takes exactly the
keys of `minilab VERB --config`), except that the recipe owns `output_dir` (the stage's folder,
`<workdir>/<stage>`) and `force`; `models_dir` defaults to the recipe's registry.
"""

from __future__ import annotations

import math
from typing import Any

from minilab.config import ConfigError, from_dict, to_dict
from minilab.stage import get as get_stage

# Keys that change how a run is observed, not what it produces: outside the fingerprint.
RUNTIME_KEYS = {"interrupt_at_step", "tensorboard"}


def build_config(recipe, stage, lookup, source: str) -> tuple[Any, dict[str, Any]]:
    """(the stage's typed config, its fingerprinted form): references substituted through
    `lookup(stage, attr)`, the recipe-owned keys set, every key checked by the config class."""
    from minilab.recipe.refs import substitute

    kind = get_stage(stage.kind)
    cls = kind.config
    data = substitute(stage.config, lookup)
    names = {f for f in cls.__dataclass_fields__}
    for owned in ("output_dir", "force"):
        if owned in data:
            raise ConfigError(f"set by the recipe (the stage writes to {recipe.stage_dir(stage.name)}); remove it",
                              source=source, key=f"stages.{stage.name}.{owned}")
    fingerprinted = {k: v for k, v in data.items() if k not in RUNTIME_KEYS}
    data["output_dir"] = str(recipe.stage_dir(stage.name))
    if "force" in names:
        data["force"] = True  # the runner decides when a stage reruns; its folder is replaced then
    if "models_dir" in names and data.get("models_dir") is None and recipe.models_dir:
        data["models_dir"] = str(recipe.models_dir)
    for key, what in kind.required.items():  # keys the verb takes as flags, a recipe in its config
        if key not in data:
            raise ConfigError(f"required: {what}", source=source, key=f"stages.{stage.name}.{key}")
    return from_dict(cls, data, source=source, prefix=f"stages.{stage.name}."), fingerprinted


def jsonable(result: Any) -> Any:
    """The result, trimmed to what a state file should keep (numbers, short strings, small dicts)."""
    if isinstance(result, dict):
        return {k: jsonable(v) for k, v in result.items() if k not in ("config", "shards", "sources", "template")}
    if isinstance(result, (list, tuple)):
        return [jsonable(v) for v in result[:50]]
    if isinstance(result, float) and not math.isfinite(result):
        return None
    if isinstance(result, (str, int, float, bool)) or result is None:
        return result if not isinstance(result, str) or len(result) < 2000 else result[:2000]
    return str(to_dict(result))
