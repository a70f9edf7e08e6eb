"""The `pipeline` command: one entry point for every stage.

User mistakes (bad paths, bad options, broken files) end in one line on stderr and a
non-zero exit; `pipeline --debug ...` shows the traceback instead.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import click

from pipeline import __version__
from pipeline.devices import DEVICE_FORMS, is_device
from pipeline.errors import PipelineError, ReportedError
from pipeline.help_defaults import Tunable

_ARGV: list[str] | None = None  # the command line, for `--nproc` to start it once per rank
CONTEXT = {"show_default": True, "help_option_names": ["-h", "--help"], "max_content_width": 100,
           "terminal_width": 100}


class _OneLineFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"{record.levelname.lower()}: {record.getMessage()}"


def _setup_logging(verbose: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_OneLineFormatter())
    root = logging.getLogger("pipeline")
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    root.propagate = False


class Registered(click.ParamType):
    """A closed set of names read from a registry when they are needed (for `--help` or a
    value to check), so help lists what is registered and start-up imports nothing heavy.

    `accepts` replaces membership for open families such as `cuda:N` or `timm:NAME`."""

    name = "choice"

    def __init__(self, names: Callable[[], Sequence[str]],
                 accepts: Callable[[str], bool] | None = None) -> None:
        self.names = names
        self.accepts = accepts

    def get_metavar(self, param: click.Parameter, ctx: click.Context | None = None) -> str:
        return "[" + "|".join(self.names()) + "]"

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> Any:
        ok = self.accepts(value) if self.accepts else value in self.names()
        if not ok:
            self.fail(f"{value!r} is not one of {', '.join(self.names())}", param, ctx)
        return value


def _datasets() -> list[str]:
    from pipeline import datasets

    return datasets.available()


def _captioners() -> list[str]:
    from stages.teacher import captioners

    return captioners.available()


def _backbones() -> list[str]:
    from stages.student.encoder import backbone_names

    return backbone_names()


def _is_backbone(name: str) -> bool:
    from stages.student.encoder import is_backbone

    return is_backbone(name)


def _store_dtypes() -> list[str]:
    from stages.teacher.run import STORE_DTYPES

    return list(STORE_DTYPES)


def _settings() -> list[str]:
    from stages.student.evaluate import SETTINGS

    return [*SETTINGS, "all"]


def _modes() -> list[str]:
    from stages.student.evaluate import INFERENCE_MODES

    return list(INFERENCE_MODES)


def _protocols() -> list[str]:
    from stages.student.protocol import PROTOCOLS

    return list(PROTOCOLS)


def _missing_modes() -> list[str]:
    from stages.student.model import MISSING_MODES

    return list(MISSING_MODES)


DATASET = Registered(_datasets)
DEVICE = Registered(lambda: DEVICE_FORMS, is_device)


class LimitType(click.ParamType):
    """`--limit N` (>= 1 is checked with the config) or `--limit all`, which overrides a
    params.yaml `eval.limit` with every sample."""

    name = "N|all"

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> Any:
        if value == "all" or value == ALL:
            return ALL
        try:
            return int(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not an integer or all", param, ctx)


ALL = -1  # LimitType's value for `all`


def _flags(overrides: dict[str, Any], aliases: dict[str, str] | None = None) -> dict[str, str]:
    """The flag each overridden config field came from, for errors that name it."""
    aliases = aliases or {}
    return {key: aliases.get(key, "--" + key.replace("_", "-"))
            for key, value in overrides.items() if value is not None}


@click.group(context_settings=CONTEXT)
@click.version_option(__version__, prog_name="any2seg-pipeline")
@click.option("--debug", is_flag=True, help="Show full tracebacks for errors.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """any2seg-pipeline: cache frozen teachers once, then train and evaluate Any2Seg students.

    Start with `pipeline make-sample` for the embedded DELIVER-format sample, then inspect
    it with `pipeline datasets info --dataset sample`.
    """
    from pipeline.progress import quiet_library_bars

    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug
    _setup_logging(debug)
    quiet_library_bars()


# ---------------------------------------------------------------------------------------
# make-sample
# ---------------------------------------------------------------------------------------
@cli.command("make-sample", context_settings=CONTEXT)
@click.option("--out", type=click.Path(path_type=Path), default=Path("data/deliver-sample"),
              help="Folder to write the sample to (DELIVER layout).")
@click.option("--size", type=int, default=256, help="Image side in pixels (square, even).")
@click.option("--train", "n_train", type=int, default=120, help="Training frames.")
@click.option("--val", "n_val", type=int, default=40, help="Validation frames.")
@click.option("--test", "n_test", type=int, default=40, help="Test frames.")
@click.option("--frames-per-scene", type=int, default=4,
              help="Consecutive frames per scene folder (events come from their motion).")
@click.option("--seed", type=int, default=0, help="Seed; the same seed gives the same bytes.")
@click.option("--workers", type=int, default=None,
              help="Worker processes (default: one per CPU core).")
@click.option("--overwrite", is_flag=True,
              help="Replace a sample generated earlier with other settings.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def make_sample_cmd(out: Path, size: int, n_train: int, n_val: int, n_test: int,
                    frames_per_scene: int, seed: int, workers: int | None, overwrite: bool,
                    as_json: bool) -> None:
    """Generate the DELIVER-format sample data set (the embedded default).

    Procedural street scenes with RGB, depth/HHA, events, LiDAR and labels, in every
    weather and sensor-failure case, in the exact DELIVER layout. Does nothing when an
    identical sample is already at --out. `pipeline fit-teacher` then fits the small
    default teacher on it.
    """
    from pipeline import datasets
    from pipeline.progress import progress as progress_bar
    from pipeline.synth import SampleSpec, make_sample

    spec = SampleSpec(size=size, train=n_train, val=n_val, test=n_test,
                      frames_per_scene=frames_per_scene, seed=seed)
    bar = None

    def progress(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = progress_bar(total=total, desc="rendering scenes", unit="scene", leave=False)
        bar.update(done - bar.n)

    try:
        result = make_sample(out, spec, overwrite=overwrite, workers=workers, progress=progress)
    finally:
        if bar is not None:
            bar.close()
    summary = datasets.info("sample", out)
    if as_json:
        click.echo(json.dumps({"make_sample": result, "info": summary}, indent=2))
        return
    if result["status"] == "up-to-date":
        click.echo(f"sample at {out} is up to date (seed {seed}, {size}px); nothing to do")
    else:
        click.echo(f"wrote {summary['total']} samples at {size}x{size} to {out} "
                   f"in {result['seconds']:.1f} s")
    click.echo(_format_info(summary))
    fractions = result.get("class_pixel_fraction", {})
    if fractions:
        top = sorted(fractions.items(), key=lambda kv: -kv[1])
        click.echo(f"classes present: {len(fractions)} of {summary['num_classes']} - " +
                   ", ".join(f"{k} {100 * v:.1f}%" for k, v in top))


# ---------------------------------------------------------------------------------------
# datasets
# ---------------------------------------------------------------------------------------
@cli.group("datasets", context_settings=CONTEXT)
def datasets_group() -> None:
    """Inspect and check data sets (deliver, mcubes, sample, and registered ones)."""


def _dataset_root(dataset: str, root: Path | None) -> Path:
    from pipeline.config import dataset_root

    return dataset_root(dataset, root)


_DATASET = click.option("--dataset", type=DATASET, required=True,
                        help="A registered dataset format.")
_ROOT = click.option("--root", type=click.Path(path_type=Path), default=None,
                     help="Dataset folder (default: the root in configs/datasets/NAME.yaml).")


@datasets_group.command("list", context_settings=CONTEXT)
def datasets_list() -> None:
    """Registered dataset formats with their modalities and class counts."""
    from pipeline import datasets

    for name in datasets.available():
        reader = datasets.get(name)
        click.echo(f"{name:10s} {len(reader.classes):3d} classes  modalities "
                   f"{','.join(reader.modalities):24s} default root {reader.default_root}")


@datasets_group.command("info", context_settings=CONTEXT)
@_DATASET
@_ROOT
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def datasets_info(dataset: str, root: Path | None, as_json: bool) -> None:
    """Counts per split, weather condition and sensor-failure case, and the class list.

    Only indexes files (no decoding), so it is fast on the full data set.
    """
    from pipeline import datasets

    summary = datasets.info(dataset, _dataset_root(dataset, root))
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    else:
        click.echo(_format_info(summary))
        click.echo("classes: " + ", ".join(f"{i} {c}" for i, c in enumerate(summary["classes"])))


@datasets_group.command("check", context_settings=CONTEXT)
@_DATASET
@_ROOT
@click.option("--split", default="train,val,test", help="Comma-separated splits to check.")
def datasets_check(dataset: str, root: Path | None, split: str) -> None:
    """Decode every sample of the splits and list missing, corrupt or mislabelled files.

    Exits with status 1 when anything is wrong; readers' --skip-bad drops exactly these.
    """
    from pipeline import datasets
    from pipeline.datasets.base import as_list, find_undecodable

    reader = datasets.get(dataset)
    root = _dataset_root(dataset, root)
    records = reader.index(root, split, **reader.every_file_options)
    expected = f"; expected {root}/{reader.layout}" if reader.layout else ""
    if not records:
        raise PipelineError(f"no {dataset} samples of {split} under {root}{expected}")
    problems = [f"split {s}: no samples{expected}" for s in as_list(split) or []
                if not any(r.split == s for r in records)]
    complete = []
    for r in records:
        missing = [f"{k} file {p}" for k, p in r.files.items() if not p.is_file()]
        if missing:
            problems.append(f"{r.id}: missing {missing[0]}")
        else:
            complete.append(r)
    problems += [f"{r.id}: {msg}" for r, msg in find_undecodable(complete, reader.decode,
                                                                  dataset)]
    for p in problems:
        click.echo(p)
    click.echo(f"checked {len(records)} samples of {dataset} ({split}) under {root}: "
               f"{len(problems)} bad")
    if problems:
        raise SystemExit(1)


@cli.command("pack", context_settings=CONTEXT)
@_DATASET
@_ROOT
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="The HDF5 file to write.  [default: data/DATASET.h5]")
@click.option("--split", default=None, help="Comma-separated splits to pack.  "
              "[default: all of the dataset's]")
@click.option("--modalities", default=None, help="Comma-separated modalities to pack (the "
              "label always is).  [default: all of the dataset's]")
@click.option("--workers", type=int, default=4, help="Threads reading source files ahead.")
@click.option("--overwrite", is_flag=True,
              help="Replace an output that was packed from other data or settings.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def pack_cmd(dataset: str, root: Path | None, out: Path | None, split: str | None,
             modalities: str | None, workers: int, overwrite: bool, as_json: bool) -> None:
    """Pack a data set folder into one HDF5 file: every file's original bytes.

    Read it anywhere a folder is read: `--dataset DATASET --root data/DATASET.h5`, or
    `dataset.root` in params.yaml; samples decode exactly as from the folder. A rerun on an
    unchanged source does nothing; an output packed from other data is refused.
    """
    from pipeline.pack import pack
    from pipeline.progress import progress as progress_bar

    if workers < 1:
        raise click.BadParameter("must be >= 1", param_hint="--workers")
    root = _dataset_root(dataset, root)
    out = out or Path(f"data/{dataset}.h5")
    bar = None

    def progress(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = progress_bar(total=total, desc=f"packing {dataset}", unit="file")
        bar.update(done - bar.n)

    try:
        report = pack(dataset, root, out, split.split(",") if split else None,
                      modalities.split(",") if modalities else None, overwrite=overwrite,
                      workers=workers, progress=progress)
    finally:
        if bar is not None:
            bar.close()
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    samples = sum(s["samples"] for s in report["splits"].values())
    if report["status"] == "up-to-date":
        click.echo(f"{out} is up to date with {root} ({samples} samples); nothing to do")
    else:
        click.echo(f"packed {samples} samples ({report['files']} files, "
                   f"{report['source_bytes'] / 1e6:.1f} MB) of {dataset} at {root} into {out} "
                   f"({report['bytes'] / 1e6:.1f} MB) in {report['seconds']:.1f} s")
        if report["missing"]:
            click.echo(f"warning: {len(report['missing'])} file(s) the reader expects are "
                       f"missing in {root}, e.g. {report['missing'][0]}; they are missing in "
                       f"the pack too (`pipeline datasets check --dataset {dataset} --root "
                       f"{out}` lists them)")
    for name, s in report["splits"].items():
        click.echo(f"  {name}: {s['samples']} samples, sample-list fingerprint "
                   f"{s['sample_list_fingerprint']}")


def _format_info(summary: dict[str, Any]) -> str:
    """A compact per-split table of counts by condition and case."""
    lines = [f"dataset {summary['dataset']} at {summary['root']} "
             f"({summary['format']} layout, {summary['num_classes']} classes, "
             f"{summary['total']} samples)"]
    splits = summary["splits"]
    conditions = sorted({c for s in splits.values() for c in s.get("conditions", {})})
    cases = list(next(iter(splits.values())).get("cases", {}).keys()) if splits else []
    header = ["split", "samples", *conditions, *cases]
    rows = [header]
    for name, s in splits.items():
        rows.append([name, str(s["samples"]),
                     *(str(s["conditions"].get(c, 0)) for c in conditions),
                     *(str(s["cases"].get(c, 0)) for c in cases)])
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    for r in rows:
        lines.append("  ".join(cell.rjust(w) if i else cell.ljust(w)
                               for i, (cell, w) in enumerate(zip(r, widths, strict=True))))
    for name, s in splits.items():
        if s.get("missing_files"):
            missing = ", ".join(f"{k} {v}" for k, v in s["missing_files"].items())
            lines.append(f"warning: {name} has missing files: {missing} "
                         "(run `pipeline datasets check`)")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# stage one
# ---------------------------------------------------------------------------------------
def _pairs(values: tuple[str, ...], flag: str) -> dict[str, str]:
    out = {}
    for value in values:
        key, sep, val = value.partition("=")
        if not sep or not key or not val:
            raise click.BadParameter(f"expected NAME=VALUE, got {value!r}", param_hint=flag)
        out[key.strip()] = val.strip()
    return out


def _option_value(text: str) -> Any:
    import yaml

    return yaml.safe_load(text)


@cli.command("cache-teacher", context_settings=CONTEXT)
@click.option("--dataset", type=DATASET, default=None, help="Dataset.",
              cls=Tunable, key="dataset.name")
@_ROOT
@click.option("--split", default=None, help="Comma-separated splits to cache.  "
              "[default: train,val,test]")
@click.option("--modalities", default=None,
              help="Comma-separated modalities.  [default: all of the dataset's]")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="The zarr store.  [default: cache/DATASET.zarr]")
@click.option("--teacher-root", default=None, help="Folder with LanguageBind_Image/, "
              "LanguageBind_Depth/ ... (hub folder names), or a hub namespace such as "
              "LanguageBind.", cls=Tunable, key="teacher.root")
@click.option("--captioner", type=Registered(_captioners), default=None,
              help="A registered captioner.", cls=Tunable, key="teacher.captioner")
@click.option("--captioner-option", multiple=True, metavar="KEY=VALUE",
              help="Option for the captioner (repeatable; values are YAML). llama-adapter "
              "feeds BGR by default, as upstream (Image.fromarray(cv2.imread(...))); "
              "bgr=false feeds RGB.")
@click.option("--modality-branch", multiple=True, metavar="MODALITY=BRANCH",
              help="LanguageBind branch for a modality (repeatable); auto: a modality's "
              "own LanguageBind_<Modality>/ when the teacher root has it, else image.",
              cls=Tunable, key="teacher.modality_branch")
@click.option("--class-prompt", default=None,
              help="Prompt for class names, {} is the name.",
              cls=Tunable, key="teacher.class_prompt")
@click.option("--batch-size", type=int, default=None, help="Samples per model batch.",
              cls=Tunable, key="teacher.batch_size")
@click.option("--rows-per-shard", type=int, default=None, help="Rows per zarr shard (the "
              "unit of resume and of scale-out).", cls=Tunable, key="teacher.rows_per_shard")
@click.option("--device", type=DEVICE, default=None, help="auto: cuda when available.",
              cls=Tunable, key="teacher.device")
@click.option("--dtype", type=Registered(_store_dtypes), default=None,
              help="Stored embedding dtype.", cls=Tunable, key="teacher.dtype")
@click.option("--scheduler", default=None, metavar="[local:N|tcp://HOST:PORT]",
              help="local:N for N worker processes, or "
              "tcp://HOST:PORT of a dask.distributed scheduler.",
              cls=Tunable, key="teacher.scheduler")
@click.option("--decode-workers", type=int, default=None,
              help="Threads decoding and preprocessing ahead of the model; 0 = max(4, CPU "
              "cores).", cls=Tunable, key="teacher.decode_workers")
@click.option("--skip-bad", is_flag=True, default=None,
              help="Log and skip samples with missing or broken files.")
@click.option("--overwrite", is_flag=True, default=None,
              help="Rebuild the whole store, recomputing every row.")
@click.option("--repair", is_flag=True, default=None,
              help="Recompute the rows in damaged chunks (see `pipeline cache-verify`); "
              "every other row stays byte-identical.")
@click.option("--on-mismatch", type=click.Choice(["refuse", "rebuild"]), default=None,
              help="A store built with another teacher, sample list, modalities or dtype: "
              "refuse it, or rebuild it (what dvc.yaml runs).  [default: refuse]")
@click.option("--dense", default=None, metavar="codebook:K",
              help="Also store dense targets: a K-code codebook per modality fitted on the "
              "teacher's patch tokens, and each sample's patch codes (teacher-code "
              "compression, not CodeAlign).", cls=Tunable, key="teacher.dense")
@click.option("--params", "params_path", type=click.Path(path_type=Path), default=None,
              help="Parameters file.  [default: ./params.yaml if present]")
@click.option("--json", "as_json", is_flag=True, help="Print the run report as JSON.")
def cache_teacher_cmd(dataset: str | None, root: Path | None, split: str | None,
                      modalities: str | None, out: Path | None, teacher_root: str | None,
                      captioner: str | None, captioner_option: tuple[str, ...],
                      modality_branch: tuple[str, ...], class_prompt: str | None,
                      batch_size: int | None, rows_per_shard: int | None, device: str | None,
                      dtype: str | None, scheduler: str | None, decode_workers: int | None,
                      skip_bad: bool | None, overwrite: bool | None, repair: bool | None,
                      on_mismatch: str | None, dense: str | None, params_path: Path | None,
                      as_json: bool) -> None:
    """Stage one: caption every sample and encode it with LanguageBind into a zarr cache.

    Resumable and content-aware: a rerun computes only rows that are not done or whose
    input files changed since (hashed, remembered by size and mtime), and loads no model
    when nothing is left. Every chunk is checksummed; a damaged store is refused until
    --repair. Settings come from params.yaml (dataset.*, teacher.*) and these flags.
    """
    from pipeline.config import load_params
    from pipeline.progress import progress as progress_bar
    from stages.teacher.run import TeacherConfig, cache_teacher

    if params_path is not None and not params_path.is_file():
        raise PipelineError(f"parameters file {params_path} does not exist")
    params = load_params(params_path)
    overrides: dict[str, Any] = {
        "dataset": dataset, "root": str(root) if root else None,
        "split": split.split(",") if split else None,
        "modalities": modalities.split(",") if modalities else None,
        "out": str(out) if out else None, "teacher_root": teacher_root,
        "captioner": captioner, "class_prompt": class_prompt, "batch_size": batch_size,
        "rows_per_shard": rows_per_shard, "device": device, "dtype": dtype,
        "scheduler": scheduler, "decode_workers": decode_workers, "skip_bad": skip_bad,
        "overwrite": overwrite, "repair": repair, "on_mismatch": on_mismatch, "dense": dense,
        "captioner_options": {k: _option_value(v) for k, v in
                              _pairs(captioner_option, "--captioner-option").items()} or None,
        "modality_branch": _pairs(modality_branch, "--modality-branch") or None,
    }
    cfg = TeacherConfig.from_params(params, overrides, str(params_path or "params.yaml"),
                                    _flags(overrides, {"captioner_options": "--captioner-option"}))
    bar = None
    import time

    begun = time.monotonic()  # the bar appears at the first rows; its time counts from here

    def progress(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = progress_bar(total=total, desc="caching teacher", unit="sample", start=begun)
        bar.update(done - bar.n)

    try:
        report = cache_teacher(cfg, progress)
    finally:
        if bar is not None:
            bar.close()
    if as_json:
        click.echo(json.dumps(report.as_dict(), indent=2))
    elif report.status == "complete":
        click.echo(f"{report.out} is complete ({report.rows} rows, inputs unchanged); "
                   f"nothing to do ({report.seconds:.2f} s)")
    else:
        why = [f"{n} {what}" for n, what in ((report.new_rows, "new"),
                                              (report.changed_rows, "whose inputs changed"),
                                              (report.repaired_rows, "repaired")) if n]
        click.echo(f"{report.out}: computed {report.computed_rows} of {report.rows} rows "
                   f"({', '.join(why) or 'none'}) in {report.seconds:.1f} s "
                   f"({report.samples_per_s:.1f} samples/s)" + _waited(report.as_dict()))


def _waited(run: dict[str, Any] | None) -> str:
    """'; the model waited 12% of the loop for decoding (4 decode workers)', or ''."""
    if not run or not run.get("decode_workers"):
        return ""
    return (f"; the model waited {100 * run['model_waited']:.0f}% of the loop for decoding "
            f"({run['decode_workers']} decode workers)")


@cli.command("fit-teacher", context_settings=CONTEXT)
@click.option("--root", type=click.Path(path_type=Path), default=Path("data/deliver-sample"),
              help="The generated sample to fit on (its train split; quality on val).")
@click.option("--out", type=click.Path(path_type=Path), default=Path("data/sample-teacher"),
              help="Folder for the LanguageBind_<Branch>/ folders and teacher.json.")
@click.option("--seed", type=int, default=None, help="Seed.  [default: teacher.fit.seed]")
@click.option("--overwrite", is_flag=True, help="Fit again even when an identical teacher "
              "is already at --out.")
@click.option("--params", "params_path", type=click.Path(path_type=Path), default=None,
              help="Parameters file: teacher.fit, teacher.modality_branch (one fitted branch "
              "per branch named) and teacher.class_prompt.  [default: ./params.yaml if present]")
@click.option("--json", "as_json", is_flag=True, help="Print teacher.json instead of a table.")
def fit_teacher_cmd(root: Path, out: Path, seed: int | None, overwrite: bool,
                    params_path: Path | None, as_json: bool) -> None:
    """Fit the small default LanguageBind-format teacher on the generated sample.

    Phase 1 trains the image branch CLIP-style on RGB frames and their captions, and class
    prompts against class regions; phase 2 freezes the text tower and trains a LoRA branch
    for depth (and event and LiDAR when teacher.modality_branch gives them their own).
    Deterministic for a seed, about 2 minutes on 2 CPU cores; prints the quality on val
    beside chance. Does nothing when an identical teacher is already at --out.
    """
    from pipeline.config import build, load_params
    from stages.teacher.default.config import FitConfig
    from stages.teacher.default.fit import fit_default_teacher
    from stages.teacher.default.quality import format_quality
    from stages.teacher.run import TeacherConfig

    if params_path is not None and not params_path.is_file():
        raise PipelineError(f"parameters file {params_path} does not exist")
    params = load_params(params_path)
    source = str(params_path or "params.yaml")
    fit = dict((params.get("teacher") or {}).get("fit") or {})
    if seed is not None:
        fit["seed"] = seed
    cfg = build(FitConfig, fit, f"{source} (teacher.fit)")
    teacher = TeacherConfig.from_params(params, {"dataset": "sample", "root": str(root)}, source)
    result = fit_default_teacher(root, out, cfg, teacher.branch_map(fitting=True),
                                 teacher.class_prompt, overwrite=overwrite)
    record = result.manifest
    if as_json:
        click.echo(json.dumps(record, indent=2))
        return
    if result.status == "up-to-date":
        click.echo(f"the default teacher at {out} is up to date; nothing to do")
    else:
        click.echo(f"fitted the default teacher ({', '.join(record['manifest']['branches'])}) "
                   f"in {result.seconds:.0f} s into {out}")
    click.echo(format_quality(record["quality"], record.get("random_init_quality")))


@cli.command("cache-info", context_settings=CONTEXT)
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def cache_info_cmd(path: Path, as_json: bool) -> None:
    """What a teacher cache holds: rows, done fraction, dims, dtype, fingerprints, size."""
    from pipeline.store import describe

    info = describe(path)
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    click.echo(f"{info['path']}: {info['done']}/{info['rows']} rows done "
               f"({100 * info['done_fraction']:.1f}%), dim {info['dim']} {info['dtype']}, "
               f"modalities {', '.join(info['modalities'])}, {info['classes']} classes")
    click.echo(f"size {info['size_bytes'] / 1e6:.2f} MB in {info['files']} files, "
               f"{info['rows_per_shard']} rows per shard, schema v{info['schema_version']}, "
               f"updated {info['updated']}")
    if info.get("last_run"):
        run = info["last_run"]
        click.echo(f"last run: {run['rows']} rows, model busy {100 * run['model_busy']:.0f}%"
                   + _waited(run))
    skipped = f", {info['skipped']} samples skipped as bad" if info["skipped"] else ""
    click.echo(f"dataset fingerprint {info['dataset_fingerprint']} (sample list "
               f"{info['sample_list_fingerprint']}{skipped}); every chunk checksum verified")
    click.echo("teacher fingerprint " + json.dumps(info["teacher_fingerprint"], sort_keys=True))
    dense = info.get("dense")
    if dense:
        b = dense["bytes_per_sample"]
        click.echo(f"dense codes: K={dense['k']}, {dense['grid'][0]}x{dense['grid'][1]} patches "
                   f"per modality; per sample {b['codes_uint16']} B of uint16 codes "
                   f"({b['codes_on_disk']:.0f} B on disk) vs {b['fp16_tokens']} B of fp16 "
                   f"tokens: {dense['ratio_raw']:g}x ({dense['ratio_on_disk']:g}x on disk); "
                   f"codebook fingerprint {dense['codebook_fingerprint']}")
        cos = ", ".join(f"{m} {c:.3f}" for m, c in dense["reconstruction_cosine"].items())
        click.echo(f"reconstruction cosine on {dense['heldout_samples']} held-out samples: "
                   f"{cos}")
    for sample_id, caption in info["captions"].items():
        click.echo(f"  {sample_id}: {caption}")


@cli.command("cache-verify", context_settings=CONTEXT)
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def cache_verify_cmd(path: Path, as_json: bool) -> None:
    """Read every chunk of a teacher cache and check its CRC32C; list damaged rows by id.

    A chunk that fails its checksum, or a missing or empty chunk file where a computed
    row needs it, is damage. Exits with status 1 when anything is damaged; repair with
    `pipeline cache-teacher ... --repair`, which recomputes only those rows.
    """
    from pipeline.progress import interactive
    from pipeline.store import damaged_rows, open_cache

    cache = open_cache(path)
    done, damages = cache.scan(show=not as_json or interactive())
    rows = damaged_rows(damages)
    try:
        ids = cache.ids
    except PipelineError:  # the ids themselves are damaged: name rows by number
        ids = [f"row {i}" for i in range(len(cache))]
    if as_json:
        click.echo(json.dumps({
            "path": str(path), "rows": len(cache), "done": int(done.sum()),
            "damaged_rows": len(rows), "repair": cache.repair_command() if damages else None,
            "damage": [{"array": d.array, "rows": [d.rows.start, d.rows.stop - 1],
                        "problem": d.problem,
                        "ids": [ids[i] for i in d.rows] if d.sample_rows else []}
                       for d in damages]}, indent=2))
    else:
        for d in damages:
            which = ", ".join(ids[i] for i in d.rows) if d.sample_rows else "E_C of every class"
            click.echo(f"damaged: {d.where()}: {which}")
        if damages:
            click.echo(f"{path}: {len(rows)} of {len(cache)} rows damaged in "
                       f"{len({d.array for d in damages})} arrays; recompute them with "
                       f"`{cache.repair_command()}`")
        else:
            click.echo(f"{path}: every chunk intact ({len(cache)} rows, {int(done.sum())} "
                       f"done, {len(cache.array_names)} arrays, CRC32C checked)")
    if damages:
        raise SystemExit(1)


# ---------------------------------------------------------------------------------------
# stage two
# ---------------------------------------------------------------------------------------
@cli.command("train", context_settings=CONTEXT)
@click.option("--dataset", type=DATASET, default=None, help="Dataset.",
              cls=Tunable, key="dataset.name")
@_ROOT
@click.option("--cache", default=None, help="Teacher cache.  [default: cache/DATASET.zarr]")
@click.option("--out", default=None, help="Run folder (checkpoints, dvclive).  "
              "[default: runs/DATASET]")
@click.option("--variant", type=Registered(_backbones, _is_backbone), default=None,
              help="Backbone (timm:NAME: any timm model with features_only).",
              cls=Tunable, key="student.backbone")
@click.option("--pretrained", default=None, help="Local folder of pretrained MiT weights "
              "(e.g. a downloaded nvidia/mit-b2); null: random init.",
              cls=Tunable, key="student.pretrained")
@click.option("--steps", type=int, default=None, help="Optimiser steps (>= 1).",
              cls=Tunable, key="train.steps")
@click.option("--epochs", type=float, default=None, help="Epochs (> 0, instead of --steps).",
              cls=Tunable, key="train.epochs")
@click.option("--batch-size", type=int, default=None, help="Samples per step.",
              cls=Tunable, key="train.batch_size")
@click.option("--crop", type=int, default=None, help="Training crop side; any size the backbone "
              "accepts, no multiple of 32 needed.", cls=Tunable, key="train.crop")
@click.option("--lr", type=float, default=None, help="Peak learning rate.",
              cls=Tunable, key="train.lr")
@click.option("--workers", type=int, default=None, help="Data loader workers.",
              cls=Tunable, key="train.workers")
@click.option("--device", type=DEVICE, default=None, help="auto: cuda when available.",
              cls=Tunable, key="train.device")
@click.option("--seed", type=int, default=None, help="Seed.", cls=Tunable, key="train.seed")
@click.option("--nproc", type=int, default=None, help="Processes on this machine (one per "
              "GPU; gloo ranks on CPU), started through torch's elastic launcher; "
              "--batch-size is the global batch.", cls=Tunable, key="train.nproc")
@click.option("--resume", is_flag=True, help="Continue from OUT/last.pt.")
@click.option("--params", "params_path", type=click.Path(path_type=Path), default=None,
              help="Parameters file.  [default: ./params.yaml if present]")
@click.option("--json", "as_json", is_flag=True, help="Print the run summary as JSON.")
def train_cmd(dataset: str | None, root: Path | None, cache: str | None, out: str | None,
              variant: str | None, pretrained: str | None, steps: int | None,
              epochs: float | None, batch_size: int | None, crop: int | None, lr: float | None,
              workers: int | None, device: str | None, seed: int | None, nproc: int | None,
              resume: bool, params_path: Path | None, as_json: bool) -> None:
    """Stage two: train the Any2Seg student (shared encoder, MFF, LSCD losses) from the cache.

    Every tunable is in params.yaml under `student` and `train`; flags override them.
    Several GPUs: `--nproc N`, or `torchrun --nproc-per-node N -m pipeline train ...`.
    """
    from pipeline.config import load_params
    from pipeline.devices import resolve_device
    from stages.student import distributed
    from stages.student.config import TrainConfig
    from stages.student.train import train

    if params_path is not None and not params_path.is_file():
        raise PipelineError(f"parameters file {params_path} does not exist")
    if steps is not None and epochs is not None:
        raise PipelineError("--steps and --epochs are both given; give one: --steps counts "
                            "optimiser steps, --epochs passes over the train split")
    overrides = {"dataset": dataset, "root": str(root) if root else None, "cache": cache,
                 "out": out, "backbone": variant, "pretrained": pretrained, "steps": steps,
                 "epochs": epochs, "batch_size": batch_size, "crop": crop, "lr": lr,
                 "workers": workers, "device": device, "seed": seed, "nproc": nproc}
    if steps is not None:
        overrides["epochs"] = None
    student, cfg = TrainConfig.from_params(load_params(params_path), overrides,
                                           str(params_path or "params.yaml"),
                                           _flags(overrides, {"backbone": "--variant"}))
    if steps is not None:
        cfg.epochs = None
    if epochs is not None and steps is None:
        cfg.steps = None
    if cfg.nproc > 1 and not distributed.launched():
        distributed.World(size=cfg.nproc).split(cfg.batch_size)  # refused before any start
        distributed.launch(cfg.nproc, _argv(), resolve_device(cfg.device), _debug())
        return  # rank 0 printed the summary
    try:
        summary = train(student, cfg, progress=True, resume=resume)
    finally:
        distributed.leave()
    if os.environ.get("RANK", "0") != "0":
        return
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    elif summary["status"] == "finished":
        click.echo(f"{summary['out']} has finished: its last.pt is at step {summary['start']} "
                   f"of {summary['steps']}; nothing to resume (evaluate "
                   f"{summary['out']}/best.pt, or train more steps into a new --out)")
    else:
        click.echo(f"trained {summary['steps']} steps into {summary['out']} in "
                   f"{summary['seconds']} s: loss {summary['first_loss']:.3f} -> "
                   f"{summary['last_loss']:.3f}, val mIoU {summary['val_mIoU']}")


@cli.command("evaluate", context_settings=CONTEXT)
@click.option("--checkpoint", type=click.Path(path_type=Path), required=True,
              help="A student checkpoint, e.g. runs/sample/best.pt.")
@click.option("--dataset", type=DATASET, default=None, help="Dataset.  [default: the "
              "checkpoint's]")
@_ROOT
@click.option("--split", default=None, help="Split to evaluate.", cls=Tunable, key="eval.split")
@click.option("--setting", type=Registered(_settings), default=None,
              help="MSS (all modalities), MISS (every modality subset), sensor (per weather "
              "and failure case), or all.", cls=Tunable, key="eval.setting")
@click.option("--mode", type=Registered(_modes), default=None,
              help="Whole-image or sliding-window inference.", cls=Tunable, key="eval.mode")
@click.option("--crop", type=int, default=None, help="Sliding-window size.",
              cls=Tunable, key="eval.crop")
@click.option("--stride", type=int, default=None, help="Sliding-window stride.",
              cls=Tunable, key="eval.stride")
@click.option("--protocol", type=Registered(_protocols), default=None,
              help="official: resize and score as the dataset's official evaluation code "
              "(DELIVER: 1024 short side); native: as stored; null: official for deliver "
              "and mcubes, native for sample.", cls=Tunable, key="eval.protocol")
@click.option("--missing", type=Registered(_missing_modes), default=None,
              help="Absent modalities: black frames (MISS), zeros after normalisation, or "
              "left out of the fusion; null: black under --protocol official, else the "
              "checkpoint's.", cls=Tunable, key="eval.missing")
@click.option("--limit", type=LimitType(), default=None, help="Evaluate only the first N (>= 1) "
              "samples; all: every sample, whatever eval.limit says.", cls=Tunable,
              key="eval.limit")
@click.option("--examples", type=int, default=None,
              help="Samples drawn in predictions.png.", cls=Tunable, key="eval.examples")
@click.option("--device", type=DEVICE, default="auto", help="auto: cuda when available.")
@click.option("--nproc", type=int, default=None, help="Processes on this machine, each "
              "scoring a share of the samples (one per GPU).", cls=Tunable, key="eval.nproc")
@click.option("--out", type=click.Path(path_type=Path), default=Path("metrics"),
              help="Folder for report.md, *.json and plots/.")
@click.option("--params", "params_path", type=click.Path(path_type=Path), default=None,
              help="Parameters file (its `eval` group).  [default: ./params.yaml if present]")
def evaluate_cmd(checkpoint: Path, dataset: str | None, root: Path | None, split: str | None,
                 setting: str | None, protocol: str | None, mode: str | None,
                 crop: int | None, stride: int | None, missing: str | None, limit: int | None,
                 examples: int | None, device: str, nproc: int | None, out: Path,
                 params_path: Path | None) -> None:
    """Evaluate a student: mIoU, mAcc, F1 and pixel accuracy per setting, with charts.

    Several processes (`--nproc N` or torchrun) score shares of the samples; the
    confusion matrices are summed, so the numbers equal those of one process."""
    from pipeline.config import Where, build, load_params
    from pipeline.devices import resolve_device
    from stages.student import distributed
    from stages.student.evaluate import EvalConfig

    if params_path is not None and not params_path.is_file():
        raise PipelineError(f"parameters file {params_path} does not exist")
    source = str(params_path or "params.yaml")
    cfg = build(EvalConfig, dict(load_params(params_path).get("eval") or {}),
                Where("eval", source))
    overrides = {"split": split, "setting": setting, "protocol": protocol, "mode": mode,
                 "crop": crop, "stride": stride, "missing": missing, "limit": limit,
                 "examples": examples, "nproc": nproc}
    for key, value in overrides.items():
        if value is not None:
            setattr(cfg, key, value)
    if limit == ALL:
        cfg.limit = None
    where = Where("eval", source, _flags(overrides))
    cfg.validate(where)
    if cfg.nproc > 1 and not distributed.launched():
        distributed.launch(cfg.nproc, _argv(), resolve_device(device), _debug())
        return  # rank 0 wrote and printed the results
    try:
        world = distributed.join(resolve_device(device))
        _evaluate_here(world, cfg, where, checkpoint, dataset, root, out)
    finally:
        distributed.leave()


def _evaluate_here(world: Any, cfg: Any, where: Any, checkpoint: Path, dataset: str | None,
                   root: Path | None, out: Path) -> None:
    """`evaluate` in this process (one rank of several, or the only one)."""
    from pipeline import datasets
    from pipeline.runlock import check_outside, check_run_folder
    from stages.student.encoder import min_input_size
    from stages.student.evaluate import (
        describe,
        evaluate,
        flat_metrics,
        load_checkpoint,
        markdown,
        write_outputs,
    )

    check_run_folder(out)
    dev = world.device
    model, meta = load_checkpoint(checkpoint, dev)
    backbone = meta["student"]["backbone"]
    smallest = min_input_size(backbone)
    if cfg.mode == "slide" and smallest:
        where.integer("crop", cfg.crop, smallest, why=f"the smallest input {backbone} accepts")
    name = dataset or meta["dataset"]
    model.missing = cfg.resolved_missing(name, model.missing)
    check_outside(out, _dataset_root(name, root), "--out", "the data set root")
    samples = datasets.load(name, _dataset_root(name, root), cfg.split,
                            modalities=meta["modalities"])
    in_split = len(samples)
    if cfg.limit is not None:
        samples = samples[: cfg.limit]
    if list(samples.classes) != list(meta["classes"]):
        raise PipelineError(f"{checkpoint} was trained on other classes than {name}'s")
    result = evaluate(model, samples, cfg.settings, cfg.mode, cfg.crop, cfg.stride, device=dev,
                      examples=cfg.examples, progress=True,
                      protocol=cfg.resolved_protocol(name), world=world)
    if not world.main:
        return
    from stages.student.evaluate import SENSOR_GROUPS
    from stages.student.provenance import provenance

    facts = provenance(checkpoint, meta.get("step"), name, _dataset_root(name, root), cfg.split,
                       samples, in_split, result.protocol, result.missing, cfg.mode,
                       SENSOR_GROUPS)
    written = write_outputs(result, out, [tuple(c) for c in meta["palette"]], facts)
    click.echo(describe(result) + "\n")
    click.echo(markdown(flat_metrics(result)))
    click.echo("wrote " + ", ".join(str(p) for p in written))


# ---------------------------------------------------------------------------------------
# ablate
# ---------------------------------------------------------------------------------------
@cli.command("ablate", context_settings=CONTEXT)
@click.argument("plan")
@click.option("--seeds", type=int, default=3, help="Seeds per row (train.seed, train.seed + 1, "
              "...); the same seed gives every row the same initial weights and batches.")
@click.option("--rows", default=None, help="Comma-separated rows to run (the baseline always "
              "runs).  [default: every row of the plan]")
@click.option("-S", "--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="A params.yaml override added to every row (repeatable), as dvc exp run -S.")
@click.option("--jobs", type=int, default=1, help="Runs at once (one GPU each when there are "
              "GPUs, through CUDA_VISIBLE_DEVICES).")
@click.option("--metric", "metrics", multiple=True, metavar="FILE.KEY",
              help="Another metric to report, FILE.KEY of a metrics file the plan's "
              "target stage writes, e.g. mss.mAcc (besides the plan's metrics; by default "
              "mss.mIoU, miss.mean_mIoU and sensor.mean_of_groups_mIoU).")
@click.option("--pipeline", "pipeline_path", type=click.Path(path_type=Path), default=None,
              help="The dvc.yaml to run.  [default: ./dvc.yaml]")
@click.option("--report", "report_only", is_flag=True,
              help="Only re-render the report from the finished runs (no training).")
def ablate_cmd(plan: str, seeds: int, rows: str | None, sets: tuple[str, ...], jobs: int,
               metrics: tuple[str, ...], pipeline_path: Path | None, report_only: bool) -> None:
    """Run an ablation plan (configs/ablations/PLAN.yaml) as rows x seeds of DVC experiments.

    Each run is `dvc exp run --temp --name PLAN-ROW-sSEED` of the plan's target stage
    (evaluate unless the plan names another) on the one cached teacher (stage one never
    reruns; the workspace's runs/ and metrics/ are untouched). A rerun starts only the
    missing runs and removes what killed ones left. Writes ablations/PLAN/report.md,
    report.json and plot.png: mean ± std over seeds, the paired difference to the baseline
    with its 95 % t interval and verdict.
    """
    from pipeline import ablate

    setup = ablate.prepare(plan, seeds, rows, sets, metrics, pipeline_path)
    if not report_only:
        ablate.check_stage_one(setup)
        ablate.ablate(setup, jobs, echo=click.echo)
    from pipeline import ablation_report

    written = ablation_report.report(setup)
    click.echo(written[0].read_text())
    click.echo("wrote " + ", ".join(str(p) for p in written))


# ---------------------------------------------------------------------------------------
# entry point
# ---------------------------------------------------------------------------------------
def _argv() -> list[str]:
    return list(_ARGV if _ARGV is not None else sys.argv[1:])


def _debug() -> bool:
    ctx = click.get_current_context(silent=True)
    return bool(ctx and ctx.find_root().obj and ctx.find_root().obj.get("debug"))


def _report_here() -> bool:
    """Whether this process prints the error: always alone; under a multi-process launch
    only the first rank to fail (the others failed with it or because of it)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return True
    from stages.student.distributed import first_to_fail

    return first_to_fail()


from pipeline.codealign_cli import codealign_group  # noqa: E402  (CodeAlign's stages)

cli.add_command(codealign_group)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry: run the click group and turn user errors into one line."""
    global _ARGV
    args = list(sys.argv[1:] if argv is None else argv)
    _ARGV = args
    debug = "--debug" in args
    message, code = None, 0
    from pipeline import diskspace, failures

    command = failures.command_of(args, list(cli.commands))
    # exit outside the except clauses: a SystemExit raised inside one would carry the error
    # and its frames (open files, repositories) into interpreter shutdown
    try:
        empty = failures.empty_argument(args)
        if empty is not None:
            raise PipelineError(f"{empty} is empty; give a value or leave the option out")
        result = cli.main(args=args, prog_name="pipeline", standalone_mode=False)
        code = result if isinstance(result, int) else 0
    except click.exceptions.Abort:
        message, code = "aborted", 130
    except click.UsageError as exc:
        hint = f" (see '{exc.ctx.command_path} --help')" if exc.ctx else ""
        message, code = f"{exc.format_message()}{hint}", exc.exit_code
    except click.ClickException as exc:
        message, code = exc.format_message(), exc.exit_code
    except ReportedError as exc:  # a rank printed it already
        code = exc.exitcode
    except PipelineError as exc:
        if debug:
            raise
        message, code = str(exc), 1
    except KeyboardInterrupt:
        message, code = "interrupted", 130
    except MemoryError:
        if debug:
            raise
        message, code = failures.memory_line(command), 1
    except OSError as exc:
        if debug:
            raise
        line = failures.os_error_line(exc, command, args)
        message, code = line or f"{exc} (rerun with --debug for a traceback)", 1
    except Exception as exc:
        if failures.is_out_of_memory(exc) and not debug:
            message, code = failures.memory_line(command), 1
        elif diskspace.is_disk_full(exc) and not debug:  # wrapped by torch / h5py
            message, code = failures.os_error_line(OSError(errno.ENOSPC, str(exc)), command,
                                                   args), 1
        elif not _report_here():  # a rank that failed because another one did
            code = 1
        else:
            raise
    if message is not None and _report_here():
        click.echo("error: " + " ".join(line.strip() for line in message.splitlines()), err=True)
    sys.exit(code)


if __name__ == "__main__":
    main()
