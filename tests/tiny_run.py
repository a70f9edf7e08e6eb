"""The tiny student run the training tests share, what it logged, and a NaN-target cache."""

import csv
import json
import shutil
from pathlib import Path

import numpy as np

from stages.student.config import TrainConfig
from stages.student.model import StudentConfig

# the narrowest student that runs every code path: timm's own test-sized ConvNeXt (0.2 M
# parameters, strides 4..32, LayerNorm so batch 1 trains). A training checkpoint is 1-3 MB and
# a CodeAlign one (three encoders and their Adam state) 5 MB, not mit_b0's 40 and 146 MB. A
# `timm:` name, so the `pipeline` commands DVC starts build it with no test-only registration.
# MIT_STUDENT, the default backbone, where a test is about MiT's own training (drop-path noise
# on resume, a loss that really falls); MiT's encoder: test_encoder.py, test_student_model.py
TINY_BACKBONE = "timm:test_convnext"
TINY_STUDENT = StudentConfig(backbone=TINY_BACKBONE, embed_dim=32)
MIT_STUDENT = StudentConfig(backbone="mit_b0", embed_dim=32)


def tiny(root: Path, cache: Path, out: Path, **kw) -> TrainConfig:
    """8 steps of batch 2 on 64-pixel crops, CPU-sized; `kw` overrides any field."""
    base = dict(dataset="sample", root=str(root), cache=str(cache), out=str(out), steps=8,
                batch_size=2, crop=64, lr=2e-3, workers=0, checkpoint_every=4, val_limit=2,
                seed=7)
    return TrainConfig(**{**base, **kw})


def logged(run: Path) -> dict:
    """Every dvclive metric of a run: {name: {"steps": [...], "values": [...]}}, summary."""
    out = {}
    base = run / "dvclive" / "plots" / "metrics"
    for tsv in sorted(base.rglob("*.tsv")):
        with open(tsv, newline="") as f:
            rows = list(csv.DictReader(f, delimiter="\t"))
        name = str(tsv.relative_to(base).with_suffix(""))
        out[name] = {"steps": [int(r["step"]) for r in rows],
                     "values": [r[tsv.stem] for r in rows]}
    out["summary"] = json.loads((run / "dvclive" / "metrics.json").read_text())
    return out


def nan_scene_copy(cache: Path, out: Path) -> Path:
    """A copy of `cache` whose teacher scene embeddings E_S are all NaN (a damaged cache)."""
    import zarr

    shutil.copytree(cache, out)
    group = zarr.open_group(str(out), mode="r+")
    group["scene"][:] = np.full(group["scene"].shape, np.nan, group["scene"].dtype)
    return out
