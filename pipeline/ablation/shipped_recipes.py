"""The shipped real-data recipes, as digests: what `pipeline ablate` calls the paper's setting.

`pipelines/NAME/params.yaml` is the one recipe file; this module holds only the sha256 of its
result-relevant content (every `student`, `train` and `eval` leaf but the weights' path and
how-to-compute keys), so an edited pipeline is told from the shipped one without a second
copy of the file. `tests/application/test_ablation_recipes.py` recomputes each digest from
its file and fails on drift: a deliberate change of a recipe updates its digest here.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from pipeline.ablation.plan import leaves

SHIPPED_RECIPES = {  # dataset name -> digest of pipelines/NAME/params.yaml
    "deliver": "ee5b01f3e4eafc16dd8263990360fce169185ae588f084f4fa4adeaf7ee77f91",
    "mcubes": "ee5b01f3e4eafc16dd8263990360fce169185ae588f084f4fa4adeaf7ee77f91",  # = DELIVER's
}
GROUPS = ("student", "train", "eval")
# -S keys that change how a run is computed, not its result (the paper's reference figures
# still apply)
RUN_ONLY = ("train.nproc", "train.workers", "train.persistent_workers", "train.prefetch_factor",
            "train.device", "train.compile", "train.checkpoint_every", "eval.nproc")
PATHS = ("student.pretrained",)  # where the same weights are


def _canonical(value: Any) -> Any:
    """One spelling per value as `==` sees it: 1.0 and 1 alike (YAML writes either)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, list | tuple):
        return [_canonical(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _canonical(v) for k, v in value.items()}
    return value


def result_leaves(params: dict[str, Any]) -> dict[str, Any]:
    """{dotted key: value} of what decides a run's result; a null leaf counts as absent."""
    out = {}
    for group in GROUPS:
        out.update({k: _canonical(v) for k, v in leaves(params, group).items()
                    if k not in RUN_ONLY + PATHS and v is not None})
    return out


def _text(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def recipe_digest(params: dict[str, Any]) -> str:
    """sha256 of `result_leaves` as canonical JSON."""
    return hashlib.sha256(_text(result_leaves(params)).encode()).hexdigest()


def differing_keys(mine: dict[str, Any], theirs: dict[str, Any]
                   ) -> list[tuple[str, Any, Any]]:
    """(key, mine, theirs) for each result leaf the two params files set differently (None:
    absent), in key order; empty exactly when their digests are equal."""
    a, b = result_leaves(mine), result_leaves(theirs)
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b))
            if k not in a or k not in b or _text(a[k]) != _text(b[k])]
