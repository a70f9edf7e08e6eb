"""LanguageBind checkpoints loaded into transformers' own `CLIPModel`.

LanguageBind towers are CLIP towers: for still images the vision branch is a plain CLIP
ViT (patch dropout is off in eval, temporal attention only exists for video), and every
checkpoint carries the same frozen OpenCLIP text tower. What differs from a CLIP
checkpoint is the key layout: the vision encoder is wrapped by peft LoRA, so its keys
read `vision_model.encoder.base_model.model.layers.{i}...` with `lora_A`/`lora_B`
matrices beside the attention projections (old peft), or with an extra `base_layer`
segment (newer peft). We map those keys explicitly, merge `W += B @ A * alpha / r`,
drop `position_ids` buffers and refuse anything else we do not recognise.
"""

from __future__ import annotations

import html
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ftfy
import numpy as np
import torch
import torch.nn.functional as F
from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

from any2seg.errors import PipelineError
from any2seg.precision import stable_dtype, upcast
from stages.teacher.checkpoints import (
    WEIGHT_FILES,
    checkpoint_fingerprint,
    resolve_branch_dir,
    weights_file,
)

log = logging.getLogger("pipeline.teacher")

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
_PEFT_PREFIX = "vision_model.encoder.base_model.model."
_LORA = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.default)?\.weight$")


# ---------------------------------------------------------------------------------------
# config and state dict
# ---------------------------------------------------------------------------------------
def read_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.is_file():
        raise PipelineError(f"missing {path}; a LanguageBind folder holds config.json, "
                            f"{' or '.join(WEIGHT_FILES)} and tokenizer files")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise PipelineError(f"{path} is not valid JSON ({exc})") from exc
    for part in ("text_config", "vision_config"):
        if not isinstance(cfg.get(part), dict):
            raise PipelineError(f"{path} has no {part}; not a LanguageBind/CLIP config")
    cfg["vision_config"]["image_size"] = _image_size(cfg["vision_config"].get("image_size", 224),
                                                     path)
    if cfg["vision_config"].get("add_time_attn"):
        raise PipelineError(f"{path}: add_time_attn is set (a video checkpoint); only "
                            "still-image branches (Image, Depth, Thermal) are supported")
    return cfg


def _image_size(value: Any, path: Path) -> int:
    """`vision_config.image_size` as an int. The official `save_pretrained` writes a list:
    LanguageBind's `resize_pos` (languagebind/image/modeling_image.py:799) sets
    `config.image_size = [s, s]`; the still-image branches are square."""
    if isinstance(value, (list, tuple)) and len(value) == 2 and value[0] == value[1]:
        value = value[0]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise PipelineError(f"{path}: vision_config.image_size must be a size or a square "
                            f"[size, size], got {value!r}")
    return value


def clip_config(cfg: dict[str, Any]) -> CLIPConfig:
    """The `CLIPConfig` equivalent of a LanguageBind config (extras are kept as attributes)."""
    projection = cfg.get("projection_dim", cfg["vision_config"].get("projection_dim", 512))
    return CLIPConfig(text_config=dict(cfg["text_config"]),
                      vision_config=dict(cfg["vision_config"]), projection_dim=projection,
                      logit_scale_init_value=cfg.get("logit_scale_init_value", 2.6592))


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - corrupt/truncated files raise many kinds
        raise PipelineError(f"cannot read {path} ({type(exc).__name__}: {exc}); the file "
                            "is corrupt or truncated: download it again") from exc
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise PipelineError(f"{path} does not hold a state dict")
    return sd


