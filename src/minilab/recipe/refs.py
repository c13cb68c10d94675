"""Recipe references: `${stage}`, `${stage.dir}`, `${stage.name}`, `${recipe_dir}`, `${workdir}`.

The syntax only: finding references in a config value and substituting them. What a reference
stands for is the recipe's business (`spec.placeholder`, the runner's lookup); this module sits
below both `spec` and `stages`, which read it.
"""

from __future__ import annotations

import re
from typing import Any

# ${stage} is the stage's output; ${stage.dir} its directory; ${stage.name} the registry name it got.
REF = re.compile(r"\$\{([A-Za-z0-9_-]+)(?:\.([a-z_]+))?\}")
REF_ATTRS = (None, "dir", "name")
# ${recipe_dir}: the folder of the recipe file (for files shipped beside it); ${workdir}: the work directory.
BUILTIN_REFS = ("recipe_dir", "workdir")


def find_refs(value: Any) -> list[tuple[str, str | None]]:
    """Every ${stage[.attr]} in a (nested) config value, in order."""
    if isinstance(value, str):
        return [(m.group(1), m.group(2)) for m in REF.finditer(value)]
    if isinstance(value, dict):
        return [r for v in value.values() for r in find_refs(v)]
    if isinstance(value, list):
        return [r for v in value for r in find_refs(v)]
    return []


def substitute(value: Any, lookup) -> Any:
    """A copy of `value` with each ${stage[.attr]} replaced by `lookup(stage, attr)`."""
    if isinstance(value, str):
        return REF.sub(lambda m: str(lookup(m.group(1), m.group(2))), value)
    if isinstance(value, dict):
        return {k: substitute(v, lookup) for k, v in value.items()}
    if isinstance(value, list):
        return [substitute(v, lookup) for v in value]
    return value
