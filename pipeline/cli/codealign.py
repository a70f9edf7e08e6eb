"""`pipeline codealign stage0|stage1|stage2|evaluate`: CodeAlign's stages, each resumable
(rerunning one continues from its last checkpoint), every tunable under `codealign` in
params.yaml (the group models use `student`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from any2seg.errors import PipelineError
from pipeline.cli.options import CONTEXT as _CONTEXT
from pipeline.cli.options import PARAMS

# the other commands' settings but the terminal's own width, as these commands always had
CONTEXT = {k: v for k, v in _CONTEXT.items() if k != "terminal_width"}


RESUME = click.option(
    "--resume", type=click.Choice(["strict", "auto"]), default="strict",
    help="A part's checkpoint of other settings, split or code: strict refuses it; auto "
    "(what the DVC stages run) trains that part again from scratch, saying why.")


def _common(fn: Any) -> Any:
    fn = PARAMS(fn)
    fn = click.option("--out", type=click.Path(path_type=Path), default=Path("runs/codealign"),
                      help="Run folder (checkpoints of every stage).")(fn)
    fn = click.option("--root", type=click.Path(path_type=Path), default=None,
                      help="Dataset root.  [default: dataset.root of params.yaml, else the "
                      "root in configs/datasets/DATASET.yaml]")(fn)
    return click.option("--dataset", default=None,
                        help="Dataset.  [default: dataset.name of params.yaml]")(fn)


def _run(dataset: str | None, root: Path | None, out: Path, params_path: Path | None,
         resume: str = "strict") -> Any:
    from any2seg.config import DEFAULT_DATASET, Where, build, dataset_root, read_params
    from stages.student.codealign.config import CodeAlignConfig
    from stages.student.codealign.stages import CodeAlignRun
    from stages.student.model import StudentConfig

    params, source = read_params(params_path)
    ds = params.get("dataset") or {}
    named = ds.get("name", DEFAULT_DATASET)
    dataset = dataset or named
    if root is None:  # params' root belongs to params' dataset
        root = dataset_root(dataset, ds.get("root") if dataset == named else None)
    if not root.exists():
        raise PipelineError(f"--root {root} does not exist (run `pipeline make-sample` or "
                            f"point --root / dataset.root at the data)")
    cfg = build(CodeAlignConfig, dict(params.get("codealign") or {}), Where("codealign", source))
    cfg.validate(Where("codealign", source))
    student = build(StudentConfig, dict(params.get("student") or {}), Where("student", source))
    student.validate(Where("student", source))
    return CodeAlignRun(dataset, root, out, student, cfg, resume)


def _report(losses: dict[str, list[float]], as_json: bool) -> None:
    summary = {k: (v[-1] if v else None) for k, v in losses.items()}
    if as_json:
        click.echo(json.dumps({"final_loss": summary}))
    else:
        for k, v in summary.items():
            click.echo(f"{k}: final loss {'-' if v is None else f'{v:.4f}'}")


@click.group("codealign", context_settings=CONTEXT)
def codealign_group() -> None:
    """CodeAlign (CVPR 2026) as its authors' code runs it: modality groups that never
    share a frame, a code space per group, translators between them (docs/codealign.md)."""


@codealign_group.command("stage0", context_settings=CONTEXT)
@_common
@RESUME
@click.option("--json", "as_json", is_flag=True, help="Print the final losses as JSON.")
def stage0_cmd(dataset: str | None, root: Path | None, out: Path, params_path: Path | None,
               resume: str, as_json: bool) -> None:
    """A model per group on its own frames, and the naive-joint reference."""
    _report(_run(dataset, root, out, params_path, resume).stage0(), as_json)


@codealign_group.command("stage1", context_settings=CONTEXT)
@_common
@RESUME
@click.option("--json", "as_json", is_flag=True, help="Print the final losses as JSON.")
def stage1_cmd(dataset: str | None, root: Path | None, out: Path, params_path: Path | None,
               resume: str, as_json: bool) -> None:
    """Aligners and code spaces, encoders frozen (reads OUT/stage0.pt)."""
    _report(_run(dataset, root, out, params_path, resume).stage1(), as_json)


@codealign_group.command("stage2", context_settings=CONTEXT)
@_common
@RESUME
@click.option("--control", is_flag=True,
              help="Shuffled-label control: label pixels permuted (writes stage2.control.pt).")
@click.option("--json", "as_json", is_flag=True, help="Print the final losses as JSON.")
def stage2_cmd(dataset: str | None, root: Path | None, out: Path, params_path: Path | None,
               resume: str, control: bool, as_json: bool) -> None:
    """Translators between groups, everything else frozen (reads OUT/stage1.pt)."""
    _report(_run(dataset, root, out, params_path, resume).stage2(control=control), as_json)


@codealign_group.command("evaluate", context_settings=CONTEXT)
@_common
@click.option("--split", default="val", help="Split to score.")
@click.option("--limit", type=int, default=None, help="Score only the first N frames.")
@click.option("--metrics", type=click.Path(path_type=Path), default=None,
              help="Write the rows as JSON here.  [default: OUT/metrics.json]")
def evaluate_cmd(dataset: str | None, root: Path | None, out: Path, params_path: Path | None,
                 split: str, limit: int | None, metrics: Path | None) -> None:
    """Source -> translator -> target back-end, the target's own modalities fused with the
    translation, beside the target's own model, the source's own model and naive joint
    training; payload of the codes (reads OUT/stage2.pt)."""
    from stages.student.codealign.evaluate import evaluate_run, markdown

    rows = evaluate_run(_run(dataset, root, out, params_path), "stage2", split, limit)
    path = metrics or out / "metrics.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows, indent=2) + "\n")
    click.echo(markdown(rows))
    p = rows[0] if rows else None
    if p:
        click.echo(f"payload: {p['code_bits_per_pixel']:.4f} bits/pixel of codes vs "
                   f"{p['float_bits_per_pixel']:.1f} of float32 features ({p['ratio']:.0f}x)")
