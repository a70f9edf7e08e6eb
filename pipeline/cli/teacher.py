"""Stage one's commands: `pipeline cache-teacher`, `fit-teacher`, `cache-info` and
`cache-verify` (build, fit the default teacher for, describe and check the teacher cache)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from any2seg.errors import PipelineError
from pipeline.cli.options import (
    CAPTIONER,
    CONTEXT,
    DATASET,
    DEVICE,
    PARAMS,
    STORE_DTYPE,
    flags,
    option_value,
    pairs,
    params_root,
)
from pipeline.help_defaults import Derived, ParamsCommand, Tunable
from stages.teacher.default import FOLDER as TEACHER_FOLDER


@click.command("cache-teacher", cls=ParamsCommand, context_settings=CONTEXT)
@click.option("--dataset", type=DATASET, default=None, help="Dataset.",
              cls=Tunable, key="dataset.name")
@params_root()
@click.option("--split", default=None, help="Comma-separated splits to cache.  "
              "[default: train,val,test]")
@click.option("--modalities", default=None,
              help="Comma-separated modalities.  [default: all of the dataset's]")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="The zarr store.  [default: cache/DATASET.zarr]")
@click.option("--teacher-root", default=None, help="Folder with LanguageBind_Image/, "
              "LanguageBind_Depth/ ... (hub folder names), or a hub namespace such as "
              "LanguageBind.", cls=Tunable, key="teacher.root")
@click.option("--captioner", type=CAPTIONER, default=None,
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
@click.option("--dtype", type=STORE_DTYPE, default=None,
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
@PARAMS
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
    import time

    from any2seg.config import read_params
    from any2seg.progress import reporting
    from stages.teacher.run import TeacherConfig, cache_teacher

    params, source = read_params(params_path)
    overrides: dict[str, Any] = {
        "dataset": dataset, "root": str(root) if root else None,
        "split": split.split(",") if split else None,
        "modalities": modalities.split(",") if modalities else None,
        "out": str(out) if out else None, "teacher_root": teacher_root,
        "captioner": captioner, "class_prompt": class_prompt, "batch_size": batch_size,
        "rows_per_shard": rows_per_shard, "device": device, "dtype": dtype,
        "scheduler": scheduler, "decode_workers": decode_workers, "skip_bad": skip_bad,
        "overwrite": overwrite, "repair": repair, "on_mismatch": on_mismatch, "dense": dense,
        "captioner_options": {k: option_value(v) for k, v in
                              pairs(captioner_option, "--captioner-option").items()} or None,
        "modality_branch": pairs(modality_branch, "--modality-branch") or None,
    }
    cfg = TeacherConfig.from_params(params, overrides, source,
                                    flags(overrides, {"captioner_options": "--captioner-option"}))
    begun = time.monotonic()  # the bar appears at the first rows; its time counts from here
    with reporting("caching teacher", "sample", start=begun) as progress:
        report = cache_teacher(cfg, progress)
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


def _sample_root() -> Path:
    """The generated sample's folder (the root of configs/datasets/sample.yaml)."""
    from any2seg.config import dataset_root

    return dataset_root("sample", None)


@click.command("fit-teacher", context_settings=CONTEXT)
@click.option("--root", type=click.Path(path_type=Path), cls=Derived, compute=_sample_root,
              help="The generated sample to fit on (its train split; quality on val).")
@click.option("--out", type=click.Path(path_type=Path), default=Path(TEACHER_FOLDER),
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
    Deterministic for a seed; about a minute of one CPU core, longer on busy cores
    (benchmarks/results/fit_teacher.json); prints the quality on val beside chance. Does
    nothing when an identical teacher is already at --out.
    """
    from any2seg.config import build, read_params
    from stages.teacher.config import TeacherConfig
    from stages.teacher.default.config import FitConfig
    from stages.teacher.default.fit import fit_default_teacher
    from stages.teacher.default.quality import format_quality

    params, source = read_params(params_path)
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


@click.command("cache-info", context_settings=CONTEXT)
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def cache_info_cmd(path: Path, as_json: bool) -> None:
    """What a teacher cache holds: rows, done fraction, dims, dtype, fingerprints, size."""
    from any2seg.store import describe

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


@click.command("cache-verify", context_settings=CONTEXT)
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def cache_verify_cmd(path: Path, as_json: bool) -> None:
    """Read every chunk of a teacher cache and check its CRC32C; list damaged rows by id.

    A chunk that fails its checksum, or a missing or empty chunk file where a computed
    row needs it, is damage. Exits with status 1 when anything is damaged; repair with
    `pipeline cache-teacher ... --repair`, which recomputes only those rows.
    """
    from any2seg.progress import interactive
    from any2seg.store import damaged_rows, open_cache

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