def map_state_dict(sd: dict[str, torch.Tensor], lora_alpha: float, lora_r: int,
                   expected: set[str], source: str) -> dict[str, torch.Tensor]:
    """LanguageBind keys -> `CLIPModel` keys with LoRA merged; refuses unknown keys.

    Both peft layouts are accepted: `...q_proj.weight` next to `...q_proj.lora_A.default
    .weight` (old), and `...q_proj.base_layer.weight` (new).
    """
    out: dict[str, torch.Tensor] = {}
    lora: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in sd.items():
        if key.endswith("position_ids"):
            continue
        k = key
        if k.startswith(_PEFT_PREFIX):
            k = "vision_model.encoder." + k[len(_PEFT_PREFIX):]
        match = _LORA.match(k)
        if match:
            lora.setdefault(match["module"], {})[match["ab"]] = value
            continue
        k = k.replace(".base_layer.", ".")
        if k in out:
            raise PipelineError(f"{source}: key {key} appears twice after mapping ({k})")
        out[k] = value
    if lora and lora_r <= 0:
        raise PipelineError(f"{source} holds LoRA weights but its config says lora_r="
                            f"{lora_r}; the config does not belong to these weights")
    scale = lora_alpha / lora_r if lora_r > 0 else 0.0
    for module, ab in sorted(lora.items()):
        if set(ab) != {"A", "B"}:
            lacking = ({"A", "B"} - set(ab)).pop()
            raise PipelineError(f"{source}: LoRA for {module} lacks lora_{lacking}")
        target = f"{module}.weight"
        if target not in out:
            raise PipelineError(f"{source}: LoRA for {module} but no base weight {target}")
        base = out[target]
        merge = stable_dtype(torch.promote_types(base.dtype, ab["A"].dtype))
        a, b = ab["A"].to(merge), ab["B"].to(merge)
        if a.shape[0] != lora_r or b.shape[1] != lora_r or (b.shape[0], a.shape[1]) != \
                tuple(base.shape):
            raise PipelineError(
                f"{source}: LoRA shapes for {module} (A {tuple(a.shape)}, B {tuple(b.shape)}) "
                f"do not fit the weight {tuple(base.shape)} with lora_r={lora_r}")
        out[target] = (base.to(merge) + (b @ a) * scale).to(base.dtype)
    missing = sorted(expected - set(out))
    unexpected = sorted(set(out) - expected)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} keys (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} keys (e.g. {', '.join(unexpected[:3])})")
        raise PipelineError(f"{source} does not match a CLIP model built from its config: "
                            f"{'; '.join(parts)}")
    return out


def load_clip(folder: Path) -> tuple[CLIPModel, dict[str, Any]]:
    """Build `CLIPModel` from a LanguageBind folder with merged LoRA, in eval mode, fp32."""
    cfg = read_config(folder)
    weights = weights_file(folder)
    model = CLIPModel(clip_config(cfg)).eval()
    expected = {k for k in model.state_dict() if not k.endswith("position_ids")}
    vc = cfg["vision_config"]
    mapped = map_state_dict(load_state_dict(weights), float(vc.get("lora_alpha", 16)),
                            int(vc.get("lora_r", 0)), expected, str(weights))
    result = model.load_state_dict(mapped, strict=False)
    leftover = [k for k in result.missing_keys if not k.endswith("position_ids")]
    if leftover or result.unexpected_keys:
        raise PipelineError(f"{weights}: could not load {leftover[:3]} "
                            f"{result.unexpected_keys[:3]}")
    return model, cfg


# ---------------------------------------------------------------------------------------
# preprocessing, as LanguageBind's processors (torchvision Resize(224, BICUBIC) on tensors)
# ---------------------------------------------------------------------------------------
def _resize_crop_normalise(x: torch.Tensor, size: int) -> torch.Tensor:
    """(3, H, W) float in 0..1 -> resize short side (bicubic, antialiased), centre crop,
    OpenAI mean/std. A (1, H, W) image stands for its three equal channels: each channel
    is resized alone, so resizing one and broadcasting gives the same numbers."""
    _, h, w = x.shape
    short, long = (h, w) if h <= w else (w, h)
    new_short, new_long = size, int(size * long / short)
    new_h, new_w = (new_short, new_long) if h <= w else (new_long, new_short)
    if (new_h, new_w) != (h, w):
        x = F.interpolate(x[None], size=(new_h, new_w), mode="bicubic", align_corners=False,
                          antialias=True)[0]
    top = int(round((new_h - size) / 2.0))
    left = int(round((new_w - size) / 2.0))
    x = x[:, top:top + size, left:left + size]
    mean = torch.tensor(OPENAI_MEAN, dtype=x.dtype)[:, None, None]
    std = torch.tensor(OPENAI_STD, dtype=x.dtype)[:, None, None]
    return (x - mean) / std


