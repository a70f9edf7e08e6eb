"""Fitting the embedded default teacher on the generated sample, as LanguageBind binds
modalities: language is the anchor.

A random teacher gives E_m, E_S and E_C without meaning, so the distillation terms have
nothing to transfer. Here the small LanguageBind-format teacher is trained on the
sample's train split before stage one encodes anything:

- Phase 1, the image branch: vision and text tower trained CLIP-style (symmetric
  InfoNCE, learnable temperature) on RGB frames against their template captions (frames
  sharing a caption are all positives), plus class-name prompts against class regions
  (patch tokens averaged over each class's pixels, through the post-LayerNorm and the
  projection, classified among all class prompts), so that E_S and E_C mean something
  and a class prompt lands near its pixels.
- Phase 2, every other branch named in `teacher.modality_branch` (depth, and event and
  LiDAR when they have their own): the text tower frozen, the phase-1 vision tower
  copied with LoRA on q/k/v/out (LanguageBind's `convert_model_to_lora`, model/
  process_clip.py) and the same two losses against the frozen text embeddings. Besides
  the LoRA factors, the patch/class embeddings, the LayerNorms outside the encoder, the
  projection and the temperature train (the encoder base stays frozen, as under peft).
  A modality mapped to the image branch is not trained further.

Each branch is written as a `LanguageBind_<Branch>/` folder in the real format (old peft
layout: the trained LoRA factors beside the frozen base), so stage one reads it with
the unchanged loader. Quality is measured on the val split through that loader and
recorded in `teacher.json`. Everything runs on CPU with a fixed thread count and
deterministic kernels: one seed gives the same bytes on the same machine.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.errors import PipelineError
from pipeline.publish import publish
from stages.teacher.captioners.template import OPENINGS, TemplateCaptioner, compose
from stages.teacher.checkpoints import BRANCH_FOLDERS
from stages.teacher.default_teacher import (
    clip_vocabulary,
    languagebind_config,
    random_clip_state,
    save_branch,
    write_tokenizer,
)

GENERATOR = "any2seg-pipeline fitted default LanguageBind teacher v1"
MANIFEST = "teacher.json"
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
WEATHER = tuple(OPENINGS)  # cloud, fog, night, rain, sun
MAX_LOGIT_SCALE = math.log(100.0)  # CLIP's clamp


# upper bounds of the fit's sizes: far above the default, below what exhausts a machine
FIT_LIMITS = {"hidden": 4096, "layers": 48, "heads": 64, "projection": 4096,
              "image_size": 1024, "batch_size": 4096, "lora_r": 1024, "image_lora_r": 1024,
              "threads": 1024}


@dataclass
class FitConfig:
    """The `teacher.fit` group of params.yaml (the embedded default only)."""

    seed: int = 0
    hidden: int = 64
    layers: int = 2
    heads: int = 2
    projection: int = 64
    image_size: int = 128
    patch: int = 16
    max_depth: float = 80.0  # metres; the sample's streets reach far beyond 10 m
    image_epochs: int = 40
    branch_epochs: int = 30
    batch_size: int = 16
    lr: float = 2e-3
    branch_lr: float = 5e-3
    weight_decay: float = 0.05
    warmup: float = 0.1  # fraction of each phase's steps
    region_weight: float = 1.0
    caption_views: float = 0.5  # share of captions cut to the opening + a random class subset
    lora_r: int = 8  # phase-2 branches
    lora_alpha: int = 16
    image_lora_r: int = 4  # the image branch is written with a LoRA split of this rank
    threads: int = 1  # fixed, so that the bytes do not depend on the machine; one thread
    # also keeps a shared CPU from thrashing (OpenMP threads spin on busy cores)

    def validate(self) -> None:
        for name in ("hidden", "layers", "heads", "projection", "image_size", "patch",
                     "batch_size", "lora_r", "image_lora_r", "threads"):
            if getattr(self, name) < 1:
                raise PipelineError(f"teacher.fit.{name} must be >= 1")
        for name, hi in FIT_LIMITS.items():  # a tiny CPU-fitted teacher: larger runs out of
            if getattr(self, name) > hi:  # memory (or years) before it finishes
                raise PipelineError(f"teacher.fit.{name} must be <= {hi} (the embedded "
                                    f"teacher is fitted on CPU), got {getattr(self, name)}")
        if self.image_epochs < 0 or self.branch_epochs < 0:
            raise PipelineError("teacher.fit.image_epochs and branch_epochs must be >= 0")
        if self.hidden % self.heads:
            raise PipelineError("teacher.fit.hidden must be a multiple of teacher.fit.heads")
        if self.image_size % self.patch:
            raise PipelineError("teacher.fit.image_size must be a multiple of "
                                "teacher.fit.patch")
        if not (self.lr > 0 and self.branch_lr > 0 and 0 <= self.warmup < 1):
            raise PipelineError("teacher.fit.lr and branch_lr must be > 0, warmup in [0, 1)")
        if not 0 <= self.caption_views <= 1:
            raise PipelineError("teacher.fit.caption_views must be in [0, 1]")


# ---------------------------------------------------------------------------------------
# data: every modality preprocessed exactly as stage one does, captions, class regions
# ---------------------------------------------------------------------------------------
@dataclass
class SplitData:
    pixels: dict[str, torch.Tensor]  # modality -> (N, 3, S, S) as the branch sees it
    captions: list[str]
    parts: list[tuple[str, list[str]]]  # the caption's opening and class names
    conditions: list[str]
    regions: torch.Tensor  # (N, K, P) share of each patch's pixels per class
    labels: torch.Tensor  # (N, S, S) the label under the same resize/crop, 255 ignore


def _label_view(label: np.ndarray, size: int) -> torch.Tensor:
    """The label under the preprocessing's geometry (short side to `size`, centre crop),
    nearest-neighbour."""
    h, w = label.shape
    short, long = min(h, w), max(h, w)
    new_h, new_w = (size, int(size * long / short)) if h <= w else (int(size * long / short),
                                                                    size)
    t = torch.from_numpy(label.astype(np.int64))[None, None].float()
    t = F.interpolate(t, size=(new_h, new_w), mode="nearest")[0, 0].long()
    top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
    return t[top:top + size, left:left + size]


def load_split(root: Path, split: str, branch_of: dict[str, str], num_classes: int,
               cfg: FitConfig) -> SplitData:
    from stages.teacher.languagebind import preprocess_depth, preprocess_image
    from stages.teacher.run import TeacherConfig, load_samples, model_input

    tcfg = TeacherConfig(dataset="sample", root=str(root), split=[split],
                         modalities=list(branch_of), modality_branch=dict(branch_of))
    samples = load_samples(tcfg)
    if len(samples) == 0:
        raise PipelineError(f"the sample at {root} has no {split} frames to fit the teacher on")
    captioner = TemplateCaptioner(samples.classes)
    pixels: dict[str, list[torch.Tensor]] = {m: [] for m in branch_of}
    parts, conditions, labels = [], [], []
    for sample in samples:
        for m, b in branch_of.items():
            x = model_input(sample, m, b)
            pixels[m].append(preprocess_depth(x, cfg.max_depth, cfg.image_size) if b == "depth"
                             else preprocess_image(x, cfg.image_size))
        parts.append(captioner.parts(sample.label, sample.condition))
        conditions.append(sample.condition or "")
        labels.append(_label_view(sample.label, cfg.image_size))
    label_t = torch.stack(labels)
    onehot = F.one_hot(label_t.clamp(max=num_classes), num_classes + 1)[..., :num_classes]
    grid = cfg.image_size // cfg.patch
    regions = F.adaptive_avg_pool2d(onehot.permute(0, 3, 1, 2).float(), grid).flatten(2)
    return SplitData({m: torch.stack(v) for m, v in pixels.items()},
                     [compose(*p) for p in parts], parts, conditions, regions, label_t)


# ---------------------------------------------------------------------------------------
# model pieces
# ---------------------------------------------------------------------------------------
class LoRALinear(nn.Module):
    """peft's LoRA on a frozen linear layer: y = W x + b + (B A x) * alpha / r."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, generator: torch.Generator) -> None:
        super().__init__()
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.scale = alpha / r
        a = torch.empty(r, base.in_features)
        bound = 1 / math.sqrt(base.in_features)  # kaiming_uniform(a=sqrt(5)), as peft
        a.uniform_(-bound, bound, generator=generator)
        self.lora_A = nn.Parameter(a)
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.lora_A.T @ self.lora_B.T) * self.scale


