"""`pipeline ablate`: a plan's rows x seeds as DVC experiments on the one cached teacher.

Each run is `dvc exp run --temp --name <plan>-<row>-s<seed> -S ...`: DVC runs it in a
temporary copy of the workspace, so the workspace's own `runs/` and `metrics/` are never
touched, and the result is an ordinary experiment (`dvc exp show`, `dvc exp apply NAME`
restores it, `dvc exp run` reproduces it). When the pipeline reads data DVC does not hold
(`data/DELIVER` and `weights/` in the repository, which that copy would lack, or folders
outside it, which every copy would hash again), each job runs in a linked workspace of its
own instead (`pipeline.ablation.workspace`). Stage one is checked once up front (`dvc status`
of every stage before `train` must be clean, and no row may change a key those stages read),
so in every run DVC skips it. Finished runs are the experiment refs of the current commit:
a killed ablate, rerun, starts only the runs that are missing. The plan itself is resolved
by `pipeline.ablation.setup.prepare`.
"""

from __future__ import annotations

import concurrent.futures
import copy
import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import yaml

from any2seg.errors import PipelineError
from pipeline.ablation import workspace as ablation_workspace
from pipeline.ablation.dag import STAGE_ONE
from pipeline.ablation.leftovers import MARKER, clean_killed_runs
from pipeline.ablation.plan import assign, leaves
from pipeline.ablation.setup import Setup
from pipeline.ablation.setup import git as _git


def _dvc(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([_dvc_bin(), *args], cwd=root, capture_output=True, text=True)


def _dvc_bin() -> str:
    here = Path(sys.executable).parent / "dvc"
    return str(here) if here.exists() else "dvc"


def _rel(setup: Setup, path: Path) -> str:
    return os.path.relpath(path, setup.root)


def check_stage_one(setup: Setup) -> dict[str, Any] | None:
    """The stages the target runs before the ablated ones (stage one and its inputs) are
    recorded in dvc.lock and up to date; returns the teacher cache's fingerprints (read
    once, named in the report), None when the target does not read the teacher cache."""
    lock = setup.pipeline.parent / "dvc.lock"
    frozen = setup.dag.frozen(setup.target)
    if not lock.is_file():
        what = "the teacher cache" if STAGE_ONE in frozen else \
            f"the stages before {setup.target}"
        first = setup.dag.address(frozen[-1] if frozen else setup.target)
        raise PipelineError(f"ablate needs {what} recorded in {_rel(setup, lock)}: run "
                            f"`dvc repro {first}` once (committing dvc.lock is optional)")
    if frozen:
        result = _dvc(setup.root, "status", "--json",
                      *[setup.dag.address(s) for s in frozen])
        if result.returncode != 0:
            raise PipelineError(f"dvc status failed: "
                                f"{_last_line(result.stderr or result.stdout)}")
        changed = json.loads(result.stdout or "{}")
        if changed:
            what = "the teacher cache is" if STAGE_ONE in frozen else \
                f"{', '.join(frozen)} {'is' if len(frozen) == 1 else 'are'}"
            raise PipelineError(f"{what} not up to date with {_rel(setup, lock)} (dvc "
                                f"status: {', '.join(changed)} changed); run `dvc repro "
                                f"{setup.dag.address(frozen[-1])}` first, then ablate")
    setup.links, setup.outside = ablation_workspace.inputs_outside_dvc(
        setup.root, setup.dag, setup.target)
    return teacher_info(setup)


def teacher_info(setup: Setup) -> dict[str, Any] | None:
    """The teacher cache's fingerprints, as the report names them (None when the target
    does not read the teacher cache)."""
    from any2seg.store import open_cache

    if STAGE_ONE not in setup.dag.frozen(setup.target):
        return None
    store = next(o for o in setup.dag.stages[STAGE_ONE].outs if o.endswith(".zarr"))
    cache = open_cache(setup.root / store)
    fingerprint = cache.teacher_fingerprint
    digest = hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:16]
    return {"store": store, "teacher_fingerprint_sha256": digest,
            "teacher_fingerprint": fingerprint,
            "dataset_fingerprint": cache.dataset_fingerprint}


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "(no output)"


def baseline_rev(root: Path) -> str:
    rev = _git(root, "rev-parse", "--verify", "-q", "HEAD^{commit}", check=False).strip()
    if not rev:
        raise PipelineError(f"{root} has no commit; ablate records runs as DVC experiments of "
                            "a commit: git add -A && git commit first")
    return rev


def finished_runs(root: Path, rev: str) -> dict[str, str]:
    """{experiment name: its commit} of the experiments DVC recorded on commit `rev`."""
    out = _git(root, "for-each-ref", "--format=%(refname) %(objectname)",
               f"refs/exps/{rev[:2]}/{rev[2:]}/")
    found = {}
    for line in out.splitlines():
        ref, _, commit = line.partition(" ")
        found[ref.rsplit("/", 1)[-1]] = commit
    return found


def run_params(setup: Setup, commit: str) -> dict[str, Any]:
    rel = _rel(setup, setup.params_path)
    return yaml.safe_load(_git(setup.root, "show", f"{commit}:{rel}")) or {}


