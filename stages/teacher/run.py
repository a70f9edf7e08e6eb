"""Stage one: run the frozen teachers once per sample into the zarr cache.

Every run first looks up the hashes of the files each sample is computed from
(`any2seg.content`, remembered by size and mtime) and reads the store once, checking
every chunk. The rows to compute are those not `done`, those whose input hash changed
since they were written (a done row's unremembered files are read to hash them), and,
with `--repair`, those in damaged shards. A computed row's unremembered files are
hashed from the read that decodes them, so a first run reads each input file once.
For each shard holding such rows: decode the samples and preprocess them for their
LanguageBind branch (in a thread pool, overlapping the model), caption them, encode
each modality (E_m) and the caption (E_S), and write the rows. The class names (E_C)
are encoded once when the store is created.
Compute batches are fixed subdivisions of a shard (of the store's batch size), and a
changed row is recomputed within its whole batch, so a resumed, updated, repaired or
distributed run does exactly the same arithmetic as a clean single-process build and
writes the same bytes.

`run.py` holds the entry point and what decides the rows: `config` the settings, `worker`
the work on one shard, `local` and `cluster` the two runners.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from any2seg import datasets
from any2seg.content import FileHashes
from any2seg.datasets import SampleSequence
from any2seg.errors import PipelineError
from any2seg.store import (
    HASHES_NAME,
    CacheWriter,
    Plan,
    StoreSpec,
    TeacherCache,
    check_out_path,
    mismatches,
    plan,
    writer_lock,
)
from stages.teacher import captioners
from stages.teacher.checkpoints import checkpoint_fingerprint, resolve_branch_dir
from stages.teacher.cluster import run_distributed
from stages.teacher.config import STORE_DTYPES, TeacherConfig, parse_scheduler
from stages.teacher.local import RunReport, decode_threads, run_local
from stages.teacher.worker import ShardWorker, load_samples, model_input, readable_class

# re-exported: the names other code, tests and docs import from here
__all__ = ["STORE_DTYPES", "RunReport", "ShardWorker", "TeacherConfig", "cache_teacher",
           "decode_threads", "load_samples", "model_input", "parse_scheduler", "readable_class",
           "skipped_ids", "teacher_fingerprint"]

log = logging.getLogger("pipeline.teacher")

PREPROCESS_VERSION = ("openai-mean-std bicubic-antialias short-side centre-crop; depth mm->m; "
                      "non-8-bit images over their value range; text ftfy+html+space clean v2")
DENSE_TOKENS = ("last-layer patch tokens -> post_layernorm -> visual_projection -> L2; "
                "spherical mini-batch k-means, float16 codebook")


def skipped_ids(cfg: TeacherConfig, samples: SampleSequence) -> list[str]:
    """Samples of the requested splits that `--skip-bad` dropped (recorded in the store, so
    stage two skips them too instead of calling the store another sample list)."""
    if not cfg.skip_bad:
        return []
    kept = set(samples.ids)
    indexed = datasets.get(cfg.dataset).index(cfg.resolved_root(), cfg.split)
    return [r.id for r in indexed if r.id not in kept]


def teacher_fingerprint(cfg: TeacherConfig, class_names: Sequence[str]) -> dict[str, Any]:
    """Everything that decides the cached numbers, without loading a model."""
    branch_of = cfg.branch_map()
    checkpoints = {b: checkpoint_fingerprint(resolve_branch_dir(cfg.teacher_root, b))
                   for b in sorted(set(branch_of.values()))}
    captioner = captioners.create(cfg.captioner, class_names, **cfg.captioner_options)
    return {
        "encoder": "languagebind",
        "checkpoints": checkpoints,
        "modality_branch": dict(sorted(branch_of.items())),
        "preprocess": PREPROCESS_VERSION,
        "class_prompt": cfg.class_prompt,
        "captioner": captioner.fingerprint(),
        **({"dense": {"kind": "codebook", "k": cfg.dense_k(), "tokens": DENSE_TOKENS,
                      "fit_samples": cfg.dense_fit_samples, "heldout": cfg.dense_heldout,
                      "passes": cfg.dense_passes, "seed": cfg.dense_seed}}
           if cfg.dense else {}),
    }


def cache_teacher(cfg: TeacherConfig,
                  progress: Callable[[int, int], None] | None = None) -> RunReport:
    """Build, finish, update or repair the store at `cfg.resolved_out()` (module docstring).

    A store with nothing to do is only read: no lock, no model, nothing written into it
    (a read-only complete store is fine)."""
    cfg.validate()  # before anything is loaded or locked
    start = time.perf_counter()
    out = cfg.resolved_out()
    check_out_path(out)
    samples = load_samples(cfg)
    hashes = FileHashes(out / HASHES_NAME)
    spec = StoreSpec(ids=samples.ids, modalities=list(cfg.branch_map()),
                     teacher_fingerprint=teacher_fingerprint(cfg, samples.classes),
                     dtype=cfg.dtype, rows_per_shard=cfg.rows_per_shard,
                     batch_size=cfg.batch_size, skipped=skipped_ids(cfg, samples))
    if not cfg.overwrite:
        existing, todo, input_hashes = _inspect(cfg, out, spec, samples, hashes)
        if existing is not None and todo.empty:
            if out.is_dir():
                hashes.save()
            return RunReport(str(out), existing.n, 0, 0, time.perf_counter() - start, 0.0,
                             "complete", hashed_files=hashes.hashed)
    with writer_lock(out):
        existing, todo, input_hashes = _inspect(cfg, out, spec, samples, hashes)
        if existing is not None and todo.empty:  # another run finished it meanwhile
            return RunReport(str(out), existing.n, 0, 0, time.perf_counter() - start, 0.0,
                             "complete", hashed_files=hashes.hashed)
        writer = None
        if existing is not None:
            writer = CacheWriter(out)
            writer.remove_partials()
            writer.discard(todo.damages)
            if writer.rows_per_shard != cfg.rows_per_shard:
                log.info("updating with the store's rows_per_shard=%d", writer.rows_per_shard)
            if writer.batch_size != cfg.batch_size:
                log.info("updating with the store's batch_size=%d (the batches it was built "
                         "with, so recomputed rows equal a clean build)", writer.batch_size)
        for note in cfg.auto_fallbacks():  # once, where models are about to be loaded
            log.info(note)
        device = cfg.resolved_device()
        if cfg.scheduler:
            report = run_distributed(cfg, samples, spec, writer, todo, input_hashes, out,
                                     device, hashes, progress)
        else:
            report = run_local(cfg, samples, spec, writer, todo, input_hashes, out, device,
                               hashes, progress)
        hashes.save()
    if writer is not None:
        report.new_rows, report.changed_rows = len(todo.new), len(todo.changed)
        report.repaired_rows = len(todo.damaged)
    else:
        report.new_rows = report.computed_rows
    report.hashed_files = hashes.hashed
    report.seconds = time.perf_counter() - start
    report.samples_per_s = report.computed_rows / report.seconds if report.seconds else 0.0
    return report


def _inspect(cfg: TeacherConfig, out: Path, spec: StoreSpec, samples: SampleSequence,
             hashes: FileHashes) -> tuple[TeacherCache | None, Plan, list[str | None]]:
    """The existing store (None: create a new one), what it needs, and the input hashes.
    Reads only. A row whose files' digests are not remembered gets None, unless it is
    done and must be compared with the store: a row that is computed takes its hash
    from the read that decodes its files (`run_job`), so a first run reads each once."""
    files = [r.files for r in samples.records]
    input_hashes = hashes.lookup(files)
    if cfg.overwrite:
        return None, Plan(), input_hashes
    cache, problems = mismatches(out, spec)
    if problems and cfg.on_mismatch != "rebuild":
        raise PipelineError(f"{out} was built differently: {' | '.join(problems)}; pass "
                            "--overwrite to rebuild it, or choose another --out")
    if cache is None or problems:
        return None, Plan(), input_hashes
    big = cache.num_shards >= 32  # a progress bar only where the scan takes a while
    todo = plan(cache, input_hashes, cfg.repair, show=big,
                complete=lambda rows: hashes.complete(files, input_hashes, rows))
    books = [name for name in todo.static if name.startswith("codebook/")]
    if books:  # refused before anything (the damaged file included) is touched
        raise PipelineError(f"{out}: {', '.join(books)} is damaged; every code of the store "
                            "was assigned against it, so it cannot be refitted in place: "
                            "rebuild the store with `pipeline cache-teacher --overwrite`")
    return cache, todo, input_hashes
