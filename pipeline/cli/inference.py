"""Using a trained student: `pipeline predict` (new frames, any modality subset) and
`pipeline export --format onnx` (one graph per subset, with ONNX Runtime parity checked).

Both read the `eval` group of params.yaml as `pipeline evaluate` does, so a frame is
predicted with the protocol, missing-modality mode and window evaluate would use."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from any2seg.errors import PipelineError
from pipeline.cli.options import (
    ALL,
    CONTEXT,
    DATASET,
    DEVICE,
    MISSING_MODE,
    MODE,
    PROTOCOL,
    ROOT,
    LimitType,
    flags,
)
from pipeline.help_defaults import Tunable

# the modalities of the registered readers (DELIVER and the sample: rgb, depth, event,
# lidar; MCubeS: rgb, aolp, dolp, nir); tests/student/test_predict.py keeps this list complete
INPUT_MODALITIES = ("rgb", "depth", "event", "lidar", "aolp", "dolp", "nir")


def _inputs(f: Any) -> Any:
    for m in reversed(INPUT_MODALITIES):
        f = click.option(f"--{m}", f"input_{m}", type=click.Path(path_type=Path),
                         default=None, help=f"Folder (or text list) of {m} frames.")(f)
    return f


def _eval_options(f: Any) -> Any:
    """The inference settings `pipeline evaluate` takes, read from the same `eval` keys."""
    options = [
        click.option("--dataset", type=DATASET, default=None,
                     help="Dataset whose reader, protocol and colours apply.  [default: the "
                     "checkpoint's]"),
        click.option("--protocol", type=PROTOCOL, default=None,
                     help="official: resize as the dataset's official evaluation (DELIVER: "
                     "1024 short side); native: as stored; null: the dataset's default.",
                     cls=Tunable, key="eval.protocol"),
        click.option("--missing", type=MISSING_MODE, default=None,
                     help="Absent modalities: black frames (MISS), zeros after "
                     "normalisation, or left out of the fusion; null: black under "
                     "--protocol official, else the checkpoint's.", cls=Tunable,
                     key="eval.missing"),
        click.option("--params", "params_path", type=click.Path(path_type=Path),
                     default=None, help="Parameters file (its `eval` group).  [default: "
                     "./params.yaml if present]"),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _eval_config(params_path: Path | None, overrides: dict[str, Any]) -> Any:
    from any2seg.config import Where, build, read_params
    from stages.student.eval_config import EvalConfig

    params, source = read_params(params_path)
    cfg = build(EvalConfig, dict(params.get("eval") or {}), Where("eval", source))
    for key, value in overrides.items():
        if value is not None:
            setattr(cfg, key, value)
    cfg.validate(Where("eval", source, flags(overrides)))
    return cfg


@click.command("predict", context_settings=CONTEXT)
@click.option("--checkpoint", type=click.Path(path_type=Path), required=True,
              help="A student checkpoint, e.g. runs/sample/best.pt.")
@_eval_options
@ROOT
@click.option("--split", default=None, help="Split of --dataset to predict (labels not "
              "needed).", cls=Tunable, key="eval.split")
@click.option("--modalities", default=None, help="With --dataset: the subset to feed, "
              "comma-separated.  [default: every modality of the checkpoint]")
@_inputs
@click.option("--mode", type=MODE, default=None, help="Whole-image or sliding-window "
              "inference.", cls=Tunable, key="eval.mode")
@click.option("--crop", type=int, default=None, help="Sliding-window size.",
              cls=Tunable, key="eval.crop")
@click.option("--stride", type=int, default=None, help="Sliding-window stride.",
              cls=Tunable, key="eval.stride")
@click.option("--limit", type=LimitType(), default=None, help="Predict only the first N (>= 1) "
              "frames; all: every frame.", cls=Tunable, key="eval.limit")
@click.option("--batch-size", type=int, default=1, help="Frames per forward pass (frames of "
              "one size and subset).")
@click.option("--device", type=DEVICE, default="auto", help="auto: cuda when available.")
@click.option("--out", type=click.Path(path_type=Path), default=Path("predictions"),
              help="Folder for labels/, overlays/, probs/ and predictions.json.")
@click.option("--overwrite", is_flag=True, help="Replace the outputs of an existing --out.")
@click.option("--save-logits", is_flag=True, help="Also write each frame's class "
              "probabilities (float16 .npz).")
@click.option("--skip-bad", is_flag=True, help="Skip frames with a missing or unreadable "
              "file (with a warning) instead of stopping.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def predict_cmd(checkpoint: Path, dataset: str | None, protocol: str | None,
                missing: str | None, params_path: Path | None, root: Path | None,
                split: str | None, modalities: str | None, mode: str | None, crop: int | None,
                stride: int | None, limit: int | None, batch_size: int, device: str,
                out: Path, overwrite: bool, save_logits: bool, skip_bad: bool, as_json: bool,
                **inputs: Path | None) -> None:
    """Predict new frames with a trained student, with any subset of its modalities.

    Inputs: a registered data set split (--dataset, --root, --split, --modalities), or one
    folder or file list per modality (--rgb DIR --depth DIR ...) matched by file stem
    (0001.png, or DELIVER's 0001_rgb_front.png). Frames are read, resized and predicted
    exactly as `pipeline evaluate` scores them; every output is written to a temporary
    folder that becomes --out when all frames are done."""
    from any2seg.devices import resolve_device
    from stages.student.predict import load_student
    from stages.student.predict_run import (
        check_out,
        frames_from_dataset,
        frames_from_inputs,
        predict_frames,
    )

    given = {k.removeprefix("input_"): v for k, v in inputs.items() if v is not None}
    if given and (modalities or root or split):
        raise PipelineError("give either per-modality inputs (--rgb DIR ...) or a data set "
                            "split (--root / --split / --modalities), not both")
    cfg = _eval_config(params_path, {"split": split, "protocol": protocol, "mode": mode,
                                     "crop": crop, "stride": stride, "missing": missing,
                                     "limit": limit})
    if limit == ALL:
        cfg.limit = None
    check_out(out, overwrite, list(given.values()))
    student = load_student(checkpoint, resolve_device(device), dataset, cfg)
    if given:
        subset = student.check_subset(list(given))
        frames = frames_from_inputs(given, subset, skip_bad)
        source = {"inputs": {m: str(p) for m, p in given.items()}}
    else:
        from any2seg.config import dataset_root

        wanted = [m.strip() for m in (modalities or "").split(",") if m.strip()]
        subset = student.check_subset(wanted or student.modalities)
        where = dataset_root(student.dataset, root)
        check_out(out, overwrite, [where])
        frames = frames_from_dataset(student, root, cfg.split, subset)
        source = {"dataset": student.dataset, "root": str(where), "split": cfg.split}
    if cfg.limit is not None:
        frames = frames[: cfg.limit]
    click.echo(f"predicting {len(frames)} frames with {', '.join(subset)} "
               f"({student.describe()}) into {out}", err=True)
    summary = predict_frames(student, frames, out, checkpoint=checkpoint,
                             batch_size=batch_size, save_probs=save_logits,
                             skip_bad=skip_bad, progress=True, source=source)
    if as_json:
        click.echo(json.dumps({k: v for k, v in summary.items() if k != "ids"}, indent=2))
    else:
        skipped = f", {len(summary['skipped'])} skipped" if summary["skipped"] else ""
        click.echo(f"predicted {summary['frames']} frames{skipped} "
                   f"({summary['seconds_per_frame']} s/frame on {summary['device']}) into "
                   f"{out}: labels/, overlays/{', probs/' if save_logits else ''} and "
                   "predictions.json")


def _sizes(text: str) -> list[tuple[int, int]]:
    out = []
    for part in text.split(","):
        h, sep, w = part.strip().lower().partition("x")
        if not sep or not h.isdigit() or not w.isdigit() or int(h) < 1 or int(w) < 1:
            raise click.BadParameter(f"expected HxW[,HxW...], got {text!r}",
                                     param_hint="--parity-sizes")
        out.append((int(h), int(w)))
    return out


@click.command("export", context_settings=CONTEXT)
@click.option("--checkpoint", type=click.Path(path_type=Path), required=True,
              help="A student checkpoint, e.g. runs/sample/best.pt.")
@click.option("--format", "fmt", type=click.Choice(["onnx"]), default="onnx",
              help="Export format.")
@click.option("--subset", "subsets", multiple=True, help="Modalities of one graph, "
              "comma-separated (repeat for several graphs; `all`: every non-empty subset).  "
              "[default: every modality of the checkpoint]")
@_eval_options
@ROOT
@click.option("--split", default=None, help="Split the parity frames come from (with "
              "--root).", cls=Tunable, key="eval.split")
@click.option("--parity-frames", type=click.IntRange(min=1), default=2,
              help="Frames (per size, for random inputs) ONNX Runtime is checked on.")
@click.option("--parity-sizes", default="256x256,320x416",
              help="Sizes of the random parity inputs when no --root is given.")
@click.option("--out", type=click.Path(path_type=Path), default=Path("exported"),
              help="Folder for <checkpoint>.<subset>.onnx and <checkpoint>.export.json.")
@click.option("--overwrite", is_flag=True, help="Replace existing exported files.")
@click.option("--json", "as_json", is_flag=True, help="Print the export record as JSON.")
def export_cmd(checkpoint: Path, fmt: str, subsets: tuple[str, ...], dataset: str | None,
               protocol: str | None, missing: str | None, params_path: Path | None,
               root: Path | None, split: str | None, parity_frames: int, parity_sizes: str,
               out: Path, overwrite: bool, as_json: bool) -> None:
    """Export the student to ONNX, one graph per modality subset, and prove it.

    Each graph takes only its subset's frames, normalised as evaluate feeds them
    ((batch, S, 3, H, W), dynamic batch and size), and returns logits at the input size
    (whole-frame inference, the missing-modality mode fixed in the graph). After writing,
    ONNX Runtime runs it on frames of the data set (with --root, through the protocol's
    resize) or random inputs, against PyTorch; a graph beyond the tolerances is removed
    and the command fails."""
    from any2seg.runlock import check_run_folder
    from stages.student.evaluate import subsets as all_subsets
    from stages.student.export import OPSET, export_subsets, random_frames
    from stages.student.predict import load_student

    sizes = _sizes(parity_sizes)
    cfg = _eval_config(params_path, {"split": split, "protocol": protocol,
                                     "missing": missing})
    check_run_folder(out)
    try:
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as exc:
        raise PipelineError(f"pipeline export needs the `export` extra ({exc.name} is not "
                            "installed): pip install 'any2seg-pipeline[export]'") from exc
    student = load_student(checkpoint, "cpu", dataset, cfg)
    mods = student.modalities
    wanted: list[list[str]] = []
    for text in subsets or (",".join(mods),):
        if text.strip() == "all":
            wanted += [[mods[i] for i in s] for s in all_subsets(len(mods))]
        else:
            given = [m.strip() for m in text.split(",") if m.strip()]
            wanted.append(list(student.check_subset(given)))
    if root is not None:
        from stages.student.predict_run import frames_from_dataset, read_frame

        def frames(subset: list[str]) -> list[Any]:
            picked = frames_from_dataset(student, root, cfg.split, tuple(subset))
            index = [mods.index(m) for m in subset]
            return [student.prepare(*read_frame(student, f)).images[index]
                    for f in picked[:parity_frames]]
        where = f"{parity_frames} frames of {student.dataset} {cfg.split}"
    else:
        def frames(subset: list[str]) -> list[Any]:
            return random_frames(student.model, subset, sizes, parity_frames)
        where = "random inputs of " + ", ".join(f"{h}x{w}" for h, w in sizes)
    click.echo(f"exporting {len(wanted)} graph(s) of {checkpoint} at opset {OPSET} "
               f"({student.describe()}); parity on {where}", err=True)
    facts = {"checkpoint": str(checkpoint), "dataset": student.dataset,
             "protocol": student.protocol, "missing": student.missing,
             "modalities": mods, "classes": student.classes,
             "palette": [list(c) for c in student.palette], "parity_inputs": where}
    done = export_subsets(student.model, wanted, out, checkpoint.stem, frames, overwrite,
                          facts=facts)
    if as_json:
        click.echo((out / f"{checkpoint.stem}.export.json").read_text())
        return
    for e in done:
        click.echo(f"{e.path}: {e.parity.line()}")
