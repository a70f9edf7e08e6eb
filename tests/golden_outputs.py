"""Golden outputs for behaviour-preserving moves (issue 29): run before and after a
refactor on the same machine and compare the two JSON files (CPU float results depend on
the machine's kernels, so digests are compared on one machine, never across machines).

Usage: PYTHONPATH=$PWD .venv/bin/python tests/golden_outputs.py OUT.json

Everything goes through the `pipeline` CLI (so the script does not change when modules move),
run with cwd = a fresh temporary folder and relative paths (so paths recorded in stores and
checkpoints are the same on every run):
  1. make-sample (64 px, 8/4/4 frames, 2 frames per scene, seed 3): sha256 of every file;
  2. fit-teacher (tiny fit settings): sha256 of every tensor of each branch's state dict, of
     every other file, and of teacher.json without its run time;
  3. the random embedded default teacher (write_default_teacher, as tests/conftest.py), through
     `python -c` with the import path of before and after move 4;
  4. cache-teacher, every option explicit, twice: plain with the random teacher, and with the
     fitted one and dense codes (codebook:8): sha256 of every array's bytes (+ dtype, shape)
     and of the attrs without the created/updated/last_run times;
  5. train on the dense cache (6 steps, every flag explicit but --pretrained, null in the
     frozen params file; code and decoded-code losses on): sha256 of every tensor of the
     final checkpoint's model / optimizer state dicts, its version/step/best and meta, and the
     dvclive metric rows.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np

warnings.filterwarnings("ignore", message="Object at .* is not recognized")

REPO = Path.cwd()
PY = str(REPO / ".venv" / "bin" / "python")
PIPELINE = str(REPO / ".venv" / "bin" / "pipeline")
ENV = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
       "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

FIT = {"seed": 0, "hidden": 32, "layers": 1, "heads": 2, "projection": 32, "image_size": 32,
       "patch": 16, "max_depth": 80.0, "image_epochs": 2, "branch_epochs": 1, "batch_size": 8,
       "lr": 0.002, "branch_lr": 0.005, "weight_decay": 0.05, "warmup": 0.1,
       "region_weight": 1.0, "caption_views": 0.5, "lora_r": 8, "lora_alpha": 16,
       "image_lora_r": 4, "threads": 1}
BRANCHES = {"rgb": "image", "depth": "depth", "event": "event", "lidar": "lidar"}

# the train / student groups, every key explicit (frozen here, not read from the repo)
PARAMS = {
    "dataset": {"name": "sample", "root": "sample"},
    "teacher": {"fit": FIT, "modality_branch": BRANCHES, "class_prompt": "{}"},
    "student": {"backbone": "mit_b0", "pretrained": None, "embed_dim": 32, "dropout": 0.1,
                "mff": {"variant": "pixel", "reweight": True, "select": True, "residual": True,
                        "iterations": 1},
                "missing": "exclude"},
    "train": {"steps": 6, "batch_size": 2, "crop": 64, "lr": 0.002, "weight_decay": 0.01,
              "warmup": 0.1, "warmup_ratio": 0.1, "power": 0.9, "seed": 7, "workers": 0,
              "modality_dropout": 0.25, "single_modality": False,
              "augment": {"scale": [0.5, 2.0], "flip": True, "jitter": 0.2, "blur": 0.2},
              "loss": {"w_sup": 1.0, "w_cr": 1.0, "w_se": 1.0, "w_teacher_code": 0.5,
                       "w_teacher_decoded": 0.5, "tau_cr": 0.1, "tau_se": 0.1, "ohem": False,
                       "ohem_thresh": 0.7, "ohem_min_fraction": 0.0625,
                       "distill_warmup": 0.0, "se_target": "teacher", "se_features": "fused"},
              "val_every": 3, "val_limit": 2, "val_protocol": None, "checkpoint_every": 3,
              "device": "cpu", "dtype": "float32", "nproc": 1, "compile": False,
              "persistent_workers": False, "prefetch_factor": None},
}

WRITE_TEACHER = """
import sys
try:
    from stages.teacher.default.folders import write_default_teacher
except ImportError:
    from stages.teacher.default_teacher import write_default_teacher