def preprocess_image(img: np.ndarray, size: int = 224) -> torch.Tensor:
    """H x W x 3 uint8 (the official `ToTensor`: / 255), or float in [0, 1] (a modality
    that is not 8-bit, as `Sample.unit_image` maps it) -> (3, size, size) float32."""
    if img.ndim != 3 or img.shape[2] != 3 or not (
            img.dtype == np.uint8 or np.issubdtype(img.dtype, np.floating)):
        raise ValueError(f"expected H x W x 3 uint8 or float in [0, 1], got {img.shape} "
                         f"{img.dtype}")
    # one float copy of the H x W x 3 image (the official `ToTensor`'s x / 255 in float32,
    # value for value), viewed as (3, H, W): the resize reads it in place
    x = torch.from_numpy(np.ascontiguousarray(img))
    x = x.float().div_(255.0) if img.dtype == np.uint8 else x.float()
    return _resize_crop_normalise(x.permute(2, 0, 1), size)


def preprocess_depth(depth_mm: np.ndarray, max_depth: float = 10.0,
                     size: int = 224) -> torch.Tensor:
    """Metric depth in millimetres (H x W) -> (3, size, size), as LanguageBind's DepthNorm:
    metres, clip below 0.01, clip at `max_depth` and divide by it (or by the maximum
    when `max_depth` is 0), repeat to 3 channels, then resize/crop/normalise."""
    if depth_mm.ndim != 2:
        raise ValueError(f"expected an H x W depth map, got shape {depth_mm.shape}")
    d = torch.from_numpy(depth_mm.astype(np.float32)).div_(1000.0)  # in place: one copy
    d = d.clamp_(min=0.01)
    if max_depth:
        d = d.clamp_(max=max_depth).div_(max_depth)
    else:
        d = d.div_(d.max())
    return _resize_crop_normalise(d[None], size)  # the 3 repeated channels, resized once


# ---------------------------------------------------------------------------------------
# the teacher
# ---------------------------------------------------------------------------------------
@dataclass
class Branch:
    name: str
    folder: Path
    model: CLIPModel
    config: dict[str, Any]

    @property
    def max_depth(self) -> float:
        return float(self.config["vision_config"].get("max_depth", 10))

    @property
    def image_size(self) -> int:
        return int(self.config["vision_config"]["image_size"])  # read_config made it an int


