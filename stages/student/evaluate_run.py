"""One process's share of `pipeline evaluate`: load a checkpoint, score a data set split
under the eval config, and (on the main rank) write the report; the CLI only prints it."""

from __future__ import annotations

from pathlib import Path

from any2seg import datasets
from any2seg.config import Where, dataset_root
from any2seg.errors import PipelineError
from any2seg.runlock import check_outside, check_run_folder
from stages.student.distributed import World
from stages.student.encoder import min_input_size
from stages.student.eval_config import EvalConfig
from stages.student.evaluate import (
    SENSOR_GROUPS,
    EvalResult,
    evaluate,
    load_checkpoint,
    write_outputs,
)
from stages.student.provenance import provenance


def evaluate_checkpoint(world: World, cfg: EvalConfig, where: Where, checkpoint: Path,
                        dataset: str | None, root: Path | None,
                        out: Path) -> tuple[EvalResult, list[Path]] | None:
    """Score `checkpoint` on `dataset` (default: the checkpoint's) under `root`; on the main
    rank write report, JSON and plots under `out` and return the result and the files
    written, elsewhere None (the rank only contributed its share of the counts)."""
    check_run_folder(out)
    dev = world.device
    model, meta = load_checkpoint(checkpoint, dev)
    backbone = meta["student"]["backbone"]
    smallest = min_input_size(backbone)
    if cfg.mode == "slide" and smallest:
        where.integer("crop", cfg.crop, smallest, why=f"the smallest input {backbone} accepts")
    name = dataset or meta["dataset"]
    model.missing = cfg.resolved_missing(name, model.missing)
    check_outside(out, dataset_root(name, root), "--out", "the data set root")
    samples = datasets.load(name, dataset_root(name, root), cfg.split,
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
        return None
    facts = provenance(checkpoint, meta.get("step"), name, dataset_root(name, root), cfg.split,
                       samples, in_split, result.protocol, result.missing, cfg.mode,
                       SENSOR_GROUPS)
    written = write_outputs(result, out, [tuple(c) for c in meta["palette"]], facts)
    return result, written
