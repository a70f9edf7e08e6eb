"""The trainable pieces of the default teacher: peft-style LoRA on the vision encoder's
attention, the CLIP encoders' embeddings (pooled and per patch), and the two losses of the
fit (caption InfoNCE, class regions against class prompts)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


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
