"""Hot paths beside their floors: stage one, the training data path, the student step and
evaluation, per sample, at DELIVER's real 1042 x 1042.

    python benchmarks/hot_paths.py [--frames 8] [--repeats 5] [--official PATH]
                                   [--eval-frames 2] [--eval-repeats 3] [--paths a,b,c,d,e]

Paths (each timed per sample, variants interleaved within every repeat, so drift in the
machine's speed hits them alike; median and min-max over the repeats):
- (a) stage one preprocessing: reading each input file once, hashing and decoding it,
  and preprocessing every modality for its LanguageBind branch (what the decode pool of
  `cache-teacher` does per sample), against the floor: decoding the same files and
  nothing else.
- (b) the training data path: `StudentData[(epoch, i)]` at the DELIVER preset's crop
  (1024), against decoding its files (HHA depth) and nothing else.
- (c) a student step (forward + backward) with every modality present, against the same
  step computed from the encoder's features directly (no scatter into zero tensors).
- (d) evaluation per frame at the official 1024 px with MSS + the 15 MISS subsets and a
  black frame for a missing sensor: the project's `infer` + scoring, against encoding the
  frame's modalities once; broken down into encode, fuse + decode of every subset,
  upsampling the logits and scoring.
- (e) validation items: `StudentData[(-1, i)]` under the official protocol (the 1024 px
  resize of DELIVER's `get_val_augmentation`, then the normalisation), what evaluation
  and validation during training feed the model, against decoding its files.
The PNG decoders themselves are compared in benchmarks/decode.py. For (a), (b) and (e)
the thread's CPU time per sample (`time.thread_time`, "cpu" in the JSON) is recorded
beside the elapsed time: with one torch thread it is what the work costs, nearly
whatever else a shared machine runs.

`--official PATH` runs the official DELIVER loader and transforms (semseg/datasets/
deliver.py, semseg/augmentations_mm.py of github.com/jamycheung/DELIVER) beside (a), (b)
and (e) (its training and validation transforms at 1024): PATH is a checkout of that
repository or its bare git directory (e.g. the mirror the `fetch` tool leaves under
/work/.mirror/jamycheung+DELIVER/repo); the two files are exported to a temporary
folder at run time and nothing of them enters this project. The official
`semseg/__init__.py` imports every model, so the temporary package gets empty `__init__`
files instead, and `einops` (imported, unused by the loader) a stub module
when it is not installed. Without `--official` the column is skipped (and says so).

Frames come from `pipeline make-sample --size 1042` into a temporary folder unless
`--root` names a DELIVER-layout folder. Writes benchmarks/results/hot_paths.json.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from any2seg import datasets
from any2seg.datasets.decode import read_png, recording_digests
from any2seg.synth import SampleSpec, make_sample

MODALITIES = ["rgb", "depth", "event", "lidar"]
TEACHER_BRANCH = {"rgb": "image", "depth": "depth", "event": "image", "lidar": "image"}


def spread(values: list[float]) -> dict[str, float]:
    """Median and min-max of per-sample seconds over the repeats."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def interleaved(variants: dict[str, Callable[[], int]], repeats: int,
                cpu: dict[str, list[float]] | None = None) -> dict[str, list[float]]:
    """Each variant once per repeat, in turn; each returns how many samples it did, so the
    result is seconds per sample, one value per repeat. With `cpu` (a dict), the thread's
    CPU time per sample (`time.thread_time`) is recorded there too: with one torch thread
    it is what the work costs, nearly whatever else the shared machine runs."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    for name in variants:
        if cpu is not None:
            cpu[name] = []
    for _ in range(repeats):
        for name, fn in variants.items():
            start, start_cpu = time.perf_counter(), time.thread_time()
            n = fn()
            times[name].append((time.perf_counter() - start) / n)
            if cpu is not None:
                cpu[name].append((time.thread_time() - start_cpu) / n)
    return times


def timed(variants: dict[str, Callable[[], int]], repeats: int) -> dict[str, Any]:
    """`interleaved` as spreads: wall time per variant, and its CPU time under "cpu"."""
    cpu: dict[str, list[float]] = {}
    wall = interleaved(variants, repeats, cpu)
    return {**{k: spread(t) for k, t in wall.items()},
            "cpu": {k: spread(t) for k, t in cpu.items()}}


def decode_only(records: list[datasets.Record]) -> Callable[[], int]:
    """The floor: every file of every record decoded by the project's decoder, nothing else."""
    def run() -> int:
        for r in records:
            for path in r.files.values():
                read_png(path)
        return len(records)
    return run


