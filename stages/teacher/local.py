"""The single-process runner of stage one: shards in order, their samples decoded by a
thread pool ahead of the model (`_prefetch`), and the run's `RunReport`."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from any2seg.content import FileHashes
from any2seg.datasets import SampleSequence
from any2seg.store import CacheWriter, Plan, StoreSpec
from stages.teacher.config import TeacherConfig
from stages.teacher.worker import (
    Prepared,
    ShardJob,
    ShardWorker,
    create_store,
    repair_static,
    run_job,
    shard_jobs,
    use_codebooks,
)


@dataclass
class RunReport:
    out: str
    rows: int
    computed_rows: int
    shards: int
    seconds: float
    model_seconds: float
    status: str
    samples_per_s: float = 0.0
    model_busy: float = 0.0
    model_waited: float = 0.0  # share of the loop the model waited for decoded samples
    decode_workers: int = 0
    new_rows: int = 0  # never computed before (or interrupted)
    changed_rows: int = 0  # recomputed because their files changed
    repaired_rows: int = 0  # recomputed because their chunks were damaged
    hashed_files: int = 0  # input files hashed (0 when none changed), most while decoded
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _prefetch(worker: ShardWorker, jobs: list[ShardJob], pool: ThreadPoolExecutor,
              depth: int = 2, waited: list[float] | None = None
              ) -> Iterator[tuple[ShardJob, list[Prepared]]]:
    """Yield (job, prepared samples) while the next `depth` jobs decode in `pool`;
    `waited[0]` sums the seconds the caller (the model) waited for decoded samples."""
    queue: list[tuple[ShardJob, list[Future[Prepared]]]] = []
    it = iter(jobs)

    def submit() -> None:
        job = next(it, None)
        if job is not None:
            hashed = job.hash_while_decoding()
            queue.append((job, [pool.submit(worker.prepare, i, i in hashed)
                                for i in job.compute]))

    for _ in range(depth):
        submit()
    while queue:
        job, futures = queue.pop(0)
        submit()
        start = time.perf_counter()
        prepared = [f.result() for f in futures]
        if waited is not None:
            waited[0] += time.perf_counter() - start
        yield job, prepared


def run_local(cfg: TeacherConfig, samples: SampleSequence, spec: StoreSpec,
               writer: CacheWriter | None, todo: Plan, input_hashes: Sequence[str | None],
               out: Path, device: str, hashes: FileHashes,
               progress: Callable[[int, int], None] | None) -> RunReport:
    worker = ShardWorker(cfg, samples, device)
    if writer is None:
        writer = create_store(worker, out, spec)
        rows: list[int] = list(range(writer.n))
    else:
        repair_static(worker, writer, spec, todo, samples, cfg, device)
        rows = todo.rows
    use_codebooks(worker, writer)
    jobs = shard_jobs(writer, rows, input_hashes, writer.batch_size)
    total = sum(len(j.write) for j in jobs)
    done_rows = 0
    loop_start = time.perf_counter()
    threads = decode_threads(cfg)
    waited = [0.0]
    with ThreadPoolExecutor(threads) as pool:
        for job, prepared in _prefetch(worker, jobs, pool, waited=waited):
            hashes.learn(run_job(worker, writer, job, prepared))
            done_rows += len(job.write)
            if progress:
                progress(done_rows, total)
    loop = time.perf_counter() - loop_start
    report = RunReport(str(out), writer.n, done_rows, len(jobs), 0.0, worker.model_seconds,
                       "written", model_busy=worker.model_seconds / loop if loop else 0.0,
                       model_waited=waited[0] / loop if loop else 0.0, decode_workers=threads)
    writer.touch()
    record_run(writer, report)
    return report


def decode_threads(cfg: TeacherConfig) -> int:
    """Decode workers: `teacher.decode_workers`, or 0 for one per CPU core (at least
    4). Threads, not processes: libpng (imagecodecs) and PIL decode, hashlib and torch's
    resizes release the GIL: two decode threads wait for it 1-2 % of their time (two
    processes 0 %, a pure Python control 19-27 %), and processes would only add sending
    the tensors back (benchmarks/decode_workers.py, docs/performance.md)."""
    return cfg.decode_workers or max(4, os.cpu_count() or 1)


def record_run(writer: CacheWriter, report: RunReport) -> None:
    """The last run's throughput and the model's waiting share, for `cache-info`."""
    writer.group.attrs["last_run"] = {
        "rows": report.computed_rows, "model_busy": round(report.model_busy, 4),
        "model_waited": round(report.model_waited, 4),
        "decode_workers": report.decode_workers}
