"""LLaMA-Adapter V2 multimodal: our own inference implementation for the official files.

Behaviour follows OpenGVLab/LLaMA-Adapter `llama_adapter_v2_multimodal7b` (`llama/llama.py`,
`llama/llama_adapter.py`): CLIP ViT-L/14 tokens (post layer norm and projection on all 257
tokens) -> `clip_proj` + norm -> a learned visual query through 8 pre-norm ViT blocks
(timm 0.3.2 `Block`, nn.LayerNorm eps 1e-5) -> `visual_proj` + norm; in the last
`query_layer` LLaMA layers, the adapter prompt (`adapter_query[i]` + visual query) gives
extra keys/values (no RoPE, no bias) whose own softmax is scaled by tanh(gate) per head
and added to the attention output; bias and norm tuning, optional LoRA. Reading the
official files into it: `stages/teacher/llama_adapter_checkpoint.py`.

What is new here is speed: prompts of different lengths are left-padded into one batch
with per-sample rotary positions and a key mask, keys and values are kept in a cache,
and the adapter's keys and values are computed once per generation (the original
decodes one image at a time and recomputes them at every step).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from any2seg.errors import PipelineError
from any2seg.precision import stable_dtype, upcast

ALPACA = ("Below is an instruction that describes a task. Write a response that "
          "appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n"
          "### Response:")
CAPTION_INSTRUCTION = "Generate caption of this image"


@dataclass
class LlamaArgs:
    dim: int
    n_layers: int
    n_heads: int
    vocab_size: int
    multiple_of: int = 256
    norm_eps: float = 1e-5  # ModelArgs' default when params.json has none
    w_bias: bool = False
    w_lora: bool = False
    lora_rank: int = 16
    w_new_gate: bool = False
    max_seq_len: int = 512

    @property
    def ffn_dim(self) -> int:
        hidden = int(2 * 4 * self.dim / 3)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xs = upcast(x)
        return (xs * torch.rsqrt(xs.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) \
            * self.weight


def rope(x: torch.Tensor, positions: torch.Tensor, theta: float = 10000.0) -> torch.Tensor:
    """Rotary embedding on consecutive pairs (as LLaMA's complex form), per-sample positions.
    x (B, T, H, D); positions (B, T)."""
    d = x.shape[-1]
    dtype = stable_dtype(x.dtype)
    freqs = 1.0 / (theta ** (torch.arange(0, d, 2, device=x.device, dtype=dtype) / d))
    angles = positions.to(dtype)[..., None] * freqs  # (B, T, D/2)
    cos, sin = angles.cos()[:, :, None], angles.sin()[:, :, None]
    xf = upcast(x)
    a, b = xf[..., 0::2], xf[..., 1::2]
    out = torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2)
    return out.type_as(x)


def _lora(owner: nn.Module, name: str, d_in: int, d_out: int, rank: int) -> None:
    setattr(owner, f"lora_{name}_l1", nn.Linear(d_in, rank, bias=False))
    setattr(owner, f"lora_{name}_l2", nn.Linear(rank, d_out, bias=False))


def _official_init(owner: nn.Module) -> None:
    """Zero biases and LoRA up-projections, as the official constructors do: a checkpoint
    that lacks them then behaves as the official code (which keeps these values)."""
    for name, module in owner.named_children():
        if isinstance(module, nn.Linear):
            if module.bias is not None:
                nn.init.zeros_(module.bias)
            if name.startswith("lora_") and name.endswith("_l2"):
                nn.init.zeros_(module.weight)


def _with_lora(owner: nn.Module, name: str, x: torch.Tensor) -> torch.Tensor:
    out = getattr(owner, name)(x)
    if getattr(owner, "w_lora", False):
        out = out + getattr(owner, f"lora_{name}_l2")(getattr(owner, f"lora_{name}_l1")(x))
    return out


class Attention(nn.Module):
    def __init__(self, a: LlamaArgs) -> None:
        super().__init__()
        self.n_heads, self.head_dim = a.n_heads, a.dim // a.n_heads
        self.wq = nn.Linear(a.dim, a.dim, bias=a.w_bias)
        self.wk = nn.Linear(a.dim, a.dim, bias=False)
        self.wv = nn.Linear(a.dim, a.dim, bias=False)
        self.wo = nn.Linear(a.dim, a.dim, bias=a.w_bias)
        self.w_lora = a.w_lora
        if a.w_lora:
            for name in ("wq", "wk", "wv", "wo"):
                _lora(self, name, a.dim, a.dim, a.lora_rank)
        _official_init(self)
        self.gate = nn.Parameter(torch.zeros(1, a.n_heads, 1, 1))
        self.w_new_gate = a.w_new_gate
        if a.w_new_gate:
            self.new_gate = nn.Parameter(torch.ones(1, 1, 1, 1))

    def adapter_kv(self, prompt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the adapter prompt (B, L, dim): plain wk/wv, no RoPE."""
        b, n = prompt.shape[:2]
        k = self.wk(prompt).view(b, n, self.n_heads, self.head_dim).transpose(1, 2)
        v = self.wv(prompt).view(b, n, self.n_heads, self.head_dim).transpose(1, 2)
        return k, v

    def forward(self, x: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor,
                cache: tuple[torch.Tensor, torch.Tensor] | None, start: int,
                adapter: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        b, t, _ = x.shape
        q = _with_lora(self, "wq", x).view(b, t, self.n_heads, self.head_dim)
        k = _with_lora(self, "wk", x).view(b, t, self.n_heads, self.head_dim)
        v = _with_lora(self, "wv", x).view(b, t, self.n_heads, self.head_dim)
        q, k = rope(q, positions), rope(k, positions)
        if cache is not None:
            cache[0][:, start:start + t] = k
            cache[1][:, start:start + t] = v
            k, v = cache[0][:, :start + t], cache[1][:, :start + t]
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        scores = q @ k.transpose(2, 3) / math.sqrt(self.head_dim) + mask
        out = F.softmax(upcast(scores), dim=-1).type_as(q) @ v
        if adapter is not None:
            ak, av = adapter
            a_scores = F.softmax(upcast(q @ ak.transpose(2, 3) / math.sqrt(self.head_dim)),
                                 dim=-1).type_as(q)
            a_scores = self.gate.tanh() * a_scores
            if self.w_new_gate:
                a_scores = self.new_gate * a_scores
            out = out + a_scores @ av
        out = out.transpose(1, 2).reshape(b, t, -1)
        return _with_lora(self, "wo", out)


class FeedForward(nn.Module):
    def __init__(self, a: LlamaArgs) -> None:
        super().__init__()
        h = a.ffn_dim
        self.w1 = nn.Linear(a.dim, h, bias=a.w_bias)
        self.w2 = nn.Linear(h, a.dim, bias=a.w_bias)
        self.w3 = nn.Linear(a.dim, h, bias=a.w_bias)
        self.w_lora = a.w_lora
        if a.w_lora:
            _lora(self, "w1", a.dim, h, a.lora_rank)
            _lora(self, "w2", h, a.dim, a.lora_rank)
            _lora(self, "w3", a.dim, h, a.lora_rank)
        _official_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _with_lora(self, "w2", F.silu(_with_lora(self, "w1", x)) * _with_lora(self, "w3", x))


class Block(nn.Module):
    def __init__(self, a: LlamaArgs) -> None:
        super().__init__()
        self.attention = Attention(a)
        self.feed_forward = FeedForward(a)
        self.attention_norm = RMSNorm(a.dim, a.norm_eps)
        self.ffn_norm = RMSNorm(a.dim, a.norm_eps)

    def forward(self, x, positions, mask, cache, start, adapter):  # noqa: ANN001, ANN201
        h = x + self.attention(self.attention_norm(x), positions, mask, cache, start, adapter)
        return h + self.feed_forward(self.ffn_norm(h))


class Llama(nn.Module):
    def __init__(self, a: LlamaArgs) -> None:
        super().__init__()
        self.args = a
        self.tok_embeddings = nn.Embedding(a.vocab_size, a.dim)
        self.layers = nn.ModuleList(Block(a) for _ in range(a.n_layers))
        self.norm = RMSNorm(a.dim, a.norm_eps)
        self.output = nn.Linear(a.dim, a.vocab_size, bias=False)


@dataclass
class VisualArgs:
    clip_dim: int = 768
    v_embed_dim: int = 768
    v_depth: int = 8
    v_num_heads: int = 16
    v_mlp_ratio: float = 4.0
    query_len: int = 10
    query_layer: int = 31


class LlamaAdapter(nn.Module):
    """Adapter modules (names as in the official checkpoints) around a LLaMA and a CLIP."""

    def __init__(self, llama: LlamaArgs, visual: VisualArgs, clip: nn.Module | None) -> None:
        super().__init__()
        from timm.models.vision_transformer import Block as VitBlock

        self.clip = clip
        self.visual_args = visual
        self.clip_proj = nn.Linear(visual.clip_dim, visual.v_embed_dim)
        self.clip_proj_norm = nn.LayerNorm(visual.v_embed_dim)
        self.visual_query = nn.Embedding(visual.query_len, visual.v_embed_dim)
        self.visual_blocks = nn.ModuleList(
            VitBlock(visual.v_embed_dim, visual.v_num_heads, visual.v_mlp_ratio, qkv_bias=True,
                     norm_layer=nn.LayerNorm)  # timm 0.3.2's Block: nn.LayerNorm, eps 1e-5
            for _ in range(visual.v_depth))
        self.visual_proj = nn.Linear(visual.v_embed_dim, llama.dim)
        self.visual_proj_norm = nn.LayerNorm(llama.dim)
        self.adapter_query = nn.Embedding(visual.query_len * visual.query_layer, llama.dim)
        self.llama = Llama(llama)

    # -- vision ------------------------------------------------------------------------------
    @property
    def image_size(self) -> int:
        """CLIP's input resolution (`_transform(model.visual.input_resolution)`)."""
        return int(self.clip.vision_model.config.image_size)

    def clip_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """All CLIP tokens after the post layer norm, times the visual projection."""
        vision = self.clip.vision_model
        hidden = vision(pixel_values=pixels).last_hidden_state
        return self.clip.visual_projection(vision.post_layernorm(hidden))

    def visual(self, clip_tokens: torch.Tensor) -> torch.Tensor:
        feats = self.clip_proj_norm(self.clip_proj(clip_tokens.to(self.clip_proj.weight.dtype)))
        query = self.visual_query.weight[None].expand(len(feats), -1, -1)
        x = torch.cat([query, feats], dim=1)
        for block in self.visual_blocks:
            x = block(x)
        return self.visual_proj_norm(self.visual_proj(x[:, : self.visual_args.query_len]))

    def adapter_kv(self, visual_query: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Adapter keys/values for each of the last `query_layer` layers, computed once."""
        v = self.visual_args
        prompts = self.adapter_query.weight.view(v.query_layer, v.query_len, -1)
        layers = self.llama.layers[-v.query_layer:]
        return [layer.attention.adapter_kv(prompts[i][None] + visual_query)
                for i, layer in enumerate(layers)]

    # -- language ----------------------------------------------------------------------------
    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, key_valid: torch.Tensor,
                caches: list[tuple[torch.Tensor, torch.Tensor]] | None = None, start: int = 0,
                adapter: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> torch.Tensor:
        """Logits (B, T, V) of `tokens` at slots start..start+T-1. `key_valid` (B, S) marks
        real (non-padding) key slots 0..start+T-1; `adapter=None` runs plain LLaMA."""
        b, t = tokens.shape
        s = start + t
        h = self.llama.tok_embeddings(tokens)
        slots = torch.arange(s, device=tokens.device)
        query_slots = start + torch.arange(t, device=tokens.device)
        causal = slots[None, :] <= query_slots[:, None]
        # a padding position attends to itself only: its row stays finite (no NaN from an
        # all -inf softmax) and no real token ever attends to it
        itself = slots[None, :] == query_slots[:, None]
        allowed = (causal[None] & key_valid[:, None, :s]) | itself[None]
        mask = torch.zeros(b, 1, t, s, dtype=h.dtype, device=h.device)
        mask = mask.masked_fill(~allowed[:, None], float("-inf"))
        first_adapted = len(self.llama.layers) - self.visual_args.query_layer
        for i, layer in enumerate(self.llama.layers):
            kv = adapter[i - first_adapted] if adapter is not None and i >= first_adapted else None
            cache = caches[i] if caches is not None else None
            h = layer(h, positions, mask, cache, start, kv)
        return upcast(self.llama.output(self.llama.norm(h)))


# ---------------------------------------------------------------------------------------
# generation
# ---------------------------------------------------------------------------------------
def sample_top_p(probs: torch.Tensor, top_p: float,
                 generator: torch.Generator | None) -> torch.Tensor:
    sorted_probs, index = probs.sort(dim=-1, descending=True)
    cumulative = sorted_probs.cumsum(-1)
    sorted_probs[cumulative - sorted_probs > top_p] = 0.0
    sorted_probs = sorted_probs / sorted_probs.sum(-1, keepdim=True)
    choice = torch.multinomial(upcast(sorted_probs).cpu(), 1, generator=generator)
    return index.gather(-1, choice.to(index.device)).squeeze(-1)


@torch.inference_mode()
def generate(model: LlamaAdapter, visual_query: torch.Tensor | None, prompts: list[list[int]],
             max_new_tokens: int, eos_id: int, temperature: float = 0.0, top_p: float = 0.75,
             generator: torch.Generator | None = None, use_cache: bool = True) -> list[list[int]]:
    """Batched decoding: left padding, per-sample positions, KV cache. Greedy when
    `temperature` is 0. Returns the new tokens of each prompt, up to (not including) EOS.

    As the official `generate` (total_len = min(max_seq_len, max_gen_len + prompt)), a
    prompt gets at most `max_seq_len - len(prompt)` new tokens: a longer generation is
    shortened, not refused."""
    device = model.llama.output.weight.device
    dtype = model.llama.output.weight.dtype
    max_seq_len = model.llama.args.max_seq_len
    b = len(prompts)
    longest = max(len(p) for p in prompts)
    if longest > max_seq_len:
        raise PipelineError(f"a prompt of {longest} tokens exceeds max_seq_len {max_seq_len}; "
                            "shorten the instruction")
    budgets = [min(max_new_tokens, max_seq_len - len(p)) for p in prompts]
    steps = max(budgets)
    out: list[list[int]] = [[] for _ in range(b)]
    if steps <= 0:
        return out
    total = longest + steps
    tokens = torch.zeros(b, total, dtype=torch.long, device=device)
    valid = torch.zeros(b, total, dtype=torch.bool, device=device)
    for i, p in enumerate(prompts):
        tokens[i, longest - len(p):longest] = torch.tensor(p, device=device)
        valid[i, longest - len(p):longest] = True
    valid[:, longest:] = True
    positions = (valid.long().cumsum(1) - 1).clamp(min=0)
    adapter = model.adapter_kv(visual_query) if visual_query is not None else None
    heads = model.llama.args.n_heads
    head_dim = model.llama.args.dim // heads
    caches = [(torch.zeros(b, total, heads, head_dim, device=device, dtype=dtype),
               torch.zeros(b, total, heads, head_dim, device=device, dtype=dtype))
              for _ in model.llama.layers] if use_cache else None
    logits = model(tokens[:, :longest], positions[:, :longest], valid, caches, 0, adapter)[:, -1]
    budget = torch.tensor(budgets, device=device)
    finished = budget <= 0
    for step in range(steps):
        if temperature > 0:
            nxt = sample_top_p(torch.softmax(logits / temperature, dim=-1), top_p, generator)
        else:
            nxt = logits.argmax(-1)
        # one device -> host copy per step, not two per sample (each a CUDA sync)
        chosen, ended = nxt.tolist(), finished.tolist()
        for i in range(b):
            if not ended[i] and chosen[i] != eos_id:
                out[i].append(chosen[i])
        finished |= (nxt == eos_id) | (budget <= step + 1)
        if bool(finished.all()):
            break
        slot = longest + step
        tokens[:, slot] = nxt
        if use_cache:
            logits = model(tokens[:, slot:slot + 1], positions[:, slot:slot + 1], valid, caches,
                           slot, adapter)[:, -1]
        else:
            logits = model(tokens[:, :slot + 1], positions[:, :slot + 1], valid, None, 0,
                           adapter)[:, -1]
    return out
