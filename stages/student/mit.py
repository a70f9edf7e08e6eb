"""SegFormer's Mix Transformer (MiT) encoder in plain torch.

The student used transformers' `SegformerModel` for MiT, and importing transformers cost
every `pipeline train` / `evaluate` / `predict` / `export` process about 3 s of CPU. This
module is the same network without that import. It is transformers' `SegformerModel`
(5.23.0, the lock's version) op for op, so the numbers are equal (tests/student/test_mit.py
checks bit equality of every stage's hidden state, float32 and float64, eval and train):

- module and parameter names are those of `SegformerModel` (`stages.0.patch_embeddings.proj`,
  `stages.0.blocks.0.attention.q_proj`, `...attention.sequence_reduction.sequence_reduction`,
  `...mlp.dwconv.dwconv`, `stages.0.layer_norm`, ...), so every checkpoint the project saved
  while the encoder was transformers' loads unchanged;
- attention is `F.scaled_dot_product_attention` with the scale 1/sqrt(head dim), as
  transformers runs it by default (`attn_implementation="sdpa"`); its math is the eager
  softmax(q k^T * scale) v;
- random initialisation is transformers': the layers' own init at construction, then a
  post-order pass setting Linear/Conv weights ~ N(0, initializer_range), biases 0 and
  LayerNorms to 1/0, in the same order, so one seed gives the same weights as before;
- drop path: per-layer rates `rate * i / (sum(depths) - 1)`, one `MiTDropPath` per block
  used on both residual branches (an `nn.Identity` where the rate is 0).

Where transformers (and so this module) differs from the official MiT (NVlabs/SegFormer,
mmseg/models/backbones/mix_transformer.py):
- LayerNorm epsilon: the official `mit_bN` build the block norms (`norm1`/`norm2`) and the
  per-stage norms (`norm1..4`) with eps 1e-6 (the patch-embedding and spatial-reduction
  norms keep torch's 1e-5); transformers builds every LayerNorm with torch's default 1e-5
  and ignores `config.layer_norm_eps` (1e-6). Outputs differ slightly from the official
  code with the same weights; this module follows transformers.
- key/value: one fused `kv` Linear in the official code, separate `k_proj`/`v_proj` here
  (the same numbers; the hub checkpoints already hold them split).
- drop-path rates: official `torch.linspace(0, rate, n)` in float32, here the float64
  formula above (the rates differ in the last float32 bits).
- random init: official trunc_normal(std 0.02) for Linear and N(0, sqrt(2 / fan_out)) for
  Conv2d; transformers uses N(0, 0.02) for both. Pretrained weights make this moot.
- attention: the official code is the eager softmax; SDPA computes the same function with
  a different kernel (float32 rounding only).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

# SegFormer MiT variants (hidden sizes, depths), as in the SegFormer paper / nvidia/mit-bN
MIT = {
    "b0": ([32, 64, 160, 256], [2, 2, 2, 2]),
    "b1": ([64, 128, 320, 512], [2, 2, 2, 2]),
    "b2": ([64, 128, 320, 512], [3, 4, 6, 3]),
    "b3": ([64, 128, 320, 512], [3, 4, 18, 3]),
    "b4": ([64, 128, 320, 512], [3, 8, 27, 3]),
    "b5": ([64, 128, 320, 512], [3, 6, 40, 3]),
}
# the geometry every MiT shares (SegFormer's defaults): overlapping patch embeddings
# (kernel, stride) per stage and the spatial-reduction ratio of each stage's attention
MIT_PATCHES = [(7, 4), (3, 2), (3, 2), (3, 2)]
MIT_SR_RATIOS = [8, 4, 2, 1]

# the activations a MiT config may name (`hidden_act`), as transformers' ACT2FN builds them
ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "gelu": nn.GELU,
    "gelu_pytorch_tanh": lambda: nn.GELU(approximate="tanh"),
    "relu": nn.ReLU,
    "silu": nn.SiLU,
    "swish": nn.SiLU,
}


def mit_min_input(patches: list[tuple[int, int]] = MIT_PATCHES,
                  sr_ratios: list[int] = MIT_SR_RATIOS) -> int:
    """The smallest image side MiT accepts: the patch embeddings pad (kernel // 2), so any
    size works and none has to be a multiple of 32, but each stage's map must be at least
    as large as its spatial-reduction kernel (8 on stage one: 29 px)."""
    def fits(side: int) -> bool:
        for (kernel, stride), sr in zip(patches, sr_ratios, strict=True):
            side = (side + 2 * (kernel // 2) - kernel) // stride + 1
            if side < sr:
                return False
        return True

    return next(side for side in range(1, 4096) if fits(side))


@dataclass
class MiTConfig:
    """The fields of transformers' `SegformerConfig` that shape the encoder (same names, so
    an nvidia/mit-bN `config.json` fills it), with SegFormer's defaults."""

    hidden_sizes: list[int] = field(default_factory=lambda: list(MIT["b0"][0]))
    depths: list[int] = field(default_factory=lambda: list(MIT["b0"][1]))
    num_attention_heads: list[int] = field(default_factory=lambda: [1, 2, 5, 8])
    patch_sizes: list[int] = field(default_factory=lambda: [k for k, _ in MIT_PATCHES])
    strides: list[int] = field(default_factory=lambda: [s for _, s in MIT_PATCHES])
    sr_ratios: list[int] = field(default_factory=lambda: list(MIT_SR_RATIOS))
    mlp_ratios: list[int] = field(default_factory=lambda: [4, 4, 4, 4])
    num_channels: int = 3
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.0
    attention_probs_dropout_prob: float = 0.0
    drop_path_rate: float = 0.1
    initializer_range: float = 0.02

    @classmethod
    def variant(cls, name: str, drop_path_rate: float = 0.1) -> MiTConfig:
        """mit_b0..b5 (`name` "b0".."b5") with SegFormer's shared geometry."""
        hidden, depths = MIT[name]
        return cls(hidden_sizes=list(hidden), depths=list(depths),
                   drop_path_rate=drop_path_rate)

    def problem(self) -> str | None:
        """What makes this config unbuildable, in words (None when it builds)."""
        stages = len(self.hidden_sizes)
        for name in ("depths", "num_attention_heads", "patch_sizes", "strides", "sr_ratios",
                     "mlp_ratios"):
            if len(getattr(self, name)) != stages:
                return f"{name} has {len(getattr(self, name))} entries for {stages} stages"
        for hidden, heads in zip(self.hidden_sizes, self.num_attention_heads, strict=True):
            if heads < 1 or hidden % heads:
                return f"hidden size {hidden} is not a multiple of {heads} attention heads"
        if self.hidden_act not in ACTIVATIONS:
            return f"hidden_act {self.hidden_act!r} is not one of {', '.join(ACTIVATIONS)}"
        return None

    def min_side(self) -> int:
        """The smallest input side this geometry accepts."""
        return mit_min_input(list(zip(self.patch_sizes, self.strides, strict=True)),
                             list(self.sr_ratios))


