"""Reading the official LLaMA-Adapter V2 multimodal files into `LlamaAdapter`.

Follows the official `llama.load` (`llama/llama_adapter.py` of OpenGVLab/LLaMA-Adapter):
bias tuning is always on (`w_bias = phase == "finetune"`, the checkpoint's config
notwithstanding), every `*.pth` of the LLaMA folder is loaded in sorted order, and weights a
checkpoint lacks keep the official initial values. Kept apart from the model so that the
model (and the captioning speed-ups) read without the file formats' error handling.
"""

from __future__ import annotations

import json
import logging
import re
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from any2seg.errors import PipelineError
from stages.teacher.llama_adapter import LlamaAdapter, LlamaArgs, VisualArgs

log = logging.getLogger("pipeline.teacher")


def expected_adapter_keys(n_layers: int, v: VisualArgs, w_bias: bool, w_lora: bool) -> set[str]:
    """The keys an official adapter checkpoint holds (`util/extract_adapter_from_checkpoint.py`
    for BIAS / LORA)."""
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


# Weights whose initial value in the official constructors is fixed, so a checkpoint that
# lacks them still gives the official result: zero biases, gates and LoRA up-projections,
# new_gate one, norms one (LayerNorm bias zero). Everything else starts random there.
_FIXED_INIT = re.compile(
    r"llama\.layers\.\d+\.(attention\.(wq|wo)\.bias|feed_forward\.w[123]\.bias"
    r"|attention\.gate|attention\.new_gate|(attention|feed_forward)\.lora_\w+_l2\.weight"
    r"|attention_norm\.weight|ffn_norm\.weight)"
    r"|llama\.norm\.weight|(clip_proj_norm|visual_proj_norm|visual_blocks\.\d+\.norm[12])"
    r"\.(weight|bias)")


def _keeps_official_value(key: str, missing: set[str]) -> bool:
    if _FIXED_INIT.fullmatch(key):
        return True
    # a LoRA down-projection is irrelevant while its up-projection stays zero
    return key.endswith("_l1.weight") and key.replace("_l1.weight", "_l2.weight") in missing


def _grouped(keys: list[str]) -> str:
    """`llama.layers.*.attention.new_gate (32)` instead of 32 names."""
    groups: dict[str, list[str]] = {}
    for key in keys:
        pattern = re.sub(r"\.(layers|visual_blocks)\.\d+\.", r".\1.*.", "." + key)[1:]
        groups.setdefault(pattern, []).append(key)
    return ", ".join(f"{k} ({len(v)})" if len(v) > 1 else v[0] for k, v in groups.items())


def _need(path: Path, what: str) -> Path:
    if not path.is_file():
        raise PipelineError(f"missing {path}: {what}")
    return path


def _torch_load(path: Path, mmap: bool = False) -> Any:
    import argparse

    try:
        # official training checkpoints (checkpoint-N.pth) carry their argparse.Namespace
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True,
                              mmap=mmap and zipfile.is_zipfile(path))
    except Exception as exc:  # noqa: BLE001
        raise PipelineError(f"cannot read {path} ({type(exc).__name__}); the file is corrupt, "
                            "truncated or not a torch checkpoint: download it again") from exc


def base_files(llama_dir: str | Path, llama_type: str = "7B") -> list[Path]:
    """Every `*.pth` of `<llama_dir>/<llama_type>`, sorted: what the official constructor
    loads, one after the other (`sorted(Path(llama_ckpt_dir).glob("*.pth"))`)."""
    return sorted((Path(llama_dir) / llama_type).glob("*.pth"))


def _clip_tower(clip: str | Path) -> nn.Module:
    """A transformers CLIP folder (openai/clip-vit-large-patch14) or OpenAI's own file."""
    from transformers import CLIPModel

    from stages.teacher.openai_clip import vision_tower

    clip = Path(clip)
    if clip.is_file():
        return vision_tower(clip)
    if not (clip / "config.json").is_file():
        raise PipelineError(f"no CLIP ViT-L/14 at {clip}; give OpenAI's ViT-L-14.pt (as "
                            "clip.load caches it in ~/.cache/clip) or a folder from "
                            "`hf download openai/clip-vit-large-patch14 "
                            f"--local-dir {clip}`")
    try:
        model = CLIPModel.from_pretrained(str(clip))
    except (OSError, ValueError) as exc:
        raise PipelineError(f"cannot load CLIP from {clip} ({exc})") from exc
    del model.text_model, model.text_projection  # only the vision tower is used
    return model


# keys of the official model's CLIP that LLaMA-Adapter never uses (its text side minus the
# deleted `clip.transformer`): a full training checkpoint holds them
_CLIP_TEXT = ("positional_embedding", "token_embedding.weight", "ln_final.weight",
              "ln_final.bias", "text_projection", "logit_scale")


