"""Stage one on a real dask cluster: `dask scheduler` and two `dask worker --nthreads 1`
processes on 127.0.0.1, as a user starts them; one worker SIGKILLed mid-run."""

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from any2seg.store import open_cache
from stages.teacher.run import cache_teacher
from tests.teacher.test_cache_teacher import assert_same_store, config

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

SHARD = {"split": ["train"], "rows_per_shard": 2, "batch_size": 1}  # 12 shards of 2 rows


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dask(*args: str) -> list[str]:
    return [str(Path(sys.executable).with_name("dask")), *args]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A scheduler and two single-threaded workers (no nanny: a killed worker stays dead);
    yields (address, {worker address: pid}); every process is ended afterwards. Shared by
    the tests below in file order: the last one kills a worker."""
    from dask.distributed import Client

    tmp_path = tmp_path_factory.mktemp("cluster")

    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path),
           "HF_HUB_OFFLINE": "1"}
    procs: list[subprocess.Popen] = []
    log = (tmp_path / "dask.log").open("w")

    def start(args: list[str]) -> None:
        procs.append(subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT,
                                      cwd=tmp_path))

    try:
        start(_dask("scheduler", "--host", "127.0.0.1", "--port", str(port),
                    "--no-dashboard"))
        for _ in range(2):
            start(_dask("worker", address, "--nthreads", "1", "--no-nanny", "--no-dashboard",
                        "--host", "127.0.0.1", "--local-directory", str(tmp_path / "w")))
        with Client(address, timeout="60s") as client:
            client.wait_for_workers(2, timeout=120)
            pids = client.run(os.getpid)
        yield address, pids
    finally:
        # workers first, and SIGKILL as the test does to one (their graceful close takes
        # seconds, and a worker whose scheduler is gone already spends its connect timeout
        # trying to reach it: the teardown took 15 s); then the scheduler, politely
        for p in reversed(procs):
            if p.poll() is None:
                if p is procs[0]:
                    p.terminate()
                else:
                    p.kill()
        for p in reversed(procs):
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        log.close()


@pytest.fixture(scope="module")
def single_process(teacher_sample, tmp_path_factory):
    root, _ = teacher_sample
    out = tmp_path_factory.mktemp("single") / "single.zarr"
    cache_teacher(config(root, out, **SHARD))
    return root, out


def _intact(out: Path) -> None:
    cache = open_cache(out)
    assert cache.done.all()
    assert cache.verify() == []  # every chunk's checksum matches: nothing half-written
    assert not list(out.rglob("*.partial"))


@pytest.mark.slow
def test_two_worker_cluster_equals_single_process(single_process, cluster, tmp_path):
    root, single = single_process
    address, pids = cluster
    out = tmp_path / "dist.zarr"
    report = cache_teacher(config(root, out, scheduler=address, **SHARD))
    assert report.extra["workers"] == 2 and report.computed_rows == 24
    assert_same_store(single, out)
    _intact(out)


@pytest.mark.slow
def test_a_worker_killed_halfway_loses_nothing(single_process, cluster, tmp_path):
    from dask.distributed import Client

    root, single = single_process
    address, pids = cluster
    out = tmp_path / "dist.zarr"
    result: dict = {}

    def run() -> None:
        try:
            result["report"] = cache_teacher(config(root, out, scheduler=address, **SHARD))
        except BaseException as exc:  # noqa: BLE001 - shown by the assertion below
            result["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    done_dir = out / "done" / "c"
    killed = None
    with Client(address, timeout="60s") as client:
        deadline = time.time() + 300
        while time.time() < deadline and thread.is_alive() and killed is None:
            if done_dir.is_dir() and any(done_dir.iterdir()):
                busy = [w for w, tasks in client.processing().items() if tasks]
                if busy:  # a worker holding a shard task right now
                    killed = busy[0]
                    written = len(list(done_dir.iterdir()))
                    os.kill(pids[killed], signal.SIGKILL)
            time.sleep(0.005)
    thread.join(timeout=600)
    assert killed is not None, "no worker was busy to kill"
    assert written < 12, "the kill must land mid-run"
    assert "error" not in result, result.get("error")
    assert result["report"].computed_rows == 24
    assert_same_store(single, out)
    _intact(out)
