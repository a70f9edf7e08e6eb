"""Stage two: train the Any2Seg student from images, labels and the teacher cache.

Read it top to bottom: data and cached targets, model and optimiser, resume, the loop
(loss, step, log, validate, checkpoint). Its settings are `TrainConfig`
(`stages.student.config`), its checkpoints `stages.student.checkpoint`, its dvclive log
`stages.student.tracking`. The teacher never runs here; its targets come from
`any2seg.store.open_cache` (this module never imports `stages.teacher`). Under torchrun
each rank runs this same loop on its slice of every global batch
(`stages.student.distributed`); rank 0 alone writes files.
"""

from __future__ import annotations

import logging
import math
import os
import random
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from any2seg import datasets
from any2seg.devices import resolve_device
from any2seg.errors import PipelineError
from any2seg.precision import upcast
from any2seg.progress import progress as progress_bar
from any2seg.runlock import check_run_folder, folder_lock
from any2seg.store import TeacherCache, open_cache, sample_list_fingerprint
from stages.student import distributed, noise
from stages.student.checkpoint import cache_fingerprints, restore, save_checkpoint
from stages.student.checkpoint_file import plain
from stages.student.code_version import code_fingerprint
from stages.student.codes import CodeTranslators, code_loss, decoded_loss
from stages.student.config import TrainConfig
from stages.student.data import IGNORE, ScheduleSampler, StudentData, Targets, WorkerErrors
from stages.student.estimate import train_steps
from stages.student.evaluate import evaluate, evaluation_loader
from stages.student.losses import (
    correlation_kl,
    distill_ramp,
    gap_correlation,
    semantic,
    supervised,
)
from stages.student.model import StudentConfig, build_student
from stages.student.resume import clear_run, decide
from stages.student.schedule import PolyWarmup
from stages.student.tracking import open_live

log = logging.getLogger("pipeline.train")


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
        skipped = set(cache.skipped)  # dropped as broken by `cache-teacher --skip-bad`
        records = datasets.get(cfg.dataset).index(cfg.resolved_root(), splits)
        now = sample_list_fingerprint([r.id for r in records if r.id not in skipped])
        if now != cache.sample_list_fingerprint:
            raise PipelineError(
                f"{cache_path} was built from another sample list (fingerprint "
                f"{cache.sample_list_fingerprint}, the data at {cfg.resolved_root()} gives "
                f"{now}); rebuild it with `pipeline cache-teacher --overwrite`")
    cache.require(samples.ids)
    got = cache.get(samples.ids, modalities)
    return Targets(visual=np.stack([got["visual"][m] for m in modalities], axis=1),
                   scene=got["scene"], classes=cache.classes)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups as DELIVER's `get_optimizer` (semseg/optimizers.py): weight decay on
    matrices and kernels, none on 1-D parameters (norm weights and biases)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def without_skipped(samples: datasets.SampleSequence, skipped: set[str],
                    dataset: str) -> datasets.SampleSequence:
    """`samples` less those the teacher cache skipped as broken (even if repaired since:
    the cache has no rows for them)."""
    kept = [r for r in samples.records if r.id not in skipped]
    if len(kept) == len(samples.records):
        return samples
    return datasets.SampleSequence(samples.name, kept, datasets.get(dataset).decode,
                                   samples.classes, samples.modalities)


def load_codes(cache: TeacherCache, targets: Targets, ids: list[str], modalities: list[str],
               key: str = "w_teacher_code") -> torch.Tensor:
    """Put the teacher's patch codes into `targets`; return the frozen codebooks
    (M, K, D) for code -> feature decoding. `key`: the train.loss weight that asked."""
    if cache.dense is None:
        raise PipelineError(f"train.loss.{key} > 0 needs dense codes, and {cache.path} has "
                            "none; rebuild it with `pipeline cache-teacher --dense codebook:K` "
                            f"(teacher.dense in params.yaml) or set train.loss.{key}: 0")
    targets.codes = cache.codes(ids, modalities)
    targets.code_image_size = int(cache.dense["image_size"])
    books = torch.from_numpy(np.stack([cache.codebook(m) for m in modalities]).astype(np.float32))
    return books


