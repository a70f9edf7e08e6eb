"""OpenAI CLIP as LLaMA-Adapter uses it: its preprocessing and its own checkpoint files.

- `clip_transform` is CLIP's `_transform(n_px)` (openai/CLIP `clip/clip.py`): PIL bicubic
  resize of the uint8 image to `n_px` on the short side, centre crop, ToTensor, Normalize,
  value for value (LanguageBind resizes float tensors, which differs by up to 0.4).
- `read_openai_clip` reads the state dict of `ViT-L-14.pt` as `clip.load` caches it (a
  TorchScript archive) without executing any of the archive's code: a restricted
  unpickler builds tensors and plain attribute records only. A plain saved state dict
  (`clip.load`'s fallback) is read with `torch.load(weights_only=True)`.
- `vision_tower` maps OpenAI's `visual.*` keys onto transformers'
  `CLIPVisionModelWithProjection` by an explicit key map, sized as `clip.model.build_model`
  infers the model from the keys.
"""

from __future__ import annotations

import io
import pickle
import re
import zipfile
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from any2seg.errors import PipelineError

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


def clip_transform(img: np.ndarray, n_px: int = 224) -> torch.Tensor:
    """H x W x 3 uint8 -> (3, n_px, n_px) float32, exactly CLIP's `_transform(n_px)` on
    `Image.fromarray(img)`: torchvision's Resize(n_px, BICUBIC) and CenterCrop(n_px) on a
    PIL image are PIL's bicubic resize and a crop at round((size - n_px) / 2)."""
    if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
        raise ValueError(f"expected H x W x 3 uint8, got {img.shape} {img.dtype}")
    image = Image.fromarray(np.ascontiguousarray(img))
    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = n_px, int(n_px * long / short)
    size = (new_short, new_long) if w <= h else (new_long, new_short)
    image = image.resize(size, Image.BICUBIC)
    w, h = image.size
    top, left = int(round((h - n_px) / 2.0)), int(round((w - n_px) / 2.0))
    image = image.crop((left, top, left + n_px, top + n_px)).convert("RGB")
    x = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).contiguous()
    x = x.to(torch.float32).div(255)
    mean = torch.tensor(MEAN, dtype=torch.float32)[:, None, None]
    std = torch.tensor(STD, dtype=torch.float32)[:, None, None]
    return x.sub_(mean).div_(std)


# ---------------------------------------------------------------------------------------
# reading OpenAI's files without running them
# ---------------------------------------------------------------------------------------
_STORAGE_DTYPES = {
    "HalfStorage": torch.float16, "FloatStorage": torch.float32,
    "DoubleStorage": torch.float64, "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64, "IntStorage": torch.int32, "ShortStorage": torch.int16,
    "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
}


class ScriptRecord:
    """An object of a TorchScript class (`__torch__.*`): its attributes, none of its code."""

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, dict):
            self.__dict__.update(state)
        else:
            self.__dict__["_state"] = state


_RECORD_CLASSES: dict[str, type] = {}


def _record_class(name: str) -> type:
    if name not in _RECORD_CLASSES:
        _RECORD_CLASSES[name] = type(name.rsplit(".", 1)[-1], (ScriptRecord,), {})
    return _RECORD_CLASSES[name]


def _rebuild_tensor(storage: torch.Tensor, offset: int, size: tuple, stride: tuple,
                    *_: Any) -> torch.Tensor:
    return torch.as_strided(storage, tuple(size), tuple(stride), offset)


def _rebuild_parameter(data: torch.Tensor, *_: Any) -> torch.Tensor:
    return data


def _same(value: Any, *_: Any) -> Any:
    return value


_ALLOWED = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("collections", "OrderedDict"): OrderedDict,
    ("torch.jit._pickle", "build_intlist"): _same,
    ("torch.jit._pickle", "build_doublelist"): _same,
    ("torch.jit._pickle", "build_boollist"): _same,
    ("torch.jit._pickle", "build_tensorlist"): _same,
    ("torch.jit._pickle", "build_strlist"): _same,
    ("torch.jit._pickle", "restore_type_tag"): _same,
}


class _StorageType:
    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype


