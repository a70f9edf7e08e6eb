"""One prepared check of every CUDA path, and the throughput figures a GPU user plans with.

    python benchmarks/gpu_check.py [--device cuda] [--sections agreement,stage_one,...]
    python benchmarks/gpu_check.py --device cpu --tiny      # the dry run (tests, seconds)

GPU time is scarce, so this runs in one go (under 10 minutes on one modern GPU) and was
proven on CPU beforehand (`--device cpu --tiny`, run by tests/e2e/test_gpu_check.py). Six
sections, each with a time budget, each timed and each failure recorded without losing
the others (the JSON is rewritten after every section, so a killed run keeps what it had):

1. `agreement`: a tiny student trained a few float32 steps on CPU and on the device from
   the same weights and batches (autocast and TF32 off), and one evaluation on each.
2. `stage_one`: a random ViT-L/14-size LanguageBind teacher written in the real on-disk
   format over generated 1042 px DELIVER-layout frames (fp16, batch 16 / 64), and a
   LLaMA-shaped LLaMA-Adapter captioner (tokens/s at batch 1 and 16).
3. `training`: mit_b2 (random init), head 768, crop 1024, batch 2 / 8, bf16 autocast,
   channels-last, with and without torch.compile; and `torchrun --nproc-per-node 1`
   (NCCL, SyncBatchNorm, DDP) against the plain step.
4. `evaluation`: the official protocol (1024 px, 15 MISS subsets, sensor groups), s/frame.
5. `feeding`: samples/s per DataLoader worker at 1042 px from the folder and from a
   `pipeline pack` file, and the workers needed to feed the measured training step.
6. `inference`: `pipeline predict` / `pipeline export` at 1024 px (mit_b2, head 768):
   s/frame of the eager predict path and of the exported subset graph on the device, and
   of the ONNX graph on ONNX Runtime's CUDA provider where the installed onnxruntime has
   it (the locked CPU wheel has not: then its CPU provider on all cores), for all four
   modalities and RGB alone, with the device's logits against ONNX Runtime's.

Writes benchmarks/results/gpu_check.json and gpu_check.md (`--out`). `--sections` reruns
some and keeps the other sections of an existing JSON.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import yaml

SECTIONS = ("agreement", "stage_one", "training", "evaluation", "feeding", "inference")
MODALITIES = ["rgb", "depth", "event", "lidar"]
# the DELIVER recipe's peak learning rate, read from its one home
RECIPE_LR = float(yaml.safe_load((Path(__file__).resolve().parents[1] / "pipelines" / "deliver" /
                                  "params.yaml").read_text())["train"]["lr"])

# Sizes: the real ones (GPU, ~8 minutes) and the dry run's (CPU, seconds). Budgets are
# seconds per section; a sub-measurement that would start past its budget is skipped
# and recorded as such.
FULL: dict[str, Any] = {
    "frame": 1042, "frames": {"train": 64, "val": 8, "test": 8},
    "agreement": {"backbone": "mit_b0", "embed_dim": 64, "crop": 128, "batch": 2,
                  "steps": 4, "lr": 1e-4, "eval_frames": 4},
    "teacher": {"hidden": 1024, "layers": 24, "heads": 16, "patch": 14, "projection": 768},
    "teacher_batches": [16, 64],
    "llama": {"dim": 4096, "layers": 32, "heads": 32, "clip_hidden": 1024,
              "clip_layers": 24, "clip_heads": 16, "new_tokens": 32},
    "caption_batches": [1, 16],
    "student": {"backbone": "mit_b2", "embed_dim": 768, "crop": 1024, "batches": [2, 8],
                "warmup": 2, "steps": 5, "ddp_steps": 3, "ddp_batch": 2, "ddp_crop": 512},
    "eval": {"backbone": "mit_b2", "embed_dim": 768, "frames": 4, "protocol": "official"},
    "feed": {"workers": [1, 4], "batches": 3, "batch": 8, "crop": 1024},
    "infer": {"backbone": "mit_b2", "embed_dim": 768, "size": 1024, "repeats": 5},
    "budgets": {"agreement": 45, "stage_one": 150, "training": 180, "evaluation": 45,
                "feeding": 60, "inference": 120},
}
TINY: dict[str, Any] = {
    "frame": 64, "frames": {"train": 8, "val": 4, "test": 4},
    "agreement": {"backbone": "mit_b0", "embed_dim": 16, "crop": 32, "batch": 2,
                  "steps": 2, "lr": 1e-4, "eval_frames": 1},
    "teacher": {"hidden": 32, "layers": 1, "heads": 2, "patch": 32, "projection": 32},
    "teacher_batches": [2, 4],
    "llama": {"dim": 64, "layers": 2, "heads": 2, "clip_hidden": 32, "clip_layers": 1,
              "clip_heads": 2, "new_tokens": 4},
    "caption_batches": [1, 2],
    "student": {"backbone": "mit_b0", "embed_dim": 16, "crop": 32, "batches": [1, 2],
                "warmup": 1, "steps": 1, "ddp_steps": 2, "ddp_batch": 1, "ddp_crop": 32},
    "eval": {"backbone": "mit_b0", "embed_dim": 16, "frames": 1, "protocol": "native"},
    "feed": {"workers": [1], "batches": 2, "batch": 2, "crop": 32},
    # timm's test-sized ConvNeXt (the tests' tiny student): an ONNX export of mit_b0 costs
    # ~20 CPU seconds, of which its ops' tracing is the larger part; MiT's export is
    # tests/student/test_export.py's
    "infer": {"backbone": "timm:test_convnext", "embed_dim": 16, "size": 64, "repeats": 1},
    # the dry run must reach every sub-measurement, however loaded the CPU
    "budgets": {"agreement": 900, "stage_one": 900, "training": 900, "evaluation": 900,
                "feeding": 900, "inference": 900},
}


class Skipped(Exception):
    """A sub-measurement not started because its section's budget was spent."""


