"""`pipeline export --format onnx`: one ONNX graph per modality subset, and the proof that
ONNX Runtime computes what PyTorch computes.

A graph takes only the subset's frames, `images` (B, S, 3, H, W) normalised as
`pipeline evaluate` feeds the student (`stages.student.predict.model_input`), with batch,
height and width dynamic, and returns `logits` (B, K, H, W) at the input size: whole-frame
inference of the student under the missing-modality mode fixed at export (`black` and
`zero-fill` feed the filler frame inside the graph; `exclude` leaves the absent modalities
out of MFF). A subset is a fixed part of the graph, so every subset is its own file: one
graph with a presence input would need data-dependent branches the exporter refuses, and
would encode absent modalities for nothing. Resizing to the protocol's size and sliding
windows stay outside the graph (`stages.student.predict` does both around it).

The exporter is torch's maintained one (`torch.onnx.export(..., dynamo=True)`, through
`torch.export`), at opset `OPSET`.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from any2seg.errors import PipelineError
from stages.student.model import Any2Seg

# ai.onnx 23: MiT's scaled_dot_product_attention becomes one `Attention` node (ONNX Runtime
# has its CPU kernel since 1.23) instead of MatMul + Softmax + MatMul; mit_b2, four
# modalities, 1024 px: 3.5 GB peak instead of 4.7, 26 % less time (docs/inference.md)
OPSET = 23

# Parity tolerances between ONNX Runtime (CPU, float32) and eager PyTorch (float32), on
# the same weights and inputs. Both compute in float32 (unit round-off u = 2^-24, ~6e-8)
# with other kernels and summation orders; a layer sum of n terms moves by up to ~n*u
# relative, and the student's deepest path (MiT-B5: 52 blocks, each a few reductions of
# up to 4 * 512 channels) compounds that to below 1e-4 of the logits' scale, the bound the
# GPU check's CPU / device agreement uses for the same network (benchmarks/gpu_check.py
# `logit_agreement`). An argmax can flip only at a pixel whose top-2 margin is below twice
# that bound; `MAX_FLIPPED_SHARE` allows such near-ties on 0.1 % of the pixels (a random
# student has flat logits and so many near-ties; a trained one far fewer). A wrong graph
# (another resize, a missing term) moves logits by a large share of their scale.
LOGIT_RTOL = 1e-4
MAX_FLIPPED_SHARE = 1e-3


class SubsetGraph(nn.Module):
    """The student for one fixed modality subset, in a form `torch.export` can trace:
    the subset's frames in, logits at input size out (whole-frame inference)."""

    def __init__(self, model: Any2Seg, subset: list[str]) -> None:
        super().__init__()
        unknown = [m for m in subset if m not in model.modalities]
        if unknown or not subset or len(set(subset)) != len(subset):
            raise PipelineError(f"subset {','.join(subset) or '(empty)'} is not a non-empty "
                                "set of the checkpoint's modalities "
                                f"({', '.join(model.modalities)})")
        self.model = model
        self.subset = [model.modalities.index(m) for m in subset]
        dtype = next(model.parameters()).dtype
        # (M, 3) values of the frame fed for an absent modality (black / zero-fill)
        self.register_buffer("fill", model.filler(torch.zeros((), dtype=dtype))[0, :, :, 0, 0],
                             persistent=False)
        present = torch.zeros(1, len(model.modalities), dtype=torch.bool)
        present[0, self.subset] = True
        self.register_buffer("present", present, persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, S, 3, H, W) -> logits (B, K, H, W)."""
        model = self.model
        b, _, _, h, w = images.shape
        if model.missing == "exclude" and model.mff.config.variant == "author":
            return self._author_exclude(images)
        if model.missing == "exclude":  # encode the subset only; MFF ignores the rest
            given = model.encode_all(images)
            feats = []
            for f in given:
                zero = f.new_zeros((b, *f.shape[2:]))
                slots = [zero] * len(model.modalities)
                for j, i in enumerate(self.subset):
                    slots[i] = f[:, j]
                feats.append(torch.stack(slots, 1))
            present = self.present.expand(b, -1)
        else:  # the filler frame in every absent slot, fused like the others
            slots = [self.fill[i].view(1, 3, 1, 1).expand(b, 3, h, w)
                     for i in range(len(model.modalities))]
            for j, i in enumerate(self.subset):
                slots[i] = images[:, j]
            feats = model.encode_all(torch.stack(slots, 1))
            present = torch.ones_like(self.present).expand(b, -1)
        logits = model.fuse(feats, present)[0]
        return F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)

    def _author_exclude(self, images: torch.Tensor) -> torch.Tensor:
        """`author` under `exclude`: the shared head on the given modalities only (in the
        checkpoint's order, as `Any2Seg.modality_logits` runs it in eager evaluation),
        zeros in the absent slots, then MFF. The generic path would trace the head over
        every slot (a graph has no data-dependent gather), so RGB alone would decode four
        rows of stride-4 maps, three of them zeros multiplied away."""
        model = self.model
        b, _, _, h, w = images.shape
        order = sorted(range(len(self.subset)), key=lambda j: self.subset[j])
        given = model.encode_all(images)
        if torch.compiler.is_exporting():  # one head call per given modality (ONNX
            # Runtime holds one modality's stride-4 maps at a time); the same function
            per = [model.head([f[:, j] for f in given]) for j in order]
        else:  # as eager evaluation batches the present rows
            if order != list(range(len(order))):
                given = [f[:, order] for f in given]
            out = model.head([f.flatten(0, 1) for f in given])
            out = out.view(b, len(order), *out.shape[1:])
            per = [out[:, j] for j in range(len(order))]
        zero = per[0].new_zeros(per[0].shape)
        slots = [zero] * len(model.modalities)
        for j, i in enumerate(sorted(self.subset)):
            slots[i] = per[j]
        logits = model.mff(torch.stack(slots, 1), self.present.expand(b, -1)).fused
        return F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)


def export_onnx(model: Any2Seg, subset: list[str], path: Path, opset: int = OPSET) -> Path:
    """Write the subset's graph to `path` with batch, height and width dynamic, weights
    embedded (no external data file). The traced example is 2 frames of 64 x 96: sizes
    of 1, or equal height and width, would be specialised into the graph."""
    graph = SubsetGraph(model, subset).eval()
    dtype = next(model.parameters()).dtype
    example = torch.stack(random_frames(model, subset, [(64, 96)], 2))
    dynamic = torch.export.Dim.DYNAMIC
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        program = torch.onnx.export(
            graph, (example.to(next(model.parameters()).device, dtype),), dynamo=True,
            opset_version=opset, input_names=["images"], output_names=["logits"],
            dynamic_shapes={"images": {0: dynamic, 3: dynamic, 4: dynamic}},
            external_data=False, optimize=True, verbose=False)
    except Exception as exc:  # noqa: BLE001 - the exporter's own error, in one line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PipelineError(f"torch.onnx.export could not export the student for "
                            f"{'+'.join(subset)} ({first}); rerun with --debug for the "
                            "exporter's report") from exc
    program.save(str(path))
    return path


def onnx_session(path: Path, threads: int | None = None, providers: list[str] | None = None
                 ) -> Any:
    """An ONNX Runtime session on `path` (CPU unless `providers` says otherwise).

    The CPU arena is off: with dynamic spatial sizes the arena keeps the largest run's
    blocks for the session's life (a session that ran one 1024 px mit_b2 frame held them
    while the next session ran), and its peak within a run is higher (mit_b2, four
    modalities, 384 px: 1.25 GB above the loaded session with the arena, 0.93 GB
    without, docs/inference.md); the numbers do not depend on the allocator."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.enable_cpu_mem_arena = False
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options,
                                providers=providers or ["CPUExecutionProvider"])


