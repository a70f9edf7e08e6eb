"""Tiny LLaMA-Adapter V2 files in the official layouts, written by the tests.

- adapter: `{'model': {...}, 'config': {'w_bias', 'w_lora', 'lora_rank'}}` (.pth), or a
  training checkpoint `{'model', 'optimizer', 'epoch', 'args'}` without config
- LLaMA: `<dir>/7B/consolidated.00.pth` (Meta keys, with `rope.freqs`), `params.json`,
  `<dir>/tokenizer.model` (sentencepiece, bos 1 / eos 2 / unk 0, no pad)
- CLIP: a transformers `CLIPModel` folder, as openai/clip-vit-large-patch14 is saved, or
  OpenAI's own `ViT-L-14.pt` format: a TorchScript archive of a module with OpenAI's
  attribute names (`visual.conv1`, `visual.transformer.resblocks.N.attn` as
  nn.MultiheadAttention, ...), weights that `convert_weights` makes float16 stored in
  float16, plus the `input_resolution` / `context_length` / `vocab_size` buffers.

`write_reference_model` writes the model the official code's reference outputs in
tests/fixtures/llama_adapter_reference/ were recorded on (see its README).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import warnings
import zlib
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn
from transformers import CLIPConfig, CLIPModel

from stages.teacher.llama_adapter import (
    ALPACA,
    LlamaAdapter,
    LlamaArgs,
    VisualArgs,
)
from stages.teacher.llama_adapter_checkpoint import expected_adapter_keys

PARAMS = {"dim": 32, "multiple_of": 16, "n_heads": 4, "n_layers": 3, "norm_eps": 1e-06,
          "vocab_size": -1}
VISUAL = VisualArgs(clip_dim=24, v_embed_dim=16, v_depth=2, v_num_heads=2, query_len=3,
                    query_layer=2)
# OpenAI-format CLIP: heads = width // 64 as clip.model.build_model infers them
OPENAI = {"width": 128, "layers": 2, "patch": 16, "resolution": 64, "embed": VISUAL.clip_dim,
          "text_width": 64, "text_layers": 1, "context": 8, "vocab": 50}
CORPUS = [ALPACA.format(instruction="Generate caption of this image"),
          "a foggy street with road, buildings, cars and sky",
          "a rainy street at night with trucks, buses, poles and vegetation",
          "The image shows road, sidewalk, pedestrians and traffic lights."]


def write_tokenizer(path: Path) -> int:
    import sentencepiece as spm

    corpus = path.parent / "corpus.txt"
    corpus.write_text("\n".join(CORPUS * 30) + "\n")
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(path.with_suffix("")),
                                   vocab_size=120, model_type="bpe", bos_id=1, eos_id=2,
                                   unk_id=0, pad_id=-1, character_coverage=1.0, minloglevel=2,
                                   num_threads=1)
    corpus.unlink()
    (path.with_suffix(".vocab")).unlink()
    return spm.SentencePieceProcessor(model_file=str(path)).vocab_size()


def write_clip(folder: Path, seed: int = 0) -> None:
    torch.manual_seed(seed)
    cfg = CLIPConfig(
        text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, vocab_size=100, max_position_embeddings=16,
                         bos_token_id=98, eos_token_id=99, pad_token_id=99),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, image_size=224, patch_size=32),
        projection_dim=VISUAL.clip_dim)
    CLIPModel(cfg).save_pretrained(folder)


# --- OpenAI's CLIP, by its attribute names ------------------------------------------------
class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class ResidualBlock(nn.Module):
    """Pre-norm block, sequence-first as nn.MultiheadAttention expects."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(width, width // 64)
        self.ln_1 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([("c_fc", nn.Linear(width, 4 * width)),
                                              ("gelu", QuickGELU()),
                                              ("c_proj", nn.Linear(4 * width, width))]))
        self.ln_2 = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class Stack(nn.Module):
    def __init__(self, width: int, layers: int) -> None:
        super().__init__()
        self.resblocks = nn.Sequential(*[ResidualBlock(width) for _ in range(layers)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resblocks(x)


class Visual(nn.Module):
    def __init__(self, width: int, layers: int, patch: int, resolution: int, embed: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, patch, patch, bias=False)
        self.class_embedding = nn.Parameter(torch.randn(width) * width ** -0.5)
        self.positional_embedding = nn.Parameter(
            torch.randn((resolution // patch) ** 2 + 1, width) * width ** -0.5)
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = Stack(width, layers)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(torch.randn(width, embed) * width ** -0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """All tokens after ln_post, times proj (what LLaMA-Adapter takes from CLIP)."""
        x = self.conv1(x).flatten(2).transpose(1, 2)
        cls = self.class_embedding.expand(x.shape[0], 1, -1)
        x = self.ln_pre(torch.cat([cls, x], dim=1) + self.positional_embedding)
        x = self.transformer(x.transpose(0, 1)).transpose(0, 1)
        return self.ln_post(x) @ self.proj


class OpenAIClip(nn.Module):
    def __init__(self, o: dict) -> None:
        super().__init__()
        self.visual = Visual(o["width"], o["layers"], o["patch"], o["resolution"], o["embed"])
        self.transformer = Stack(o["text_width"], o["text_layers"])
        self.token_embedding = nn.Embedding(o["vocab"], o["text_width"])
        self.positional_embedding = nn.Parameter(torch.randn(o["context"], o["text_width"]))
        self.ln_final = nn.LayerNorm(o["text_width"])
        self.text_projection = nn.Parameter(torch.randn(o["text_width"], o["embed"]))
        self.logit_scale = nn.Parameter(torch.tensor(4.6052))
        for name in ("input_resolution", "context_length", "vocab_size"):
            self.register_buffer(name, torch.tensor({"input_resolution": o["resolution"],
                                                     "context_length": o["context"],
                                                     "vocab_size": o["vocab"]}[name]))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.visual(image)


def _float16_parameters(model: nn.Module) -> list[nn.Parameter]:
    """What `clip.model.convert_weights` turns float16: conv/linear weights and biases,
    attention in-projections, `proj` and `text_projection`."""
    out = []
    for module in model.modules():
        if isinstance(module, nn.Conv2d | nn.Linear):
            out += [p for p in (module.weight, module.bias) if p is not None]
        if isinstance(module, nn.MultiheadAttention):
            out += [module.in_proj_weight, module.in_proj_bias]
    return out + [model.visual.proj, model.text_projection]


def seeded_value(key: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """A weight drawn from its own generator (seed and key): the tiny models do not depend on
    the order or kind of the modules' own initialisers (which library versions change).
    Norms near 1, biases and gates small but non-zero, matrices scaled by their fan-in."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(key.encode()))
    x = torch.randn(shape, generator=g)
    parts = key.split(".")
    if any("norm" in part or part.startswith("ln_") for part in parts[:-1]):
        return 1 + 0.1 * x if parts[-1] == "weight" else 0.1 * x
    if parts[-1] == "gate":  # tanh(gate) far from 0: the image matters
        return 2.0 * x
    if parts[-1] == "new_gate" or parts[-1] == "bias" or parts[-1].endswith("_bias"):
        return 0.5 * x
    if parts[-1] == "logit_scale":
        return torch.full(shape, 4.6052)
    if parts[-1] in ("proj", "text_projection"):  # used as x @ proj: fan-in is dim 0
        return x / shape[0] ** 0.5
    if parts[-1] in ("class_embedding", "positional_embedding"):
        return x / shape[-1] ** 0.5
    if parts[0] in ("visual_query", "adapter_query"):  # small: the image's tokens dominate
        return 0.1 * x
    if parts[-2:] == ["tok_embeddings", "weight"]:
        return x
    if len(shape) >= 2:
        return x / math.prod(shape[1:]) ** 0.5
    return x


def fill(model: nn.Module, seed: int, skip: tuple[str, ...] = ()) -> None:
    with torch.no_grad():
        for key, value in model.state_dict().items():
            if value.is_floating_point() and not key.startswith(skip):
                value.copy_(seeded_value(key, tuple(value.shape), seed))


def openai_clip(seed: int = 0) -> OpenAIClip:
    """The tiny OpenAI-format CLIP in float32, its float16 weights rounded to float16."""
    model = OpenAIClip(OPENAI).eval()
    fill(model, seed)
    with torch.no_grad():
        for p in _float16_parameters(model):
            p.copy_(p.half().float())
    return model


def write_openai_clip(path: Path, seed: int = 0) -> OpenAIClip:
    """`ViT-L-14.pt`'s format (a TorchScript archive); returns the float32 module."""
    model = openai_clip(seed)
    stored = openai_clip(seed)
    with torch.no_grad():
        for p in _float16_parameters(stored):
            p.data = p.data.half()
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit's deprecation notice
        torch.jit.script(stored).save(str(path))
    return model


# --- LLaMA-Adapter ------------------------------------------------------------------------
def _adapter_model(vocab: int, w_lora: bool, seed: int, zero_gates: bool = False) -> dict:
    """A trained-looking LLaMA-Adapter state: non-zero gates, LoRA, biases and norms."""
    args = LlamaArgs(dim=PARAMS["dim"], n_layers=PARAMS["n_layers"], n_heads=PARAMS["n_heads"],
                     vocab_size=vocab, multiple_of=PARAMS["multiple_of"], w_bias=True,
                     w_lora=w_lora, lora_rank=4, w_new_gate=w_lora)
    model = LlamaAdapter(args, VISUAL, clip=None)
    fill(model, seed)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if zero_gates:
        state.update({k: torch.zeros_like(v) for k, v in state.items()
                      if k.endswith("attention.gate")})
    return state


def _write_llama(llama_dir: Path, state: dict, adapter_keys: set[str]) -> None:
    base = {k[len("llama."):]: v for k, v in state.items()
            if k.startswith("llama.") and k not in adapter_keys}
    base["rope.freqs"] = seeded_value("rope.freqs", (PARAMS["dim"] // PARAMS["n_heads"] // 2,), 0)
    torch.save(base, llama_dir / "7B" / "consolidated.00.pth")


def write_llama_adapter(root: Path, w_lora: bool = False, seed: int = 0,
                        zero_gates: bool = False, clip: str = "hf") -> dict[str, Path]:
    """Everything LLaMA-Adapter needs under `root`; returns the three paths. `clip`: "hf"
    (a transformers folder) or "openai" (ViT-L-14.pt)."""
    llama_dir = root / "llama"
    (llama_dir / "7B").mkdir(parents=True, exist_ok=True)
    vocab = write_tokenizer(llama_dir / "tokenizer.model")
    (llama_dir / "7B" / "params.json").write_text(json.dumps(PARAMS))
    if clip == "hf":
        clip_path = root / "clip"
        write_clip(clip_path)
    else:
        clip_path = root / "clip" / "ViT-L-14.pt"
        write_openai_clip(clip_path)
    state = _adapter_model(vocab, w_lora, seed, zero_gates)
    adapter_keys = expected_adapter_keys(PARAMS["n_layers"], VISUAL, True, w_lora)
    _write_llama(llama_dir, state, adapter_keys)
    ckpt = root / ("LORA-BIAS-7B.pth" if w_lora else "BIAS-7B.pth")
    torch.save({"model": {k: state[k] for k in sorted(adapter_keys)},
                "config": {"w_bias": True, "w_lora": w_lora, "lora_rank": 4}}, ckpt)
    return {"checkpoint": ckpt, "llama_dir": llama_dir, "clip": clip_path}


# what the reference checkpoints lack that the official strict=False load tolerates
NO_NEW_GATE = "llama.layers.2.attention.new_gate"  # an adapted layer
NO_BIAS = tuple(f"llama.layers.0.{w}.bias" for w in
                ("attention.wq", "attention.wo", "feed_forward.w1", "feed_forward.w2",
                 "feed_forward.w3"))


def write_reference_model(root: Path, seed: int = 0) -> dict[str, Path]:
    """The model the reference outputs were recorded on: one LLaMA, one OpenAI-format CLIP
    and three adapters of one trained state: `BIAS-7B.pth`, `LORA-BIAS-7B.pth` (lacking
    layer 2's new_gate) and `checkpoint-0.pth` (a training checkpoint: no config, every
    weight including CLIP's and LLaMA's, lacking layer 0's biases)."""
    llama_dir = root / "llama"
    (llama_dir / "7B").mkdir(parents=True, exist_ok=True)
    vocab = write_tokenizer(llama_dir / "tokenizer.model")
    (llama_dir / "7B" / "params.json").write_text(json.dumps(PARAMS))
    clip_model = write_openai_clip(root / "clip" / "ViT-L-14.pt", seed)
    state = _adapter_model(vocab, True, seed)
    state["llama.output.weight"][2] *= 1.9  # EOS likelier: some greedy captions end early
    bias_keys = expected_adapter_keys(PARAMS["n_layers"], VISUAL, True, False)
    lora_keys = expected_adapter_keys(PARAMS["n_layers"], VISUAL, True, True)
    _write_llama(llama_dir, state, lora_keys)
    paths = {"llama_dir": llama_dir, "clip": root / "clip" / "ViT-L-14.pt"}
    paths["bias"] = root / "BIAS-7B.pth"
    torch.save({"model": {k: state[k] for k in sorted(bias_keys)},
                "config": {"w_bias": True, "w_lora": False, "lora_rank": 4}}, paths["bias"])
    paths["lora"] = root / "LORA-BIAS-7B.pth"
    torch.save({"model": {k: state[k] for k in sorted(lora_keys - {NO_NEW_GATE})},
                "config": {"w_bias": True, "w_lora": True, "lora_rank": 4}}, paths["lora"])
    clip_state = {f"clip.{k}": v for k, v in clip_model.state_dict().items()
                  if k not in ("input_resolution", "context_length", "vocab_size")
                  and not k.startswith("transformer.")}  # the official model deletes those
    full = {k: v for k, v in state.items() if "lora" not in k and "new_gate" not in k
            and k not in NO_BIAS}
    paths["training"] = root / "checkpoint-0.pth"
    torch.save({"model": {**full, **clip_state}, "optimizer": {"state": {}, "param_groups": []},
                "epoch": 0, "args": argparse.Namespace(lr=0.001, batch_size=4)},
               paths["training"])
    return paths


def fingerprint(paths: dict[str, Path]) -> dict[str, str]:
    """sha256 of every tensor (by key) and of the tokenizer's pieces: what the reference
    outputs depend on, independent of file paths stored inside the files."""
    import sentencepiece as spm

    from stages.teacher.openai_clip import read_openai_clip

    def digest(state: dict) -> str:
        h = hashlib.sha256()
        for k in sorted(state):
            v = state[k]
            if isinstance(v, torch.Tensor):
                h.update(k.encode())
                h.update(v.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
        return h.hexdigest()

    llama_dir = paths["llama_dir"]
    out = {"clip": digest(read_openai_clip(paths["clip"])),
           "llama": digest(torch.load(llama_dir / "7B" / "consolidated.00.pth",
                                      weights_only=True))}
    for name in ("bias", "lora", "training"):
        with torch.serialization.safe_globals([argparse.Namespace]):
            out[name] = digest(torch.load(paths[name], weights_only=True)["model"])
    sp = spm.SentencePieceProcessor(model_file=str(llama_dir / "tokenizer.model"))
    out["tokenizer"] = hashlib.sha256("\n".join(
        sp.id_to_piece(i) for i in range(sp.vocab_size())).encode()).hexdigest()
    return out