@dataclass
class Context:
    device: str
    sizes: dict[str, Any]
    scratch: Path
    tiny: bool
    results: dict[str, Any]
    deadline: float = math.inf
    _data: Path | None = None
    _pack: Path | None = None
    skipped: list[str] = field(default_factory=list)

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")

    def time_left(self, what: str) -> bool:
        """Whether there is budget left to start `what` (recorded when not)."""
        if time.perf_counter() < self.deadline:
            return True
        self.skipped.append(what)
        return False

    def data(self) -> Path:
        """Generated DELIVER-layout frames (the `sample` reader is DELIVER's)."""
        if self._data is None:
            from any2seg.synth import SampleSpec, make_sample

            self._data = self.scratch / "frames"
            f = self.sizes["frames"]
            make_sample(self._data, SampleSpec(size=self.sizes["frame"], train=f["train"],
                                               val=f["val"], test=f["test"],
                                               frames_per_scene=2),
                        workers=1 if self.tiny else os.cpu_count())
        return self._data

    def pack(self) -> Path:
        if self._pack is None:
            from any2seg.pack import pack

            self._pack = self.scratch / "frames.h5"
            pack("sample", self.data(), self._pack, workers=max(1, min(8, os.cpu_count() or 1)))
        return self._pack


# ---------------------------------------------------------------------------------------
# measuring helpers
# ---------------------------------------------------------------------------------------
def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device: str) -> float | None:
    """Peak GPU memory allocated by torch since `reset_peak` (None on CPU)."""
    if not device.startswith("cuda"):
        return None
    return round(torch.cuda.max_memory_allocated() / 2 ** 30, 2)


def synthetic_batch(batch: int, crop: int, dim: int, k: int = 25, seed: int = 0
                    ) -> dict[str, torch.Tensor]:
    """A training batch of the shapes `StudentData` yields (images already normalised)."""
    g = torch.Generator().manual_seed(seed)
    return {
        "images": torch.randn(batch, len(MODALITIES), 3, crop, crop, generator=g),
        "label": torch.randint(0, k, (batch, crop, crop), generator=g),
        "present": torch.ones(batch, len(MODALITIES), dtype=torch.bool),
        "visual": F.normalize(torch.randn(batch, len(MODALITIES), dim, generator=g), dim=-1),
        "scene": F.normalize(torch.randn(batch, dim, generator=g), dim=-1),
        "classes": F.normalize(torch.randn(k, dim, generator=g), dim=-1),
    }


class Step:
    """The training step of `stages.student.train` (same loss terms through
    `World.total`, `(loss * ranks).backward()`, AdamW, keyed noise), with the loop's CUDA
    settings made explicit so that `agreement` can turn autocast off."""

    def __init__(self, model: torch.nn.Module, net: torch.nn.Module, world: Any,
                 device: str, autocast: bool, lr: float, ohem: bool = False) -> None:
        from stages.student.losses import LossConfig
        from stages.student.train import param_groups

        self.model, self.net, self.world, self.device = model, net, world, device
        self.autocast = autocast
        self.optimizer = torch.optim.AdamW(param_groups(model, 0.01), lr=lr)
        self.loss_cfg = LossConfig(ohem=ohem)
        self.fuse_classes = model.mff.config.variant == "author"

    def __call__(self, batch: dict[str, torch.Tensor], step: int, seed: int = 0) -> float:
        from any2seg.precision import upcast
        from stages.student import noise
        from stages.student.losses import correlation_kl, gap_correlation, semantic, supervised

        d, world, cfg = self.device, self.world, self.loss_cfg
        images = batch["images"].to(d, non_blocking=True)
        label = batch["label"].to(d, non_blocking=True)
        present = batch["present"].to(d)
        slots = world.rank * len(label) + torch.arange(len(label), device=d)
        autocast = torch.autocast("cuda", dtype=torch.bfloat16,
                                  enabled=self.autocast and d.startswith("cuda"))
        with autocast, noise.using(noise.sample_keys(seed, step, slots)):
            out = self.net(images, present)
            fused = upcast(out.fused[-1].fused)
            loss = supervised(upcast(out.logits), label, cfg, world.total)
            m_f = (out.fused[-1].correlation if self.fuse_classes
                   else gap_correlation(upcast(out.feats[-1]), fused))
            loss = loss + correlation_kl(upcast(m_f), out.present, batch["visual"].to(d),
                                         batch["scene"].to(d), cfg.tau_cr, world.total)
            loss = loss + semantic(fused, label, batch["classes"].to(d), cfg.tau_se,
                                   world.total)
        self.optimizer.zero_grad(set_to_none=True)
        (loss * world.size).backward()
        self.optimizer.step()
        return float(loss.detach())


def student(backbone: str, embed_dim: int, seed: int = 0, variant: str = "pixel"
            ) -> torch.nn.Module:
    from stages.student.model import StudentConfig, build_student

    torch.manual_seed(seed)
    return build_student(StudentConfig(backbone=backbone, embed_dim=embed_dim,
                                       mff={"variant": variant}), MODALITIES, 25)


def flat_params(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().float().cpu().reshape(-1) for p in model.parameters()])


def flat_grads(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p))
                      .detach().float().cpu().reshape(-1) for p in model.parameters()])