class OverlapPatchEmbeddings(nn.Module):
    """Overlapping patches: a strided conv with padding kernel // 2, then LayerNorm."""

    def __init__(self, patch_size: int, stride: int, num_channels: int,
                 hidden_size: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(num_channels, hidden_size, kernel_size=patch_size, stride=stride,
                              padding=patch_size // 2)
        self.layer_norm = nn.LayerNorm(hidden_size)

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        embeddings = self.proj(pixels)
        _, _, height, width = embeddings.shape
        embeddings = embeddings.flatten(2).transpose(1, 2)
        return self.layer_norm(embeddings), height, width


class SequenceReduction(nn.Module):
    """Keys/values from a sr_ratio-strided conv of the token map, then LayerNorm."""

    def __init__(self, hidden_size: int, ratio: int) -> None:
        super().__init__()
        self.sequence_reduction = nn.Conv2d(hidden_size, hidden_size, kernel_size=ratio,
                                            stride=ratio)
        self.layer_norm = nn.LayerNorm(hidden_size)

    def forward(self, tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
        batch, _, channels = tokens.shape
        grid = tokens.transpose(1, 2).reshape(batch, channels, height, width)
        grid = self.sequence_reduction(grid)
        return self.layer_norm(grid.reshape(batch, channels, -1).transpose(1, 2))


class EfficientSelfAttention(nn.Module):
    """Multi-head attention whose keys/values come from the spatially reduced sequence."""

    def __init__(self, hidden_size: int, heads: int, sr_ratio: int, dropout: float) -> None:
        super().__init__()
        self.head_dim = hidden_size // heads
        self.scaling = self.head_dim ** -0.5
        self.attention_dropout = dropout
        self.q_proj = nn.Linear(hidden_size, heads * self.head_dim)
        self.k_proj = nn.Linear(hidden_size, heads * self.head_dim)
        self.v_proj = nn.Linear(hidden_size, heads * self.head_dim)
        self.o_proj = nn.Linear(heads * self.head_dim, hidden_size)
        self.sr_ratio = sr_ratio
        if sr_ratio > 1:
            self.sequence_reduction = SequenceReduction(hidden_size, sr_ratio)

    def forward(self, tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
        shape = tokens.shape[:-1]
        query = self.q_proj(tokens).view(*shape, -1, self.head_dim).transpose(1, 2)
        kv = self.sequence_reduction(tokens, height, width) if self.sr_ratio > 1 else tokens
        kv_shape = (*kv.shape[:-1], -1, self.head_dim)
        key = self.k_proj(kv).view(kv_shape).transpose(1, 2)
        value = self.v_proj(kv).view(kv_shape).transpose(1, 2)
        out = F.scaled_dot_product_attention(
            query, key, value, attn_mask=None, is_causal=False, scale=self.scaling,
            dropout_p=self.attention_dropout if self.training else 0.0)
        out = out.transpose(1, 2).contiguous()
        return self.o_proj(out.reshape(*shape, -1).contiguous())


class DepthWiseConv(nn.Module):
    """Mix-FFN's 3x3 depthwise conv on the token map (the implicit position encoding)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim)

    def forward(self, tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
        batch, _, channels = tokens.shape
        grid = tokens.transpose(1, 2).view(batch, channels, height, width)
        return self.dwconv(grid).flatten(2).transpose(1, 2)


class MixFFN(nn.Module):
    """fc1 -> depthwise conv -> activation -> fc2 (dropout after the activation and fc2)."""

    def __init__(self, hidden_size: int, ffn_size: int, act: str, dropout: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, ffn_size)
        self.dwconv = DepthWiseConv(ffn_size)
        self.activation_fn = ACTIVATIONS[act]()
        self.fc2 = nn.Linear(ffn_size, hidden_size)
        self.dropout = nn.Dropout(dropout)

    def forward(self, tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
        tokens = self.activation_fn(self.dwconv(self.fc1(tokens), height, width))
        return self.dropout(self.fc2(self.dropout(tokens)))


class MiTDropPath(nn.Module):
    """Stochastic depth: a sample's residual branch dropped with prob `drop_prob`, the kept
    ones scaled by 1 / keep (stages.student.noise swaps it for its keyed version)."""

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1 - self.drop_prob
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        mask = torch.floor(torch.rand(shape, dtype=x.dtype, device=x.device) + keep)
        return x.div(keep) * mask

    def extra_repr(self) -> str:
        return f"p={self.drop_prob}"


class MiTLayer(nn.Module):
    """Pre-norm block: x + drop_path(attention(LN(x))), then x + drop_path(MixFFN(LN(x)))."""

    def __init__(self, cfg: MiTConfig, stage: int, drop_path: float) -> None:
        super().__init__()
        hidden = cfg.hidden_sizes[stage]
        self.layernorm_before = nn.LayerNorm(hidden)
        self.attention = EfficientSelfAttention(hidden, cfg.num_attention_heads[stage],
                                                cfg.sr_ratios[stage],
                                                cfg.attention_probs_dropout_prob)
        self.drop_path = MiTDropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.layernorm_after = nn.LayerNorm(hidden)
        self.mlp = MixFFN(hidden, int(hidden * cfg.mlp_ratios[stage]), cfg.hidden_act,
                          cfg.hidden_dropout_prob)
        self.hidden_dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
        attended = self.attention(self.layernorm_before(tokens), height, width)
        tokens = self.drop_path(self.hidden_dropout(attended)) + tokens
        return self.drop_path(self.mlp(self.layernorm_after(tokens), height, width)) + tokens


class MiTStage(nn.Module):
    """Patch embeddings -> blocks -> LayerNorm -> (N, C, H, W)."""

    def __init__(self, cfg: MiTConfig, stage: int, drop_paths: list[float]) -> None:
        super().__init__()
        first = sum(cfg.depths[:stage])
        self.patch_embeddings = OverlapPatchEmbeddings(
            cfg.patch_sizes[stage], cfg.strides[stage],
            cfg.num_channels if stage == 0 else cfg.hidden_sizes[stage - 1],
            cfg.hidden_sizes[stage])
        self.blocks = nn.ModuleList(MiTLayer(cfg, stage, drop_paths[first + i])
                                    for i in range(cfg.depths[stage]))
        self.layer_norm = nn.LayerNorm(cfg.hidden_sizes[stage])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens, height, width = self.patch_embeddings(x)
        for block in self.blocks:
            tokens = block(tokens, height, width)
        tokens = self.layer_norm(tokens)
        return tokens.reshape(tokens.shape[0], height, width, -1).permute(0, 3, 1, 2).contiguous()


class MiT(nn.Module):
    """The encoder: (N, C, H, W) -> every stage's map, strides 4, 8, 16, 32."""

    def __init__(self, cfg: MiTConfig) -> None:
        super().__init__()
        self.config = cfg
        total = sum(cfg.depths)
        drop_paths = [cfg.drop_path_rate * i / max(total - 1, 1) for i in range(total)]
        self.stages = nn.ModuleList(MiTStage(cfg, s, drop_paths)
                                    for s in range(len(cfg.hidden_sizes)))
        self.apply(self._init_weights)  # post-order, as transformers' initialize_weights

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear | nn.Conv2d):
            module.weight.normal_(mean=0.0, std=self.config.initializer_range)
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, nn.LayerNorm):
            module.weight.fill_(1.0)
            module.bias.zero_()

    def forward(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        hidden, states = pixels, []
        for stage in self.stages:
            hidden = stage(hidden)
            states.append(hidden)
        return states
