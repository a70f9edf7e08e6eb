"""Small LanguageBind teachers written in the real on-disk format.

Real LanguageBind weights (1.7 GB per branch) cannot be downloaded offline, so the
embedded default writes `LanguageBind_<Branch>/` folders with a LanguageBind
`config.json`, a `pytorch_model.bin` whose vision encoder is in the old peft LoRA layout,
and CLIP BPE tokenizer files, at small dimensions. The stage-one loader reads them
exactly as it reads the real folders. `write_default_teacher` writes random weights
(fast; tests and benchmarks of the loading path); the embedded default of `make demo`
is fitted on the sample by `stages.teacher.default.fit` and saved with `save_branch`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from transformers import CLIPConfig, CLIPModel

from any2seg.publish import publish
from stages.teacher.checkpoints import BRANCH_FOLDERS

GENERATOR = "any2seg-pipeline default LanguageBind teacher v1"
MANIFEST = "teacher.json"
SPECIALS = ("<|startoftext|>", "<|endoftext|>")
# words whose BPE merges the small vocabulary carries (captions and DELIVER class names)
WORDS = (
    "a", "an", "the", "and", "with", "of", "photo", "street", "scene", "road", "roads",
    "building", "buildings", "sky", "car", "cars", "truck", "trucks", "bus", "buses",
    "vegetation", "trees", "sidewalk", "pedestrian", "pedestrians", "pole", "poles",
    "fence", "wall", "traffic", "sign", "signs", "light", "lights", "terrain", "ground",
    "bridge", "static", "dynamic", "water", "rail", "track", "line", "lines", "other",
    "two", "wheeler", "wheelers", "cloudy", "foggy", "rainy", "sunny", "night", "at",
    "on", "in", "day", "time", "objects", "fences", "walls", "guard", "rails", "tracks",
    "side", "walk",
)


def bytes_to_unicode() -> list[str]:
    """The byte -> printable character table of GPT-2/CLIP byte-level BPE."""
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def clip_vocabulary(words: tuple[str, ...] = WORDS) -> tuple[list[str], list[tuple[str, str]]]:
    """CLIP-style BPE vocabulary and merges covering `words`.

    Layout as CLIP's: 256 byte symbols, the same with `</w>`, then merges, then the
    start/end tokens last (so end-of-text has the largest id, as in CLIP).
    """
    symbols = bytes_to_unicode()
    vocab = symbols + [s + "</w>" for s in symbols]
    known = set(vocab)
    merges: list[tuple[str, str]] = []
    for word in words:
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            pair = (parts[0], parts[1])
            merged = pair[0] + pair[1]
            if merged not in known:
                merges.append(pair)
                vocab.append(merged)
                known.add(merged)
            parts = [merged] + parts[2:]
    return vocab + list(SPECIALS), merges


def write_tokenizer(folder: Path, words: tuple[str, ...] = WORDS) -> int:
    """CLIP tokenizer files (vocab.json, merges.txt, configs); returns the vocabulary size."""
    vocab, merges = clip_vocabulary(words)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)},
                                                  ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" +
                                       "\n".join(f"{a} {b}" for a, b in merges) + "\n")
    special = {"bos_token": SPECIALS[0], "eos_token": SPECIALS[1], "pad_token": SPECIALS[1],
               "unk_token": SPECIALS[1]}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {**special, "tokenizer_class": "CLIPTokenizer", "model_max_length": 77,
         "do_lower_case": True, "errors": "replace"}, indent=2))
    return len(vocab)


def languagebind_config(branch: str, vocab_size: int, hidden: int = 64, layers: int = 2,
                        heads: int = 2, projection: int = 64, patch: int = 32,
                        lora_r: int = 2, lora_alpha: int = 16, image_size: int = 224,
                        max_depth: float = 10) -> dict[str, Any]:
    """A config.json as LanguageBind writes it (model_type, text/vision configs with the
    LanguageBind extras), at small dimensions."""
    name = "LanguageBind" + branch.capitalize()
    eos = vocab_size - 1
    return {
        "architectures": [name],
        "model_type": name,
        "projection_dim": projection,
        "logit_scale_init_value": 2.6592,
        "initializer_factor": 1.0,
        "torch_dtype": "float32",
        "transformers_version": "4.31.0",
        "text_config": {
            "model_type": "clip_text_model", "hidden_size": hidden,
            "intermediate_size": 4 * hidden, "num_hidden_layers": layers,
            "num_attention_heads": heads, "max_position_embeddings": 77,
            "vocab_size": vocab_size, "hidden_act": "gelu", "layer_norm_eps": 1e-5,
            "projection_dim": projection, "bos_token_id": eos - 1, "eos_token_id": eos,
            "pad_token_id": eos, "add_time_attn": False,
        },
        "vision_config": {
            "model_type": "clip_vision_model", "hidden_size": hidden,
            "intermediate_size": 4 * hidden, "num_hidden_layers": layers,
            "num_attention_heads": heads, "image_size": image_size, "patch_size": patch,
            "num_channels": 3, "hidden_act": "gelu", "layer_norm_eps": 1e-5,
            "projection_dim": projection, "add_time_attn": False, "num_frames": 1,
            "force_patch_dropout": 0.0, "lora_r": lora_r, "lora_alpha": lora_alpha,
            "lora_dropout": 0.0, "num_mel_bins": 0.0, "target_length": 0.0,
            "max_depth": max_depth, "video_decode_backend": "decord",
        },
    }


def random_clip_state(config: dict[str, Any], seed: int) -> dict[str, torch.Tensor]:
    """Random CLIP weights for `config` from `seed` (CPU, deterministic)."""
    torch.manual_seed(seed)
    cfg = CLIPConfig(text_config=config["text_config"], vision_config=config["vision_config"],
                     projection_dim=config["projection_dim"])
    model = CLIPModel(cfg)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def to_languagebind_layout(state: dict[str, torch.Tensor], config: dict[str, Any], seed: int,
                           layout: str = "peft-old",
                           lora: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
                           ) -> dict[str, torch.Tensor]:
    """A LanguageBind checkpoint from CLIP weights: base + LoRA A/B in the peft layout.

    Without `lora`, `state` holds the merged weights the loader must reproduce and is
    split into base = W - B @ A * alpha / r with random A, B from `seed`. With `lora`
    (`"layers.{i}.self_attn.q_proj" -> (A, B)`, trained factors), `state` holds the base
    weights and they are written unchanged beside A and B. Layouts: `peft-old`
    (`...q_proj.weight` + `lora_A.default.weight`), `peft-base-layer`
    (`...q_proj.base_layer.weight`), `plain` (no LoRA, lora_r must be 0).
    """
    vc = config["vision_config"]
    r, alpha = int(vc["lora_r"]), float(vc["lora_alpha"])
    gen = torch.Generator().manual_seed(seed + 7919)
    out: dict[str, torch.Tensor] = {}
    prefix = "vision_model.encoder."
    for key, value in state.items():
        if layout == "plain" or not key.startswith(prefix):
            out[key] = value
            continue
        rest = key[len(prefix):]
        module, _, leaf = rest.rpartition(".")
        is_target = module.split(".")[-1] in ("q_proj", "k_proj", "v_proj", "out_proj")
        new_prefix = "vision_model.encoder.base_model.model."
        if not is_target:
            out[new_prefix + rest] = value
            continue
        base_key = (f"{new_prefix}{module}.base_layer.{leaf}" if layout == "peft-base-layer"
                    else f"{new_prefix}{module}.{leaf}")
        if leaf == "bias":
            out[base_key] = value
            continue
        if lora is not None:
            a, b = (t.detach().clone() for t in lora[module])
            out[base_key] = value
        else:
            a = torch.randn(r, value.shape[1], generator=gen) * 0.05
            b = torch.randn(value.shape[0], r, generator=gen) * 0.05
            out[base_key] = value - (b @ a) * (alpha / r)
        out[f"{new_prefix}{module}.lora_A.default.weight"] = a
        out[f"{new_prefix}{module}.lora_B.default.weight"] = b
    # old transformers saved these buffers; real LanguageBind files carry them
    n_pos = (vc["image_size"] // vc["patch_size"]) ** 2 + 1
    out["vision_model.embeddings.position_ids"] = torch.arange(n_pos)[None]
    out["text_model.embeddings.position_ids"] = torch.arange(
        config["text_config"]["max_position_embeddings"])[None]
    return out


def save_branch(folder: Path, config: dict[str, Any], state: dict[str, torch.Tensor], *,
                seed: int = 0, layout: str = "peft-old", weights_format: str = "bin",
                lora: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None) -> None:
    """Write one LanguageBind branch folder (tokenizer, config.json, weights) for `state`
    (see `to_languagebind_layout` for `lora`)."""
    folder.mkdir(parents=True, exist_ok=True)
    write_tokenizer(folder)
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    ckpt = to_languagebind_layout(state, config, seed, layout, lora)
    if weights_format == "safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in ckpt.items()}, str(folder / "model.safetensors"))
    else:
        torch.save(ckpt, folder / "pytorch_model.bin")


def write_checkpoint(folder: Path, branch: str, *, seed: int = 0, layout: str = "peft-old",
                     weights_format: str = "bin", text_seed: int | None = None,
                     **dims: Any) -> dict[str, torch.Tensor]:
    """Write one LanguageBind branch folder with random weights; returns the merged CLIP
    state dict it encodes.

    The text tower comes from `text_seed` (default `seed`), so branches written with one
    `text_seed` share their text tower, as real LanguageBind checkpoints do.
    """
    if layout == "plain":
        dims.setdefault("lora_r", 0)
    config = languagebind_config(branch, len(clip_vocabulary()[0]), **dims)
    state = random_clip_state(config, seed)
    if text_seed is not None:
        text = random_clip_state(config, text_seed)
        for k in state:
            if k.startswith(("text_model.", "text_projection.")):
                state[k] = text[k]
    save_branch(folder, config, state, seed=seed, layout=layout, weights_format=weights_format)
    return state


def write_default_teacher(root: Path | str, seed: int = 0) -> str:
    """`<root>/LanguageBind_Image` and `<root>/LanguageBind_Depth` with random weights;
    "up-to-date" when an identical teacher is already there, else "written"."""
    root = Path(root)
    manifest = {"generator": GENERATOR, "seed": seed, "branches": ["image", "depth"]}
    path = root / MANIFEST
    if path.is_file():
        try:
            if json.loads(path.read_text()) == manifest:
                return "up-to-date"
        except json.JSONDecodeError:
            pass
    tmp = root.parent / f".{root.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    for i, branch in enumerate(("image", "depth")):
        write_checkpoint(tmp / BRANCH_FOLDERS[branch], branch, seed=seed * 1000 + i + 1,
                         text_seed=seed * 1000, lora_r=4 if branch == "image" else 2)
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    publish(tmp, root, (*(BRANCH_FOLDERS[b] for b in ("image", "depth")), MANIFEST))
    return "written"