# ---------------------------------------------------------------------------------------
# 1. CPU / device agreement
# ---------------------------------------------------------------------------------------
def _train_run(device: str, a: dict[str, Any], channels_last: bool) -> dict[str, Any]:
    from stages.student.distributed import World

    model = student(a["backbone"], a["embed_dim"]).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    step = Step(model, model, World(device=device), device, autocast=False, lr=a["lr"])
    losses, grad0 = [], None
    model.train()
    for i in range(a["steps"]):
        batch = synthetic_batch(a["batch"], a["crop"], 32, seed=i)
        losses.append(step(batch, i))
        if i == 0:
            grad0 = flat_grads(model)
    return {"losses": losses, "grad0": grad0, "params": flat_params(model)}


def _eval_run(device: str, ctx: Context, channels_last: bool
              ) -> tuple[dict[str, np.ndarray], torch.Tensor]:
    """The evaluation's confusion matrices, and the logits of every subset (S, B, K, H, W)
    of the same frames through `infer`, on the CPU, for the near-tie check."""
    from any2seg import datasets
    from stages.student.distributed import World
    from stages.student.evaluate import evaluate, evaluation_loader, infer, subsets

    a = ctx.sizes["agreement"]
    # MFF `author` (the DELIVER preset): under `pixel` and `paper` the per-pixel selection
    # of a two-modality subset is an exact tie between layer-normed features of equal norm,
    # decided by round-off, so those 6 MISS subsets move with any change of kernels
    model = student(a["backbone"], a["embed_dim"], seed=1, variant="author").to(device).eval()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    val = datasets.load("sample", ctx.data(), "val", modalities=MODALITIES)[: a["eval_frames"]]
    result = evaluate(model, val, ("mss", "miss", "sensor"), device=device, protocol="native")
    masks = torch.zeros(15, len(MODALITIES), dtype=torch.bool)
    for i, sub in enumerate(subsets(len(MODALITIES))):
        masks[i, list(sub)] = True
    logits = [infer(model, b["images"].to(device), masks.to(device)).cpu()
              for b in evaluation_loader(val, MODALITIES, World(), 0, protocol="native")]
    return result.confusion, torch.cat(logits, 1)


def logit_agreement(ref: torch.Tensor, other: torch.Tensor) -> dict[str, Any]:
    """Two runs' logits (..., K, H, W): the largest difference against 1e-4 of their scale
    (`ok`), and the argmax flips with the widest top-2 margin among them. A flip needs a
    logit change of at least half its margin, so within the bound every flip is a near-tie
    decided by round-off; pixel counts alone would depend on the kernels a machine picks."""
    diff = float((ref - other).abs().max())
    scale = float(ref.abs().max())
    top2 = ref.topk(2, dim=-3).values
    margin = top2[..., 0, :, :] - top2[..., 1, :, :]
    flipped = ref.argmax(-3) != other.argmax(-3)
    return {"logits_max_abs": diff, "logits_scale": scale, "ok": diff <= 1e-4 * scale,
            "pixels": int(flipped.numel()), "flipped": int(flipped.sum()),
            "widest_flipped_margin": float(margin[flipped].max()) if flipped.any() else 0.0}