def load(checkpoint: str | Path, llama_dir: str | Path, clip: str | Path,
         llama_type: str = "7B", v_num_heads: int = 16, max_seq_len: int = 512,
         device: str = "cpu", dtype: torch.dtype = torch.float32) -> tuple[LlamaAdapter, Any]:
    """Build LLaMA-Adapter from an adapter .pth, a Meta-format LLaMA and a CLIP, as the
    official `llama.load` does (`llama/llama_adapter.py`).

    Layout: `<llama_dir>/<llama_type>/{*.pth,params.json}`, `<llama_dir>/tokenizer.model`;
    `clip`: OpenAI's `ViT-L-14.pt` or a transformers `openai/clip-vit-large-patch14` folder.
    The adapter file may be a released one (`{'model', 'config'}`) or a training
    checkpoint (`{'model', 'optimizer', 'args', ...}`, no config, every weight).
    """
    import sentencepiece as spm

    from stages.teacher.openai_clip import map_visual_state

    llama_dir = Path(llama_dir)
    base_dir = llama_dir / llama_type
    layout = (f"expected {base_dir}/consolidated.00.pth, {base_dir}/params.json and "
              f"{llama_dir}/tokenizer.model (LLaMA-1 in Meta's format)")
    params_path = _need(base_dir / "params.json", layout)
    shards = base_files(llama_dir, llama_type)
    if not shards:
        raise PipelineError(f"no consolidated.00.pth (no *.pth) in {base_dir}; {layout}")
    tok_path = _need(llama_dir / "tokenizer.model", layout)
    ckpt_path = _need(Path(checkpoint), "the LLaMA-Adapter checkpoint (BIAS-7B.pth, "
                      "LORA-BIAS-7B.pth, CAPTION-7B.pth or LORA-BIAS-7B-v21.pth)")
    ckpt = _torch_load(ckpt_path)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict):
        raise PipelineError(f"{ckpt_path} is not a LLaMA-Adapter checkpoint (no 'model' entry)")
    cfg = ckpt.get("config") or {}
    state = ckpt["model"]
    clip_state = {k[len("clip."):]: v for k, v in state.items() if k.startswith("clip.")}
    adapter_sd = {k: v for k, v in state.items() if not k.startswith("clip.")}
    try:
        params = json.loads(params_path.read_text())
    except json.JSONDecodeError as exc:
        raise PipelineError(f"{params_path} is not valid JSON ({exc})") from exc
    tokenizer = spm.SentencePieceProcessor(model_file=str(tok_path))
    # official: `w_bias = phase == "finetune"` overrides the config (phase defaults to
    # finetune); w_lora, lora_rank and w_new_gate (= w_lora) come from the config or default
    w_lora = bool(cfg.get("w_lora", False))
    llama_args = LlamaArgs(dim=params["dim"], n_layers=params["n_layers"],
                           n_heads=params["n_heads"], vocab_size=tokenizer.vocab_size(),
                           multiple_of=params.get("multiple_of", 256),
                           norm_eps=params.get("norm_eps", 1e-5), w_bias=True, w_lora=w_lora,
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
    tower = _clip_tower(clip)
    projection = tower.visual_projection.weight.shape[0]
    if projection != visual.clip_dim:
        raise PipelineError(f"{clip} projects to {projection} but the adapter expects "
                            f"{visual.clip_dim} (CLIP ViT-L/14: 768)")
    model = LlamaAdapter(llama_args, visual, tower.eval())
    own = {k: v for k, v in model.state_dict().items() if not k.startswith("clip.")}
    provided: set[str] = set()

    def put(key: str, value: torch.Tensor, source: Path, target: dict) -> None:
        if target[key].shape != value.shape:
            hint = (" (model-parallel shards of a larger LLaMA hold slices; LLaMA-Adapter "
                    "V2 multimodal is built on the one-file 7B)" if source in shards else "")
            raise PipelineError(f"{source}: {key} has shape {tuple(value.shape)}, "
                                f"{params_path.name}/the adapter imply "
                                f"{tuple(target[key].shape)}{hint}")
        with torch.no_grad():
            target[key].copy_(value)

    for shard in shards:  # loaded in turn, later files win, unknown keys (rope.freqs) skipped
        for key, value in _torch_load(shard, mmap=True).items():
            if f"llama.{key}" in own and isinstance(value, torch.Tensor):
                put(f"llama.{key}", value, shard, own)
                provided.add(f"llama.{key}")
    unexpected = sorted(set(adapter_sd) - set(own))
    clip_weights = map_visual_state(clip_state, str(ckpt_path))
    unexpected += [f"clip.{k}" for k in clip_state
                   if not k.startswith("visual.") and k not in _CLIP_TEXT]
    if unexpected:  # the official load asserts there are none
        raise PipelineError(f"{ckpt_path} has weights LLaMA-Adapter does not have (config "
                            f"w_lora={w_lora}): {_grouped(unexpected)}")
    for key, value in adapter_sd.items():
        put(key, value, ckpt_path, own)
        provided.add(key)
    tower_state = {k: v for k, v in model.state_dict().items() if k.startswith("clip.")}
    for key, value in clip_weights.items():
        if f"clip.{key}" not in tower_state:
            raise PipelineError(f"{ckpt_path} holds a CLIP other than {clip} (its {key} has "
                                "no counterpart); give the CLIP it was trained with")
        put(f"clip.{key}", value, ckpt_path, tower_state)
    missing = set(own) - provided
    random = sorted(k for k in missing if not _keeps_official_value(k, missing))
    if random:
        raise PipelineError(f"{ckpt_path} and {base_dir} lack {_grouped(random)}: the official "
                            "loader would leave them at random initialisation, so the captions "
                            "would be noise; use complete files")
    if missing:
        log.warning("%s lacks %s; as the official load (load_state_dict(strict=False)) they "
                    "keep their initial values (zero biases, gates and LoRA up-projections, "
                    "new_gate 1, norms 1)", ckpt_path, _grouped(sorted(missing)))
    return model.to(device=device, dtype=dtype).eval(), tokenizer
