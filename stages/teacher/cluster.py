"""The dask.distributed runner of stage one: the coordinator creates the store, and each
worker process loads the teacher once and fills whole shards (`--scheduler local:N` or
`tcp://HOST:PORT`)."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from any2seg.content import FileHashes
from any2seg.datasets import SampleSequence
from any2seg.errors import PipelineError
from any2seg.store import CacheWriter, Plan, StoreSpec
from stages.teacher.config import TeacherConfig, parse_scheduler
from stages.teacher.local import RunReport
from stages.teacher.worker import (
    ShardJob,
    ShardWorker,
    create_store,
    load_samples,
    repair_static,
    run_job,
    shard_jobs,
    use_codebooks,
)

_WORKER_STATE: dict[str, tuple[ShardWorker, CacheWriter]] = {}


def _shard_task(cfg_dict: dict[str, Any], out: str, device: str, threads: int,
                job: ShardJob) -> tuple[int, int, float, dict[str, str]]:
    """Runs on a dask worker: load the teacher once per process, compute one shard's rows."""
    key = repr((sorted(cfg_dict.items()), out, device))
    if key not in _WORKER_STATE:
        import torch

        torch.set_num_threads(threads)
        cfg = TeacherConfig(**cfg_dict)
        worker = ShardWorker(cfg, load_samples(cfg), device)
        writer = CacheWriter(Path(out))
        use_codebooks(worker, writer)
        _WORKER_STATE[key] = (worker, writer)
    worker, writer = _WORKER_STATE[key]
    before = worker.model_seconds
    hashed = job.hash_while_decoding()
    prepared = [worker.prepare(i, i in hashed) for i in job.compute]
    read = run_job(worker, writer, job, prepared)
    return job.shard, len(job.write), worker.model_seconds - before, read


def _client(scheduler: str) -> tuple[Any, Any]:
    """A dask client (and the cluster it started, for local:N). A tcp:// scheduler that does
    not answer within dask's connect timeout fails in one line."""
    import dask
    from dask.distributed import Client, LocalCluster

    kind, value = parse_scheduler(scheduler)
    if kind == "local":
        cluster = LocalCluster(n_workers=int(value), threads_per_worker=1, processes=True,
                               dashboard_address=None, silence_logs=logging.ERROR)
        return Client(cluster), cluster
    timeout = dask.config.get("distributed.comm.timeouts.connect")
    try:
        return Client(scheduler, timeout=timeout), None
    except OSError as exc:  # TimeoutError included
        raise PipelineError(
            f"cannot reach the dask scheduler at {scheduler} within {timeout} "
            f"({str(exc).splitlines()[0]}); start one there with `dask scheduler`, or wait "
            "longer with DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT=120s") from exc


def run_distributed(cfg: TeacherConfig, samples: SampleSequence, spec: StoreSpec,
                     writer: CacheWriter | None, todo: Plan,
                     input_hashes: Sequence[str | None], out: Path, device: str,
                     hashes: FileHashes,
                     progress: Callable[[int, int], None] | None) -> RunReport:
    from dask.distributed import as_completed

    environ = dict(os.environ)  # dask sets OMP/MKL_NUM_THREADS=1 here for its workers
    client = cluster = None
    try:
        client, cluster = _client(cfg.scheduler or "")  # reachable before anything is written
        if writer is None:
            # the coordinator creates the store (and E_C) once; workers only fill shards
            creator = ShardWorker(cfg, samples, device)
            writer = create_store(creator, out, spec)
            del creator
            rows: list[int] = list(range(writer.n))
        else:
            repair_static(None, writer, spec, todo, samples, cfg, device)
            rows = todo.rows
        jobs = shard_jobs(writer, rows, input_hashes, writer.batch_size)
        total = sum(len(j.write) for j in jobs)
        n_workers = max(1, len(client.scheduler_info()["workers"]))
        threads = max(1, (os.cpu_count() or 1) // n_workers)
        cfg_dict = {**asdict(cfg), "scheduler": None, "overwrite": False, "repair": False,
                    "root": str(cfg.resolved_root()), "out": str(out)}
        futures = [client.submit(_shard_task, cfg_dict, str(out), device, threads, job,
                                 pure=False, key=f"teacher-shard-{job.shard}") for job in jobs]
        done_rows, model_s = 0, 0.0
        for fut in as_completed(futures):
            _, n_rows, seconds, read = fut.result()
            hashes.learn(read)
            done_rows += n_rows
            model_s += seconds
            if progress:
                progress(done_rows, total)
    finally:
        if client is not None:
            client.close()
        if cluster is not None:
            cluster.close()
        os.environ.clear()
        os.environ.update(environ)
    writer.touch()
    return RunReport(str(out), writer.n, done_rows, len(jobs), 0.0, model_s, "written",
                     extra={"workers": n_workers})