def section_agreement(ctx: Context) -> dict[str, Any]:
    """Same weights, same batches, float32, autocast and TF32 off: CPU against the device.
    On a CPU dry run the second run is the CPU in channels-last (other conv kernels),
    which is what the tolerances must absorb on a GPU too.

    Tolerances: step 0 starts from identical weights, so its loss and gradient differ only
    by float32 round-off of reductions taken in another order (~1e-7 relative per sum,
    grown through the network's depth): loss to 1e-5 relative, gradient to 1e-4 of its
    largest entry. Later steps: AdamW divides by sqrt(v), which turns round-off on
    near-zero gradients into lr-sized updates, so parameters can differ by up to
    2 * lr * steps however small the round-off (the bound checked), while the losses stay
    within 1e-3 relative; a larger gap means a different computation, not rounding.
    Evaluation: every subset's logits to 1e-4 of their scale (`logit_agreement`); the
    confusion matrices may then differ only by argmax flips at near-ties, which a tiny
    random student has, so moved pixels are reported, not bounded."""
    a = ctx.sizes["agreement"]
    other = ctx.device if ctx.cuda else "cpu"
    tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        ref = _train_run("cpu", a, False)
        dev = _train_run(other, a, not ctx.cuda)
        ref_cm, ref_logits = _eval_run("cpu", ctx, False)
        dev_cm, dev_logits = _eval_run(other, ctx, not ctx.cuda)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    loss_rel = [abs(x - y) / max(abs(x), 1e-12) for x, y in
                zip(ref["losses"], dev["losses"], strict=True)]
    grad_rel = float((ref["grad0"] - dev["grad0"]).abs().max() / ref["grad0"].abs().max())
    param_diff = float((ref["params"] - dev["params"]).abs().max())
    bound = 2 * a["lr"] * a["steps"]
    pixels = sum(int(m.sum()) for m in ref_cm.values())
    differing = sum(int(np.abs(ref_cm[k] - dev_cm[k]).sum()) // 2 for k in ref_cm)
    ties = logit_agreement(ref_logits, dev_logits)
    checks = {
        "step0_loss_rel <= 1e-5": loss_rel[0] <= 1e-5,
        "losses_rel <= 1e-3": max(loss_rel) <= 1e-3,
        "step0_grad_rel <= 1e-4": grad_rel <= 1e-4,
        f"params_max_abs <= 2*lr*steps ({bound:g})": param_diff <= bound,
        "subset logits_max_abs <= 1e-4 * scale": ties["ok"],
    }
    out = {"devices": ["cpu", other if ctx.cuda else "cpu (channels-last)"],
           "settings": {**a, "dtype": "float32", "autocast": False, "tf32": False,
                        "eval": "mss+miss+sensor, native protocol"},
           "losses_cpu": ref["losses"], "losses_other": dev["losses"],
           "loss_rel": loss_rel, "step0_grad_rel": grad_rel, "params_max_abs": param_diff,
           "confusion_matrices": len(ref_cm), "confusion_pixels": pixels,
           "confusion_identical": differing == 0, "confusion_pixels_moved": differing,
           "subset_logits": ties,
           "checks": checks}
    if not all(checks.values()):
        failed = [k for k, v in checks.items() if not v]
        raise AssertionError(f"CPU and {other} disagree: {', '.join(failed)} ({out})")
    return out


# ---------------------------------------------------------------------------------------
# 2. stage one at real size
# ---------------------------------------------------------------------------------------
def write_teacher(root: Path, dims: dict[str, Any]) -> Path:
    """A random LanguageBind teacher of `dims` in the real on-disk format (config.json,
    peft LoRA `pytorch_model.bin`, tokenizer), image and depth branches."""
    from stages.teacher.default.folders import write_checkpoint

    for i, branch in enumerate(("image", "depth")):
        write_checkpoint(root / f"LanguageBind_{branch.capitalize()}", branch, seed=100 + i,
                         text_seed=99, **dims)
    return root


def _teacher_run(ctx: Context, teacher: Path, batch: int) -> dict[str, Any]:
    from stages.teacher.run import TeacherConfig, cache_teacher

    out = ctx.scratch / f"store-{batch}.zarr"
    shutil.rmtree(out, ignore_errors=True)
    cfg = TeacherConfig(dataset="sample", root=str(ctx.data()), out=str(out),
                        teacher_root=str(teacher), batch_size=batch,
                        rows_per_shard=max(64, batch), device=ctx.device,
                        dtype="float16", modality_branch={"depth": "depth"})
    reset_peak(ctx.device)
    start = time.perf_counter()
    report = cache_teacher(cfg)
    seconds = time.perf_counter() - start
    return {"batch": batch, "samples": report.computed_rows, "seconds": round(seconds, 2),
            "samples_per_s": round(report.computed_rows / seconds, 2),
            "loop_samples_per_s": round(report.samples_per_s, 2),
            "model_busy": round(report.model_busy, 3),
            "waiting_for_decode": round(1 - report.model_busy, 3),
            "peak_gpu_gib": peak_gib(ctx.device)}


def build_llama(cfg: dict[str, Any], device: str, dtype: torch.dtype) -> Any:
    """A random LLaMA-Adapter V2 of the official structure at `cfg`'s size (LLaMA dim,
    layers, heads; CLIP tower size), built on the device in `dtype`."""
    from transformers import CLIPConfig, CLIPModel

    from stages.teacher.llama_adapter import LlamaAdapter, LlamaArgs, VisualArgs

    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            h = cfg["clip_hidden"]
            clip = CLIPModel(CLIPConfig(
                text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2),
                vision_config=dict(hidden_size=h, intermediate_size=4 * h,
                                   num_hidden_layers=cfg["clip_layers"],
                                   num_attention_heads=cfg["clip_heads"], image_size=224,
                                   patch_size=14),
                projection_dim=768 if h >= 768 else h))
            clip_dim = clip.config.projection_dim
            visual = VisualArgs(clip_dim=clip_dim, v_embed_dim=768 if h >= 768 else h,
                                v_depth=8 if h >= 768 else 1,
                                v_num_heads=16 if h >= 768 else 2,
                                query_len=10, query_layer=cfg["layers"] - 1)
            args = LlamaArgs(dim=cfg["dim"], n_layers=cfg["layers"], n_heads=cfg["heads"],
                             vocab_size=32000, w_bias=True)
            model = LlamaAdapter(args, visual, clip)
    finally:
        torch.set_default_dtype(default)
    return model.to(device=device, dtype=dtype).eval()


