"""`llama-adapter`: LLaMA-Adapter V2 multimodal captions (the paper's captioner).

Options: `checkpoint` (BIAS-7B.pth, LORA-BIAS-7B.pth, CAPTION-7B.pth, LORA-BIAS-7B-v21.pth,
or a training checkpoint), `llama_dir` (Meta-format LLaMA-1 folder with 7B/ and
tokenizer.model), `clip` (OpenAI's ViT-L-14.pt or a local openai/clip-vit-large-patch14
folder), `instruction`, `with_classes` (name the classes present, as the paper prompts with
category names), `temperature` (0 = greedy), `top_p`, `max_new_tokens` (256, the official
`max_gen_len`; a prompt plus generation longer than 512 tokens is shortened to 512 as
officially), `seed`, `bgr` (true by default: upstream's demo, app and training data feed
`Image.fromarray(cv2.imread(...))`, i.e. BGR; false feeds RGB), `device`, `dtype`.
Images go through CLIP's own `_transform` (not LanguageBind's). The model is loaded on the
first batch, once per process.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from any2seg.datasets import Sample
from stages.teacher.captioners import Captioner, register
from stages.teacher.captioners.template import join, natural_name
from stages.teacher.checkpoints import quick_hash


@register
class LlamaAdapterCaptioner(Captioner):
    name = "llama-adapter"

    def __init__(self, class_names: Sequence[str], checkpoint: str = "", llama_dir: str = "",
                 clip: str = "", llama_type: str = "7B",
                 instruction: str = "Generate caption of this image", with_classes: bool = False,
                 temperature: float = 0.1, top_p: float = 0.75, max_new_tokens: int = 256,
                 seed: int = 0, bgr: bool = True, v_num_heads: int = 16, device: str = "auto",
                 dtype: str = "auto") -> None:
        super().__init__(class_names, checkpoint=checkpoint, llama_dir=llama_dir, clip=clip,
                         llama_type=llama_type, instruction=instruction,
                         with_classes=with_classes, temperature=temperature, top_p=top_p,
                         max_new_tokens=max_new_tokens, seed=seed, bgr=bgr,
                         v_num_heads=v_num_heads)
        from any2seg.errors import PipelineError

        for key in ("checkpoint", "llama_dir", "clip"):
            if not self.options[key]:
                raise PipelineError(f"captioner llama-adapter needs --captioner-option {key}=PATH")
        self.device, self.dtype = device, dtype
        self._model: Any = None

    def fingerprint(self) -> dict[str, Any]:
        from stages.teacher.llama_adapter_checkpoint import base_files

        o = self.options
        files = {"checkpoint": Path(o["checkpoint"]),
                 "tokenizer": Path(o["llama_dir"]) / "tokenizer.model"}
        for path in base_files(o["llama_dir"], o["llama_type"]):
            files["llama" if path.name == "consolidated.00.pth" else f"llama/{path.name}"] = path
        clip = Path(o["clip"])
        clip_weights = clip if clip.is_file() else next(
            (clip / n for n in ("model.safetensors", "pytorch_model.bin")
             if (clip / n).is_file()), None)
        if clip_weights is not None:
            files["clip"] = clip_weights
        hashes = {k: quick_hash(p) for k, p in files.items() if p.is_file()}
        keep = {k: v for k, v in o.items() if k not in ("checkpoint", "llama_dir", "clip")}
        return {"name": self.name, **keep, "preprocess": "openai-clip-transform",
                "files": hashes}

    def _load(self) -> None:
        import torch

        from stages.teacher.llama_adapter_checkpoint import load

        device = self.device if self.device != "auto" else (
            "cuda" if torch.cuda.is_available() else "cpu")
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16,
                 "float16": torch.float16, "auto": torch.bfloat16 if device.startswith("cuda")
                 else torch.float32}[self.dtype]
        o = self.options
        self._model, self._tokenizer = load(
            o["checkpoint"], o["llama_dir"], o["clip"], o["llama_type"], o["v_num_heads"],
            device=device, dtype=dtype)
        self._generator = torch.Generator().manual_seed(int(o["seed"]))

    def prompt(self, sample: Sample) -> str:
        from stages.teacher.llama_adapter import ALPACA

        instruction = self.options["instruction"]
        if self.options["with_classes"]:
            present = [natural_name(self.class_names[c]) for c in np.unique(sample.label)
                       if c != 255]
            instruction = f"{instruction}. The image shows {join(present)}."
        return ALPACA.format(instruction=instruction)

    def pixels(self, samples: Sequence[Sample], size: int) -> Any:
        """CLIP's `_transform(size)` of each RGB image, channels reversed first when `bgr`
        (what `Image.fromarray(cv2.imread(path))` gives upstream)."""
        import torch

        from stages.teacher.openai_clip import clip_transform

        images = []
        for s in samples:
            rgb = s.modalities["rgb"]
            if rgb.dtype != np.uint8:  # 16-bit / float RGB: CLIP's transform reads 8 bits
                rgb = np.round(s.unit_image("rgb") * 255).astype(np.uint8)
            images.append(clip_transform(rgb[:, :, ::-1] if self.options["bgr"] else rgb, size))
        return torch.stack(images)

    def caption(self, samples: Sequence[Sample]) -> list[str]:
        import torch

        from stages.teacher.llama_adapter import generate

        if self._model is None:
            self._load()
        model, tok = self._model, self._tokenizer
        param = model.llama.output.weight
        pixels = self.pixels(samples, model.image_size).to(param.device, param.dtype)
        with torch.inference_mode():
            visual = model.visual(model.clip_tokens(pixels))
        prompts = [[tok.bos_id(), *tok.encode(self.prompt(s))] for s in samples]
        new = generate(model, visual, prompts, int(self.options["max_new_tokens"]), tok.eos_id(),
                       float(self.options["temperature"]), float(self.options["top_p"]),
                       self._generator)
        return [tok.decode(t).strip() for t in new]