# -- (a) stage one -------------------------------------------------------------------
def stage_one(samples: datasets.SampleSequence) -> Callable[[], int]:
    """What the decode pool does per sample on a fresh build (`ShardWorker.prepare` with
    `hash_files`): read each file once, hash and decode it, preprocess every modality
    for its branch at 224 px."""
    from stages.teacher.languagebind import preprocess_depth, preprocess_image
    from stages.teacher.run import model_input

    def run() -> int:
        for i in range(len(samples)):
            with recording_digests():
                sample = samples[i]
            for m, b in TEACHER_BRANCH.items():
                x = model_input(sample, m, b)
                if b == "depth":
                    preprocess_depth(x, 10.0, 224)
                else:
                    preprocess_image(x, 224)
        return len(samples)
    return run


# -- (b) training data path ----------------------------------------------------------
def training_path(samples: datasets.SampleSequence, crop: int) -> Callable[[], int]:
    from stages.student.data import AugmentConfig, StudentData

    data = StudentData(samples, MODALITIES, None, crop, AugmentConfig(), seed=3407)
    epoch = [0]

    def run() -> int:
        for i in range(len(data)):
            data[(epoch[0], i)]
        epoch[0] += 1  # other random draws every repeat, the same for every variant run
        return len(data)
    return run


# -- (e) validation items ------------------------------------------------------------
def validation_path(samples: datasets.SampleSequence) -> Callable[[], int]:
    from stages.student.data import AugmentConfig, StudentData
    from stages.student.protocol import protocol_transform

    data = StudentData(samples, MODALITIES, None, None, AugmentConfig(), 0,
                       transform=protocol_transform("official", samples.name))

    def run() -> int:
        for i in range(len(data)):
            data[(-1, i)]
        return len(data)
    return run


# -- the official DELIVER code, from its public source --------------------------------
def official_package(source: Path, into: Path) -> Path:
    """Export semseg/datasets/deliver.py and semseg/augmentations_mm.py from a checkout or
    a bare git directory into `into`/semseg (with empty package `__init__` files)."""
    files = ["semseg/datasets/deliver.py", "semseg/augmentations_mm.py"]
    pkg = into / "semseg"
    (pkg / "datasets").mkdir(parents=True, exist_ok=True)
    if (source / "semseg" / "datasets" / "deliver.py").is_file():
        for f in files:
            (into / f).write_bytes((source / f).read_bytes())
    else:
        for f in files:
            text = subprocess.run(["git", "--git-dir", str(source), "show", f"HEAD:{f}"],
                                  check=True, capture_output=True).stdout
            (into / f).write_bytes(text)
    (pkg / "__init__.py").write_text("")
    (pkg / "datasets" / "__init__.py").write_text("")
    return into


