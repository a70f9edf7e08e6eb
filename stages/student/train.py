"""Stage two: train the Any2Seg student from images, labels and the teacher cache.

Read it top to bottom: configuration, data and cached targets, model and optimiser,
resume, the loop (loss, step, log, validate, checkpoint). The teacher never runs here;
its targets come from `pipeline.store.open_cache` (this module never imports
`stages.teacher`). Under torchrun each rank runs this same loop on its slice of every
global batch (`stages.student.distributed`); rank 0 alone writes files.
"""

from __future__ import annotations

import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline import datasets
from pipeline.config import build, preset
from pipeline.errors import PipelineError
from pipeline.precision import upcast
from pipeline.progress import progress as progress_bar
from pipeline.store import TeacherCache, dataset_fingerprint, open_cache
from stages.student import distributed, noise
from stages.student.data import AugmentConfig, ScheduleSampler, StudentData, Targets
from stages.student.evaluate import evaluate, evaluation_loader
from stages.student.losses import LossConfig, correlation, semantic, supervised
from stages.student.model import StudentConfig, build_student

CHECKPOINT_VERSION = 1


@dataclass
class TrainConfig:
    """The `train` group of params.yaml (plus the dataset it trains on)."""

    dataset: str = "sample"
    root: str | None = None
    cache: str | None = None  # default cache/<dataset>.zarr
    out: str | None = None  # default runs/<dataset>
    modalities: list[str] | None = None  # default: those in the cache
    steps: int | None = None
    epochs: float | None = None
    batch_size: int = 8
    crop: int = 512
    lr: float = 6e-5
    weight_decay: float = 0.01
    warmup: float = 0.1  # fraction of the steps
    warmup_ratio: float = 0.1  # warm-up starts at lr * warmup_ratio
    power: float = 0.9
    seed: int = 3407
    workers: int = 2
    modality_dropout: float = 0.0
    augment: dict[str, Any] = field(default_factory=dict)
    loss: dict[str, Any] = field(default_factory=dict)
    val_every: int = 0  # 0: only at the end
    val_limit: int | None = None
    checkpoint_every: int = 100
    device: str = "auto"
    skip_bad: bool = False
    dtype: str = "float32"  # float64: a reference run (numerical checks), not for speed
    nproc: int = 1  # processes (GPUs) on this machine; `pipeline train` launches them
    compile: bool = False  # torch.compile the model
    persistent_workers: bool = False  # keep the validation loader's workers between runs
    prefetch_factor: int | None = None  # batches each loader worker prepares ahead

    @classmethod
    def from_params(cls, params: dict[str, Any], overrides: dict[str, Any],
                    source: str = "params.yaml") -> tuple[StudentConfig, TrainConfig]:
        data = dict(params.get("train") or {})
        ds = params.get("dataset") or {}
        data.setdefault("dataset", ds.get("name", "sample"))
        if "root" in ds:
            data.setdefault("root", ds["root"])
        cfg = build(cls, data, f"{source} (train)")
        student = build(StudentConfig, dict(params.get("student") or {}), f"{source} (student)")
        if overrides.get("dataset") not in (None, cfg.dataset) and "root" not in overrides:
            cfg.root = None
        for key, value in overrides.items():
            if value is None:
                continue
            if hasattr(cfg, key):
                setattr(cfg, key, value)
            elif hasattr(student, key):
                setattr(student, key, value)
            else:
                raise PipelineError(f"unknown option {key}")
        cfg.validate()
        return student, cfg

    def validate(self) -> None:
        if self.steps is None and self.epochs is None:
            raise PipelineError("set train.steps or train.epochs (or --steps / --epochs)")
        for name in ("batch_size", "crop", "checkpoint_every", "nproc"):
            if getattr(self, name) < 1:
                raise PipelineError(f"train.{name} must be >= 1")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise PipelineError(f"train.lr must be a positive number, got {self.lr}")
        if self.dtype not in ("float32", "float64"):
            raise PipelineError(f"train.dtype must be float32 or float64, got {self.dtype!r}")
        if self.prefetch_factor is not None and self.prefetch_factor < 1:
            raise PipelineError("train.prefetch_factor must be >= 1 (or null)")
        if not 0 <= self.modality_dropout <= 1 or not 0 <= self.warmup < 1:
            raise PipelineError("train.modality_dropout must be in [0, 1], warmup in [0, 1)")
        self.loss_config()
        self.augment_config()

    def settings(self) -> dict[str, Any]:
        """What decides the weights (a resumed run must match): not how many processes
        or loader workers compute them."""
        run_only = ("nproc", "workers", "persistent_workers", "prefetch_factor")
        return {k: v for k, v in asdict(self).items() if k not in run_only}

    def loss_config(self) -> LossConfig:
        return build(LossConfig, self.loss, "train.loss")

    def augment_config(self) -> AugmentConfig:
        return build(AugmentConfig, self.augment, "train.augment")

    def resolved_root(self) -> Path:
        return Path(self.root or preset("datasets", self.dataset).get("root")
                    or datasets.get(self.dataset).default_root)

    def resolved_cache(self) -> Path:
        return Path(self.cache or f"cache/{self.dataset}.zarr")

    def resolved_out(self) -> Path:
        return Path(self.out or f"runs/{self.dataset}")


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise PipelineError("--device cuda was requested but no CUDA device is available")
    return name