def _caption_run(model: Any, batch: int, captions: int, new_tokens: int) -> dict[str, Any]:
    from stages.teacher.llama_adapter import generate

    p = model.llama.output.weight
    pixels = torch.randn(captions, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    pixels = pixels.to(p.device, p.dtype)
    prompts = [[1, *range(3, 40 - i % 5)] for i in range(captions)]  # the Alpaca prompt's length
    tokens, gen_s = 0, 0.0
    with torch.inference_mode():
        for i in range(0, captions, batch):
            visual = model.visual(model.clip_tokens(pixels[i:i + batch]))
            sync(str(p.device))
            t0 = time.perf_counter()
            out = generate(model, visual, prompts[i:i + batch], new_tokens, eos_id=-1)
            sync(str(p.device))
            gen_s += time.perf_counter() - t0
            tokens += sum(len(t) for t in out)
    return {"batch": batch, "captions": captions, "new_tokens": tokens,
            "generate_s": round(gen_s, 2), "tokens_per_s": round(tokens / gen_s, 1)}


def section_stage_one(ctx: Context) -> dict[str, Any]:
    """The LanguageBind cache at real size (decode share, samples/s, memory) and the
    captioner's generation speed."""
    dims = ctx.sizes["teacher"]
    ctx.data()
    start = time.perf_counter()
    teacher = write_teacher(ctx.scratch / "teacher", dims)
    write_s = time.perf_counter() - start
    rows = []
    for b in ctx.sizes["teacher_batches"]:
        if ctx.time_left(f"stage_one teacher batch {b}"):
            rows.append(_teacher_run(ctx, teacher, b))
    shutil.rmtree(teacher, ignore_errors=True)
    captioner: dict[str, Any] = {"rows": []}
    lcfg = ctx.sizes["llama"]
    if ctx.time_left("stage_one captioner"):
        dtype = torch.bfloat16 if ctx.cuda else torch.float32
        reset_peak(ctx.device)
        t0 = time.perf_counter()
        model = build_llama(lcfg, ctx.device, dtype)
        params = sum(p.numel() for p in model.parameters())
        captioner.update({"build_s": round(time.perf_counter() - t0, 1),
                          "params_billion": round(params / 1e9, 3),
                          "dtype": str(dtype).removeprefix("torch."), **lcfg})
        _caption_run(model, 1, 1, 2)  # warm-up
        for b in ctx.sizes["caption_batches"]:
            if ctx.time_left(f"stage_one captioner batch {b}"):
                captioner["rows"].append(_caption_run(model, b, max(b, 2), lcfg["new_tokens"]))
        captioner["peak_gpu_gib"] = peak_gib(ctx.device)
        del model
    f = ctx.sizes["frames"]
    return {"settings": {"frame": ctx.sizes["frame"], "frames": sum(f.values()),
                         "teacher": {**dims, "text_tower": "same size as the vision tower"},
                         "dtype": "float16" if ctx.cuda else "float32 (CPU)",
                         "modalities": MODALITIES, "branches": "rgb/event/lidar image, depth "
                         "depth", "captioner": "template (the LLaMA row is apart)"},
            "teacher_write_s": round(write_s, 1), "teacher_rows": rows,
            "captioner": captioner}


# ---------------------------------------------------------------------------------------
# 3. training at real size
# ---------------------------------------------------------------------------------------
def _time_steps(ctx: Context, s: dict[str, Any], batch: int, compiled: bool) -> dict[str, Any]:
    from stages.student import distributed
    from stages.student.distributed import World

    model = student(s["backbone"], s["embed_dim"], variant="author").to(ctx.device)
    if ctx.cuda:
        model = model.to(memory_format=torch.channels_last)
    net = distributed.parallel(model, World(device=ctx.device), compiled)
    step = Step(model, net, World(device=ctx.device), ctx.device, autocast=True, lr=RECIPE_LR,
                ohem=True)
    data = synthetic_batch(batch, s["crop"], 768 if not ctx.tiny else 32)
    if ctx.cuda:
        data = {k: v.pin_memory() for k, v in data.items()}
    model.train()
    reset_peak(ctx.device)
    t0 = time.perf_counter()
    for i in range(s["warmup"]):
        step(data, i)
    sync(ctx.device)
    warm = time.perf_counter() - t0
    times = []
    for i in range(s["steps"]):
        t = time.perf_counter()
        step(data, s["warmup"] + i)
        sync(ctx.device)
        times.append(time.perf_counter() - t)
    med = float(np.median(times))
    return {"batch": batch, "compile": compiled, "warmup_s": round(warm, 2),
            "step_s": round(med, 4), "step_s_min": round(min(times), 4),
            "step_s_max": round(max(times), 4), "images_per_s": round(batch / med, 2),
            "peak_gpu_gib": peak_gib(ctx.device)}


def ddp_worker(args: argparse.Namespace) -> None:
    """Under torchrun: join the process group even at one rank (NCCL on CUDA), wrap the
    student as `distributed.parallel` does for several ranks (SyncBatchNorm, DDP) and
    write the losses and final weights of a few steps for the parent to compare."""
    import torch.distributed as dist

    from stages.student.distributed import World

    sizes = TINY if args.tiny else FULL
    s = sizes["student"]
    device = args.device
    if device.startswith("cuda"):
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    backend = "nccl" if device.startswith("cuda") else "gloo"
    dist.init_process_group(backend, device_id=torch.device(device)
                            if backend == "nccl" else None)
    world = World(dist.get_rank(), dist.get_world_size(), 0, device)
    losses, params = _ddp_steps(s, device, world, ddp=True)
    if world.main:
        Path(args.worker_out).write_text(json.dumps({"losses": losses, "backend": backend,
                                                     "world_size": world.size}))
        torch.save(params, Path(args.worker_out).with_suffix(".pt"))
    dist.destroy_process_group()


def _ddp_steps(s: dict[str, Any], device: str, world: Any, ddp: bool
               ) -> tuple[list[float], torch.Tensor]:
    from stages.student import distributed

    # float32 without TF32, deterministic kernels: the plain and the torchrun process
    # then differ only where DDP / SyncBatchNorm compute differently
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False

    # the fuse layer's BatchNorm is what SyncBatchNorm replaces; dropout keyed
    model = student(s["backbone"], s["embed_dim"], variant="author").to(device)
    if device.startswith("cuda"):
        model = model.to(memory_format=torch.channels_last)
    net: torch.nn.Module = model
    if ddp:
        model = distributed.sync_batchnorm(model, device)
        ids = [torch.device(device).index or 0] if device.startswith("cuda") else None
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
    step = Step(model, net, world, device, autocast=False, lr=RECIPE_LR, ohem=True)
    model.train()
    losses = [step(synthetic_batch(s["ddp_batch"], s["ddp_crop"], 32, seed=i), i)
              for i in range(s["ddp_steps"])]
    return losses, flat_params(model)


def _torchrun_vs_plain(ctx: Context) -> dict[str, Any]:
    from stages.student.distributed import World

    s = ctx.sizes["student"]
    flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
             torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    try:
        plain_losses, plain = _ddp_steps(s, ctx.device, World(device=ctx.device), ddp=False)
    finally:
        (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
         torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark) = flags
    out = ctx.scratch / "ddp.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]),
                                                        *sys.path]),
           "OMP_NUM_THREADS": str(torch.get_num_threads()),
           "NVIDIA_TF32_OVERRIDE": "0"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", "1", str(Path(__file__).resolve()), "--worker", "ddp",
               "--worker-out", str(out), "--device", ctx.device]
    if ctx.tiny:
        command.append("--tiny")
    t0 = time.perf_counter()
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    seconds = time.perf_counter() - t0
    if proc.returncode:
        raise RuntimeError(f"torchrun failed ({proc.returncode}): {proc.stderr[-2000:]}")
    got = json.loads(out.read_text())
    params = torch.load(out.with_suffix(".pt"), weights_only=True)
    diff = float((params - plain).abs().max())
    loss_rel = max(abs(a - b) / max(abs(a), 1e-12) for a, b in
                   zip(plain_losses, got["losses"], strict=True))
    # one rank: DDP's all-reduce of one gradient and SyncBatchNorm's one-rank statistics
    # are exact, so only kernel non-determinism separates the runs (float32, no autocast)
    # (AdamW can still turn a last-bit difference of a near-zero gradient into an
    # lr-sized step: the bound of `agreement`)
    bound = 2 * RECIPE_LR * s["ddp_steps"]
    ok = loss_rel <= 1e-5 and diff <= bound
    result = {"backend": got["backend"], "world_size": got["world_size"],
              "steps": s["ddp_steps"], "batch": s["ddp_batch"], "crop": s["ddp_crop"],
              "dtype": "float32, autocast off", "torchrun_s": round(seconds, 1),
              "losses_plain": plain_losses, "losses_torchrun": got["losses"],
              "loss_rel": loss_rel, "params_max_abs": diff, "params_bound": bound,
              "equal": ok}
    if not ok:
        raise AssertionError(f"torchrun --nproc-per-node 1 differs from the plain run: {result}")
    return result


