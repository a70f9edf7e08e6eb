"""Student step time: cached teacher targets vs computing them online, and LSCD overhead.

    python benchmarks/student_step.py [--steps 8] [--batch 2] [--crop 128] [--vitl-steps 3]

Rows (median seconds per optimiser step, CPU unless CUDA is present):
- `CE only`: the student with the supervised loss alone;
- `LSCD, cached targets`: + L_cr and L_se reading E_m / E_S / E_C from memory (what
  `pipeline train` does; target: at most 10% over CE only);
- `LSCD, online small teacher`: the embedded default LanguageBind teacher encodes every
  modality and caption inside the step (what a pipeline without the cache would do);
- `LSCD, online ViT-L/14 teacher`: the same with a random-weight CLIP ViT-L/14-size
  vision tower (LanguageBind's real size) for the image branch.
Prints a Markdown table and writes JSON (default benchmarks/results/student_step.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from stages.student.losses import LossConfig, correlation, semantic, supervised
from stages.student.model import StudentConfig, build_student

MODALITIES = ["rgb", "depth", "event", "lidar"]


def make_batch(batch: int, crop: int, dim: int, k: int = 25) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "images": torch.randn(batch, len(MODALITIES), 3, crop, crop, generator=g),
        "label": torch.randint(0, k, (batch, crop, crop), generator=g),
        "present": torch.ones(batch, len(MODALITIES), dtype=torch.bool),
        "visual": F.normalize(torch.randn(batch, len(MODALITIES), dim, generator=g), dim=-1),
        "scene": F.normalize(torch.randn(batch, dim, generator=g), dim=-1),
        "classes": F.normalize(torch.randn(k, dim, generator=g), dim=-1),
    }


def step_fn(model, optimizer, batch, lscd: bool, teacher=None):
    """One optimiser step; `teacher(batch) -> (visual, scene)` computes targets online."""
    visual, scene = batch["visual"], batch["scene"]
    if teacher is not None:
        visual, scene = teacher(batch)
    out = model(batch["images"], batch["present"])
    loss = supervised(out.logits, batch["label"], LossConfig())
    if lscd:
        fused = out.fused[-1].fused
        loss = loss + correlation(out.feats[-1], fused, out.present, visual, scene)
        loss = loss + semantic(fused, batch["label"], batch["classes"])
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def timed(fn, steps: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def online_teacher(branches, text_model, tokenizer):
    """Encode every modality through its branch and a caption through the text tower."""
    from stages.teacher.languagebind import preprocess_image

    captions = ["a foggy street with road, buildings, sky, vegetation and cars"]

    @torch.inference_mode()
    def teacher(batch):
        b = batch["images"].shape[0]
        vis = []
        for m_i, m in enumerate(MODALITIES):
            imgs = ((batch["images"][:, m_i].clamp(-2, 2) + 2) * 63.75).byte()
            pixels = torch.stack([preprocess_image(i.permute(1, 2, 0).numpy()) for i in imgs])
            model = branches["depth" if m == "depth" else "image"]
            vis.append(F.normalize(model(pixel_values=pixels).image_embeds, dim=-1))
        enc = tokenizer(captions * b, padding="max_length", max_length=77, truncation=True,
                        return_tensors="pt")
        scene = F.normalize(text_model(**enc).text_embeds, dim=-1)
        return torch.stack(vis, dim=1), scene

    return teacher


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--vitl-steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--crop", type=int, default=128)
    parser.add_argument("--backbone", default="mit_b0")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/student_step.json"))
    args = parser.parse_args()
    from transformers import (
        CLIPTextModelWithProjection,
        CLIPTokenizer,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
    )

    from stages.teacher.default.folders import write_default_teacher

    torch.manual_seed(0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        teacher_dir = Path(tmp) / "teacher"
        write_default_teacher(teacher_dir)
        small = {b: CLIPVisionModelWithProjection.from_pretrained(
            str(teacher_dir / f"LanguageBind_{b.capitalize()}")).eval() for b in ("image", "depth")}
        text = CLIPTextModelWithProjection.from_pretrained(
            str(teacher_dir / "LanguageBind_Image")).eval()
        tok = CLIPTokenizer.from_pretrained(str(teacher_dir / "LanguageBind_Image"))
        dim = text.config.projection_dim
        model = build_student(StudentConfig(backbone=args.backbone), MODALITIES, 25)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        batch = make_batch(args.batch, args.crop, dim)
        # interleaved, so that drift in machine speed hits both variants alike
        ce_times, cached_times = [], []
        step_fn(model, opt, batch, True)
        for _ in range(args.steps):
            ce_times.append(timed(lambda: step_fn(model, opt, batch, False), 1, warmup=0))
            cached_times.append(timed(lambda: step_fn(model, opt, batch, True), 1, warmup=0))
        ce, cached = statistics.median(ce_times), statistics.median(cached_times)
        rows.append({"variant": "CE only", "step_s": ce})
        rows.append({"variant": "LSCD, cached targets", "step_s": cached})
        teacher = online_teacher(small, text, tok)
        online = timed(lambda: step_fn(model, opt, batch, True, teacher), args.steps)
        rows.append({"variant": "LSCD, online small teacher", "step_s": online})
        vitl_cfg = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096,
                                    num_hidden_layers=24, num_attention_heads=16,
                                    patch_size=14, image_size=224, projection_dim=dim)
        vitl = CLIPVisionModelWithProjection(vitl_cfg).eval()
        big = online_teacher({"image": vitl, "depth": vitl}, text, tok)
        online_l = timed(lambda: step_fn(model, opt, batch, True, big), args.vitl_steps)
        rows.append({"variant": "LSCD, online ViT-L/14 teacher", "step_s": online_l})
    for r in rows:
        r["step_s"] = round(r["step_s"], 4)
        r["vs_cached"] = round(r["step_s"] / cached, 2)
    overhead = cached / ce - 1
    print(f"student {args.backbone}, batch {args.batch} x {len(MODALITIES)} modalities, "
          f"crop {args.crop}, device cpu, {os.cpu_count()} cores")
    print("| variant | median step (s) | x cached |")
    print("|---|---:|---:|")
    for r in rows:
        print(f"| {r['variant']} | {r['step_s']} | {r['vs_cached']} |")
    print(f"LSCD overhead over CE only: {100 * overhead:.1f}% (target <= 10%)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "benchmark": "student_step", "backbone": args.backbone, "batch": args.batch,
        "crop": args.crop, "cpu_count": os.cpu_count(), "machine": platform.machine(),
        "lscd_overhead": round(overhead, 4), "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