ABSENT = "(not set)"


def expected_params(setup: Setup, row: str, seed: int) -> dict[str, Any]:
    """The params file the run of (row, seed) would record: the pipeline's params with
    every override the run sets."""
    merged = copy.deepcopy(setup.params)
    for key, value in setup.overrides(row, seed).items():
        assign(merged, key, value)
    return merged


def differences(recorded: dict[str, Any], expected: dict[str, Any], keys: list[str]
                ) -> list[tuple[str, Any, Any]]:
    """(key, recorded value, expected value) for every leaf of the listed params keys whose
    values differ (ABSENT where one side lacks the key)."""
    out = []
    for key in keys:
        have, want = leaves(recorded, key), leaves(expected, key)
        for leaf in sorted(set(have) | set(want)):
            a, b = have.get(leaf, ABSENT), want.get(leaf, ABSENT)
            if a != b or (type(a) is bool) != (type(b) is bool):
                out.append((leaf, a, b))
    return out


def run_keys(setup: Setup) -> list[str]:
    """The params keys every stage the target runs lists (stage one's included)."""
    keys: list[str] = []
    for stage in setup.dag.runs(setup.target):
        keys += [k for k in setup.dag.stages[stage].params if k not in keys]
    return keys


def mismatch(setup: Setup, commit: str, row: str, seed: int) -> list[tuple[str, Any, Any]]:
    """How the params a finished run recorded differ from what this command would run."""
    return differences(run_params(setup, commit), expected_params(setup, row, seed),
                       run_keys(setup))


def check_finished(setup: Setup, done: dict[str, str]) -> None:
    """A finished run counts only if it is the run this command would start: every param
    of every stage it ran equal. Refused otherwise, in one line, with how to go on."""
    bad: dict[str, list[tuple[str, Any, Any]]] = {}
    for row, seed in setup.runs():
        name = setup.run_name(row, seed)
        if name in done:
            diff = mismatch(setup, done[name], row, seed)
            if diff:
                bad[name] = diff
    if not bad:
        return
    name, diff = next(iter(bad.items()))
    shown = "; ".join(f"{k}: {_show(a)} there, {_show(b)} now" for k, a, b in diff[:4])
    more = f" and {len(diff) - 4} more" if len(diff) > 4 else ""
    others = f" ({len(bad) - 1} more of the plan's runs differ too)" if len(bad) > 1 else ""
    raise PipelineError(
        f"experiment {name!r} of commit {setup.baseline_rev[:7]} ran with other params than "
        f"this command would run ({shown}{more}){others}: rerun with the options it was "
        f"run with, remove those runs (`dvc exp remove {' '.join(bad)}`), or run this under "
        f"another plan name (a copy of {_rel(setup, setup.plan.path.resolve())} named "
        "otherwise)")


def _show(value: Any) -> str:
    return value if value == ABSENT else json.dumps(value)


def _gpus() -> list[str]:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [g for g in visible.split(",") if g.strip()]
    try:
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]
    except Exception:  # no torch CUDA: CPU runs
        return []


def _set_args(setup: Setup, overrides: dict[str, Any]) -> list[str]:
    prefix = "" if setup.pipeline.parent == setup.root else f"{_rel(setup, setup.params_path)}:"
    args = []
    for key, value in overrides.items():
        args += ["-S", f"{prefix}{key}={json.dumps(value)}"]
    return args