write_default_teacher(sys.argv[1])
"""


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def run(*args: str, cwd: Path) -> str:
    proc = subprocess.run(args, cwd=cwd, env=ENV, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout


def tensors(state, prefix: str = "") -> dict[str, str]:
    """sha256 of every tensor / array in a nested state, with its dtype and shape."""
    import torch

    out: dict[str, str] = {}
    if isinstance(state, torch.Tensor):
        t = state.detach().cpu().contiguous().reshape(-1)
        data = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
        out[prefix] = f"{state.dtype} {tuple(state.shape)} {sha(data)}"
    elif isinstance(state, np.ndarray):
        out[prefix] = f"{state.dtype} {state.shape} {sha(np.ascontiguousarray(state).tobytes())}"
    elif isinstance(state, dict):
        for k in sorted(state, key=str):
            out.update(tensors(state[k], f"{prefix}/{k}"))
    elif isinstance(state, (list, tuple)):
        for i, v in enumerate(state):
            out.update(tensors(v, f"{prefix}[{i}]"))
    else:
        out[prefix] = repr(state)
    return out


def files(folder: Path, skip: tuple[str, ...] = ()) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): sha(p.read_bytes())
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name not in skip}


def teacher_record(folder: Path) -> dict:
    import torch

    rec = files(folder, skip=("pytorch_model.bin", "teacher.json"))
    for p in sorted(folder.rglob("pytorch_model.bin")):
        state = torch.load(p, map_location="cpu", weights_only=True)
        rec.update({f"{p.relative_to(folder).as_posix()}{k}": v
                    for k, v in tensors(state).items()})
    manifest = folder / "teacher.json"
    if manifest.exists():
        m = json.loads(manifest.read_text())
        m.pop("seconds", None)
        rec["teacher.json"] = sha(json.dumps(m, sort_keys=True).encode())
    return rec


def store_record(path: Path) -> dict:
    import zarr

    group = zarr.open_group(str(path), mode="r")
    rec: dict[str, str] = {}

    def walk(g, prefix):
        for name, arr in sorted(g.arrays()):
            a = arr[...]
            # strings (numpy StringDType holds pointers): their values, not the buffer
            data = a.tobytes() if a.dtype.kind in "biuf" else json.dumps(a.tolist()).encode()
            rec[f"{prefix}{name}"] = f"{a.dtype} {a.shape} {sha(data)}"
        for name, sub in sorted(g.groups()):
            walk(sub, f"{prefix}{name}/")

    walk(group, "")
    attrs = {k: v for k, v in group.attrs.asdict().items()
             if k not in ("created", "updated", "last_run")}  # times of the run
    rec["@attrs"] = sha(json.dumps(attrs, sort_keys=True, default=str).encode())
    if os.environ.get("GOLDEN_ATTRS"):
        print(json.dumps(attrs, sort_keys=True, default=str))
    return rec


def checkpoint_record(path: Path) -> dict:
    import torch

    # weights only (the numpy globals for the RNG state of checkpoints before it was a tensor)
    numpy_array = [np._core.multiarray._reconstruct, np.ndarray, np.dtype, np.dtypes.UInt32DType]
    with torch.serialization.safe_globals(numpy_array):
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    name, keys, *rest = ckpt["rng"]["numpy"]  # hashed as the uint32 array numpy returns
    ckpt["rng"]["numpy"] = (name, np.asarray(keys).astype(np.uint32), *rest)
    rec = {f"model{k}": v for k, v in tensors(ckpt["model"]).items()}
    rec.update({f"optimizer{k}": v for k, v in tensors(ckpt["optimizer"]).items()})
    rec.update({f"translators{k}": v for k, v in tensors(ckpt["translators"]).items()})
    rec["version"], rec["step"], rec["best"] = ckpt["version"], ckpt["step"], repr(ckpt["best"])
    rec["meta"] = sha(json.dumps(ckpt["meta"], sort_keys=True, default=str).encode())
    rec["rng"] = sha(json.dumps(tensors(ckpt["rng"]), sort_keys=True).encode())
    return rec


def main(out_json: str) -> None:
    result: dict = {}
    with tempfile.TemporaryDirectory(prefix="golden29-") as tmp:
        work = Path(tmp)
        run(PIPELINE, "make-sample", "--out", "sample", "--size", "64", "--train", "8",
            "--val", "4", "--test", "4", "--frames-per-scene", "2", "--seed", "3",
            "--workers", "1", cwd=work)
        result["sample"] = files(work / "sample")
        (work / "params.yaml").write_text(json.dumps(PARAMS, indent=1))
        run(PIPELINE, "fit-teacher", "--root", "sample", "--out", "fitted", "--seed", "0",
            "--params", "params.yaml", cwd=work)
        result["fitted_teacher"] = teacher_record(work / "fitted")
        run(PY, "-c", WRITE_TEACHER, "teacher", cwd=work)
        result["random_teacher"] = teacher_record(work / "teacher")
        common = ["--dataset", "sample", "--root", "sample", "--split", "train,val,test",
                  "--modalities", "rgb,depth,event,lidar",
                  "--captioner", "template", "--class-prompt", "{}", "--batch-size", "4",
                  "--rows-per-shard", "8", "--device", "cpu", "--dtype", "float16",
                  "--params", "params.yaml"]
        run(PIPELINE, "cache-teacher", *common, "--teacher-root", "teacher", "--modality-branch",
            "rgb=image", "--modality-branch", "depth=depth", "--modality-branch", "event=image",
            "--modality-branch", "lidar=image", "--out", "plain.zarr", cwd=work)
        result["store_plain"] = store_record(work / "plain.zarr")
        run(PIPELINE, "cache-teacher", *common, "--teacher-root", "fitted", "--out", "dense.zarr",
            "--dense",
            "codebook:8", cwd=work)
        result["store_dense"] = store_record(work / "dense.zarr")
        summary = json.loads(run(
            PIPELINE, "train", "--dataset", "sample", "--root", "sample", "--cache", "dense.zarr",
            "--out", "run", "--variant", "mit_b0", "--steps", "6",
            "--batch-size", "2", "--crop", "64", "--lr", "0.002", "--workers", "0", "--device",
            "cpu", "--seed", "7", "--nproc", "1", "--params", "params.yaml", "--json",
            cwd=work))
        summary.pop("seconds", None)
        result["train_summary"] = summary
        result["last.pt"] = checkpoint_record(work / "run" / "last.pt")
        result["best.pt"] = checkpoint_record(work / "run" / "best.pt")
        result["dvclive"] = files(work / "run" / "dvclive" / "plots")
    Path(out_json).write_text(json.dumps(result, indent=1, sort_keys=True))
    digest = sha(json.dumps(result, sort_keys=True).encode())
    print(f"{sum(len(v) if isinstance(v, dict) else 1 for v in result.values())} entries, "
          f"digest {digest}")


if __name__ == "__main__":
    main(sys.argv[1])