def open_targets(cache_path: Path, cfg: TrainConfig) -> TeacherCache:
    if not cache_path.exists():
        raise PipelineError(f"teacher cache {cache_path} does not exist; build it with "
                            f"`pipeline cache-teacher --dataset {cfg.dataset}`")
    return open_cache(cache_path)


def load_targets(cache: TeacherCache, samples: datasets.SampleSequence, modalities: list[str],
                 cfg: TrainConfig) -> Targets:
    """Teacher targets for `samples`, refusing a cache that does not belong to them."""
    cache_path = cache.path
    missing_mods = [m for m in modalities if m not in cache.modalities]
    if missing_mods:
        raise PipelineError(f"{cache_path} has no teacher embeddings for {missing_mods[0]}; "
                            f"it holds {', '.join(cache.modalities)}")
    splits = cache.attrs.get("splits")
    if splits:  # the cache's own sample list, re-indexed now, must still match
        records = datasets.get(cfg.dataset).index(cfg.resolved_root(), splits)
        now = dataset_fingerprint([r.id for r in records])
        if now != cache.dataset_fingerprint:
            raise PipelineError(
                f"{cache_path} was built from another sample list (dataset fingerprint "
                f"{cache.dataset_fingerprint}, the data at {cfg.resolved_root()} gives {now}); "
                "rebuild it with `pipeline cache-teacher --overwrite`")
    cache.require(samples.ids)
    got = cache.get(samples.ids, modalities)
    return Targets(visual=np.stack([got["visual"][m] for m in modalities], axis=1),
                   scene=got["scene"], classes=cache.classes)