def _likely_cause(term: str, batch: dict[str, torch.Tensor], output: Any, targets: Targets,
                  cfg: TrainConfig, ids: list[str]) -> str:
    """Why a loss term is not finite, judged from what went into it."""
    sample = ids[int(batch["index"][0])]
    if not all(bool(torch.isfinite(f).all()) for f in output.feats) or \
            not bool(torch.isfinite(output.logits).all()):
        return (f"the student's features are not finite: training diverged (lower train.lr, "
                f"now {cfg.lr:g}) or an input of {sample} holds non-finite values")
    if term == "L_cr":
        rows = [int(i) for i in batch["index"]
                if not (np.isfinite(targets.visual[int(i)]).all()
                        and np.isfinite(targets.scene[int(i)]).all())]
        if rows:
            return (f"the teacher cache {cfg.resolved_cache()} holds non-finite E_m/E_S for "
                    f"{ids[rows[0]]}; rebuild it with `pipeline cache-teacher --overwrite`")
        return "check train.loss.tau_cr and the teacher cache"
    if term == "L_se":
        if not np.isfinite(targets.classes).all():
            return (f"the teacher cache {cfg.resolved_cache()} holds non-finite class "
                    "embeddings E_C; rebuild it with `pipeline cache-teacher --overwrite`")
        return "check train.loss.tau_se and the teacher cache"
    if not bool((batch["label"] != IGNORE).any()):
        return (f"the batch (from {sample}) has no labelled pixel left after cropping (all "
                f"{IGNORE}); check the labels")
    return f"the cross-entropy overflowed; lower train.lr (now {cfg.lr:g})"


def train(student: StudentConfig, cfg: TrainConfig, progress: bool = True,
          resume: bool | str = False) -> dict[str, Any]:
    """Train under a lock on the run folder (only the rank that writes takes it): a second
    trainer on the same --out is refused instead of renaming checkpoints under the first.
    `resume`: False starts at step 0; True or "strict" continues from OUT/last.pt, refusing
    one of other settings; "auto" continues when it is this run and starts fresh, saying
    why, otherwise (`stages.student.resume`)."""
    student.validate()
    cfg.validate(student=student)
    if os.environ.get("RANK", "0") != "0":
        return _train(student, cfg, progress, resume)
    check_run_folder(cfg.resolved_out())
    with folder_lock(cfg.resolved_out(), "wait for it to finish or choose another --out "
                     "(two trainers on one run folder are refused)"):
        return _train(student, cfg, progress, resume)


