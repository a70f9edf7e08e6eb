"""`hf`: any local transformers image-to-text / image-text-to-text model (BLIP, LLaVA-style).

Options: `model` (a local folder), `prompt` (text given with the image; empty for pure
captioners such as BLIP), `temperature` (0 = greedy), `top_p`, `max_new_tokens`, `seed`,
`device`, `dtype`. The folder's weights and the settings enter the cache fingerprint.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from any2seg.datasets import Sample
from any2seg.errors import PipelineError
from stages.teacher.captioners import Captioner, register
from stages.teacher.checkpoints import quick_hash


@register
class HFCaptioner(Captioner):
    name = "hf"

    def __init__(self, class_names: Sequence[str], model: str = "", prompt: str = "",
                 temperature: float = 0.0, top_p: float = 0.9, max_new_tokens: int = 40,
                 seed: int = 0, device: str = "auto", dtype: str = "auto") -> None:
        super().__init__(class_names, model=model, prompt=prompt, temperature=temperature,
                         top_p=top_p, max_new_tokens=max_new_tokens, seed=seed)
        if not model:
            raise PipelineError("captioner hf needs --captioner-option model=PATH (a local "
                                "transformers folder, e.g. a downloaded Salesforce/blip-image-"
                                "captioning-base)")
        if not (Path(model) / "config.json").is_file():
            raise PipelineError(f"no transformers model at {model} (config.json missing); "
                                f"download one with `hf download REPO --local-dir "
                                f"{model}`")
        self.device, self.dtype = device, dtype
        self._model: Any = None

    def fingerprint(self) -> dict[str, Any]:
        folder = Path(self.options["model"])
        weights = sorted(p for p in folder.iterdir()
                         if p.suffix in (".safetensors", ".bin") and p.is_file())
        return {"name": self.name, **{k: v for k, v in self.options.items() if k != "model"},
                "model": folder.name, "weights": {p.name: quick_hash(p) for p in weights}}

    def _load(self) -> None:
        import torch
        import transformers
        from transformers import AutoProcessor

        folder = self.options["model"]
        device = self.device if self.device != "auto" else (
            "cuda" if torch.cuda.is_available() else "cpu")
        dtype = torch.bfloat16 if (self.dtype == "auto" and device.startswith("cuda")) else \
            getattr(torch, self.dtype) if self.dtype != "auto" else torch.float32
        self._processor = AutoProcessor.from_pretrained(folder)
        errors = []
        classes = [getattr(transformers, n) for n in ("AutoModelForImageTextToText",
                                                      "AutoModelForVision2Seq")
                   if hasattr(transformers, n)]
        for cls in classes:
            try:
                self._model = cls.from_pretrained(folder, dtype=dtype).to(device).eval()
                break
            except (ValueError, OSError) as exc:
                errors.append(str(exc).splitlines()[0])
        if self._model is None:
            raise PipelineError(f"{folder} is not an image-to-text model transformers can load "
                                f"({'; '.join(errors)})")
        self._device = device
        torch.manual_seed(int(self.options["seed"]))

    def caption(self, samples: Sequence[Sample]) -> list[str]:
        import torch

        if self._model is None:
            self._load()
        # writable uint8 copies (16-bit / float RGB, e.g. MCubeS, through its value range)
        images = [np.array(s.modalities["rgb"]) if s.modalities["rgb"].dtype == np.uint8
                  else np.round(s.unit_image("rgb") * 255).astype(np.uint8) for s in samples]
        prompt = self.options["prompt"]
        kwargs: dict[str, Any] = {"images": images, "return_tensors": "pt", "padding": True}
        if prompt:
            kwargs["text"] = [prompt] * len(images)
        inputs = self._processor(**kwargs).to(self._device)
        t = float(self.options["temperature"])
        gen = {"max_new_tokens": int(self.options["max_new_tokens"]), "do_sample": t > 0}
        if t > 0:
            gen.update(temperature=t, top_p=float(self.options["top_p"]))
        with torch.inference_mode():
            out = self._model.generate(**inputs, **gen)
        if prompt and "input_ids" in inputs and out.shape[1] > inputs["input_ids"].shape[1] and \
                not self._model.config.is_encoder_decoder:
            out = out[:, inputs["input_ids"].shape[1]:]  # decoder-only: drop the prompt
        return [c.strip() for c in self._processor.batch_decode(out, skip_special_tokens=True)]