def save_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                    step: int, best: float, meta: dict[str, Any]) -> None:
    """Atomic write (temporary file + rename). With the optimizer and every RNG state for
    `last.pt` (resume); weights and metadata only for `best.pt`."""
    state = {
        "version": CHECKPOINT_VERSION, "step": step, "best": best, "meta": meta,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
                "python": random.getstate(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
    }
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def train(student: StudentConfig, cfg: TrainConfig, progress: bool = True,
          resume: bool = False) -> dict[str, Any]:
    # -- this process's place in the job (torchrun: one rank per GPU) ------------------------
    world = distributed.join(resolve_device(cfg.device))
    device, local_batch = world.device, world.split(cfg.batch_size)
    dtype = getattr(torch, cfg.dtype)

    # -- data and cached teacher targets ----------------------------------------------------
    out = cfg.resolved_out()
    root = cfg.resolved_root()
    cache_path = cfg.resolved_cache()
    cache = open_targets(cache_path, cfg)
    modalities = list(cfg.modalities or cache.modalities)
    train_set = datasets.load(cfg.dataset, root, "train", modalities=modalities,
                              skip_bad=cfg.skip_bad)
    val_set = datasets.load(cfg.dataset, root, "val", modalities=modalities,
                            skip_bad=cfg.skip_bad)
    if cfg.val_limit:
        val_set = val_set[: cfg.val_limit]
    targets = load_targets(cache, train_set, modalities, cfg)
    steps = cfg.steps or math.ceil(cfg.epochs * max(1, len(train_set) // cfg.batch_size))
    loss_cfg = cfg.loss_config()
    meta = {"student": asdict(student), "train": cfg.settings(), "modalities": modalities,
            "classes": list(train_set.classes), "dataset": cfg.dataset, "steps": steps,
            "palette": [list(c) for c in datasets.get(cfg.dataset).palette]}

    # -- model, optimiser, schedule --------------------------------------------------------
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    random.seed(cfg.seed)
    model = build_student(student, modalities, len(train_set.classes)).to(device, dtype)
    if device.startswith("cuda"):
        model = model.to(memory_format=torch.channels_last)
    net = distributed.parallel(model, world, cfg.compile)  # DDP over the ranks, compiled
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    from timm.scheduler import PolyLRScheduler

    scheduler = PolyLRScheduler(optimizer, t_initial=steps, power=cfg.power,
                                warmup_t=int(cfg.warmup * steps),
                                warmup_lr_init=cfg.lr * cfg.warmup_ratio, t_in_epochs=False)
    classes = torch.from_numpy(targets.classes).to(device, dtype)

    # -- resume ----------------------------------------------------------------------------
    out.mkdir(parents=True, exist_ok=True)
    last, best_path = out / "last.pt", out / "best.pt"
    start, best = 0, -math.inf
    if resume and last.is_file():
        ckpt = torch.load(last, map_location="cpu", weights_only=False)
        if ckpt["meta"]["student"] != meta["student"] or ckpt["meta"]["train"] != meta["train"]:
            raise PipelineError(f"{last} was written with other settings; resume with the "
                                "same parameters or start a new --out")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        start, best = int(ckpt["step"]), float(ckpt["best"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        np.random.set_state(ckpt["rng"]["numpy"])
        random.setstate(ckpt["rng"]["python"])
        if ckpt["rng"]["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
    elif resume:
        raise PipelineError(f"nothing to resume: {last} does not exist")

    data = StudentData(train_set, modalities, targets, cfg.crop, cfg.augment_config(),
                       cfg.seed, cfg.modality_dropout)
    sampler = ScheduleSampler(len(data), cfg.batch_size, steps, cfg.seed, start, world.rank,
                              world.size)
    loader = torch.utils.data.DataLoader(
        data, batch_sampler=sampler, num_workers=cfg.workers,
        pin_memory=device.startswith("cuda"), generator=torch.Generator().manual_seed(cfg.seed),
        prefetch_factor=cfg.prefetch_factor if cfg.workers else None)
    val_loader = evaluation_loader(val_set, modalities, world, cfg.workers,
                                   cfg.persistent_workers, cfg.prefetch_factor)

    from dvclive import Live

    live = Live(dir=str(out / "dvclive"), resume=resume and start > 0, dvcyaml=False,
                save_dvc_exp=False, report=None) if world.main else distributed.NullLive()
    bar = progress_bar(total=steps, initial=start, desc="training", unit="step",
                       enabled=progress and world.main)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16,
                              enabled=device.startswith("cuda") and dtype == torch.float32)
    history: list[float] = []
    val_miou = float("nan")
    t0 = time.perf_counter()

    # -- the loop ----------------------------------------------------------------------------
    model.train()
    for step, batch in enumerate(loader, start):
        scheduler.step_update(step)
        images = batch["images"].to(device, dtype, non_blocking=True)
        label = batch["label"].to(device, non_blocking=True)
        present = batch["present"].to(device)
        slots = world.rank * local_batch + torch.arange(len(label), device=device)
        # every term is the loss of the whole global batch (sums over ranks: world.total)
        with autocast, noise.using(noise.sample_keys(cfg.seed, step, slots)):
            output = net(images, present)
            fused = upcast(output.fused[-1].fused)
            terms = {"L_sup": supervised(upcast(output.logits), label, loss_cfg, world.total)}
            if loss_cfg.w_cr:
                terms["L_cr"] = correlation(upcast(output.feats[-1]), fused, output.present,
                                            batch["visual"].to(device, dtype),
                                            batch["scene"].to(device, dtype),
                                            loss_cfg.tau_cr, world.total)
            if loss_cfg.w_se:
                terms["L_se"] = semantic(fused, label, classes, loss_cfg.tau_se, world.total)
        weights = {"L_sup": loss_cfg.w_sup, "L_cr": loss_cfg.w_cr, "L_se": loss_cfg.w_se}
        for name, value in terms.items():
            if not torch.isfinite(value):
                raise PipelineError(f"non-finite loss at step {step}: {name} = {value.item()}; "
                                    "lower train.lr or check the inputs and the cache")
        loss = sum(weights[n] * v for n, v in terms.items())
        optimizer.zero_grad(set_to_none=True)
        (loss * world.size).backward()  # DDP averages the ranks' gradients
        optimizer.step()

        history.append(loss.item())
        lr = optimizer.param_groups[0]["lr"]
        live.log_metric("train/loss", history[-1])
        for name, value in terms.items():
            live.log_metric(f"train/{name}", value.item())
        live.log_metric("train/lr", lr)
        bar.update(1)
        bar.set_postfix(loss=f"{history[-1]:.3f}", lr=f"{lr:.2e}")

        done = step + 1
        if (cfg.val_every and done % cfg.val_every == 0) or done == steps:
            model.eval()
            val_miou = evaluate(model, val_set, ("mss",), device=device, world=world,
                                loader=val_loader).mss["mIoU"]
            model.train()
            live.log_metric("val/mIoU", val_miou)
            if not math.isnan(val_miou) and val_miou > best:
                best = val_miou
                if world.main:
                    save_checkpoint(best_path, model, None, done, best, meta)
        if (done % cfg.checkpoint_every == 0 or done == steps) and world.main:
            save_checkpoint(last, model, optimizer, done, best, meta)
        live.next_step()
    bar.close()
    live.end()
    # no finite validation score: keep the last weights
    if world.main and not best_path.exists() and last.exists():
        save_checkpoint(best_path, model, None, steps, best, meta)
    return {"out": str(out), "steps": steps, "start": start, "val_mIoU": val_miou,
            "best_val_mIoU": best, "seconds": round(time.perf_counter() - t0, 1),
            "first_loss": history[0] if history else None,
            "last_loss": history[-1] if history else None}