def section_training(ctx: Context) -> dict[str, Any]:
    s = ctx.sizes["student"]
    rows = []
    # the dry run leaves torch.compile out: dynamo alone traces the student for ~10 CPU
    # seconds (inductor's C++ build for minutes); the GPU run compiles both batch sizes
    for compiled in (False,) if ctx.tiny else (False, True):
        for b in s["batches"]:
            if ctx.time_left(f"training batch {b} compile {compiled}"):
                rows.append(_time_steps(ctx, s, b, compiled))
                if ctx.cuda:
                    torch.cuda.empty_cache()
    torchrun = _torchrun_vs_plain(ctx) if ctx.time_left("training torchrun") else None
    return {"settings": {"backbone": s["backbone"], "init": "random",
                         "embed_dim": s["embed_dim"], "crop": s["crop"],
                         "modalities": MODALITIES, "mff": "author", "loss": "OHEM CE + L_cr + "
                         "L_se", "autocast": "bf16" if ctx.cuda else "off (CPU)",
                         "channels_last": ctx.cuda, "data": "synthetic, on the device "
                         "(feeding is measured apart)", "warmup_steps": s["warmup"],
                         "timed_steps": s["steps"]},
            "rows": rows, "torchrun": torchrun}


# ---------------------------------------------------------------------------------------
# 4. evaluation at the official protocol
# ---------------------------------------------------------------------------------------
def section_evaluation(ctx: Context) -> dict[str, Any]:
    from any2seg import datasets
    from stages.student.evaluate import evaluate

    e = ctx.sizes["eval"]
    model = student(e["backbone"], e["embed_dim"], variant="author").to(ctx.device).eval()
    val = datasets.load("sample", ctx.data(), "val", modalities=MODALITIES)[: e["frames"]]
    evaluate(model, val[:1], ("mss",), device=ctx.device, protocol=e["protocol"])  # warm-up
    reset_peak(ctx.device)
    t0 = time.perf_counter()
    result = evaluate(model, val, ("mss", "miss", "sensor"), device=ctx.device,
                      protocol=e["protocol"])
    sync(ctx.device)
    seconds = time.perf_counter() - t0
    return {"settings": {**e, "frame": ctx.sizes["frame"], "settings": "mss+miss+sensor",
                         "mode": "whole", "missing": model.missing, "dtype": "float32"},
            "frames": len(val), "subsets": len(result.miss or {}),
            "sensor_groups": len(result.sensor or {}), "seconds": round(seconds, 2),
            "s_per_frame": round(seconds / len(val), 3), "peak_gpu_gib": peak_gib(ctx.device)}


# ---------------------------------------------------------------------------------------
# 5. data feeding
# ---------------------------------------------------------------------------------------
def _feed_rate(root: Path, workers: int, f: dict[str, Any]) -> float:
    """Training samples/s (decode + augment + crop, as `pipeline train` loads them)."""
    from any2seg import datasets
    from stages.student.data import AugmentConfig, ScheduleSampler, StudentData, Targets

    train = datasets.load("sample", root, "train", modalities=MODALITIES)
    n = len(train)
    targets = Targets(visual=np.zeros((n, len(MODALITIES), 8), np.float16),
                      scene=np.zeros((n, 8), np.float16), classes=np.zeros((25, 8), np.float16))
    data = StudentData(train, MODALITIES, targets, f["crop"], AugmentConfig(), 0)
    steps = f["batches"] * max(1, workers)
    loader = torch.utils.data.DataLoader(
        data, batch_sampler=ScheduleSampler(n, f["batch"], steps + max(1, workers), 0),
        num_workers=workers)
    it = iter(loader)
    for _ in range(max(1, workers)):  # start-up and one batch per worker
        next(it)
    t0 = time.perf_counter()
    got = sum(len(b["label"]) for b in it)
    return got / (time.perf_counter() - t0)


