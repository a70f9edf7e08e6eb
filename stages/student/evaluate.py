"""MSS, system-level MISS and sensor-level MISS evaluation of a trained student.

One pass over the split: every modality is encoded once per image (window), then fused
and decoded under every modality subset, so all 15 subsets of {R, D, E, L} cost one
encoder pass. Each setting accumulates one confusion matrix per subset / group. The
protocol (`stages.student.protocol`) decides the scoring resolution and, by default,
what a missing sensor is. Under torchrun each rank scores every N-th sample and the
matrices are summed across ranks: the counts, hence the metrics, are exactly those of
one process.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from any2seg import datasets
from any2seg.datasets.base import unit_image
from any2seg.errors import PipelineError
from any2seg.metrics import Confusion
from any2seg.progress import progress as progress_bar
from stages.student.checkpoint_file import load_checkpoint_file
from stages.student.data import AugmentConfig, StudentData, WorkerErrors
from stages.student.distributed import World
from stages.student.eval_config import INFERENCE_MODES
from stages.student.model import Any2Seg, StudentConfig, build_student
from stages.student.protocol import check_protocol, default_protocol, protocol_transform

SHORT = {"rgb": "R", "depth": "D", "event": "E", "lidar": "L", "aolp": "A", "dolp": "P",
         "nir": "N", "thermal": "T"}
SENSOR_GROUPS = ("cloud", "fog", "night", "rain", "sun", "motionblur", "overexposure",
                 "underexposure", "lidarjitter", "eventlowres")


def subset_name(modalities: list[str], subset: tuple[int, ...]) -> str:
    return "+".join(SHORT.get(modalities[i], modalities[i]) for i in subset)


def subsets(n: int) -> list[tuple[int, ...]]:
    """All non-empty subsets of n modalities, smallest first (15 for four)."""
    return [c for k in range(1, n + 1) for c in itertools.combinations(range(n), k)]


def load_checkpoint(path: Path | str, device: str = "cpu") -> tuple[Any2Seg, dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"checkpoint {path} does not exist; train with `pipeline train`")
    try:
        ckpt = load_checkpoint_file(path, "evaluate a checkpoint `pipeline train` wrote "
                                          "(runs/NAME/best.pt)")
        meta = ckpt["meta"]
        model = build_student(StudentConfig(**meta["student"]), meta["modalities"],
                              len(meta["classes"]))
        model = model.to(getattr(torch, meta.get("train", {}).get("dtype", "float32")))
        model.load_state_dict(ckpt["model"])
    except PipelineError:
        raise
    except Exception as exc:  # noqa: BLE001 - corrupt or foreign files
        raise PipelineError(f"{path} is not a student checkpoint of this pipeline ({exc})") \
            from exc
    return model.to(device).eval(), {**meta, "step": ckpt.get("step")}


def _windows(h: int, w: int, mode: str, crop: int, stride: int) -> list[tuple[int, int, int, int]]:
    """(top, left, height, width) of every inference window: the whole image, or a
    sliding window when `mode` is slide and the image is larger than `crop`."""
    if mode not in INFERENCE_MODES:
        raise PipelineError(f"inference mode must be whole or slide, got {mode!r}")
    if mode == "slide" and (h > crop or w > crop):
        ys = list(range(0, max(h - crop, 0) + 1, stride))
        xs = list(range(0, max(w - crop, 0) + 1, stride))
        if ys[-1] + crop < h:
            ys.append(h - crop)
        if xs[-1] + crop < w:
            xs.append(w - crop)
        return [(y, x, min(crop, h), min(crop, w)) for y in ys for x in xs]
    return [(0, 0, h, w)]


def _subset_logits(model: Any2Seg, win: torch.Tensor, masks: torch.Tensor,
                   filler_cache: dict[tuple[Any, ...], list[torch.Tensor]]
                   ) -> Iterator[torch.Tensor]:
    """Logits at the window's size for each presence mask in turn: the window's
    modalities are encoded once, then fused and decoded under every mask."""
    b = win.shape[0]
    ch, cw = win.shape[-2:]
    feats = model.encode_all(win)
    filler_feats = None
    if model.missing != "exclude":
        key = (model.missing, *win.shape[1:])
        if key not in filler_cache:
            frame = model.filler(win).expand_as(win[:1]).contiguous()
            filler_cache[key] = model.encode_all(frame)
        filler_feats = filler_cache[key]
    if filler_feats is not None and model.mff.config.variant == "author":
        # `author` runs the head on each modality alone, so under a filler every mask
        # only picks, per modality, the real or the filler frame's class scores: the
        # head runs once on each (not once per modality and mask), then MFF per mask
        yield from _author_subsets(model, feats, filler_feats, masks, filler_cache, key,
                                   (ch, cw))
        return
    for i in range(masks.shape[0]):
        mask = masks[i][None].expand(b, -1)
        if filler_feats is not None:
            fill = mask[:, :, None, None, None]
            f = [torch.where(fill, a, z.expand_as(a)) for a, z in zip(feats, filler_feats,
                                                                    strict=True)]
            logits = model.decode(f, torch.ones_like(mask))
        else:
            logits = model.decode(feats, mask)
        yield F.interpolate(logits, size=(ch, cw), mode="bilinear", align_corners=False)


def _author_subsets(model: Any2Seg, feats: list[torch.Tensor], filler_feats: list[torch.Tensor],
                    masks: torch.Tensor,
                    filler_cache: dict[tuple[Any, ...], list[torch.Tensor]],
                    key: tuple[Any, ...], size: tuple[int, int]) -> Iterator[torch.Tensor]:
    """`_subset_logits` under `author` with a filler: the same numbers as decoding
    `where(mask, feats, filler)` for every mask (each head row sees the same input in
    a batch of the same size), with 2 head passes instead of one per mask."""
    b, m = feats[0].shape[:2]
    everyone = torch.ones(b, m, dtype=torch.bool, device=feats[0].device)
    real = model.modality_logits(feats, everyone)
    fkey = (*key, "author-logits", b)
    if fkey not in filler_cache:
        filler_cache[fkey] = [model.modality_logits(
            [z.expand_as(a).contiguous() for a, z in zip(feats, filler_feats, strict=True)],
            everyone)]
    fake = filler_cache[fkey][0]
    for i in range(masks.shape[0]):
        fill = masks[i][None].expand(b, -1)[:, :, None, None, None]
        logits = model.mff(torch.where(fill, real, fake), everyone).fused
        yield F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


@torch.no_grad()
def infer(model: Any2Seg, images: torch.Tensor, masks: torch.Tensor, mode: str = "whole",
          crop: int = 512, stride: int = 341,
          filler_cache: dict[tuple[Any, ...], list[torch.Tensor]] | None = None) -> torch.Tensor:
    """Logits at input size for every presence mask: (S, B, K, H, W) for masks (S, M).

    Under `black` and `zero-fill` the features of the filler frame (what an absent
    modality is fed) depend only on the mode and the window shape; `filler_cache` keeps
    them across calls, so they are encoded once per evaluation."""
    filler_cache = {} if filler_cache is None else filler_cache
    b, m, _, h, w = images.shape
    s = masks.shape[0]
    windows = _windows(h, w, mode, crop, stride)
    if len(windows) == 1:  # one window: its logits as they are (sum of one, / 1)
        out = images.new_empty((s, b, model.num_classes, h, w))
        for i, logits in enumerate(_subset_logits(model, images, masks, filler_cache)):
            out[i] = logits
        return out
    out = images.new_zeros((s, b, model.num_classes, h, w))
    count = images.new_zeros((1, 1, 1, h, w))
    for y, x, ch, cw in windows:
        win = images[..., y:y + ch, x:x + cw]
        for i, logits in enumerate(_subset_logits(model, win, masks, filler_cache)):
            out[i, :, :, y:y + ch, x:x + cw] += logits
        count[..., y:y + ch, x:x + cw] += 1
    return out / count


@torch.no_grad()
def predict(model: Any2Seg, images: torch.Tensor, masks: torch.Tensor, mode: str = "whole",
            crop: int = 512, stride: int = 341,
            filler_cache: dict[tuple[Any, ...], list[torch.Tensor]] | None = None
            ) -> torch.Tensor:
    """`infer(...).argmax(2)`: classes (S, B, H, W). With one window each mask's logits
    are reduced to classes as soon as they are decoded, so the (S, B, K, H, W) logits
    (1.5 GB for 15 subsets of 25 classes at 1024 px) are never held at once."""
    filler_cache = {} if filler_cache is None else filler_cache
    h, w = images.shape[-2:]
    if len(_windows(h, w, mode, crop, stride)) > 1:
        return infer(model, images, masks, mode, crop, stride, filler_cache).argmax(2)
    return torch.stack([logits.argmax(1) for logits in
                        _subset_logits(model, images, masks, filler_cache)])


@dataclass
class EvalResult:
    modalities: list[str]
    classes: list[str]
    protocol: str = "native"
    missing: str = "exclude"
    mss: dict[str, Any] | None = None
    miss: dict[str, dict[str, Any]] = field(default_factory=dict)
    sensor: dict[str, dict[str, Any]] = field(default_factory=dict)
    whole: dict[str, Any] | None = None  # all modalities over the whole split
    examples: list[dict[str, np.ndarray]] = field(default_factory=list)
    # the K x K counts behind every score: "all", "miss/<subset>", "sensor/<group>"
    confusion: dict[str, np.ndarray] = field(default_factory=dict)


def _display(arr: np.ndarray, value_range: tuple[float, float] | None) -> np.ndarray:
    """Any stored image kind as H x W x 3 uint8 for the prediction pictures."""
    return np.round(unit_image(arr, value_range) * 255).astype(np.uint8)


def evaluation_loader(samples: datasets.SampleSequence, modalities: list[str],
                      world: World | None = None, workers: int = 0, persistent: bool = False,
                      prefetch: int | None = None, batch_size: int = 1,
                      protocol: str | None = None) -> torch.utils.data.DataLoader:
    """Batches of this rank's share of `samples` (every `world.size`-th one) as `protocol`
    (None: the dataset's default) scores them. `persistent` keeps the workers between
    passes (validation during training)."""
    world = world or World()
    protocol = check_protocol(protocol or default_protocol(samples.name))
    data = StudentData(samples, modalities, None, None, AugmentConfig(), 0,
                       transform=protocol_transform(protocol, samples.name))
    return torch.utils.data.DataLoader(
        data, batch_size=batch_size, num_workers=workers,
        sampler=[(-1, i) for i in world.shard(len(samples))],
        persistent_workers=persistent and workers > 0,
        prefetch_factor=prefetch if workers else None)


def evaluate(model: Any2Seg, samples: datasets.SampleSequence, settings: tuple[str, ...],
             mode: str = "whole", crop: int = 512, stride: int = 341, batch_size: int = 1,
             workers: int = 0, device: str = "cpu", examples: int = 0,
             progress: bool = False, protocol: str | None = None, world: World | None = None,
             loader: torch.utils.data.DataLoader | None = None) -> EvalResult:
    """Run the requested settings over `samples` under `protocol` (None: the dataset's
    default); `examples` keeps a few predictions. Absent modalities are handled as
    `model.missing` says. Under several ranks (`world`) each scores its share and every
    rank gets the summed result. `loader`: one from `evaluation_loader` (same protocol)."""
    world = world or World()
    protocol = check_protocol(protocol or default_protocol(samples.name))
    transform = protocol_transform(protocol, samples.name)
    mods = model.modalities
    k = model.num_classes
    all_mask = tuple(range(len(mods)))
    masks = [all_mask]
    if "miss" in settings:
        masks = subsets(len(mods))
    index_all = masks.index(all_mask)
    mask_tensor = torch.zeros(len(masks), len(mods), dtype=torch.bool)
    for i, sub in enumerate(masks):
        mask_tensor[i, list(sub)] = True
    mask_tensor = mask_tensor.to(device)
    if loader is None:
        loader = evaluation_loader(samples, mods, world, workers, batch_size=batch_size,
                                   protocol=protocol)
    confusions = [Confusion(k) for _ in masks]
    filler_cache: dict[tuple[Any, ...], list[torch.Tensor]] = {}
    # examples spread over the split, so that several conditions are drawn
    picks = set(np.linspace(0, len(samples) - 1, examples).round().astype(int).tolist()) \
        if examples else set()
    # every group of the split, known to every rank before it scores its share
    groups = {g: Confusion(k) for g in dict.fromkeys(
        g for r in samples.records for g in (r.condition, r.case) if g)} \
        if "sensor" in settings else {}
    result = EvalResult(mods, list(samples.classes), protocol, model.missing)
    drawn: list[tuple[int, dict[str, np.ndarray]]] = []
    for batch in progress_bar(WorkerErrors(loader), desc="evaluating", unit="batch",
                              enabled=progress and world.main, leave=False):
        _check_frame_size(model, samples, batch, protocol)
        images = batch["images"].to(device, next(model.parameters()).dtype)
        label = batch["label"].to(device)
        preds = predict(model, images, mask_tensor, mode, crop, stride, filler_cache)
        for i in range(len(masks)):
            confusions[i].update(preds[i], label)
        if "sensor" in settings:
            for j, idx in enumerate(batch["index"].tolist()):
                record = samples.records[idx]
                for g in (record.condition, record.case):
                    if g:
                        groups[g].update(preds[index_all, j], label[j])
        for j, idx in enumerate(batch["index"].tolist()):
            if idx in picks:  # drawn at the scored resolution
                sample = samples[idx]
                arrays, label_arr = {m: sample.modalities[m] for m in mods}, sample.label
                if transform is not None:
                    arrays, label_arr = transform(arrays, label_arr)
                drawn.append((idx, {
                    "id": sample.id, "condition": sample.condition, "case": sample.case,
                    "label": label_arr,
                    **{m: _display(a, sample.ranges.get(m)) for m, a in arrays.items()},
                    "pred": preds[index_all, j].cpu().numpy()}))
    # the ranks' counts summed: exactly the matrices of one process over the whole split
    summed = world.sum_arrays([c.matrix for c in (*confusions, *groups.values())])
    for c, matrix in zip((*confusions, *groups.values()), summed, strict=True):
        c.matrix = matrix
    result.examples = [ex for _, ex in sorted(world.gather(drawn), key=lambda t: t[0])]
    names = result.classes
    result.confusion = {"all": confusions[index_all].matrix}
    if "miss" in settings:
        result.confusion.update({f"miss/{subset_name(mods, sub)}": c.matrix
                                 for sub, c in zip(masks, confusions, strict=True)})
    result.confusion.update({f"sensor/{g}": c.matrix for g, c in groups.items()})
    result.whole = confusions[index_all].scores(names)
    if "mss" in settings:
        result.mss = confusions[index_all].scores(names)
    if "miss" in settings:
        result.miss = {subset_name(mods, sub): c.scores(names)
                       for sub, c in zip(masks, confusions, strict=True)}
    if "sensor" in settings:
        result.sensor = {g: groups[g].scores(names) for g in SENSOR_GROUPS if g in groups}
    return result


def _check_frame_size(model: Any2Seg, samples: datasets.SampleSequence,
                      batch: dict[str, torch.Tensor], protocol: str) -> None:
    """Frames smaller than the encoder accepts are refused naming the sample (a window
    is never larger than its frame, so the frame decides)."""
    smallest = model.encoder.min_side
    h, w = batch["images"].shape[-2:]
    if smallest and min(h, w) < smallest:
        sample = samples.ids[int(batch["index"][0])]
        raise PipelineError(
            f"sample {sample} of {samples.name} is scored at {w}x{h} px under the {protocol} "
            f"protocol, smaller than the student's encoder accepts ({smallest} px on each "
            "side); score frames of at least that size (`--protocol official` resizes "
            "DELIVER and MCubeS frames)")


def _clean(x: float) -> float | None:
    return None if isinstance(x, float) and math.isnan(x) else x


MSS_KEYS = ("mIoU", "mAcc", "mF1", "aAcc", "mIoU_present", "mAcc_present", "mF1_present")


def _mean(values: list[float]) -> float | None:
    return _clean(round(float(np.nanmean(values)), 2)) if values else None


def flat_metrics(result: EvalResult) -> dict[str, dict[str, float | None]]:
    """Flat {file stem: {key: value}} as DVC shows metrics. mIoU is the official mean over
    all classes; `miss.mean_mIoU` averages the subsets (the paper's system-level mean);
    `sensor.mean_of_groups_mIoU` averages the weather / failure groups (the paper's own
    Table 4 rows) and `sensor.whole_split_mIoU` scores the whole split at once (the
    baseline rows copied into Table 4)."""
    out: dict[str, dict[str, float | None]] = {}
    if result.mss is not None:
        out["mss"] = {key: _clean(result.mss[key]) for key in MSS_KEYS}
        out["mss"].update({f"IoU_{c}": _clean(v) for c, v in result.mss["IoU"].items()})
    if result.miss:
        values = {name: s["mIoU"] for name, s in result.miss.items()}
        out["miss"] = {"mean_mIoU": _mean(list(values.values())),
                       **{name: _clean(v) for name, v in values.items()}}
    if result.sensor:
        values = {g: s["mIoU"] for g, s in result.sensor.items()}
        whole = result.whole["mIoU"] if result.whole is not None else float("nan")
        out["sensor"] = {"mean_of_groups_mIoU": _mean(list(values.values())),
                         "whole_split_mIoU": _clean(whole),
                         **{g: _clean(v) for g, v in values.items()}}
    return out


def describe(result: EvalResult) -> str:
    """One paragraph saying how the numbers were made, for report.md and the terminal."""
    how = ("images and labels resized as the official evaluation code"
           if result.protocol == "official" else "images and labels at their stored size")
    missing = {"black": "a black frame through the normal preprocessing (MISS)",
               "zero-fill": "zeros after normalisation",
               "exclude": "left out of the fusion"}[result.missing]
    return (f"Protocol `{result.protocol}` ({how}); a missing modality is {missing} "
            f"(`{result.missing}`). mIoU / mAcc / mF1 average all {len(result.classes)} "
            "classes as the official DELIVER `Metrics` (a class absent from labels and "
            "predictions counts 0); `*_present` average only the classes present.")


def markdown(flat: dict[str, dict[str, float | None]]) -> str:
    lines = []
    for setting, values in flat.items():
        keys = [k for k in values if not k.startswith("IoU_")]
        lines.append(f"| {setting} | " + " | ".join(keys) + " |")
        lines.append("|---|" + "---:|" * len(keys))
        lines.append("| score (%) | " + " | ".join(
            "n/a" if values[k] is None else f"{values[k]:.2f}" for k in keys) + " |")
        lines.append("")
    return "\n".join(lines)


def write_outputs(result: EvalResult, out: Path, palette: list[tuple[int, int, int]],
                  provenance: dict[str, Any] | None = None) -> list[Path]:
    """metrics/*.json, confusion.npz (every matrix), the MISS bar chart, the per-class IoU
    chart and prediction pictures; with `provenance` (stages.student.provenance) the report
    opens with it and provenance.json records it."""
    from stages.student.provenance import provenance_markdown
    from stages.student.report import (
        per_class_chart,
        predictions_grid,
        sensor_chart,
        subset_chart,
    )

    out.mkdir(parents=True, exist_ok=True)
    flat = flat_metrics(result)
    head = provenance_markdown(provenance) + "\n\n" if provenance else ""
    (out / "report.md").write_text(head + describe(result) + "\n\n" + markdown(flat) + "\n")
    written = [out / "report.md"]
    if provenance:
        (out / "provenance.json").write_text(json.dumps(provenance, indent=2) + "\n")
        written.append(out / "provenance.json")
    for stem, values in flat.items():
        path = out / f"{stem}.json"
        path.write_text(json.dumps(values, indent=2) + "\n")
        written.append(path)
    np.savez_compressed(out / "confusion.npz", **result.confusion)
    written.append(out / "confusion.npz")
    plots = out / "plots"
    plots.mkdir(exist_ok=True)
    note = f"protocol {result.protocol}, missing sensors: {result.missing}"
    if result.miss:
        written.append(subset_chart({k: v["mIoU"] for k, v in result.miss.items()},
                                    plots / "miss.png", note))
    if result.mss is not None:
        written.append(per_class_chart(result.mss["IoU"], plots / "per_class_iou.png", note))
    if result.sensor and provenance:
        written.append(sensor_chart({g: v["mIoU"] for g, v in result.sensor.items()},
                                    provenance["sensor_groups"], plots / "sensor.png", note))
    if result.examples:
        titles = {m: f"{m} ({kind})" for m, kind in
                  ((provenance or {}).get("inputs") or {}).items()}
        written.append(predictions_grid(result.examples, result.modalities, palette,
                                        result.classes, plots / "predictions.png", titles))
    return written
