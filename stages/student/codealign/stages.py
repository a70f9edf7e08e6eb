"""CodeAlign's stages on an isolated split, each resumable from its own checkpoint.

stage 0  each group's student (encoder + MFF + head) on its group's frames only, CE; and
         the naive-joint reference: one student on all modalities, every frame showing
         only one group's modalities
stage 1  per-modality aligners + per-group code spaces, encoder frozen; the back-end of a
         single-modality group loaded from stage 0 and frozen (the official fix_backend),
         that of a multi-modality group per `stage1_backend` (official: trained from
         random initialisation); CE + w_intra x the official l2 between decoded features
         of a group's modalities on the same frame
stage 2  translators only (everything else frozen, in eval mode so BatchNorm statistics
         stay too), source-group frames only, through the target's frozen code-space
         heads and back-end, CE

Every stage: the official optimiser (Adam with L2 weight decay, or AdamW) and multistep
schedule (train_utils.py `setup_optimizer`, `setup_lr_schedular`), lr and milestones
per stage.

Checkpoints: out/stage{N}.pt when a stage is done; inside it, per trained part (a
group, the joint model, a translator) out/stage{N}/<part>.last.pt every
`checkpoint_every` steps (model, optimiser, schedule, step, the settings and split,
the code's fingerprint); a rerun resumes from it, a finished part is not trained
again. One of other settings is refused, or under `--resume auto` (the DVC stages)
trained again from scratch.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from any2seg import datasets
from any2seg.errors import PipelineError
from any2seg.progress import progress as progress_bar
from stages.student.checkpoint_file import load_checkpoint_file, plain
from stages.student.code_version import code_diff, code_fingerprint
from stages.student.codealign.config import CodeAlignConfig
from stages.student.codealign.model import CodeAlignSystem, pair_name, seg_loss
from stages.student.codealign.split import GroupData, assign_groups, group_indices
from stages.student.data import AugmentConfig, ScheduleSampler, StudentData
from stages.student.model import StudentConfig, build_student

# the `codealign` keys each stage reads (besides `student`); a stage's checkpoint records
# those of its own and earlier stages, and each DVC stage lists exactly its own
STAGE_KEYS: dict[int | str, tuple[str, ...]] = {
    0: ("groups", "seed", "split", "stage0_steps", "batch_size", "crop", "optimizer", "eps",
        "weight_decay", "stage0_lr", "lr_gamma", "stage0_milestones", "train_seed"),
    1: ("codes", "temperature", "gumbel_tau", "aligner_blocks", "w_intra", "stage1_backend",
        "stage1_steps", "stage1_lr", "stage1_milestones"),
    2: ("translator_dim", "translator_blocks", "stage2_steps", "stage2_lr",
        "stage2_milestones"),
    "evaluate": ("eval_quantiser", "eval_seed"),
}
log = logging.getLogger("pipeline.codealign")
# read by every training stage but changing no weight: listed by the DVC stage 0 only
UNRECORDED = ("checkpoint_every",)
Step = Callable[[dict[str, torch.Tensor], torch.Generator], torch.Tensor]


def group_loader(samples: datasets.SampleSequence, modalities: list[str],
                 indices: list[int], cfg: CodeAlignConfig, steps: int, start: int = 0,
                 seed_offset: int = 0) -> torch.utils.data.DataLoader:
    """Batches of `indices`' frames showing only `modalities`, for steps start..steps-1."""
    seed = cfg.train_seed + seed_offset
    base = StudentData(samples, modalities, None, cfg.crop, AugmentConfig(), seed)
    sampler = ScheduleSampler(len(indices), cfg.batch_size, steps, seed, start)
    return torch.utils.data.DataLoader(GroupData(base, indices), batch_sampler=sampler,
                                       num_workers=0)


def freeze_all_but(model: nn.Module, trainable: Iterable[nn.Module]) -> list[nn.Parameter]:
    """requires_grad and train mode only for `trainable`; the rest frozen in eval mode."""
    model.eval()
    model.requires_grad_(False)
    params = []
    for m in trainable:
        m.train()
        m.requires_grad_(True)
        params += list(m.parameters())
    return params


def optimiser(params: list[nn.Parameter], cfg: CodeAlignConfig, stage: int, steps: int
              ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.MultiStepLR]:
    """The official `setup_optimizer` / `setup_lr_schedular` (opencood/tools/train_utils.py)
    with the yamls' values: Adam(lr, eps, weight_decay) - L2 decay added to the gradient -
    and MultiStepLR(milestones, gamma), stepped once per optimiser step here (the
    official steps it per epoch; the milestones are the same fractions of the stage)."""
    kind = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.AdamW
    opt = kind(params, lr=cfg.lr(stage), eps=cfg.eps, weight_decay=cfg.weight_decay)
    milestones = cfg.milestones(stage, steps)
    return opt, torch.optim.lr_scheduler.MultiStepLR(opt, milestones, cfg.lr_gamma)