def section_feeding(ctx: Context) -> dict[str, Any]:
    f = ctx.sizes["feed"]
    sources = {"folder": ctx.data(), "pack": ctx.pack()}
    rows = []
    for name, root in sources.items():
        for w in f["workers"]:
            if ctx.time_left(f"feeding {name} w{w}"):
                rate = _feed_rate(root, w, f)
                rows.append({"source": name, "workers": w, "samples_per_s": round(rate, 2),
                             "per_worker": round(rate / w, 2)})
    need = None
    steps = [r for r in (ctx.results.get("training", {}).get("rows") or [])
             if not r["compile"]]
    if steps:
        best = max(steps, key=lambda r: r["batch"])
        need = {"batch": best["batch"], "images_per_s": best["images_per_s"]}
        for name in sources:
            one = [r for r in rows if r["source"] == name and r["workers"] == 1]
            if one:
                need[f"workers_{name}"] = math.ceil(best["images_per_s"] / one[0]["per_worker"])
    return {"settings": {**f, "frame": ctx.sizes["frame"], "modalities": MODALITIES,
                         "cpu_count": os.cpu_count(), "loads": "decode 4 modalities + label, "
                         "random resize / crop / flip / jitter / blur"},
            "rows": rows, "workers_needed": need}


# ---------------------------------------------------------------------------------------
# 6. prediction and export
# ---------------------------------------------------------------------------------------
def _median_s(run: Callable[[], Any], device: str, repeats: int) -> float:
    run()  # warm-up (allocation, cuDNN / ORT planning)
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        sync(device)
        times.append(time.perf_counter() - t0)
    return round(float(np.median(times)), 4)


def section_inference(ctx: Context) -> dict[str, Any]:
    """Tolerances: the device's eager float32 logits (TF32 off) against ONNX Runtime's on
    the same frame, to 1e-4 of their scale (`logit_agreement`, as `agreement`)."""
    import onnxruntime as ort

    from stages.student.evaluate import infer
    from stages.student.export import SubsetGraph, export_onnx, onnx_session, random_frames

    f = ctx.sizes["infer"]
    model = student(f["backbone"], f["embed_dim"], variant="author").eval()
    cuda_ort = "CUDAExecutionProvider" in ort.get_available_providers()
    providers = (["CUDAExecutionProvider", "CPUExecutionProvider"] if cuda_ort and ctx.cuda
                 else ["CPUExecutionProvider"])
    tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    rows = []
    try:
        for name, subset in (("all four", MODALITIES), ("rgb", ["rgb"])):
            if not ctx.time_left(f"inference {name}"):
                continue
            t0 = time.perf_counter()
            path = export_onnx(model, subset, ctx.scratch / f"student.{'+'.join(subset)}.onnx")
            export_s = time.perf_counter() - t0
            x = torch.stack(random_frames(model, subset, [(f["size"], f["size"])], 1))
            idx = [MODALITIES.index(m) for m in subset]
            full = model.filler(x).expand(1, -1, 3, *x.shape[-2:]).clone()
            full[:, idx] = x
            mask = torch.zeros(1, len(MODALITIES), dtype=torch.bool)
            mask[0, idx] = True
            dev = model.to(ctx.device)
            graph = SubsetGraph(dev, subset).eval()
            xd, fulld, maskd = x.to(ctx.device), full.to(ctx.device), mask.to(ctx.device)
            session = onnx_session(path, providers=providers)
            feed = {"images": x.numpy()}
            with torch.inference_mode():
                eager_logits = graph(xd).float().cpu()
                row = {"subset": name, "export_s": round(export_s, 1),
                       "eager_graph_s": _median_s(lambda g=graph, v=xd: g(v), ctx.device,
                                                  f["repeats"]),
                       "eager_predict_s": _median_s(
                           lambda m=dev, v=fulld, k=maskd: infer(m, v, k, filler_cache={}),
                           ctx.device, f["repeats"])}
            row["onnxruntime_s"] = _median_s(lambda s=session, d=feed: s.run(None, d), "cpu",
                                             f["repeats"])
            got = torch.from_numpy(session.run(None, feed)[0])
            row["onnxruntime_provider"] = session.get_providers()[0]
            row["agreement"] = logit_agreement(eager_logits, got)
            rows.append(row)
            model = model.cpu()
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    bad = [r["subset"] for r in rows if not r["agreement"]["ok"]]
    out = {"settings": {**f, "mff": "author", "missing": "exclude", "dtype": "float32",
                        "tf32": False, "onnxruntime": ort.__version__,
                        "providers": ort.get_available_providers()},
           "cuda_provider": cuda_ort, "rows": rows}
    if bad:
        raise AssertionError(f"{ctx.device} eager and ONNX Runtime disagree on {bad} ({out})")
    return out


RUNNERS: dict[str, Callable[[Context], dict[str, Any]]] = {
    "agreement": section_agreement, "stage_one": section_stage_one,
    "training": section_training, "evaluation": section_evaluation,
    "feeding": section_feeding, "inference": section_inference}


# ---------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------
def environment(device: str) -> dict[str, Any]:
    env = {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
           "device": device, "torch": torch.__version__, "cuda": torch.version.cuda,
           "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available()
           else None, "python": platform.python_version(), "machine": platform.platform(),
           "cpu_count": os.cpu_count(), "gpu": None}
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(torch.device(device))
        env["gpu"] = {"name": props.name, "memory_gib": round(props.total_memory / 2 ** 30, 1),
                      "capability": f"{props.major}.{props.minor}",
                      "count": torch.cuda.device_count()}
    return env


def markdown(report: dict[str, Any]) -> str:
    env = report["environment"]
    gpu = env["gpu"]["name"] if env.get("gpu") else "none (CPU)"
    lines = [f"GPU check {env['date']}: {gpu}, torch {env['torch']}, CUDA {env['cuda']}, "
             f"{env['cpu_count']} CPUs{' (tiny dry run)' if report['tiny'] else ''}", "",
             "| section | status | s | figures |", "|---|---|---:|---|"]
    for name in SECTIONS:
        sec = report["sections"].get(name)
        if sec is None:
            continue
        lines.append(f"| {name} | {sec['status']} | {sec['seconds']} | {_figures(name, sec)} |")
    lines.append("")
    lines.append("Settings of every section are in the JSON (`sections.*.result.settings`).")
    return "\n".join(lines) + "\n"


