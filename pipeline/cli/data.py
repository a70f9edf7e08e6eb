"""`pipeline make-sample`, `pipeline datasets list|info|check` and `pipeline pack`: the data
a pipeline reads, generated, inspected, checked and packed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from pipeline.cli.options import CONTEXT, DATASET_OPTION, ROOT


@click.command("make-sample", context_settings=CONTEXT)
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
    from any2seg import datasets
    from any2seg.progress import reporting
    from any2seg.synth import SampleSpec, make_sample

    spec = SampleSpec(size=size, train=n_train, val=n_val, test=n_test,
                      frames_per_scene=frames_per_scene, seed=seed)
    with reporting("rendering scenes", "scene", leave=False) as progress:
        result = make_sample(out, spec, overwrite=overwrite, workers=workers, progress=progress)
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
@click.group("datasets", context_settings=CONTEXT)
def datasets_group() -> None:
    """Inspect and check data sets (deliver, mcubes, sample, and registered ones)."""


def _dataset_root(dataset: str, root: Path | None) -> Path:
    from any2seg.config import dataset_root

    return dataset_root(dataset, root)


@datasets_group.command("list", context_settings=CONTEXT)
def datasets_list() -> None:
    """Registered dataset formats with their modalities and class counts."""
    from any2seg import datasets

    for name in datasets.available():
        reader = datasets.get(name)
        click.echo(f"{name:10s} {len(reader.classes):3d} classes  modalities "
                   f"{','.join(reader.modalities):24s} default root {reader.default_root}")


@datasets_group.command("info", context_settings=CONTEXT)
@DATASET_OPTION
@ROOT
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def datasets_info(dataset: str, root: Path | None, as_json: bool) -> None:
    """Counts per split, weather condition and sensor-failure case, and the class list.

    Only indexes files (no decoding), so it is fast on the full data set.
    """
    from any2seg import datasets

    summary = datasets.info(dataset, _dataset_root(dataset, root))
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    else:
        click.echo(_format_info(summary))
        click.echo("classes: " + ", ".join(f"{i} {c}" for i, c in enumerate(summary["classes"])))


@datasets_group.command("check", context_settings=CONTEXT)
@DATASET_OPTION
@ROOT
@click.option("--split", default="train,val,test", help="Comma-separated splits to check.")
def datasets_check(dataset: str, root: Path | None, split: str) -> None:
    """Decode every file a stage reads of the splits; list missing, corrupt or mislabelled ones.

    Exits with status 1 when anything is wrong; readers' --skip-bad drops exactly these.
    """
    from any2seg import datasets

    root = _dataset_root(dataset, root)
    checked, problems = datasets.check(dataset, root, split)
    for p in problems:
        click.echo(p)
    click.echo(f"checked {checked} samples of {dataset} ({split}) under {root}: "
               f"{len(problems)} bad")
    if problems:
        raise SystemExit(1)


@click.command("pack", context_settings=CONTEXT)
@DATASET_OPTION
@ROOT
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
    from any2seg.pack import pack
    from any2seg.progress import reporting

    if workers < 1:
        raise click.BadParameter("must be >= 1", param_hint="--workers")
    root = _dataset_root(dataset, root)
    out = out or Path(f"data/{dataset}.h5")
    with reporting(f"packing {dataset}", "file") as progress:
        report = pack(dataset, root, out, split.split(",") if split else None,
                      modalities.split(",") if modalities else None, overwrite=overwrite,
                      workers=workers, progress=progress)
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

