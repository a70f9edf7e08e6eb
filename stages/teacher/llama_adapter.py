"""LLaMA-Adapter V2 multimodal: our own inference implementation for the official files.

Behaviour follows OpenGVLab/LLaMA-Adapter `llama_adapter_v2_multimodal7b`: CLIP ViT-L/14
tokens (post layer norm and projection on all 257 tokens) -> `clip_proj` + norm -> a
learned visual query through 8 pre-norm ViT blocks -> `visual_proj` + norm; in the last
`query_layer` LLaMA layers, the adapter prompt (`adapter_query[i]` + visual query) gives
extra keys/values (no RoPE, no bias) whose own softmax is scaled by tanh(gate) per head
and added to the attention output; bias and norm tuning, optional LoRA.

What is new here is speed: prompts of different lengths are left-padded into one batch
with per-sample rotary positions and a key mask, keys and values are kept in a cache,
and the adapter's keys and values are computed once per generation (the original
decodes one image at a time and recomputes them at every step).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.errors import PipelineError
from pipeline.precision import stable_dtype, upcast

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
    norm_eps: float = 1e-6
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
            VitBlock(visual.v_embed_dim, visual.v_num_heads, visual.v_mlp_ratio, qkv_bias=True)
            for _ in range(visual.v_depth))
        self.visual_proj = nn.Linear(visual.v_embed_dim, llama.dim)
        self.visual_proj_norm = nn.LayerNorm(llama.dim)
        self.adapter_query = nn.Embedding(visual.query_len * visual.query_layer, llama.dim)
        self.llama = Llama(llama)

    # -- vision ------------------------------------------------------------------------------
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
    `temperature` is 0. Returns the new tokens of each prompt, up to (not including) EOS."""
    device = model.llama.output.weight.device
    dtype = model.llama.output.weight.dtype
    b = len(prompts)
    longest = max(len(p) for p in prompts)
    total = longest + max_new_tokens
    if total > model.llama.args.max_seq_len:
        raise PipelineError(f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) "
                            f"exceed max_seq_len {model.llama.args.max_seq_len}")
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
    finished = torch.zeros(b, dtype=torch.bool, device=device)
    out: list[list[int]] = [[] for _ in range(b)]
    for step in range(max_new_tokens):
        if temperature > 0:
            nxt = sample_top_p(torch.softmax(logits / temperature, dim=-1), top_p, generator)
        else:
            nxt = logits.argmax(-1)
        for i in range(b):
            if not finished[i] and int(nxt[i]) != eos_id:
                out[i].append(int(nxt[i]))
        finished |= nxt == eos_id
        if bool(finished.all()) or step == max_new_tokens - 1:
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


# ---------------------------------------------------------------------------------------
# loading the official files
# ---------------------------------------------------------------------------------------
def expected_adapter_keys(n_layers: int, v: VisualArgs, w_bias: bool, w_lora: bool) -> set[str]:
    """The keys an official adapter checkpoint holds for its `config`."""
    keys = {"clip_proj.weight", "clip_proj.bias", "clip_proj_norm.weight", "clip_proj_norm.bias",
            "visual_query.weight", "visual_proj.weight", "visual_proj.bias",
            "visual_proj_norm.weight", "visual_proj_norm.bias", "adapter_query.weight",
            "llama.norm.weight"}
    for i in range(v.v_depth):
        for part in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"):
            keys |= {f"visual_blocks.{i}.{part}.weight", f"visual_blocks.{i}.{part}.bias"}
    for i in range(n_layers):
        p = f"llama.layers.{i}."
        keys |= {p + "attention.gate", p + "attention_norm.weight", p + "ffn_norm.weight"}
        if w_bias:
            keys |= {p + f"attention.{w}.bias" for w in ("wq", "wo")}
            keys |= {p + f"feed_forward.{w}.bias" for w in ("w1", "w2", "w3")}
        if w_lora:
            keys |= {p + f"attention.lora_{w}_l{j}.weight" for w in ("wq", "wk", "wv", "wo")
                     for j in (1, 2)}
            keys |= {p + f"feed_forward.lora_{w}_l{j}.weight" for w in ("w1", "w2", "w3")
                     for j in (1, 2)}
            keys.add(p + "attention.new_gate")
    return keys


def _need(path: Path, what: str) -> Path:
    if not path.is_file():
        raise PipelineError(f"missing {path}: {what}")
    return path


def _torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise PipelineError(f"cannot read {path} ({type(exc).__name__}); the file is corrupt, "
                            "truncated or not a torch checkpoint: download it again") from exc


