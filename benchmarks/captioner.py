"""LLaMA-Adapter captioning throughput: batch 1 (the original's loop) vs batched.

    python benchmarks/captioner.py [--dim 512 --layers 8 --heads 8 --new-tokens 32]

A random-weight LLaMA-Adapter of a small configuration (vocab 32000 like LLaMA, a small
CLIP tower) captions 16 images with the Alpaca captioning prompt, greedy, a fixed number
of new tokens each: once one image at a time (batch 1, KV cache) and once in batches of
8 (left padding, KV cache, adapter keys/values computed once). Tokens/s count generation
time only (the CLIP image encoder costs the same at any batch size and is reported
apart); captions/s are end to end. Target: batch 8 at least 3x the tokens/s of batch 1.
Prints a Markdown table and writes JSON (default benchmarks/results/captioner.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch
from transformers import CLIPConfig, CLIPModel

from stages.teacher.llama_adapter import (
    ALPACA,
    CAPTION_INSTRUCTION,
    LlamaAdapter,
    LlamaArgs,
    VisualArgs,
    generate,
)


def build(dim: int, layers: int, heads: int, device: str, dtype: torch.dtype) -> LlamaAdapter:
    torch.manual_seed(0)
    clip = CLIPModel(CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2),
        vision_config=dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                           num_attention_heads=4, image_size=224, patch_size=14),
        projection_dim=256))
    visual = VisualArgs(clip_dim=256, v_embed_dim=256, v_depth=2, v_num_heads=4,
                        query_len=10, query_layer=layers - 1)
    args = LlamaArgs(dim=dim, n_layers=layers, n_heads=heads, vocab_size=32000, w_bias=True)
    model = LlamaAdapter(args, visual, clip)
    for layer in model.llama.layers:
        layer.attention.gate.data.normal_(0, 0.5)
    return model.to(device=device, dtype=dtype).eval()


def run(model: LlamaAdapter, n: int, batch: int, new_tokens: int) -> dict:
    g = torch.Generator().manual_seed(0)
    p = model.llama.output.weight
    pixels = torch.randn(n, 3, 224, 224, generator=g).to(p.device, p.dtype)
    base = list(range(3, 3 + len(ALPACA.format(instruction=CAPTION_INSTRUCTION).split()) * 2))
    prompts = [[1, *base[: len(base) - i % 5]] for i in range(n)]  # different lengths
    tokens, vision_s, gen_s = 0, 0.0, 0.0
    with torch.inference_mode():
        for i in range(0, n, batch):
            t0 = time.perf_counter()
            visual = model.visual(model.clip_tokens(pixels[i:i + batch]))
            t1 = time.perf_counter()
            out = generate(model, visual, prompts[i:i + batch], new_tokens, eos_id=-1)
            if p.is_cuda:
                torch.cuda.synchronize()
            vision_s += t1 - t0
            gen_s += time.perf_counter() - t1
            tokens += sum(len(t) for t in out)
    seconds = vision_s + gen_s
    return {"batch": batch, "captions": n, "new_tokens": tokens,
            "vision_s": round(vision_s, 2), "generate_s": round(gen_s, 2),
            "tokens_per_s": round(tokens / gen_s, 1), "captions_per_s": round(n / seconds, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--captions", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/captioner.json"))
    args = parser.parse_args()
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    model = build(args.dim, args.layers, args.heads, args.device, dtype)
    run(model, 2, 2, 4)  # warm-up
    rows = [run(model, args.captions, b, args.new_tokens) for b in (1, 8)]
    speedup = rows[1]["tokens_per_s"] / rows[0]["tokens_per_s"]
    print(f"LLaMA dim {args.dim}, {args.layers} layers, {args.heads} heads, vocab 32000, "
          f"{args.device} {str(dtype).removeprefix('torch.')}, {os.cpu_count()} cores")
    print("| batch | captions | new tokens | vision (s) | generation (s) | tokens/s | "
          "captions/s (end to end) |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['batch']} | {r['captions']} | {r['new_tokens']} | {r['vision_s']} | "
              f"{r['generate_s']} | {r['tokens_per_s']} | {r['captions_per_s']} |")
    end_to_end = rows[1]["captions_per_s"] / rows[0]["captions_per_s"]
    print(f"batch 8 / batch 1: generation tokens/s {speedup:.2f}x (target >= 3x), "
          f"captions/s end to end {end_to_end:.2f}x (the CLIP encoder costs the same)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"benchmark": "captioner", "dim": args.dim,
                                    "layers": args.layers, "device": args.device,
                                    "cpu_count": os.cpu_count(), "machine": platform.machine(),
                                    "speedup": round(speedup, 2), "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