class _ArchiveUnpickler(pickle.Unpickler):
    """Builds tensors from the archive's records and `__torch__` objects as plain
    records; any other global is refused, so nothing from the file is executed."""

    def __init__(self, data: bytes, records: zipfile.ZipFile, prefix: str) -> None:
        super().__init__(io.BytesIO(data))
        self.records, self.prefix = records, prefix
        self.storages: dict[str, torch.Tensor] = {}

    def find_class(self, module: str, name: str) -> Any:
        if module == "__torch__" or module.startswith("__torch__."):
            return _record_class(f"{module}.{name}")
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        raise pickle.UnpicklingError(f"refusing {module}.{name}")

    def persistent_load(self, pid: Any) -> torch.Tensor:
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"
                and isinstance(pid[1], _StorageType)):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
        key = str(pid[2])
        if key not in self.storages:
            raw = bytearray(self.records.read(f"{self.prefix}data/{key}"))
            self.storages[key] = torch.frombuffer(raw, dtype=pid[1].dtype) if raw else \
                torch.empty(0, dtype=pid[1].dtype)
        return self.storages[key]


def _walk(obj: ScriptRecord, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    for name, value in vars(obj).items():
        if isinstance(value, torch.Tensor):
            yield prefix + name, value
        elif isinstance(value, ScriptRecord):
            yield from _walk(value, f"{prefix}{name}.")


def _torchscript_prefix(z: zipfile.ZipFile) -> str | None:
    names = set(z.namelist())
    for name in names:
        parts = name.split("/")
        if len(parts) == 2 and parts[1] == "data.pkl" and f"{parts[0]}/constants.pkl" in names:
            return parts[0] + "/"
    return None


def read_openai_clip(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict of an OpenAI CLIP file (`ViT-L-14.pt`), keys as `clip.load` sees them
    (`visual.conv1.weight`, ...). Plain TorchScript tensor attributes come along too."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"missing {path}: OpenAI CLIP checkpoint (ViT-L-14.pt as clip.load "
                            "caches it in ~/.cache/clip)")
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                prefix = _torchscript_prefix(z)
                if prefix is not None:
                    order = prefix + "byteorder"
                    if order in z.namelist() and z.read(order).strip() not in (b"", b"little"):
                        raise PipelineError(f"{path} was written on a big-endian machine")
                    root = _ArchiveUnpickler(z.read(prefix + "data.pkl"), z, prefix).load()
                    if not isinstance(root, ScriptRecord):
                        raise PipelineError(f"{path}: the TorchScript archive holds no module")
                    return {k: v.clone() for k, v in _walk(root)}
        state = torch.load(path, map_location="cpu", weights_only=True)
    except PipelineError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise PipelineError(f"cannot read {path} as an OpenAI CLIP checkpoint "
                            f"({type(exc).__name__}: {exc}); download ViT-L-14.pt again") from exc
    if isinstance(state, Mapping) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, Mapping):
        raise PipelineError(f"{path} is neither a TorchScript archive nor a state dict")
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


# ---------------------------------------------------------------------------------------
# OpenAI keys -> transformers' CLIP vision tower
# ---------------------------------------------------------------------------------------
_BLOCK = re.compile(r"transformer\.resblocks\.(\d+)\.(.+)")
_BLOCK_PARTS = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1",
                "mlp.c_proj": "mlp.fc2", "attn.out_proj": "self_attn.out_proj"}
_TOP = {"conv1.weight": "vision_model.embeddings.patch_embedding.weight",
        "class_embedding": "vision_model.embeddings.class_embedding",
        "positional_embedding": "vision_model.embeddings.position_embedding.weight",
        "ln_pre.weight": "vision_model.pre_layrnorm.weight",
        "ln_pre.bias": "vision_model.pre_layrnorm.bias",
        "ln_post.weight": "vision_model.post_layernorm.weight",
        "ln_post.bias": "vision_model.post_layernorm.bias"}