def load(checkpoint: str | Path, llama_dir: str | Path, clip_dir: str | Path,
         llama_type: str = "7B", v_num_heads: int = 16, max_seq_len: int = 512,
         device: str = "cpu", dtype: torch.dtype = torch.float32) -> tuple[LlamaAdapter, Any]:
    """Build LLaMA-Adapter from an adapter .pth, a Meta-format LLaMA and a local CLIP folder.

    Layout: `<llama_dir>/<llama_type>/{consolidated.00.pth,params.json}`,
    `<llama_dir>/tokenizer.model`; `clip_dir` as `openai/clip-vit-large-patch14` saves it.
    """
    import sentencepiece as spm
    from transformers import CLIPModel

    llama_dir = Path(llama_dir)
    layout = (f"expected {llama_dir}/{llama_type}/consolidated.00.pth, "
              f"{llama_dir}/{llama_type}/params.json and {llama_dir}/tokenizer.model "
              "(LLaMA-1 in Meta's format)")
    params_path = _need(llama_dir / llama_type / "params.json", layout)
    shards = sorted((llama_dir / llama_type).glob("consolidated.*.pth"))
    if not shards:
        raise PipelineError(f"no consolidated.00.pth in {llama_dir / llama_type}; {layout}")
    if len(shards) > 1:
        raise PipelineError(f"{llama_dir / llama_type} holds {len(shards)} model-parallel "
                            "shards; LLaMA-Adapter V2 multimodal uses the single-file 7B")
    tok_path = _need(llama_dir / "tokenizer.model", layout)
    ckpt_path = _need(Path(checkpoint), "the LLaMA-Adapter checkpoint (BIAS-7B.pth, "
                      "LORA-BIAS-7B.pth, CAPTION-7B.pth or LORA-BIAS-7B-v21.pth)")
    if not (Path(clip_dir) / "config.json").is_file():
        raise PipelineError(f"no CLIP ViT-L/14 at {clip_dir}; download it with "
                            f"`huggingface-cli download openai/clip-vit-large-patch14 "
                            f"--local-dir {clip_dir}`")
    ckpt = _torch_load(ckpt_path)
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise PipelineError(f"{ckpt_path} is not a LLaMA-Adapter checkpoint (no 'model' entry)")
    cfg = ckpt.get("config", {})
    adapter_sd = ckpt["model"]
    try:
        params = json.loads(params_path.read_text())
    except json.JSONDecodeError as exc:
        raise PipelineError(f"{params_path} is not valid JSON ({exc})") from exc
    tokenizer = spm.SentencePieceProcessor(model_file=str(tok_path))
    w_bias, w_lora = bool(cfg.get("w_bias", False)), bool(cfg.get("w_lora", False))
    llama_args = LlamaArgs(dim=params["dim"], n_layers=params["n_layers"],
                           n_heads=params["n_heads"], vocab_size=tokenizer.vocab_size(),
                           multiple_of=params.get("multiple_of", 256),
                           norm_eps=params.get("norm_eps", 1e-6), w_bias=w_bias, w_lora=w_lora,
                           lora_rank=int(cfg.get("lora_rank", 16)), w_new_gate=w_lora,
                           max_seq_len=max_seq_len)
    try:
        query_len = adapter_sd["visual_query.weight"].shape[0]
        visual = VisualArgs(
            clip_dim=adapter_sd["clip_proj.weight"].shape[1],
            v_embed_dim=adapter_sd["clip_proj.weight"].shape[0],
            v_depth=len({k.split(".")[1] for k in adapter_sd if k.startswith("visual_blocks.")}),
            v_num_heads=v_num_heads, query_len=query_len,
            query_layer=adapter_sd["adapter_query.weight"].shape[0] // query_len)
    except KeyError as exc:
        raise PipelineError(f"{ckpt_path} lacks {exc.args[0]}; not a LLaMA-Adapter V2 "
                            "multimodal checkpoint") from exc
    expected = expected_adapter_keys(llama_args.n_layers, visual, w_bias, w_lora)
    missing, unexpected = sorted(expected - set(adapter_sd)), sorted(set(adapter_sd) - expected)
    if missing or unexpected:
        parts = ([f"missing {missing[:3]}"] if missing else []) + \
                ([f"unexpected {unexpected[:3]}"] if unexpected else [])
        raise PipelineError(f"{ckpt_path} does not match its config (w_bias={w_bias}, "
                            f"w_lora={w_lora}): {'; '.join(parts)}")
    try:
        clip = CLIPModel.from_pretrained(str(clip_dir))
    except (OSError, ValueError) as exc:
        raise PipelineError(f"cannot load CLIP from {clip_dir} ({exc})") from exc
    del clip.text_model, clip.text_projection  # only the vision tower is used
    if clip.config.projection_dim != visual.clip_dim:
        raise PipelineError(f"{clip_dir} projects to {clip.config.projection_dim} but the "
                            f"adapter expects {visual.clip_dim} (CLIP ViT-L/14: 768)")
    model = LlamaAdapter(llama_args, visual, clip.eval())
    base = {f"llama.{k}": v for k, v in _torch_load(shards[0]).items() if k != "rope.freqs"}
    own = model.state_dict()
    base_expected = {k for k in own if k.startswith("llama.")} - expected
    if set(base) != base_expected:
        diff = sorted(set(base) ^ base_expected)
        raise PipelineError(f"{shards[0]} does not match {params_path} (e.g. {diff[:3]})")
    for key, value in (*base.items(), *adapter_sd.items()):
        if own[key].shape != value.shape:
            raise PipelineError(f"{key}: shape {tuple(value.shape)} in the files, "
                                f"{tuple(own[key].shape)} from params.json/config")
    model.load_state_dict({**base, **adapter_sd}, strict=False)
    return model.to(device=device, dtype=dtype).eval(), tokenizer