def run_one(setup: Setup, row: str, seed: int, gpu: str | None, log_dir: Path,
            threads: int | None = None, slot: int = 0) -> tuple[str, float]:
    """One `dvc exp run --temp` (or, when the runs read data DVC does not hold, an in-place
    `dvc exp run` in the linked workspace `slot`, fetched back); returns the experiment name
    and its wall seconds. Its output goes to a log, and while it runs `<log_dir>/<name>.pid`
    names its process (see `clean_killed_runs`)."""
    name = setup.run_name(row, seed)
    lock = setup.pipeline.parent / "dvc.lock"
    untracked = _git(setup.root, "ls-files", _rel(setup, lock)).strip() == ""
    temp = [] if setup.linked else ["--temp"]  # a linked workspace runs in place
    cmd = [_dvc_bin(), "--wait-for-lock", "exp", "run", *temp, "--name", name]
    if temp and untracked:
        cmd += ["-C", _rel(setup, lock)]  # copy the record of stage one in
    cmd += _set_args(setup, setup.overrides(row, seed))
    # the plan's target (and what it needs): other stages of the pipeline, such as the
    # CodeAlign chain of the root dvc.yaml for an evaluate plan, are not part of a row
    cmd.append(setup.dag.address(setup.target))
    env = dict(os.environ)
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    if threads is not None:  # CPU runs side by side share the cores instead of each taking all
        env.setdefault("OMP_NUM_THREADS", str(threads))
    log = log_dir / f"{name}.log"
    marker = log_dir / f"{name}{MARKER}"
    held: tuple[int, ...] = ()
    cwd = setup.root
    with open(log, "w") as f:
        try:
            if setup.linked:
                fd, folder = ablation_workspace.claim(setup.root, slot)
                held = (fd,)
                cwd = ablation_workspace.prepare(
                    setup.root, folder, setup.baseline_rev, setup.links,
                    _rel(setup, lock) if untracked else None,
                    [setup.dag.address(s) for s in setup.dag.frozen(setup.target)],
                    _dvc_bin(), tuple(o for s in setup.dag.frozen(setup.target)
                                      for o in setup.dag.stages[s].outs))
                f.write(f"# in the linked workspace {_rel(setup, cwd)} "
                        f"({', '.join(setup.links) or 'nothing'} linked)\n")
            pinned = {k: env[k] for k in ("CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS") if k in env}
            f.write("$ " + " ".join([*(f"{k}={v}" for k, v in pinned.items()), *cmd]) + "\n")
            f.flush()
            started = time.time()
            proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT,
                                    pass_fds=held)  # the slot stays locked while dvc lives
            try:
                marker.write_text(json.dumps({"pid": proc.pid, "baseline": setup.baseline_rev,
                                              "started": started}))
                code = proc.wait()
            finally:
                marker.unlink(missing_ok=True)
            seconds = time.time() - started
            f.flush()
            text = log.read_text()
            f.write(f"ablate: {name} took {seconds:.1f} s (exit {code})\n")
            if code == 0 and setup.linked:
                ablation_workspace.fetch(setup.root, cwd, setup.baseline_rev, name)
        finally:
            for fd in held:
                os.close(fd)
    if code != 0:
        raise PipelineError(f"run {name} failed ({_last_line(text)}); full log: {log}")
    reran = [s for s in setup.dag.frozen(setup.target)
             if f"Running stage '{setup.dag.address(s)}'" in text]
    if reran:  # the up-front check makes this impossible; say so loudly if it happens
        raise PipelineError(f"run {name} reran {reran[0]} (stage one must not rerun); "
                            f"log: {log}")
    return name, seconds


def ablate(setup: Setup, jobs: int = 1, echo: Any = print) -> dict[str, str]:
    """Run every missing (row, seed) and return {name: commit} of all of them."""
    if jobs < 1:
        raise PipelineError(f"--jobs must be an integer >= 1, got {jobs}")
    setup.baseline_rev = baseline_rev(setup.root)
    clean_killed_runs(setup.root, setup.out / "logs", echo)
    done = finished_runs(setup.root, setup.baseline_rev)
    todo = []
    for row, seed in setup.runs():
        name = setup.run_name(row, seed)
        if name not in done:
            todo.append((row, seed))
    check_finished(setup, done)
    total = len(setup.runs())
    seeds = f"{len(setup.seeds)} seed" + "s" * (len(setup.seeds) != 1)
    echo(f"{setup.plan.name}: {len(setup.rows)} rows x {seeds} = {total} "
         f"runs, {total - len(todo)} finished, {len(todo)} to run on commit "
         f"{setup.baseline_rev[:7]}")
    if todo and setup.linked:
        what, why = [], []
        if setup.links:
            what.append(f"{', '.join(setup.links)}: in the repository but neither in git nor "
                        "a DVC output")
            why.append("a dvc exp run --temp copy would lack them")
        if setup.outside:
            what.append(f"{', '.join(setup.outside)}: outside the repository")
            why.append("a --temp copy would hash them again in every run")
        echo(f"{'; '.join(what)}, so each job runs in a linked workspace under "
             f"{ablation_workspace.HOME} ({'; '.join(why)})")
    if todo:
        log_dir = setup.out / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        gpus = _gpus() if jobs > 1 else []
        threads = None if gpus or jobs == 1 else max(1, (os.cpu_count() or 1) // jobs)
        slots, count, lock = list(range(jobs)), [0], threading.Lock()
        failed = threading.Event()

        def work(item: tuple[str, int]) -> str | None:
            with lock:
                if failed.is_set():  # a run failed: its worker must not take the next one
                    return None
                slot = slots.pop()
            try:
                gpu = gpus[slot % len(gpus)] if gpus else None
                echo(f"started {setup.run_name(*item)}"
                     + (f" (CUDA_VISIBLE_DEVICES={gpu})" if gpu is not None else ""))
                name, seconds = run_one(setup, *item, gpu, log_dir, threads, slot)
                with lock:  # said here, before this worker takes the next run
                    count[0] += 1
                    echo(f"finished {name} ({count[0]} of {len(todo)}, {seconds:.0f} s)")
                return name
            except BaseException:
                failed.set()
                raise
            finally:
                with lock:
                    slots.append(slot)

        pool = concurrent.futures.ThreadPoolExecutor(jobs)
        try:
            for future in concurrent.futures.as_completed([pool.submit(work, item)
                                                           for item in todo]):
                future.result()  # the first failure stops ablate with its message
        finally:  # after a failure no new run starts; the running ones end first
            pool.shutdown(wait=True, cancel_futures=True)
    done = finished_runs(setup.root, setup.baseline_rev)
    return {setup.run_name(r, s): done[setup.run_name(r, s)] for r, s in setup.runs()
            if setup.run_name(r, s) in done}