def _train(student: StudentConfig, cfg: TrainConfig, progress: bool,
           resume: bool | str) -> dict[str, Any]:
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
    # samples the cache skipped as broken (`cache-teacher --skip-bad`) are skipped here too
    skipped = set(cache.skipped)
    train_set = datasets.load(cfg.dataset, root, "train", modalities=modalities,
                              skip_bad=cfg.skip_bad or bool(skipped))
    val_set = datasets.load(cfg.dataset, root, "val", modalities=modalities,
                            skip_bad=cfg.skip_bad or bool(skipped))
    train_set = without_skipped(train_set, skipped, cfg.dataset)
    val_set = without_skipped(val_set, skipped, cfg.dataset)
    skipped_bad = 0  # samples this run's decode check left out (train.skip_bad)
    if cfg.skip_bad or skipped:
        reader = datasets.get(cfg.dataset)
        indexed = [reader.index(root, split) for split in ("train", "val")]
        skipped_bad = sum(r.id not in skipped for records in indexed for r in records) - \
            len(train_set) - len(val_set)
    if skipped:
        left_out = [sum(r.id in skipped for r in records) for records in indexed]
        log.info("%s skipped %d broken samples when it was built (--skip-bad); training "
                 "without them: %d train and %d val samples left out", cache_path,
                 len(skipped), *left_out)
    if cfg.val_limit:
        val_set = val_set[: cfg.val_limit]
    targets = load_targets(cache, train_set, modalities, cfg)
    loss_cfg = cfg.loss_config()
    fuse_classes = student.mff_config().variant == "author"
    code_key = "w_teacher_code" if loss_cfg.w_teacher_code else \
        "w_teacher_decoded" if loss_cfg.w_teacher_decoded else None
    codebooks = load_codes(cache, targets, train_set.ids, modalities, code_key) if code_key \
        else None
    steps = train_steps(cfg, len(train_set))
    meta = plain({"student": asdict(student), "train": cfg.settings(), "modalities": modalities,
                  "classes": list(train_set.classes), "dataset": cfg.dataset, "steps": steps,
                  "palette": [list(c) for c in datasets.get(cfg.dataset).palette],
                  "cache": cache_fingerprints(cache),
                  "code": code_fingerprint()})  # as a checkpoint holds it

    # -- model, optimiser, schedule --------------------------------------------------------
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    random.seed(cfg.seed)
    model = build_student(student, modalities, len(train_set.classes)).to(device, dtype)
    model.with_base = bool(loss_cfg.w_base)  # L_base: the mean of the per-modality logits
    translators = None
    if codebooks is not None:  # after the student, so its initial weights do not move
        translators = CodeTranslators(modalities, model.encoder.channels[-1],
                                      codebooks.shape[1], codebooks).to(device, dtype)
    if device.startswith("cuda"):
        model = model.to(memory_format=torch.channels_last)
    net = distributed.parallel(model, world, cfg.compile)  # DDP over the ranks, compiled
    groups = param_groups(model, cfg.weight_decay)
    if translators is not None:  # the teacher-code translators: the same rule
        for group, extra in zip(groups, param_groups(translators, cfg.weight_decay), strict=True):
            group["params"] += extra["params"]
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr)
    scheduler = PolyWarmup(optimizer, steps, cfg.power, warmup_steps=int(cfg.warmup * steps),
                           warmup_lr_init=cfg.lr * cfg.warmup_ratio)
    classes = torch.from_numpy(targets.classes).to(device, dtype)
    if loss_cfg.se_target == "identity":  # a control: L_se without the language prior
        classes = torch.eye(len(classes), device=device, dtype=dtype)

    # -- resume ----------------------------------------------------------------------------
    out.mkdir(parents=True, exist_ok=True)
    last, best_path = out / "last.pt", out / "best.pt"
    start, best = 0, -math.inf
    if resume:
        # every rank decides from the same files; rank 0 alone clears a stale run, and no
        # rank can write a new last.pt before all have decided (DDP's first all-reduce)
        decision = decide(last, meta, steps, "strict" if resume is True else str(resume))
        if decision.action == "finished":
            return {"out": str(out), "steps": steps, "start": decision.step,
                    "status": "finished", "resume": resume,
                    "best_val_mIoU": float(decision.checkpoint["best"])}
        if decision.action == "resume":
            start, best = restore(decision.checkpoint, model, optimizer, translators)
            if world.main:
                log.info("resuming %s at step %d of %d", last, start, steps)
        elif world.main:  # fresh: nothing of an earlier run may outlive this one
            if decision.why:
                log.warning("%s", decision.why)
            clear_run(out)

    data = StudentData(train_set, modalities, targets, cfg.crop, cfg.augment_config(),
                       cfg.seed, cfg.modality_dropout, single_modality=cfg.single_modality)
    sampler = ScheduleSampler(len(data), cfg.batch_size, steps, cfg.seed, start, world.rank,
                              world.size)
    loader = torch.utils.data.DataLoader(
        data, batch_sampler=sampler, num_workers=cfg.workers,
        pin_memory=device.startswith("cuda"), generator=torch.Generator().manual_seed(cfg.seed),
        prefetch_factor=cfg.prefetch_factor if cfg.workers else None)
    val_loader = evaluation_loader(val_set, modalities, world, cfg.workers,
                                   cfg.persistent_workers, cfg.prefetch_factor,
                                   protocol=cfg.val_protocol)

    live, close_repo = open_live(out / "dvclive", start, world)  # rewound to `start`
    bar = progress_bar(total=steps, initial=start, desc="training", unit="step",
                       enabled=progress and world.main)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16,
                              enabled=device.startswith("cuda") and dtype == torch.float32)
    history: list[float] = []
    val_miou = float("nan")
    t0 = time.perf_counter()

    # -- the loop ----------------------------------------------------------------------------
    model.train()
    for step, batch in enumerate(WorkerErrors(loader), start):
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
            if loss_cfg.w_base:
                terms["L_base"] = supervised(upcast(output.base_logits), label, loss_cfg,
                                             world.total)
            if loss_cfg.w_cr:
                # the student side: MFF's re-weighting correlations under `author`
                m_f = (output.fused[-1].correlation if fuse_classes
                       else gap_correlation(upcast(output.feats[-1]), fused))
                terms["L_cr"] = correlation_kl(upcast(m_f), output.present,
                                               batch["visual"].to(device, dtype),
                                               batch["scene"].to(device, dtype),
                                               loss_cfg.tau_cr, world.total)
            if loss_cfg.w_se:
                se_input = upcast(output.decoded) if loss_cfg.se_features == "decoder" else fused
                terms["L_se"] = semantic(se_input, label, classes, loss_cfg.tau_se, world.total)
            if translators is not None:
                codes = batch["codes"].to(device, non_blocking=True)
                if loss_cfg.w_teacher_code:
                    terms["L_code"] = code_loss(translators, upcast(output.feats[-1]), present,
                                                codes, world.total)
                if loss_cfg.w_teacher_decoded:  # the codes decoded: a dense feature-space target
                    terms["L_decoded"] = decoded_loss(translators, upcast(output.feats[-1]),
                                                      present, codes, world.total)
        ramp = distill_ramp(step, steps, loss_cfg.distill_warmup)
        weights = {"L_sup": loss_cfg.w_sup, "L_base": loss_cfg.w_base,
                   "L_cr": loss_cfg.w_cr * ramp,
                   "L_se": loss_cfg.w_se * ramp, "L_code": loss_cfg.w_teacher_code,
                   "L_decoded": loss_cfg.w_teacher_decoded}
        for name, value in terms.items():
            if not torch.isfinite(value):
                raise PipelineError(f"non-finite loss at step {step}: {name} = {value.item()}; "
                                    + _likely_cause(name, batch, output, targets, cfg,
                                                    train_set.ids))
        loss = sum(weights[n] * v for n, v in terms.items())
        optimizer.zero_grad(set_to_none=True)
        (loss * world.size).backward()  # DDP averages the ranks' gradients
        if translators is not None:
            world.average_gradients(translators.parameters())
        optimizer.step()

        history.append(loss.item())
        lr = optimizer.param_groups[0]["lr"]
        live.log_metric("train/loss", history[-1])
        for name, value in terms.items():
            live.log_metric(f"train/{name}", value.item())
        live.log_metric("train/lr", lr)
        bar.update(1)
        shown = {"loss": f"{history[-1]:.3f}", "lr": f"{lr:.2e}"}
        if not math.isnan(val_miou):  # the last validation's mIoU: a log that shows learning
            shown["val_mIoU"] = f"{val_miou:.1f}"
        bar.set_postfix(**shown)

        done = step + 1
        if (cfg.val_every and done % cfg.val_every == 0) or done == steps:
            model.eval()
            val_miou = evaluate(model, val_set, ("mss",), device=device, world=world,
                                loader=val_loader, progress=progress,
                                protocol=cfg.val_protocol).mss["mIoU"]
            model.train()
            live.log_metric("val/mIoU", val_miou)
            if not math.isnan(val_miou) and val_miou > best:
                best = val_miou
                if world.main:
                    save_checkpoint(best_path, model, None, done, best, meta)
        if (done % cfg.checkpoint_every == 0 or done == steps) and world.main:
            save_checkpoint(last, model, optimizer, done, best, meta, translators)
        live.next_step()
    bar.close()
    live.end()
    close_repo()
    # no finite validation score: keep the last weights
    if world.main and not best_path.exists() and last.exists():
        save_checkpoint(best_path, model, None, steps, best, meta)
    return {"out": str(out), "steps": steps, "start": start, "status": "trained",
            "val_mIoU": val_miou,
            "best_val_mIoU": best, "seconds": round(time.perf_counter() - t0, 1),
            "first_loss": history[0] if history else None,
            "last_loss": history[-1] if history else None, "skipped_bad": skipped_bad}
