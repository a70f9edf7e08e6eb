"""Pretrained MiT from a local folder in the nvidia/mit-bN hub format, without transformers.

Such a folder (`hf download nvidia/mit-b2 --local-dir DIR`) holds `config.json` (a
`SegformerConfig`: `hidden_sizes`, `depths`, `num_attention_heads`, `patch_sizes`,
`strides`, `sr_ratios`, `mlp_ratios`, `hidden_act`, ...) and `model.safetensors` or
`pytorch_model.bin` from `SegformerForImageClassification`: encoder keys under
`segformer.` in transformers' original names (`segformer.encoder.block.0.0.attention.
self.query.weight`) plus the ImageNet `classifier.*` head, which the encoder ignores.
The names are mapped explicitly to this project's (= transformers 5's) names, as
transformers' own conversion mapping for SegformerModel does; safetensors are read with
`safetensors.torch.load_file`, `.bin` with `torch.load(weights_only=True)` (no code runs).
"""

from __future__ import annotations

import json
import re
from dataclasses import fields
from pathlib import Path

import torch

from any2seg.errors import PipelineError
from stages.student.mit import MIT, MiT, MiTConfig

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
# heads of the hub checkpoints that are not part of the encoder
HEAD_PREFIXES = ("classifier.", "decode_head.")
# transformers' original SegformerModel names -> the current ones (transformers'
# conversion_mapping "SegformerModel"); keys already in the current names pass unchanged
RENAMES = [
    (r"^encoder\.patch_embeddings\.(\d+)\.", r"stages.\1.patch_embeddings."),
    (r"^encoder\.block\.(\d+)\.", r"stages.\1.blocks."),
    (r"^encoder\.layer_norm\.(\d+)\.", r"stages.\1.layer_norm."),
    (r"\.attention\.self\.query\.", ".attention.q_proj."),
    (r"\.attention\.self\.key\.", ".attention.k_proj."),
    (r"\.attention\.self\.value\.", ".attention.v_proj."),
    (r"\.attention\.self\.sr\.", ".attention.sequence_reduction.sequence_reduction."),
    (r"\.attention\.self\.layer_norm\.", ".attention.sequence_reduction.layer_norm."),
    (r"\.attention\.output\.dense\.", ".attention.o_proj."),
    (r"\.mlp\.dense1\.", ".mlp.fc1."),
    (r"\.mlp\.dense2\.", ".mlp.fc2."),
    (r"\.layer_norm_1\.", ".layernorm_before."),
    (r"\.layer_norm_2\.", ".layernorm_after."),
]


def _download_hint(folder: Path, variant: str) -> str:
    return (f"no SegFormer/MiT weights at {folder}; download them with "
            f"`hf download nvidia/mit-{variant} --local-dir {folder}`")


def read_config(folder: Path, variant: str, drop_path_rate: float) -> MiTConfig:
    """The folder's config.json as a MiTConfig, refused unless it is `mit_{variant}`."""
    path = folder / "config.json"
    if not path.is_file():
        raise PipelineError(_download_hint(folder, variant))
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PipelineError(f"cannot read {path} ({exc}); download it again with "
                            f"`hf download nvidia/mit-{variant} --local-dir {folder}`") from exc
    if not isinstance(raw, dict) or raw.get("model_type", "segformer") != "segformer":
        kind = raw.get("model_type") if isinstance(raw, dict) else type(raw).__name__
        raise PipelineError(f"{path} is not a SegFormer/MiT config (model_type {kind!r})")
    known = {f.name for f in fields(MiTConfig)} - {"drop_path_rate"}
    try:
        cfg = MiTConfig(**{k: raw[k] for k in known if k in raw}, drop_path_rate=drop_path_rate)
    except TypeError as exc:
        raise PipelineError(f"{path} is not a SegFormer/MiT config ({exc})") from exc
    hidden, depths = list(cfg.hidden_sizes), list(cfg.depths)
    if (hidden, depths) != (MIT[variant][0], MIT[variant][1]):
        raise PipelineError(f"{folder} holds a MiT with hidden sizes {hidden} and depths "
                            f"{depths}, not mit_{variant}; pass the matching --variant")
    problem = cfg.problem()
    if problem:
        raise PipelineError(f"{path} describes no buildable MiT: {problem}")
    return cfg


def encoder_state(folder: Path, variant: str) -> dict[str, torch.Tensor]:
    """The folder's encoder weights under the current names (heads dropped)."""
    path = next((folder / name for name in WEIGHT_FILES if (folder / name).is_file()), None)
    if path is None:
        raise PipelineError(_download_hint(folder, variant) + f" (config.json is there, but "
                            f"no {' or '.join(WEIGHT_FILES)})")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            raw = load_file(str(path))
        else:
            raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # safetensors, pickle and zip raise their own kinds
        raise PipelineError(f"cannot read MiT weights {path} ({type(exc).__name__}: "
                            f"{str(exc).splitlines()[0] if str(exc) else 'damaged'}); "
                            f"download them again") from exc
    if not isinstance(raw, dict) or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise PipelineError(f"{path} is not a state dict of tensors")
    state = {}
    for key, value in raw.items():
        key = key.removeprefix("segformer.")
        if key.startswith(HEAD_PREFIXES):
            continue
        for pattern, repl in RENAMES:
            key = re.sub(pattern, repl, key)
        state[key] = value
    return state


def load_pretrained_mit(folder: str | Path, variant: str, drop_path_rate: float = 0.1) -> MiT:
    """MiT `variant` ("b0".."b5") with the weights of an nvidia/mit-bN style folder."""
    folder = Path(folder)
    cfg = read_config(folder, variant, drop_path_rate)
    state = encoder_state(folder, variant)
    with torch.device("meta"):  # no random init (nor RNG draws) for weights loaded next
        model = MiT(cfg)
    expected = model.state_dict()
    weights = folder / next(n for n in WEIGHT_FILES if (folder / n).is_file())
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        what = "; ".join(part for part in (
            f"misses {len(missing)} encoder keys (e.g. {missing[0]})" if missing else "",
            f"has {len(unexpected)} unknown keys (e.g. {unexpected[0]})" if unexpected else "",
        ) if part)
        raise PipelineError(f"{weights} is not a mit_{variant} checkpoint: it {what}")
    for key, value in state.items():
        if value.shape != expected[key].shape or not value.is_floating_point():
            raise PipelineError(f"{weights}: {key} is a {tuple(value.shape)} {value.dtype} "
                                f"tensor, mit_{variant} needs {tuple(expected[key].shape)} float")
    # float32 like a randomly initialised student; precision is the train loop's choice
    model.load_state_dict({k: v.to(torch.float32) for k, v in state.items()}, assign=True)
    return model