@dataclass
class Parity:
    """ONNX Runtime against eager PyTorch on the same inputs."""

    frames: int
    sizes: list[tuple[int, int]]
    max_abs: float  # max |logit difference|
    scale: float  # max |logit| of PyTorch's
    flipped_share: float  # pixels whose argmax differs / pixels
    seconds: float

    @property
    def ok(self) -> bool:
        return self.max_abs <= LOGIT_RTOL * self.scale and \
            self.flipped_share <= MAX_FLIPPED_SHARE

    def line(self) -> str:
        rel = self.max_abs / self.scale if self.scale else math.inf
        return (f"parity on {self.frames} frames ({', '.join(f'{h}x{w}' for h, w in self.sizes)})"
                f": max |logit difference| {self.max_abs:.2e} ({rel:.1e} of the logits' scale "
                f"{self.scale:.3g}; tolerance {LOGIT_RTOL:g}), argmax differs on "
                f"{self.flipped_share:.4%} of pixels (tolerance {MAX_FLIPPED_SHARE:.1%})")

    def as_dict(self) -> dict[str, Any]:
        return {"frames": self.frames, "sizes": [list(s) for s in self.sizes],
                "max_abs_logit_diff": self.max_abs, "logit_scale": self.scale,
                "argmax_differs_share": self.flipped_share, "seconds": round(self.seconds, 3),
                "tolerance": {"logit_rtol": LOGIT_RTOL, "argmax_share": MAX_FLIPPED_SHARE},
                "ok": self.ok}


