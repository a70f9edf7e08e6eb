"""How good the default teacher is, measured through the real stage-one loader: zero-shot
weather, caption -> frame retrieval and per-pixel zero-shot class accuracy per modality,
each beside its chance level (recorded in teacher.json, printed by `fit-teacher`)."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from stages.teacher.captioners.template import OPENINGS
from stages.teacher.default.data import SplitData
from stages.teacher.default.model import encode_vision

WEATHER = tuple(OPENINGS)  # cloud, fog, night, rain, sun


def _retrieval(text: torch.Tensor, frames: torch.Tensor, captions: list[str],
               ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """Caption -> frame retrieval over the distinct captions: a hit when one of the top-k
    frames carries the query caption. Chance is exact (hypergeometric)."""
    unique = list(dict.fromkeys(captions))
    n = len(captions)
    sims = F.normalize(text, dim=-1) @ F.normalize(frames, dim=-1).T  # (U, N)
    out: dict[str, float] = {}
    for k in ks:
        k_eff = min(k, n)
        top = sims.topk(k_eff, dim=1).indices
        hits, chance = [], []
        for u, caption in enumerate(unique):
            owners = {i for i, c in enumerate(captions) if c == caption}
            hits.append(any(int(i) in owners for i in top[u]))
            chance.append(1 - math.comb(n - len(owners), k_eff) / math.comb(n, k_eff))
        out[f"top{k}"] = float(np.mean(hits))
        out[f"top{k}_chance"] = float(np.mean(chance))
    return out


def quality(teacher_root: Path, data: SplitData, branch_of: dict[str, str],
            class_prompts: list[str]) -> dict[str, Any]:
    """Zero-shot weather per modality, caption -> frame retrieval per modality and
    per-pixel zero-shot class accuracy per modality (patch tokens vs class prompts), each
    beside its chance level, using the folders at `teacher_root` through the real loader."""
    from stages.teacher.languagebind import LanguageBind

    teacher = LanguageBind(teacher_root, sorted(set(branch_of.values())))
    weather_emb = teacher.encode_text([OPENINGS[w] for w in WEATHER])
    caption_emb = teacher.encode_text(list(dict.fromkeys(data.captions)))
    class_emb = teacher.encode_text(class_prompts)
    truth = torch.tensor([WEATHER.index(c) if c in WEATHER else -1 for c in data.conditions])
    counts = np.bincount(truth[truth >= 0].numpy(), minlength=len(WEATHER))
    labels = data.labels
    valid = labels != 255
    k = len(class_prompts)
    pixel_counts = torch.bincount(labels[valid], minlength=k).double()
    out: dict[str, Any] = {
        "frames": int(labels.shape[0]),
        "weather_chance": 1 / len(WEATHER),
        "weather_majority": float(counts.max() / max(1, counts.sum())),
        "pixel_chance": 1 / k,
        "pixel_majority": float(pixel_counts.max() / pixel_counts.sum()),
        "modalities": {},
    }
    for m, b in branch_of.items():
        model = teacher.branches[b].model
        with torch.inference_mode():
            frames, patches = encode_vision(model, data.pixels[m])
        frames, patches = frames.float(), F.normalize(patches.float(), dim=-1)
        guess = (F.normalize(frames, dim=-1) @ weather_emb.T).argmax(1)
        weather = float((guess[truth >= 0] == truth[truth >= 0]).float().mean())
        grid = int(math.isqrt(patches.shape[1]))
        scores = (patches @ class_emb.T).transpose(1, 2).reshape(-1, k, grid, grid)
        scores = F.interpolate(scores, size=labels.shape[-2:], mode="bilinear",
                               align_corners=False)
        pred = scores.argmax(1)
        correct = (pred == labels) & valid
        per_class = torch.bincount(labels[correct], minlength=k).double()
        present = pixel_counts > 0
        out["modalities"][m] = {
            "branch": b,
            "weather": weather,
            "retrieval": _retrieval(caption_emb, frames, data.captions),
            "pixel_accuracy": float(correct.sum() / valid.sum()),
            "pixel_mean_class_accuracy": float((per_class[present] /
                                                pixel_counts[present]).mean()),
        }
    return out


def format_quality(q: dict[str, Any], initial: dict[str, Any] | None = None) -> str:
    """The figures as a small table: fitted, random initialisation, chance."""
    rows = [("", "fitted", "random init", "chance")]

    def row(name: str, get: Callable[[dict[str, Any]], float], chance: str) -> None:
        before = f"{get(initial):.3f}" if initial is not None else "-"
        rows.append((name, f"{get(q):.3f}", before, chance))

    for m in q["modalities"]:
        row(f"zero-shot weather, {m}", lambda x, m=m: x["modalities"][m]["weather"],
            f"{q['weather_chance']:.3f}")
    for m in q["modalities"]:
        ret = q["modalities"][m]["retrieval"]
        row(f"caption->frame top-1, {m}",
            lambda x, m=m: x["modalities"][m]["retrieval"]["top1"], f"{ret['top1_chance']:.3f}")
        row(f"caption->frame top-5, {m}",
            lambda x, m=m: x["modalities"][m]["retrieval"]["top5"], f"{ret['top5_chance']:.3f}")
    for m in q["modalities"]:
        row(f"per-pixel class accuracy, {m}",
            lambda x, m=m: x["modalities"][m]["pixel_accuracy"],
            f"{q['pixel_chance']:.3f} (majority {q['pixel_majority']:.3f})")
        row(f"per-pixel mean class accuracy, {m}",
            lambda x, m=m: x["modalities"][m]["pixel_mean_class_accuracy"],
            f"{q['pixel_chance']:.3f}")
    width = max(len(r[0]) for r in rows)
    lines = [f"{r[0]:<{width}}  {r[1]:>7}  {r[2]:>11}  {r[3]}" for r in rows]
    return f"teacher quality on {q['frames']} val frames\n" + "\n".join(lines)
