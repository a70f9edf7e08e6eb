"""CodeAlign's evaluation table, on a split where every frame has every modality.

For each translator (source modality m of group a -> target group b):
- `translated`: m alone -> a's encoder + m's aligner -> translator -> argmax codes ->
  b's frozen code-space heads and back-end (what a receiver of group b decodes);
- `fused`: the collaboration the official inference runs (heter_codebook_shared_head_
  c2c_infer.py): b's own modalities through b's aligners and code space, plus m's
  translated codes decoded by b's quantiser heads, all through b's MFF and head;
- `target own`: b's own model on b's own modalities through its code space (the
  reference the translation tries to reach; the same decoded features `fused` adds to);
- `source own`: a's own model after stage 1 on m alone: m's aligner, a's code space and
  a's back-end, a's other modalities absent (m's own group decoding m);
- `naive joint`: the one student trained on the same isolated split, fed m alone.
Scored with the data set's protocol (`stages.student.protocol`: official for DELIVER /
MCubeS, native for the sample), mIoU as the official `Metrics` (classes absent from
label and prediction count 0). A group's own code space samples per
`codealign.eval_quantiser` (official: Gumbel) from one generator seeded with
`codealign.eval_seed`, so a rerun scores the same codes.

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
from any2seg.progress import progress as progress_bar
from stages.student.codealign.model import pair_name
from stages.student.codealign.stages import CodeAlignRun
from stages.student.evaluate import evaluation_loader

STRIDES = (4, 8, 16, 32)
KINDS = ("translated", "fused", "target own", "source own", "naive joint")


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
    """One row per translator (`only`: these pair names) with the five mIoUs (see the
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
    conf = {(m, b, kind): Confusion(k) for m, _, b in pairs for kind in KINDS}
    own: dict[int, torch.Tensor] = {}
    decoded: dict[int, list[torch.Tensor]] = {}
    gen = torch.Generator().manual_seed(run.cfg.eval_seed)
    batches = progress_bar(evaluation_loader(samples, mods), desc="codealign evaluate",
                           unit="batch")
    for batch in batches:
        images, label = batch["images"], batch["label"]
        size = label.shape[-2:]

        def pred(logits: torch.Tensor, size: Any = size) -> torch.Tensor:
            up = torch.nn.functional.interpolate(logits, size=size, mode="bilinear",
                                                 align_corners=False)
            return up.argmax(1)

        for b in sorted({b for _, _, b in pairs}):  # a fixed order of Gumbel draws
            group = run.cfg.groups[b]
            sel = images[:, [mods.index(m) for m in group]]
            logits, decoded[b], _ = system.groups[b].coded(sel, gen)
            own[b] = pred(logits)
        for m, a, b in pairs:
            x = images[:, mods.index(m)]
            codes = system.translated_codes(m, b, x)
            conf[(m, b, "translated")].update(pred(system.groups[b].from_codes(codes)), label)
            conf[(m, b, "fused")].update(
                pred(system.groups[b].collaborate(decoded[b], codes)), label)
            conf[(m, b, "target own")].update(own[b], label)
            conf[(m, b, "source own")].update(
                pred(system.groups[a].coded_alone(m, x, gen)), label)
            jp = torch.zeros(x.shape[0], len(mods), dtype=torch.bool)
            jp[:, mods.index(m)] = True
            conf[(m, b, "naive joint")].update(pred(joint(images, jp).logits), label)
    channels = system.groups[0].student.encoder.channels
    rows = []
    for m, a, b in pairs:
        row: dict[str, Any] = {"pair": pair_name(m, b), "source": m, "source_group": a,
                               "target_group": b}
        for kind in KINDS:
            row[kind] = conf[(m, b, kind)].scores()["mIoU"]
        rows.append(row | payload(run.cfg.codes, channels))
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| source -> target group | " + " | ".join(KINDS) + " |",
             "|---" * (len(KINDS) + 1) + "|"]
    for r in rows:
        lines.append(f"| {r['pair']} | " + " | ".join(f"{r[k]:.2f}" for k in KINDS) + " |")
    return "\n".join(lines)