class LanguageBind:
    """Frozen LanguageBind branches plus the shared text tower, producing unit vectors."""

    def __init__(self, teacher_root: str | Path, branches: list[str], device: str = "cpu",
                 compute_dtype: torch.dtype = torch.float32) -> None:
        if not branches:
            raise PipelineError("no LanguageBind branch requested")
        self.device = torch.device(device)
        self.compute_dtype = compute_dtype
        self.branches: dict[str, Branch] = {}
        order = sorted(set(branches), key=lambda b: (b != "image", b))
        for name in order:
            folder = resolve_branch_dir(teacher_root, name)
            model, cfg = load_clip(folder)
            model.to(self.device, compute_dtype)
            self.branches[name] = Branch(name, folder, model, cfg)
        # the text tower is the same frozen OpenCLIP tower in every checkpoint
        self.text_branch = self.branches[order[0]]
        self.tokenizer = _load_tokenizer(self.text_branch.folder)
        self.context_length = int(self.text_branch.config["text_config"].get(
            "max_position_embeddings", 77))
        dims = {b.config.get("projection_dim", b.model.config.projection_dim)
                for b in self.branches.values()}
        if len(dims) != 1:
            raise PipelineError(f"LanguageBind branches disagree on projection_dim: {dims}")
        self.dim = int(dims.pop())

    def preprocess(self, branch: str, array: np.ndarray) -> torch.Tensor:
        b = self.branches[branch]
        if branch == "depth":
            return preprocess_depth(array, b.max_depth, b.image_size)
        return preprocess_image(array, b.image_size)

    @torch.inference_mode()
    def encode_pixels(self, branch: str, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) preprocessed -> (B, D) L2-normalised, float32 or wider."""
        model = self.branches[branch].model
        pixels = pixels.to(self.device, self.compute_dtype)
        pooled = model.vision_model(pixel_values=pixels).pooler_output
        return F.normalize(upcast(model.visual_projection(pooled)), dim=-1).cpu()

    @torch.inference_mode()
    def encode_pixels_dense(self, branch: str, pixels: torch.Tensor) -> tuple[
            torch.Tensor, torch.Tensor]:
        """One forward: the pooled embedding of `encode_pixels` and the last layer's patch
        tokens in the joint space, (B, h, w, D) L2-normalised: each token through the
        tower's `post_layernorm` and `visual_projection` exactly as the class token is
        (MaskCLIP's dense read-out of a CLIP ViT)."""
        model = self.branches[branch].model
        vision = model.vision_model
        pixels = pixels.to(self.device, self.compute_dtype)
        out = vision(pixel_values=pixels)
        pooled = F.normalize(upcast(model.visual_projection(out.pooler_output)), dim=-1)
        patches = vision.post_layernorm(out.last_hidden_state[:, 1:])
        tokens = F.normalize(upcast(model.visual_projection(patches)), dim=-1)
        g = self.grid(branch)
        return pooled.cpu(), tokens.reshape(tokens.shape[0], g, g, -1).cpu()

    def grid(self, branch: str) -> int:
        """Patches per side of a branch's (square) input."""
        vc = self.branches[branch].config["vision_config"]
        return int(vc["image_size"]) // int(vc["patch_size"])

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """`clean_text` then CLIP BPE, padded and truncated to the context length."""
        return self.tokenizer([clean_text(t) for t in texts], padding="max_length",
                              max_length=self.context_length, truncation=True,
                              return_tensors="pt")

    @torch.inference_mode()
    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """Captions or prompts -> (B, D) L2-normalised, float32 or wider."""
        model = self.text_branch.model
        enc = self.tokenize(texts)
        out = model.text_model(input_ids=enc["input_ids"].to(self.device),
                               attention_mask=enc["attention_mask"].to(self.device))
        return F.normalize(upcast(model.text_projection(out.pooler_output)), dim=-1).cpu()

    def fingerprint(self) -> dict[str, Any]:
        return {name: checkpoint_fingerprint(b.folder) for name, b in self.branches.items()}


def clean_text(text: str) -> str:
    """LanguageBind's text cleaning before BPE (open_clip/tokenizer.py: `basic_clean`,
    lines 60-63, and `whitespace_clean`, 66-69, applied by `HFTokenizer.__call__`, line
    206): ftfy's `fix_text` (typographic quotes, mojibake, HTML entities, NFC), HTML
    entities unescaped twice more, whitespace runs collapsed, ends stripped. The CLIP
    tokenizer then lower-cases, as the slow `CLIPTokenizer` the official code loads."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return re.sub(r"\s+", " ", text).strip()


def _load_tokenizer(folder: Path) -> CLIPTokenizer:
    if not (folder / "vocab.json").is_file() and not (folder / "tokenizer.json").is_file():
        raise PipelineError(f"no tokenizer files (vocab.json and merges.txt, or "
                            f"tokenizer.json) in {folder}; download the folder again")
    try:
        return CLIPTokenizer.from_pretrained(str(folder))
    except Exception as exc:  # noqa: BLE001
        raise PipelineError(f"cannot load the CLIP tokenizer from {folder} ({exc})") from exc
