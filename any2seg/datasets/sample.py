"""The `sample` dataset: the generated DELIVER-format street scenes, read as DELIVER is.

`pipeline make-sample` writes it (the generator is `any2seg.synth`); registering it here
lets every command take `--dataset sample` with its default root and how-to-get hint.
"""

from __future__ import annotations

from any2seg.datasets.deliver import DeliverReader
from any2seg.datasets.registry import register

SAMPLE = register(DeliverReader(
    name="sample", default_root="data/deliver-sample",
    how_to_get="generate it with `pipeline make-sample --out data/deliver-sample`",
    # scored at its own 256 px: the official 1024 resize would upsample it 4x for nothing
    eval_protocol="native"))