def add_lora(vision: nn.Module, r: int, alpha: float, generator: torch.Generator) -> None:
    for layer in vision.encoder.layers:
        for name in LORA_TARGETS:
            setattr(layer.self_attn, name,
                    LoRALinear(getattr(layer.self_attn, name), r, alpha, generator))


def lora_factors(vision: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """`layers.{i}.self_attn.{q,k,v,out}_proj -> (A, B)` as the checkpoint names them."""
    out = {}
    for i, layer in enumerate(vision.encoder.layers):
        for name in LORA_TARGETS:
            mod = getattr(layer.self_attn, name)
            out[f"layers.{i}.self_attn.{name}"] = (mod.lora_A.detach(), mod.lora_B.detach())
    return out


def base_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with LoRA wrappers unwrapped to their frozen base weights."""
    return {k.replace(".base.", "."): v.detach().clone() for k, v in model.state_dict().items()
            if ".lora_" not in k}


def encode_vision(model: nn.Module, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled embedding (as LanguageBind) and per-patch embeddings, both unnormalised."""
    out = model.vision_model(pixel_values=pixels)
    patches = model.vision_model.post_layernorm(out.last_hidden_state[:, 1:])
    return model.visual_projection(out.pooler_output), model.visual_projection(patches)


def encode_text(model: nn.Module, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
    out = model.text_model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
    return model.text_projection(out.pooler_output)


def contrastive(image: torch.Tensor, text: torch.Tensor, caption_ids: torch.Tensor,
                scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE between B images and the U distinct captions of the batch
    (`caption_ids` (B,) indexes them); frames sharing a caption are all positives."""
    logits = scale * F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).T  # (B, U)
    i2t = F.cross_entropy(logits, caption_ids)
    positives = F.one_hot(caption_ids, text.shape[0]).T.float()  # (U, B)
    t2i = -(positives / positives.sum(1, keepdim=True) * F.log_softmax(logits.T, 1)).sum(1)
    return (i2t + t2i.mean()) / 2


def region_loss(patches: torch.Tensor, regions: torch.Tensor, classes: torch.Tensor,
                scale: torch.Tensor, min_share: float = 0.25) -> torch.Tensor:
    """Class regions vs class prompts: patch embeddings (B, P, D) averaged over each
    class's pixels (regions (B, K, P)), for classes covering at least `min_share` of a
    patch in total, classified among all K prompts (classes (K, D))."""
    mass = regions.sum(-1)  # (B, K) in patches
    b_idx, k_idx = (mass >= min_share).nonzero(as_tuple=True)
    if b_idx.numel() == 0:
        return patches.sum() * 0.0
    weights = regions[b_idx, k_idx] / mass[b_idx, k_idx, None]  # (R, P)
    pooled = torch.einsum("rp,rpd->rd", weights, patches[b_idx])
    logits = scale * F.normalize(pooled, dim=-1) @ F.normalize(classes, dim=-1).T
    return F.cross_entropy(logits, k_idx)


def _schedule(step: int, total: int, warmup: float) -> float:
    """Linear warm-up, then cosine to zero."""
    n_warm = max(1, int(warmup * total))
    if step < n_warm:
        return (step + 1) / n_warm
    return 0.5 * (1 + math.cos(math.pi * (step - n_warm) / max(1, total - n_warm)))


def _tokenize(tokenizer: Any, texts: Sequence[str]) -> dict[str, torch.Tensor]:
    # padding to the longest is exact: the pooled output is the first end-of-text token's
    # and the causal mask hides everything after it
    enc = tokenizer(list(texts), padding="longest", truncation=True, max_length=77,
                    return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


# ---------------------------------------------------------------------------------------
# the two phases
# ---------------------------------------------------------------------------------------
@dataclass
class Phase:
    name: str
    model: nn.Module
    params: list[nn.Parameter]
    inputs: list[torch.Tensor]  # per modality trained here, (N, 3, S, S)
    epochs: int
    lr: float
    train_text: bool
    losses: list[float] = field(default_factory=list)


def caption_view(parts: tuple[str, list[str]], share: float,
                 generator: torch.Generator) -> str:
    """The full caption, or (with probability `share`) its opening with a random subset
    of its class names, so that a short prompt ("a foggy street") means something too."""
    opening, names = parts
    if float(torch.rand((), generator=generator)) >= share:
        return compose(opening, names)
    keep = torch.rand(len(names), generator=generator) < 0.5
    return compose(opening, [n for n, k in zip(names, keep.tolist(), strict=True) if k])


def _run_phase(phase: Phase, data: SplitData, tokenizer: Any, prompts: dict[str, torch.Tensor],
               cfg: FitConfig, generator: torch.Generator,
               tick: Callable[[str, float], None]) -> None:
    """Train `phase.model` for `phase.epochs` passes over every (frame, modality) pair."""
    n = data.regions.shape[0]
    per_epoch = math.ceil(n * len(phase.inputs) / cfg.batch_size)
    total = per_epoch * phase.epochs
    opt = torch.optim.AdamW(phase.params, lr=phase.lr, weight_decay=cfg.weight_decay)
    frozen: dict[str, torch.Tensor] = {}  # text tower frozen: each distinct text once
    frozen_classes = None
    if not phase.train_text:
        with torch.no_grad():
            frozen_classes = encode_text(phase.model, prompts)
    step = 0
    for _ in range(phase.epochs):
        order = torch.randperm(n * len(phase.inputs), generator=generator)
        for start in range(0, order.numel(), cfg.batch_size):
            pick = order[start:start + cfg.batch_size]
            frame, which = pick % n, pick // n
            pixels = torch.stack([phase.inputs[int(w)][int(f)]
                                  for f, w in zip(frame, which, strict=True)])
            regions = data.regions[frame]
            flip = torch.rand(len(pick), generator=generator) < 0.5
            grid = int(math.isqrt(regions.shape[-1]))
            pixels = torch.where(flip[:, None, None, None], pixels.flip(-1), pixels)
            r = regions.view(len(pick), -1, grid, grid)
            regions = torch.where(flip[:, None, None, None], r.flip(-1), r).flatten(2)
            texts = [caption_view(data.parts[int(f)], cfg.caption_views, generator)
                     for f in frame]
            unique = list(dict.fromkeys(texts))
            ids = torch.tensor([unique.index(t) for t in texts])
            for group in opt.param_groups:
                group["lr"] = phase.lr * _schedule(step, total, cfg.warmup)
            image, patches = encode_vision(phase.model, pixels)
            if phase.train_text:
                text = encode_text(phase.model, _tokenize(tokenizer, unique))
                classes = encode_text(phase.model, prompts)
            else:
                new = [t for t in unique if t not in frozen]
                if new:
                    with torch.no_grad():
                        emb = encode_text(phase.model, _tokenize(tokenizer, new))
                    frozen.update(zip(new, emb, strict=True))
                text, classes = torch.stack([frozen[t] for t in unique]), frozen_classes
            scale = phase.model.logit_scale.clamp(max=MAX_LOGIT_SCALE).exp()
            loss = contrastive(image, text, ids, scale) + \
                cfg.region_weight * region_loss(patches, regions, classes, scale)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            phase.losses.append(loss.item())
            step += 1
            tick(phase.name, phase.losses[-1])


# ---------------------------------------------------------------------------------------
# quality, measured through the real loader
# ---------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------
# orchestration
# ---------------------------------------------------------------------------------------
@dataclass
class FitResult:
    status: str  # "written" or "up-to-date"
    manifest: dict[str, Any]
    seconds: float = 0.0
    models: dict[str, nn.Module] = field(default_factory=dict)  # branch -> trained model


def _sample_fingerprint(root: Path) -> str:
    manifest = root / "sample.json"
    if not manifest.is_file():
        raise PipelineError(f"{root} holds no generated sample (no sample.json); the default "
                            "teacher is fitted on it: run `pipeline make-sample` first")
    return hashlib.sha256(manifest.read_bytes()).hexdigest()[:16]


def fit_default_teacher(sample_root: Path | str, out: Path | str, cfg: FitConfig,
                        branch_of: dict[str, str], class_prompt: str = "{}", *,
                        overwrite: bool = False, progress: bool = True) -> FitResult:
    """Fit and write the default teacher for the modalities in `branch_of` unless an
    identical one is already at `out`. See the module docstring."""
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    from pipeline.datasets.deliver import CLASSES
    from pipeline.progress import progress as progress_bar
    from stages.teacher.run import readable_class

    cfg.validate()
    sample_root, out = Path(sample_root), Path(out)
    if "{}" not in class_prompt:
        raise PipelineError(f"class_prompt must contain '{{}}', got {class_prompt!r}")
    if "rgb" not in branch_of or branch_of["rgb"] != "image":
        raise PipelineError("the default teacher binds RGB to the image branch: "
                            "teacher.modality_branch must map rgb to image")
    unknown = sorted(set(branch_of.values()) - set(BRANCH_FOLDERS))
    if unknown:
        raise PipelineError(f"teacher.modality_branch names unknown branch {unknown[0]!r}; "
                            f"branches: {', '.join(BRANCH_FOLDERS)}")
    branches = sorted(set(branch_of.values()), key=lambda b: (b != "image", b))
    manifest = {"generator": GENERATOR, "sample": _sample_fingerprint(sample_root),
                "fit": asdict(cfg), "modality_branch": dict(sorted(branch_of.items())),
                "class_prompt": class_prompt, "captioner": "template",
                "branches": {b: BRANCH_FOLDERS[b] for b in branches}}
    existing = _read_manifest(out)
    if existing is not None and existing.get("manifest") == manifest and not overwrite:
        return FitResult("up-to-date", existing)
    # a fitted teacher made with other settings is ours to replace; anything else is not
    if out.exists() and not out.is_dir():
        raise PipelineError(f"{out} exists and is not a directory; choose another --out")
    if out.exists() and any(out.iterdir()) and existing is None:
        raise PipelineError(f"{out} exists and holds no fitted default teacher; refusing to "
                            "write into it: choose another --out or remove it yourself")

    start = time.perf_counter()
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(cfg.threads)
    torch.use_deterministic_algorithms(True)
    tmp = out.parent / f".{out.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    # the caller's global RNG is left as it was
    with torch.random.fork_rng(devices=[]):
        try:
            tmp.mkdir(parents=True)
            torch.manual_seed(cfg.seed)
            generator = torch.Generator().manual_seed(cfg.seed)
            train = load_split(sample_root, "train", branch_of, len(CLASSES), cfg)
            val = load_split(sample_root, "val", branch_of, len(CLASSES), cfg)
            write_tokenizer(tmp / "tokenizer")
            tokenizer = CLIPTokenizer.from_pretrained(str(tmp / "tokenizer"))
            class_prompts = [class_prompt.format(readable_class(c)) for c in CLASSES]
            prompts = _tokenize(tokenizer, class_prompts)
            vocab = len(clip_vocabulary()[0])
            dims = {"hidden": cfg.hidden, "layers": cfg.layers, "heads": cfg.heads,
                    "projection": cfg.projection, "patch": cfg.patch, "image_size": cfg.image_size,
                    "max_depth": cfg.max_depth, "lora_alpha": cfg.lora_alpha}
            configs = {b: languagebind_config(b, vocab, lora_r=cfg.image_lora_r if b == "image"
                                              else cfg.lora_r, **dims) for b in branches}
            image_cfg = configs["image"]
            model = CLIPModel(CLIPConfig(text_config=image_cfg["text_config"],
                                         vision_config=image_cfg["vision_config"],
                                         projection_dim=image_cfg["projection_dim"]))
            model.load_state_dict(random_clip_state(image_cfg, cfg.seed))

            # -- quality at random initialisation, through the same loader ----------------------
            initial_root = tmp / "initial"
            for b in branches:
                save_branch(initial_root / BRANCH_FOLDERS[b], configs[b], model.state_dict(),
                            seed=cfg.seed)
            initial = quality(initial_root, val, branch_of, class_prompts)
            shutil.rmtree(initial_root)

            n = train.regions.shape[0]
            inputs = {b: [train.pixels[m] for m, mb in branch_of.items() if mb == b]
                      for b in branches}
            steps = sum(math.ceil(n * len(inputs[b]) / cfg.batch_size) *
                        (cfg.image_epochs if b == "image" else cfg.branch_epochs) for b in branches)
            bar = progress_bar(total=steps, desc="fitting the default teacher", unit="step",
                               enabled=progress)

            def tick(name: str, loss: float) -> None:
                bar.update(1)
                bar.set_postfix(branch=name, loss=f"{loss:.3f}")

            phases = [Phase("image", model, list(model.parameters()), inputs["image"],
                            cfg.image_epochs, cfg.lr, train_text=True)]
            try:
                _run_phase(phases[0], train, tokenizer, prompts, cfg, generator, tick)
                for b in branches[1:]:
                    phases.append(_lora_phase(b, model, inputs[b], cfg, generator))
                    _run_phase(phases[-1], train, tokenizer, prompts, cfg, generator, tick)
            finally:
                bar.close()

            # -- write every branch in the real format ------------------------------------------
            text_state = {k: v for k, v in model.state_dict().items()
                          if k.startswith(("text_model.", "text_projection."))}
            models: dict[str, nn.Module] = {}
            for phase in phases:
                b = phase.name
                state = {**base_state(phase.model), **text_state}
                lora = lora_factors(phase.model.vision_model) if b != "image" else None
                save_branch(tmp / BRANCH_FOLDERS[b], configs[b], state, seed=cfg.seed + 1,
                            lora=lora)
                models[b] = phase.model.eval()
            shutil.rmtree(tmp / "tokenizer")
            fitted = quality(tmp, val, branch_of, class_prompts)
            record = {"manifest": manifest, "quality": fitted, "random_init_quality": initial,
                      "final_loss": {p.name: round(float(np.mean(p.losses[-5:])), 4)
                                     if p.losses else None for p in phases}}
            (tmp / MANIFEST).write_text(json.dumps(record, indent=2) + "\n")  # modalities in order
            owned = (*BRANCH_FOLDERS.values(), MANIFEST)
            publish(tmp, out, owned)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        finally:
            torch.set_num_threads(threads)
            torch.use_deterministic_algorithms(deterministic)
    return FitResult("written", record, round(time.perf_counter() - start, 1), models)


def _lora_phase(branch: str, image_model: nn.Module, inputs: list[torch.Tensor],
                cfg: FitConfig, generator: torch.Generator) -> Phase:
    """Phase 2 for one branch: the fitted image model copied, LoRA on the vision
    encoder's attention, the text tower frozen."""
    model = copy.deepcopy(image_model)
    for p in model.parameters():
        p.requires_grad_(False)
    add_lora(model.vision_model, cfg.lora_r, cfg.lora_alpha, generator)
    vision = model.vision_model
    trainable = [p for n, p in vision.named_parameters() if ".lora_" in n]
    trainable += [vision.embeddings.patch_embedding.weight, vision.embeddings.class_embedding,
                  *vision.pre_layrnorm.parameters(), *vision.post_layernorm.parameters(),
                  *model.visual_projection.parameters(), model.logit_scale]
    for p in trainable:
        p.requires_grad_(True)
    return Phase(branch, model, trainable, inputs, cfg.branch_epochs, cfg.branch_lr,
                 train_text=False)


def _read_manifest(out: Path) -> dict[str, Any] | None:
    path = out / MANIFEST
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(data, dict) or data.get("manifest", {}).get("generator") != GENERATOR:
        return None
    return data