def map_visual_key(key: str, value: torch.Tensor) -> dict[str, torch.Tensor]:
    """One OpenAI key below `visual.` -> the transformers keys it becomes ({} if unknown).
    `attn.in_proj_*` stacks q, k, v (nn.MultiheadAttention); `proj` is x @ proj."""
    if key in _TOP:
        return {_TOP[key]: value}
    if key == "proj":
        return {"visual_projection.weight": value.t()}
    m = _BLOCK.fullmatch(key)
    if not m:
        return {}
    layer, rest = m.groups()
    p = f"vision_model.encoder.layers.{layer}."
    if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
        kind = rest.rsplit("_", 1)[-1]
        q, k, v = value.chunk(3, dim=0)
        return {f"{p}self_attn.{n}_proj.{kind}": t for n, t in zip("qkv", (q, k, v), strict=True)}
    module, _, param = rest.rpartition(".")
    if module in _BLOCK_PARTS and param in ("weight", "bias"):
        return {f"{p}{_BLOCK_PARTS[module]}.{param}": value}
    return {}


def map_visual_state(state: Mapping[str, torch.Tensor], source: str,
                     prefix: str = "visual.") -> dict[str, torch.Tensor]:
    """All `prefix*` keys mapped; an unknown one is an error naming it."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if not key.startswith(prefix):
            continue
        mapped = map_visual_key(key[len(prefix):], value)
        if not mapped:
            raise PipelineError(f"{source}: unexpected CLIP key {key!r} (not a ViT CLIP "
                                "vision tower key)")
        out.update(mapped)
    return out


def vision_config(state: Mapping[str, torch.Tensor], source: str) -> Any:
    """The tower's size from the keys, as `clip.model.build_model` infers it (heads =
    width // 64, resolution = patch x grid)."""
    from transformers import CLIPVisionConfig

    if "visual.proj" not in state or "visual.conv1.weight" not in state:
        raise PipelineError(f"{source} is not a ViT CLIP (no visual.proj / visual.conv1); "
                            "LLaMA-Adapter V2 uses ViT-L/14 (ViT-L-14.pt)")
    width, _, _, patch = state["visual.conv1.weight"].shape
    layers = len({k.split(".")[3] for k in state if k.startswith("visual.transformer.resblocks.")
                  and k.endswith(".attn.in_proj_weight")})
    grid = round((state["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    return CLIPVisionConfig(
        hidden_size=width, intermediate_size=state["visual.transformer.resblocks.0.mlp.c_fc.weight"]
        .shape[0], num_hidden_layers=layers, num_attention_heads=width // 64,
        image_size=patch * grid, patch_size=patch, projection_dim=state["visual.proj"].shape[1],
        hidden_act="quick_gelu", layer_norm_eps=1e-5)


def vision_tower(path: str | Path) -> torch.nn.Module:
    """transformers' CLIPVisionModelWithProjection holding the weights of an OpenAI file."""
    from transformers import CLIPVisionModelWithProjection

    state = read_openai_clip(path)
    try:
        config = vision_config(state, str(path))
    except KeyError as exc:
        raise PipelineError(f"{path} lacks {exc.args[0]}; not an OpenAI CLIP checkpoint") from exc
    model = CLIPVisionModelWithProjection(config)
    mapped = map_visual_state(state, str(path))
    own = model.state_dict()
    missing = sorted(set(own) - set(mapped) - {"vision_model.embeddings.position_ids"})
    if missing:
        raise PipelineError(f"{path} lacks CLIP weights (e.g. {missing[:3]})")
    for key, value in mapped.items():
        if own[key].shape != value.shape:
            raise PipelineError(f"{path}: {key} has shape {tuple(value.shape)}, the tower "
                                f"inferred from the file expects {tuple(own[key].shape)}")
    model.load_state_dict(mapped, strict=False)
    round_as_clip_load(model)
    return model.eval()


def round_as_clip_load(tower: torch.nn.Module) -> None:
    """`clip.load` builds CLIP with `convert_weights` (float16 conv, linear and attention
    weights and biases and `proj`) before loading, then `.float()` on CPU: those weights
    hold float16 values. A no-op for OpenAI's files (stored in float16)."""
    with torch.no_grad():
        for name, param in tower.named_parameters():
            if name.startswith("vision_model.") and ("norm" in name or "embeddings.class" in name
                                                     or "position_embedding" in name):
                continue
            if name.startswith(("vision_model.", "visual_projection.")):
                param.copy_(param.to(torch.float16))
