"""Tiny LLaMA-Adapter V2 files in the official layouts, written by the tests.

- adapter: `{'model': {...}, 'config': {'w_bias', 'w_lora', 'lora_rank'}}` (.pth)
- LLaMA: `<dir>/7B/consolidated.00.pth` (Meta keys, with `rope.freqs`), `params.json`,
  `<dir>/tokenizer.model` (sentencepiece, bos 1 / eos 2 / unk 0, no pad)
- CLIP: a transformers `CLIPModel` folder, as openai/clip-vit-large-patch14 is saved
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import CLIPConfig, CLIPModel

from stages.teacher.llama_adapter import (
    ALPACA,
    LlamaAdapter,
    LlamaArgs,
    VisualArgs,
    expected_adapter_keys,
)

PARAMS = {"dim": 32, "multiple_of": 16, "n_heads": 4, "n_layers": 3, "norm_eps": 1e-06,
          "vocab_size": -1}
VISUAL = VisualArgs(clip_dim=24, v_embed_dim=16, v_depth=2, v_num_heads=2, query_len=3,
                    query_layer=2)
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
                                   unk_id=0, pad_id=-1, character_coverage=1.0, minloglevel=2)
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


def write_llama_adapter(root: Path, w_lora: bool = False, seed: int = 0,
                        zero_gates: bool = False) -> dict[str, Path]:
    """Everything LLaMA-Adapter needs under `root`; returns the three paths."""
    llama_dir, clip_dir = root / "llama", root / "clip"
    (llama_dir / "7B").mkdir(parents=True, exist_ok=True)
    vocab = write_tokenizer(llama_dir / "tokenizer.model")
    (llama_dir / "7B" / "params.json").write_text(json.dumps(PARAMS))
    write_clip(clip_dir)
    torch.manual_seed(seed)
    args = LlamaArgs(dim=PARAMS["dim"], n_layers=PARAMS["n_layers"], n_heads=PARAMS["n_heads"],
                     vocab_size=vocab, multiple_of=PARAMS["multiple_of"], w_bias=True,
                     w_lora=w_lora, lora_rank=4, w_new_gate=w_lora)
    model = LlamaAdapter(args, VISUAL, clip=None)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for k in state:  # trained adapters have non-zero gates, LoRA and biases
        if k.endswith(("attention.gate", "_l2.weight")) or k.endswith(".bias"):
            state[k] = torch.randn_like(state[k]) * 0.5
        if zero_gates and k.endswith(("attention.gate",)):
            state[k] = torch.zeros_like(state[k])
    adapter_keys = expected_adapter_keys(args.n_layers, VISUAL, True, w_lora)
    adapter = {k: state[k] for k in sorted(adapter_keys)}
    base = {k[len("llama."):]: v for k, v in state.items()
            if k.startswith("llama.") and k not in adapter_keys}
    base["rope.freqs"] = torch.randn(PARAMS["dim"] // PARAMS["n_heads"] // 2)
    torch.save(base, llama_dir / "7B" / "consolidated.00.pth")
    ckpt = root / ("LORA-BIAS-7B.pth" if w_lora else "BIAS-7B.pth")
    torch.save({"model": adapter, "config": {"w_bias": True, "w_lora": w_lora, "lora_rank": 4}},
               ckpt)
    return {"checkpoint": ckpt, "llama_dir": llama_dir, "clip": clip_dir}