def official_loaders(source: Path, tmp: Path, root: Path) -> dict[str, Any]:
    """The official DELIVER dataset without transforms (decode), with the training
    transforms at 1024 (configs/deliver_rgbdel.yaml TRAIN.IMAGE_SIZE) and, on the val
    split, the validation transforms at 1024 (EVAL.IMAGE_SIZE)."""
    official_package(source, tmp)
    sys.path.insert(0, str(tmp))
    try:
        import einops  # noqa: F401
    except ImportError:
        sys.modules["einops"] = types.ModuleType("einops")
    deliver = importlib.import_module("semseg.datasets.deliver")
    aug = importlib.import_module("semseg.augmentations_mm")
    modals = ["img", "depth", "event", "lidar"]
    import contextlib
    import io
    with contextlib.redirect_stdout(io.StringIO()):  # it prints how many files it found
        plain = deliver.DELIVER(str(root), "train", None, modals)
        train = deliver.DELIVER(str(root), "train",
                                aug.get_train_augmentation((1024, 1024), seg_fill=255), modals)
        val = deliver.DELIVER(str(root), "val", aug.get_val_augmentation((1024, 1024)), modals)
    return {"plain": plain, "train": train, "val": val}


def loop(dataset: Any, n: int | None = None) -> Callable[[], int]:
    """The first `n` items (default: all) of an official dataset, in order."""
    n = len(dataset) if n is None else min(n, len(dataset))

    def run() -> int:
        for i in range(n):
            dataset[i]
        return n
    return run


# -- (c) the student step ------------------------------------------------------------
def student_step(backbone: str, variant: str, batch: int, crop: int,
                 repeats: int) -> dict[str, list[float]]:
    from stages.student.model import StudentConfig, build_student

    torch.manual_seed(0)
    model = build_student(StudentConfig(backbone=backbone, mff={"variant": variant}),
                          MODALITIES, 25).train()
    g = torch.Generator().manual_seed(0)
    images = torch.randn(batch, len(MODALITIES), 3, crop, crop, generator=g)
    label = torch.randint(0, 25, (batch, crop, crop), generator=g)
    present = torch.ones(batch, len(MODALITIES), dtype=torch.bool)

    def project() -> int:
        out = model(images, present)
        F.cross_entropy(F.interpolate(out.logits, size=(crop, crop), mode="bilinear"),
                        label).backward()
        return 1

    def floor() -> int:  # the encoder's features straight into fusion and the head
        feats = model.encode_all(images)
        logits = model.fuse(feats, present)[0]
        F.cross_entropy(F.interpolate(logits, size=(crop, crop), mode="bilinear"),
                        label).backward()
        return 1

    project()
    floor()
    return interleaved({"project": project, "floor": floor}, repeats)


# -- (d) evaluation ------------------------------------------------------------------
def evaluation(samples: datasets.SampleSequence, backbone: str, variant: str,
               repeats: int) -> dict[str, list[float]]:
    """Per frame at the official 1024 px, black frames for missing sensors, all 15 subsets."""
    from any2seg.metrics import Confusion
    from stages.student.evaluate import evaluation_loader, predict, subsets
    from stages.student.model import StudentConfig, build_student

    torch.manual_seed(0)
    model = build_student(StudentConfig(backbone=backbone, mff={"variant": variant},
                                        missing="black"), MODALITIES, 25).eval()
    batches = list(evaluation_loader(samples, MODALITIES, protocol="official"))
    masks = subsets(len(MODALITIES))
    mask_t = torch.zeros(len(masks), len(MODALITIES), dtype=torch.bool)
    for i, sub in enumerate(masks):
        mask_t[i, list(sub)] = True
    filler: dict[Any, list[torch.Tensor]] = {}
    parts = {"encode": [], "fuse_decode": [], "upsample": [], "score": []}

    @torch.no_grad()
    def project() -> int:
        confusions = [Confusion(25) for _ in masks]
        for b in batches:
            preds = predict(model, b["images"], mask_t, "whole", filler_cache=filler)
            for i in range(len(masks)):
                confusions[i].update(preds[i], b["label"])
        return len(batches)

    @torch.no_grad()
    def encode() -> int:
        for b in batches:
            model.encode_all(b["images"])
        return len(batches)

    @torch.no_grad()
    def breakdown() -> int:
        """The same work as `project`, each part timed on its own."""
        t = dict.fromkeys(parts, 0.0)
        for b in batches:
            images, label = b["images"], b["label"]
            h, w = images.shape[-2:]
            s0 = time.perf_counter()
            feats = model.encode_all(images)
            t["encode"] += time.perf_counter() - s0
            fill_feats = filler[(model.missing, *images.shape[1:])]
            confusion = Confusion(25)
            for i in range(len(masks)):
                s0 = time.perf_counter()
                mask = mask_t[i][None]
                f = [torch.where(mask[:, :, None, None, None], a, z.expand_as(a))
                     for a, z in zip(feats, fill_feats, strict=True)]
                logits = model.decode(f, torch.ones_like(mask))
                s1 = time.perf_counter()
                up = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)
                s2 = time.perf_counter()
                confusion.update(up.argmax(1), label)
                s3 = time.perf_counter()
                t["fuse_decode"] += s1 - s0
                t["upsample"] += s2 - s1
                t["score"] += s3 - s2
        for k, v in t.items():
            parts[k].append(v / len(batches))
        return len(batches)

    project()  # warm-up; fills the filler cache (encoded once per evaluation)
    variants = {"project": project, "encode": encode, "breakdown": breakdown}
    if variant == "author":  # its evaluation runs the head per frame kind, not per subset:
        variants.pop("breakdown")  # the per-subset breakdown would time another path
    times = interleaved(variants, repeats)
    times.pop("breakdown", None)
    return {**times, **{k: v for k, v in parts.items() if v}}


