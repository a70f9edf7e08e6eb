"""FLOPs of the big computations, counted on CPU: the inputs of the README's estimates.

    python benchmarks/flops.py [--crop 1024] [--out benchmarks/results/flops.json]

Counted with `torch.utils.flop_counter.FlopCounterMode` (matmuls and convolutions, 2 per
multiply-add; norms and element-wise ops are left out, so a floor): one training step of
the DELIVER student (mit_b2, head 768, MFF `author`, 4 modalities, batch 1, forward +
backward), one LanguageBind ViT-L/14 image at 224 px and one CLIP text (77 tokens,
LanguageBind's 12-layer 768 text tower), and a LLaMA-7B decoding step (2 x parameters per
token). Seconds follow only with a GPU's sustained FLOP/s (README: Performance).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode


def count(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--crop", type=int, default=1024)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/flops.json"))
    args = parser.parse_args()
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModel

    from stages.student.model import StudentConfig, build_student

    torch.manual_seed(0)
    model = build_student(StudentConfig(backbone="mit_b2", embed_dim=768,
                                        mff={"variant": "author"}),
                          ["rgb", "depth", "event", "lidar"], 25).train()
    images = torch.randn(1, 4, 3, args.crop, args.crop)
    present = torch.ones(1, 4, dtype=torch.bool)

    def step() -> None:
        model(images, present).logits.float().mean().backward()

    student = count(step)
    vit = CLIPVisionModel(CLIPVisionConfig(hidden_size=1024, intermediate_size=4096,
                                           num_hidden_layers=24, num_attention_heads=16,
                                           patch_size=14, image_size=224)).eval()
    text = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072,
                                        num_hidden_layers=12, num_attention_heads=12)).eval()
    with torch.inference_mode():
        image = count(lambda: vit(pixel_values=torch.randn(1, 3, 224, 224)))
        caption = count(lambda: text(input_ids=torch.zeros(1, 77, dtype=torch.long)))
    llama_params = 6_738_415_616  # LLaMA-1 7B (dim 4096, 32 layers, vocab 32000)
    rows = {"student_train_step_batch1_tflop": student / 1e12,
            "vit_l14_image_gflop": image / 1e9, "clip_text_gflop": caption / 1e9,
            "llama7b_token_gflop": 2 * llama_params / 1e9, "crop": args.crop}
    for k, v in rows.items():
        print(f"{k}: {v:.3f}" if isinstance(v, float) else f"{k}: {v}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"benchmark": "flops", "counter":
                                    "torch.utils.flop_counter (matmul/conv only)",
                                    **rows}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