def run_steps(name: str, out: Path, system: nn.Module, trainable: list[nn.Module],
              loader_at: Callable[[int], torch.utils.data.DataLoader], step_fn: Step,
              steps: int, cfg: CodeAlignConfig, meta: dict[str, Any], *, stage: int,
              resume: str = "strict") -> list[float]:
    """Train `trainable` for `steps` with stage `stage`'s optimiser and schedule, resuming
    from out/{name}.last.pt; returns losses. `resume`: strict refuses a checkpoint of other
    settings or split; auto (the DVC stages, whose folders persist) starts the part afresh,
    saying why, when its settings, split or code differ. Prints progress with an ETA (a part
    runs for minutes on CPUs: `make demo-codealign` and DVC logs must not go silent)."""
    params = freeze_all_but(system, trainable)
    opt, schedule = optimiser(params, cfg, stage, steps)
    last, done = out / f"{name}.last.pt", out / f"{name}.pt"
    start = 0
    code = code_fingerprint()
    state = load_checkpoint_file(last, f"delete it (or the run folder) to start {name} again") \
        if last.is_file() else None
    if state is not None and resume == "auto":
        differ = meta_diff(state["meta"], meta) + code_diff(state.get("code"), code)
        if differ:
            shown = "; ".join(differ[:4])
            log.warning("%s (step %d) does not continue this run: %s%s; starting %s fresh",
                        last, state["step"], shown,
                        f"; and {len(differ) - 4} more" if len(differ) > 4 else "", name)
            state = None
    if state is not None:
        if state["meta"] != meta:
            raise PipelineError(f"{last} was written for other codealign settings or another "
                                f"split; delete it (or the run folder) to start {name} again")
        system.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        start = state["step"]
    losses: list[float] = []
    gen = torch.Generator()
    bar = progress_bar(total=steps, initial=start, desc=f"codealign {name}", unit="step")
    try:
        for step, batch in enumerate(loader_at(start), start):
            gen.manual_seed(cfg.train_seed * 1_000_003 + step)
            torch.manual_seed(cfg.train_seed * 1_000_003 + step)
            loss = step_fn(batch, gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            schedule.step()
            losses.append(float(loss.detach()))
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
            if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == steps:
                save({"model": system.state_dict(), "optimizer": opt.state_dict(),
                      "schedule": schedule.state_dict(), "step": step + 1, "meta": meta,
                      "code": code}, last)
    finally:
        bar.close()
    save({"model": system.state_dict(), "meta": meta, "losses": losses}, done)
    return losses


def meta_diff(recorded: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """The settings that differ, as `codealign.lr (0.02 at the checkpoint, 0.01 now)`, and
    the split as one item (it names every frame)."""
    def show(value: Any) -> str:
        return json.dumps(value, default=str)

    out = []
    for group in sorted((set(recorded) | set(now)) - {"split"}):
        old, new = recorded.get(group) or {}, now.get(group) or {}
        out += [f"{group}.{k} ({show(old.get(k))} at the checkpoint, {show(new.get(k))} now)"
                for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    old, new = recorded.get("split") or {}, now.get("split") or {}
    if old != new:
        moved = sum(old.get(k) != new.get(k) for k in set(old) | set(new))
        out.append(f"the split ({moved} of {len(new)} frames in another group or absent)")
    return out


def save(obj: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(plain(obj), tmp)  # what load_checkpoint_file reads back
    tmp.replace(path)


class CodeAlignRun:
    """One run folder: the data, the split, the system and the stage entry points."""

    def __init__(self, dataset: str, root: str | Path, out: str | Path,
                 student: StudentConfig, cfg: CodeAlignConfig, resume: str = "strict") -> None:
        self.samples = datasets.load(dataset, root, "train")
        cfg.validate(modalities=list(self.samples.modalities))
        self.dataset, self.root, self.out = dataset, str(root), Path(out)
        self.student, self.cfg, self.resume = student, cfg, resume
        self.assignment = assign_groups(self.samples.ids, len(cfg.groups), cfg.seed, dataset)
        torch.manual_seed(cfg.train_seed)
        self.system = CodeAlignSystem(student, cfg, len(self.samples.classes))
        self.joint = build_student(student, [m for g in cfg.groups for m in g],
                                   len(self.samples.classes))
        self.split = dict(zip(self.samples.ids, self.assignment, strict=True))

    def indices(self, group: int) -> list[int]:
        """The frames group `group` trains on: its dealt scenes (`split: dealt`) or every
        training frame (`split: all`, as each official run: one group per yaml)."""
        if self.cfg.split == "all":
            return list(range(len(self.samples)))
        return group_indices(self.assignment, group)

    def load(self, stage: int) -> None:
        self.load_file(self.out / f"stage{stage}.pt", f"stage{stage}")

    def meta(self, stage: int) -> dict[str, Any]:
        """What shaped stage `stage`'s weights: the split, `student` and the `codealign`
        keys read by stages 0..stage (so a later stage's key leaves earlier ones valid)."""
        keys = [k for n in range(stage + 1) for k in STAGE_KEYS[n]]
        return plain({"split": self.split, "student": vars(self.student),
                      "codealign": {k: getattr(self.cfg, k) for k in keys}})

    def load_file(self, path: Path, stage: str | None = None) -> None:
        """Weights of a finished stage: only what that stage (and earlier ones) trained,
        so modules a later stage builds afresh (another translator width) still fit."""
        stage = stage or path.stem
        number = int(stage[5])
        if not path.is_file():
            raise PipelineError(f"{path} is missing: run `pipeline codealign {stage}` first")
        state = load_checkpoint_file(path, f"rerun `pipeline codealign {stage}`")
        if state["meta"] != self.meta(number):
            raise PipelineError(f"{path} was written for other codealign/student settings or "
                                f"another split; rerun `pipeline codealign {stage}`")
        prefix = ("groups.",) if number == 1 else \
            tuple(f"groups.{g}.student." for g in range(len(self.cfg.groups)))
        model = {k: v for k, v in state["model"].items()
                 if number == 2 or k.startswith(prefix)}
        self.system.load_state_dict(model, strict=False)
        if "joint" in state:
            self.joint.load_state_dict(state["joint"])

    def stage0(self) -> dict[str, list[float]]:
        cfg, losses = self.cfg, {}
        for g, mods in enumerate(cfg.groups):
            student = self.system.groups[g].student
            idx = self.indices(g)

            def step(batch: dict[str, torch.Tensor], _: torch.Generator,
                     student: nn.Module = student) -> torch.Tensor:
                return seg_loss(student(batch["images"]).logits, batch["label"])

            losses[f"group{g}"] = run_steps(
                f"stage0/group{g}", self.out, self.system, [student],
                lambda s, mods=mods, idx=idx, g=g: group_loader(
                    self.samples, mods, idx, cfg, cfg.stage0_steps, s, g),
                step, cfg.stage0_steps, cfg, self.meta(0), stage=0, resume=self.resume)
        losses["joint"] = self.train_joint()
        save({"model": self.system.state_dict(), "joint": self.joint.state_dict(),
              "meta": self.meta(0)}, self.out / "stage0.pt")
        return losses

    def train_joint(self) -> list[float]:
        """The naive reference: one student, every frame with only one group's modalities
        present (no code spaces, no translators): its dealt group's (`split: dealt`) or a
        group drawn per sample and step (`split: all`, where every group sees every
        frame)."""
        cfg, mods = self.cfg, self.joint.modalities
        group_mask = torch.tensor([[m in g for m in mods] for g in cfg.groups])
        assignment = torch.tensor(self.assignment)

        def step(batch: dict[str, torch.Tensor], gen: torch.Generator) -> torch.Tensor:
            if cfg.split == "all":
                groups = torch.randint(len(cfg.groups), batch["frame"].shape, generator=gen)
            else:
                groups = assignment[batch["frame"]]
            present = group_mask[groups]
            return seg_loss(self.joint(batch["images"], present).logits, batch["label"])

        every = list(range(len(self.samples)))
        return run_steps("stage0/joint", self.out, self.joint, [self.joint],
                         lambda s: group_loader(self.samples, mods, every, cfg,
                                                cfg.stage0_steps, s, 99),
                         step, cfg.stage0_steps, cfg, self.meta(0), stage=0,
                         resume=self.resume)

    def stage1_start(self, g: int) -> list[nn.Module]:
        """Group g's stage-1 starting point (after stage 0 is loaded) and what it trains:
        aligners and code spaces; the back-end too unless it is fixed. A single-modality
        group's back-end is stage 0's, frozen (official `fix_backend: true`, the
        single-group yamls); a multi-modality group's per `stage1_backend`: `random`
        (official, `fix_backend` unset in codebook_pyramid_fixenc_aligner_add_loss.yaml:
        heter_codebook_shared_head.py loads the back-end only under fix_backend) re-draws
        it from `train_seed` as at construction, `stage0` keeps stage 0's and trains it,
        `fixed` keeps stage 0's frozen (official `fix_backend: true`)."""
        gm = self.system.groups[g]
        trainable: list[nn.Module] = [gm.aligners, gm.quantisers]
        mode = self.cfg.stage1_backend if len(self.cfg.groups[g]) > 1 else "fixed"
        if mode == "random":
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.cfg.train_seed * 1_000_003 + 500 + g)
                for part in gm.backend():
                    for module in part.modules():
                        if hasattr(module, "reset_parameters"):
                            module.reset_parameters()
        if mode != "fixed":
            trainable += gm.backend()
        return trainable

    def stage1(self) -> dict[str, list[float]]:
        self.load(0)
        cfg, losses = self.cfg, {}
        for g, mods in enumerate(cfg.groups):
            gm = self.system.groups[g]
            trainable = self.stage1_start(g)

            def step(batch: dict[str, torch.Tensor], gen: torch.Generator,
                     gm: Any = gm) -> torch.Tensor:
                return self.stage1_loss(gm, batch, gen)

            losses[f"group{g}"] = run_steps(
                f"stage1/group{g}", self.out, self.system, trainable,
                lambda s, mods=mods, g=g: group_loader(
                    self.samples, mods, self.indices(g), cfg, cfg.stage1_steps, s, 10 + g),
                step, cfg.stage1_steps, cfg, self.meta(1), stage=1, resume=self.resume)
        save({"model": self.system.state_dict(), "joint": self.joint.state_dict(),
              "meta": self.meta(1)}, self.out / "stage1.pt")
        return losses

    def stage1_loss(self, gm: Any, batch: dict[str, torch.Tensor],
                    gen: torch.Generator) -> torch.Tensor:
        """CE through the code space, + w_intra x the intra-group l2 where the group has
        several modalities; nothing else reaches the codebook (no commitment term)."""
        logits, decoded, _ = gm.coded(batch["images"], gen)
        loss = seg_loss(logits, batch["label"])
        if decoded[0].shape[1] > 1 and self.cfg.w_intra:
            loss = loss + self.cfg.w_intra * intra_l2(decoded)
        return loss

    def stage2(self, control: bool = False, only: list[str] | None = None
               ) -> dict[str, list[float]]:
        """`control`: the label pixels of every frame shuffled (a fresh permutation per
        step): same class frequencies, no image-label correspondence. `only`: train just
        these translators (pair names `source->target group`)."""
        self.load(1)
        cfg, losses = self.cfg, {}
        for a, mods in enumerate(cfg.groups):
            for m in mods:
                for b in range(len(cfg.groups)):
                    name = pair_name(m, b)
                    if b == a or (only is not None and name not in only):
                        continue

                    def step(batch: dict[str, torch.Tensor], gen: torch.Generator,
                             m: str = m, b: int = b) -> torch.Tensor:
                        label = shuffled(batch["label"], gen) if control else batch["label"]
                        logits = self.system.translate(m, b, batch["images"][:, 0], gen)
                        return seg_loss(logits, label)

                    tag = f"stage2{'.control' if control else ''}/{m}-{b}"
                    losses[name] = run_steps(
                        tag, self.out, self.system, [self.system.translators[name]],
                        lambda s, m=m, a=a: group_loader(
                            self.samples, [m], self.indices(a), cfg, cfg.stage2_steps, s,
                            20 + a),
                        step, cfg.stage2_steps, cfg, self.meta(2), stage=2, resume=self.resume)
        save({"model": self.system.state_dict(), "joint": self.joint.state_dict(),
              "meta": self.meta(2)}, self.out / f"stage2{'.control' if control else ''}.pt")
        return losses


def shuffled(label: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    flat = label.flatten(1)
    return flat[:, torch.randperm(flat.shape[1], generator=gen)].view_as(label)


def official_l2(feat1: torch.Tensor, feat2: torch.Tensor) -> torch.Tensor:
    """The official `l2_loss` (loss/point_pillar_pyramid_codebook_loss.py) per sample of
    (B, C, h, w) maps, every cell valid (pixel-aligned inputs need no warp mask): the
    squared difference summed over channels and cells, divided by the valid cells
    (+ 1e-6, as there). (B,) values."""
    cells = feat1.shape[-2] * feat1.shape[-1]
    return (feat1 - feat2).square().flatten(1).sum(1) / (cells + 1e-6)


def intra_l2(decoded: list[torch.Tensor]) -> torch.Tensor:
    """The official `FeatureSimLoss(mode='l2')` on each encoder stage, summed over the
    stages (each stage is a code space of its own, trained as the official one map is):
    per stage, the first modality of the group against each other one (the official ego
    agent against each agent of another modality), averaged over samples and pairs.
    `decoded`: per stage (B, M, C, h, w)."""
    total = decoded[0].new_zeros(())
    for d in decoded:
        total = total + torch.stack([official_l2(d[:, 0], d[:, i])
                                     for i in range(1, d.shape[1])]).mean()
    return total