def fmt(s: dict[str, float], unit: float = 1e3) -> str:
    return f"{s['median'] * unit:.1f} ({s['min'] * unit:.1f}-{s['max'] * unit:.1f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, help="a DELIVER-layout folder (default: generate)")
    parser.add_argument("--size", type=int, default=1042)
    parser.add_argument("--frames", type=int, default=8, help="training frames generated")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--official", type=Path, help="DELIVER checkout or bare git dir")
    parser.add_argument("--crop", type=int, default=1024, help="training crop (DELIVER preset)")
    parser.add_argument("--step-batch", type=int, default=2)
    parser.add_argument("--step-crop", type=int, default=256)
    parser.add_argument("--backbone", default="mit_b0")
    parser.add_argument("--variant", default="pixel", help="student.mff.variant")
    parser.add_argument("--eval-frames", type=int, default=2)
    parser.add_argument("--eval-repeats", type=int, default=3)
    parser.add_argument("--val-frames", type=int, default=None,
                        help="validation frames generated for (e) (default: --frames)")
    parser.add_argument("--paths", default="a,b,c,d,e")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/hot_paths.json"))
    args = parser.parse_args()
    paths = set(args.paths.split(","))
    torch.set_num_threads(1)  # one data worker / one rank per core
    result: dict[str, Any] = {"benchmark": "hot_paths", "size": args.size,
                              "repeats": args.repeats, "cpu_count": os.cpu_count(),
                              "machine": platform.machine(), "torch_threads": 1,
                              "load_before": os.getloadavg()[0], "rows": {}}
    rows = result["rows"]
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        root = args.root
        if root is None:
            root = tmp / "sample"
            val_frames = max(args.eval_frames, args.val_frames or args.frames) \
                if "e" in paths else args.eval_frames
            make_sample(root, SampleSpec(size=args.size, train=args.frames,
                                         val=val_frames, test=0))
        teacher = datasets.load("sample", root, "train", modalities=MODALITIES,
                                depth_source="raw")
        student = datasets.load("sample", root, "train", modalities=MODALITIES)
        official = None
        if args.official is not None:
            official = official_loaders(args.official, tmp / "official", root)
        result["frames"] = len(student)
        if "a" in paths:
            v = {"floor": decode_only(teacher.records), "project": stage_one(teacher)}
            if official:
                v["official"] = loop(official["plain"])
            rows["a_stage_one"] = timed(v, args.repeats)
        if "b" in paths:
            v = {"floor": decode_only(student.records),
                 "project": training_path(student, args.crop)}
            if official:
                v["official"] = loop(official["train"])
            rows["b_training_data"] = timed(v, args.repeats)
        if "e" in paths:
            val = datasets.load("sample", root, "val", modalities=MODALITIES)
            val = val[:args.val_frames or args.frames]
            v = {"floor": decode_only(val.records), "project": validation_path(val)}
            if official:
                v["official"] = loop(official["val"], len(val))
            rows["e_validation_data"] = timed(v, args.repeats)
        if "c" in paths:
            rows["c_student_step"] = {k: spread(t) for k, t in student_step(
                args.backbone, args.variant, args.step_batch, args.step_crop,
                args.repeats).items()}
        if "d" in paths:
            val = datasets.load("sample", root, "val", modalities=MODALITIES)
            val = val[:args.eval_frames]
            rows["d_evaluation"] = {k: spread(t) for k, t in evaluation(
                val, args.backbone, args.variant, args.eval_repeats).items()}
    result["load_after"] = os.getloadavg()[0]
    report(result, args, official is not None)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