def check_parity(model: Any2Seg, subset: list[str], session: Any,
                 frames: list[torch.Tensor]) -> Parity:
    """Run every frame (S, 3, H, W) through ONNX Runtime and through PyTorch's evaluation
    path (`stages.student.evaluate.infer`, whole frame, the same missing mode) and compare
    the logits in float32."""
    from stages.student.evaluate import infer

    index = [model.modalities.index(m) for m in subset]
    mask = torch.zeros(1, len(model.modalities), dtype=torch.bool)
    mask[0, index] = True
    dtype = next(model.parameters()).dtype
    device = next(model.parameters()).device
    max_abs, scale, flipped, pixels = 0.0, 0.0, 0, 0
    t0 = time.perf_counter()
    for x in frames:
        full = model.filler(x).expand(1, -1, 3, *x.shape[-2:]).clone()
        full[0, index] = x
        ref = infer(model, full.to(device, dtype), mask.to(device))[0].float().cpu()
        got = torch.from_numpy(session.run(None, {"images": x[None].numpy()})[0])
        max_abs = max(max_abs, float((got - ref).abs().max()))
        scale = max(scale, float(ref.abs().max()))
        flipped += int((got.argmax(1) != ref.argmax(1)).sum())
        pixels += ref.shape[0] * ref.shape[-2] * ref.shape[-1]
    return Parity(len(frames), sorted({tuple(x.shape[-2:]) for x in frames}), max_abs, scale,
                  flipped / max(pixels, 1), time.perf_counter() - t0)


def random_frames(model: Any2Seg, subset: list[str], sizes: list[tuple[int, int]],
                  per_size: int, seed: int = 0) -> list[torch.Tensor]:
    """Frames (S, 3, H, W) of random stored values in [0, 1] through the checkpoint's
    normalisation (ImageNet mean / std for RGB, as they are for the others)."""
    from stages.student.data import normalise

    g = torch.Generator().manual_seed(seed)
    out = []
    for h, w in sizes:
        for _ in range(per_size):
            out.append(torch.stack([normalise(m, torch.rand(3, h, w, generator=g))
                                    for m in subset]))
    return out



@dataclass
class Exported:
    subset: list[str]
    path: Path
    parity: Parity
    export_seconds: float


def subset_file(out: Path, stem: str, subset: list[str]) -> Path:
    """`<out>/<stem>.<mod>+<mod>.onnx`, the subset in the checkpoint's order."""
    return out / f"{stem}.{'+'.join(subset)}.onnx"


def export_subsets(model: Any2Seg, subsets: list[list[str]], out: Path, stem: str,
                   frames: Any, overwrite: bool = False, opset: int = OPSET,
                   facts: dict[str, Any] | None = None) -> list[Exported]:
    """Export each subset's graph, run it with ONNX Runtime on `frames(subset)` (a list of
    (S, 3, H, W) inputs) and keep it only when parity holds: a graph that fails is removed
    and the run fails naming the numbers. `<out>/<stem>.export.json` records the inputs'
    order and normalisation, the opset and every parity result."""
    files = [subset_file(out, stem, s) for s in subsets]
    sidecar = out / f"{stem}.export.json"
    existing = [f for f in (*files, sidecar) if f.exists()]
    if existing and not overwrite:
        raise PipelineError(f"{existing[0]} exists; pass --overwrite to replace it, or choose "
                            "another --out")
    done: list[Exported] = []
    for subset, path in zip(subsets, files, strict=True):
        tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
        try:
            t0 = time.perf_counter()
            export_onnx(model, subset, tmp, opset)
            seconds = time.perf_counter() - t0
            parity = check_parity(model, subset, onnx_session(tmp), frames(subset))
            if not parity.ok:
                raise PipelineError(f"the ONNX graph for {'+'.join(subset)} disagrees with "
                                    f"PyTorch: {parity.line()}; not written")
            tmp.replace(path)
        finally:
            tmp.unlink(missing_ok=True)
        done.append(Exported(subset, path, parity, seconds))
    record = {**(facts or {}), "opset": opset, "exporter": "torch.onnx.export(dynamo=True)",
              "input": {"name": "images", "shape": "(batch, S, 3, height, width)",
                        "normalisation": "stored values as pipeline evaluate feeds them: "
                        "integer images / 255, RGB then ImageNet mean / std, the other "
                        "modalities as they are"},
              "output": {"name": "logits", "shape": "(batch, K, height, width)"},
              "graphs": [{"subset": e.subset, "file": e.path.name,
                          "export_seconds": round(e.export_seconds, 1),
                          "parity": e.parity.as_dict()} for e in done]}
    sidecar.write_text(json.dumps(record, indent=2) + "\n")
    return done
