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

Where the pieces live: `config` (FitConfig), `data` (the split as the fit sees it), `model`
(LoRA, encoders, losses), `quality` (the figures), `folders` (the LanguageBind format);
this module runs the two phases and writes the teacher.
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
from torch import nn

from any2seg.errors import PipelineError
from any2seg.publish import publish
from stages.teacher.captioners.template import compose
from stages.teacher.checkpoints import BRANCH_FOLDERS
from stages.teacher.default.config import FitConfig
from stages.teacher.default.data import SplitData, load_split
from stages.teacher.default.folders import (
    clip_vocabulary,
    languagebind_config,
    random_clip_state,
    save_branch,
    write_tokenizer,
)
from stages.teacher.default.model import (
    add_lora,
    base_state,
    contrastive,
    encode_text,
    encode_vision,
    lora_factors,
    region_loss,
)
from stages.teacher.default.quality import quality

GENERATOR = "any2seg-pipeline fitted default LanguageBind teacher v1"
MANIFEST = "teacher.json"
MAX_LOGIT_SCALE = math.log(100.0)  # CLIP's clamp


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

    from any2seg.datasets.deliver import CLASSES
    from any2seg.progress import progress as progress_bar
    from stages.teacher.worker import readable_class

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
