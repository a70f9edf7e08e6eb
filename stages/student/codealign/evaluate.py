"""CodeAlign's evaluation table, on a split where every frame has every modality.

For each translator (source modality m of group a -> target group b):
- `translated`: m alone -> a's encoder + m's aligner -> translator -> argmax codes ->
  b's frozen code-space heads and back-end (what a receiver of group b decodes);
- `target own`: b's own model on b's own modalities through its code space (the
  reference the translation tries to reach);
- `source own`: a's own model on m alone (m's own group decoding m);
- `naive joint`: the one student trained on the same isolated split, fed m alone.
Scored with the data set's protocol (`stages.student.protocol`: official for DELIVER /
MCubeS, native for the sample), mIoU as the official `Metrics` (classes absent from
label and prediction count 0).

Payload per input pixel of what is sent instead of the float features MFF reads: a code
index per cell of every encoder stage, sum_s log2(K) / stride_s^2 bits, against
sum_s 32 C_s / stride_s^2 bits for float32 features.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from any2seg import datasets
from any2seg.metrics import Confusion
from stages.student.codealign.model import pair_name
from stages.student.codealign.stages import CodeAlignRun
from stages.student.evaluate import evaluation_loader

STRIDES = (4, 8, 16, 32)


def payload(codes: int, channels: list[int], strides: tuple[int, ...] = STRIDES
            ) -> dict[str, float]:
    """Bits per input pixel: transmitted codes vs float32 features, and the ratio."""
    code_bits = sum(math.log2(codes) / s ** 2 for s in strides[:len(channels)])
    float_bits = sum(32 * c / s ** 2 for c, s in zip(channels, strides, strict=False))
    return {"code_bits_per_pixel": code_bits, "float_bits_per_pixel": float_bits,
            "ratio": float_bits / code_bits}


@torch.no_grad()
def evaluate_run(run: CodeAlignRun, stage: str = "stage2", split: str = "val",
                 limit: int | None = None, only: list[str] | None = None
                 ) -> list[dict[str, Any]]:
    """One row per translator (`only`: these pair names) with the four mIoUs (see the
    module docstring)."""
    run.load_file(run.out / f"{stage}.pt")
    system, joint = run.system.eval(), run.joint.eval()
    samples = datasets.load(run.dataset, run.root, split)
    if limit is not None:
        samples = samples[:limit]
    mods = [m for g in run.cfg.groups for m in g]
    k = len(samples.classes)
    pairs = [(m, a, b) for a, g in enumerate(run.cfg.groups) for m in g
             for b in range(len(run.cfg.groups))
             if b != a and (only is None or pair_name(m, b) in only)]
    kinds = ("translated", "target own", "source own", "naive joint")
    conf = {(m, b, kind): Confusion(k) for m, _, b in pairs for kind in kinds}
    own = {}
    for batch in evaluation_loader(samples, mods):
        images, label = batch["images"], batch["label"]
        size = label.shape[-2:]

        def pred(logits: torch.Tensor, size: Any = size) -> torch.Tensor:
            up = torch.nn.functional.interpolate(logits, size=size, mode="bilinear",
                                                 align_corners=False)
            return up.argmax(1)

        for b in {b for _, _, b in pairs}:
            group = run.cfg.groups[b]
            sel = images[:, [mods.index(m) for m in group]]
            own[b] = pred(system.groups[b].coded(sel)[0])
        for m, a, b in pairs:
            x = images[:, mods.index(m)]
            conf[(m, b, "translated")].update(pred(system.translate(m, b, x)), label)
            conf[(m, b, "target own")].update(own[b], label)
            ga = system.groups[a]
            single = torch.zeros(x.shape[0], len(ga.student.modalities), *x.shape[1:])
            single[:, ga.student.modalities.index(m)] = x
            present = torch.zeros(single.shape[:2], dtype=torch.bool)
            present[:, ga.student.modalities.index(m)] = True
            conf[(m, b, "source own")].update(pred(ga.student(single, present).logits), label)
            jp = torch.zeros(x.shape[0], len(mods), dtype=torch.bool)
            jp[:, mods.index(m)] = True
            conf[(m, b, "naive joint")].update(pred(joint(images, jp).logits), label)
    channels = system.groups[0].student.encoder.channels
    rows = []
    for m, a, b in pairs:
        row: dict[str, Any] = {"pair": pair_name(m, b), "source": m, "source_group": a,
                               "target_group": b}
        for kind in kinds:
            row[kind] = conf[(m, b, kind)].scores()["mIoU"]
        rows.append(row | payload(run.cfg.codes, channels))
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    head = "| source -> target group | translated | target own | source own | naive joint |"
    lines = [head, "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['pair']} | {r['translated']:.2f} | {r['target own']:.2f} | "
                     f"{r['source own']:.2f} | {r['naive joint']:.2f} |")
    return "\n".join(lines)