def _figures(name: str, sec: dict[str, Any]) -> str:
    r = sec.get("result")
    if sec["status"] != "ok" or r is None:
        return (sec.get("error") or "").splitlines()[0][:200] if sec.get("error") else ""
    if name == "agreement":
        return (f"loss rel {max(r['loss_rel']):.1e}, grad rel {r['step0_grad_rel']:.1e}, "
                f"params {r['params_max_abs']:.1e}, confusion identical "
                f"{r['confusion_identical']}")
    if name == "stage_one":
        t = "; ".join(f"batch {x['batch']}: {x['samples_per_s']} samples/s, waiting "
                      f"{x['waiting_for_decode']:.0%}, {x['peak_gpu_gib']} GiB"
                      for x in r["teacher_rows"])
        c = r["captioner"]
        cap = "; ".join(f"batch {x['batch']}: {x['tokens_per_s']} tok/s" for x in c["rows"])
        return f"teacher {t}; captioner {c.get('params_billion')} B params: {cap}"
    if name == "training":
        t = "; ".join(f"b{x['batch']}{' compiled' if x['compile'] else ''}: {x['step_s']} s, "
                      f"{x['images_per_s']} img/s, {x['peak_gpu_gib']} GiB" for x in r["rows"])
        d = r.get("torchrun")
        return t + (f"; torchrun {d['backend']} equal {d['equal']}" if d else "")
    if name == "evaluation":
        return (f"{r['s_per_frame']} s/frame ({r['subsets']} subsets, "
                f"{r['sensor_groups']} sensor groups)")
    if name == "inference":
        return "; ".join(f"{x['subset']}: eager graph {x['eager_graph_s']} s, predict "
                         f"{x['eager_predict_s']} s, ORT {x['onnxruntime_provider']} "
                         f"{x['onnxruntime_s']} s, agree {x['agreement']['ok']}"
                         for x in r["rows"])
    rows = "; ".join(f"{x['source']} w{x['workers']}: {x['per_worker']}/s per worker"
                     for x in r["rows"])
    return rows + (f"; needed {r['workers_needed']}" if r.get("workers_needed") else "")


def run(device: str, tiny: bool, sections: list[str], out: Path,
        scratch: Path | None = None) -> dict[str, Any]:
    """Run `sections`, rewriting `out` (JSON) and its .md after each one."""
    sizes = TINY if tiny else FULL
    report: dict[str, Any] = {"benchmark": "gpu_check", "tiny": tiny, "sections": {}}
    if out.is_file():
        try:
            old = json.loads(out.read_text())
            if old.get("tiny") == tiny and old.get("environment", {}).get("device") == device:
                report["sections"] = {k: v for k, v in old.get("sections", {}).items()
                                      if k not in sections}
        except (OSError, ValueError):
            pass
    report["environment"] = environment(device)
    report["sizes"] = sizes
    own = scratch is None
    if tiny:  # one thread: a loaded small CPU makes OpenMP's spinning threads crawl
        torch.set_num_threads(1)
    scratch = scratch or Path(tempfile.mkdtemp(prefix="gpu-check-"))
    results = {k: v.get("result") or {} for k, v in report["sections"].items()}
    ctx = Context(device, sizes, scratch, tiny, results)
    total = time.perf_counter()
    try:
        for name in sections:
            ctx.deadline = time.perf_counter() + sizes["budgets"][name]
            ctx.skipped = []
            t0 = time.perf_counter()
            entry: dict[str, Any] = {"budget_s": sizes["budgets"][name]}
            try:
                entry["result"] = RUNNERS[name](ctx)
                entry["status"] = "ok"
                results[name] = entry["result"]
            except Exception as exc:  # noqa: BLE001 - recorded; the other sections go on
                entry["status"] = "failed"
                entry["error"] = f"{type(exc).__name__}: {exc}"[:4000]
                entry["traceback"] = traceback.format_exc()[-4000:]
            entry["seconds"] = round(time.perf_counter() - t0, 1)
            entry["skipped"] = list(ctx.skipped)
            report["sections"][name] = entry
            report["total_s"] = round(time.perf_counter() - total, 1)
            print(f"[gpu_check] {name}: {entry['status']} in {entry['seconds']} s"
                  + (f" ({entry['error'].splitlines()[0][:300]})" if "error" in entry else ""),
                  flush=True)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(report, indent=2, default=str) + "\n")
            out.with_suffix(".md").write_text(markdown(report))
            if ctx.cuda:
                torch.cuda.empty_cache()
    finally:
        if own:
            shutil.rmtree(scratch, ignore_errors=True)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes: the CPU dry run")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"comma-separated, of {', '.join(SECTIONS)}")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/gpu_check.json"))
    parser.add_argument("--scratch", type=Path, default=None,
                        help="folder for generated data and weights (default: temporary)")
    parser.add_argument("--worker", choices=["ddp"], help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker == "ddp":
        ddp_worker(args)
        return
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        parser.error(f"--sections: unknown section {unknown[0]!r}; "
                     f"choose from {', '.join(SECTIONS)}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: no CUDA device here; use --device cpu --tiny "
                     "for the dry run")
    report = run(args.device, args.tiny, sections, args.out, args.scratch)
    print(markdown(report))
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")
    failed = [k for k, v in report["sections"].items() if v["status"] != "ok"]
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