def report(result: dict[str, Any], args: argparse.Namespace, official: bool) -> None:
    rows = result["rows"]
    print(f"{result['frames']} frames of {args.size} px, {args.repeats} interleaved repeats, "
          f"1 torch thread, {result['cpu_count']} cores, load {result['load_before']:.1f} -> "
          f"{result['load_after']:.1f}; ms per sample, median (min-max)")
    if not official:
        print("official DELIVER column skipped: pass --official PATH (a checkout or bare git "
              "dir of github.com/jamycheung/DELIVER)")
    cpu_lines: list[str] = []
    print("| path | project | floor | x floor | official DELIVER | x official |")
    print("|---|---:|---:|---:|---:|---:|")
    for key, name in (("a_stage_one", "(a) stage one preprocessing vs decoding its files"),
                      ("b_training_data", "(b) training data path vs decoding its files"),
                      ("c_student_step", "(c) student step, all present vs no scatter"),
                      ("e_validation_data", "(e) validation items vs decoding their files")):
        if key not in rows:
            continue
        r = rows[key]
        ratio = r["project"]["median"] / r["floor"]["median"]
        off = r.get("official")
        print(f"| {name} | {fmt(r['project'])} | {fmt(r['floor'])} | {ratio:.2f} | "
              f"{fmt(off) if off else 'skipped'} | "
              f"{r['project']['median'] / off['median']:.2f} |" if off else
              f"| {name} | {fmt(r['project'])} | {fmt(r['floor'])} | {ratio:.2f} | skipped | |")
        r["x_floor"] = round(ratio, 3)
        if off:
            r["x_official"] = round(r["project"]["median"] / off["median"], 3)
        if "cpu" in r:
            c = r["cpu"]
            r["cpu_x_floor"] = round(c["project"]["median"] / c["floor"]["median"], 3)
            line = f"    CPU time: project {fmt(c['project'])}, floor {fmt(c['floor'])} " \
                   f"({r['cpu_x_floor']:.2f}x)"
            if "official" in c:
                r["cpu_x_official"] = round(c["project"]["median"] / c["official"]["median"],
                                            3)
                line += f", official {fmt(c['official'])} ({r['cpu_x_official']:.2f}x)"
            cpu_lines.append(f"{name}: {line.strip()}")
    if cpu_lines:
        print("CPU time of the thread, ms per sample:")
        print("\n".join(cpu_lines))
    if "d_evaluation" in rows:
        r = rows["d_evaluation"]
        ratio = r["project"]["median"] / r["encode"]["median"]
        r["x_encode"] = round(ratio, 3)
        print(f"| (d) evaluation per frame, 1024 px, MSS + 15 MISS vs encoding once | "
              f"{fmt(r['project'])} | {fmt(r['encode'])} | {ratio:.2f} | | |")
        if "fuse_decode" in r:
            print("evaluation breakdown per frame (ms): " + ", ".join(
                f"{k} {fmt(r[k])}" for k in ("encode", "fuse_decode", "upsample", "score")))


if __name__ == "__main__":
    main()
