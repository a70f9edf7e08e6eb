import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# the environment's own commands (dvc, pipeline, torchrun) first, as `make demo` has them:
# `make test` runs .venv/bin/python without the venv on PATH
os.environ["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), os.environ["PATH"]])
# Torch and OpenMP threads per process: the cores shared out over pytest's workers (one
# each under `make test`'s two workers on two cores). Set before torch is imported, so this
# process and every command a test starts inherit it; the tests' tiny models gain nothing
# from more, and two workers' threads on two cores only spin against each other (a test
# ConvNeXt forward: 640 ms at 2 threads per worker, 14.5 ms at 1). A test about thread
# counts sets its own.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _WORKERS)))

import pytest  # noqa: E402

from tests.layouts import write_deliver, write_mcubes  # noqa: E402


@pytest.fixture
def deliver_root(tmp_path):
    """A tiny DELIVER tree in the real layout; returns (root, what was written)."""
    root = tmp_path / "DELIVER"
    return root, write_deliver(root)


@pytest.fixture
def mcubes_root(tmp_path):
    root = tmp_path / "multimodal_dataset"
    return root, write_mcubes(root)


@pytest.fixture(scope="session")
def small_sample(tmp_path_factory):
    """A small generated sample shared by the tests that only read it."""
    from any2seg.synth import SampleSpec, make_sample

    root = tmp_path_factory.mktemp("sample") / "deliver-sample"
    spec = SampleSpec(size=64, train=24, val=12, test=12, frames_per_scene=2, seed=3)
    make_sample(root, spec, workers=1)
    return root, spec


@pytest.fixture(scope="session")
def teacher_sample(small_sample):
    """The small sample with the embedded LanguageBind-format teacher beside it."""
    from stages.teacher.default.folders import write_default_teacher

    root, spec = small_sample
    write_default_teacher(root / "teacher")
    return root, spec


@pytest.fixture(scope="session")
def sample_cache(teacher_sample, tmp_path_factory):
    """The small sample's teacher cache (all splits)."""
    from stages.teacher.run import TeacherConfig, cache_teacher

    root, spec = teacher_sample
    out = tmp_path_factory.mktemp("cache") / "sample.zarr"
    cache_teacher(TeacherConfig(dataset="sample", root=str(root), out=str(out),
                                teacher_root=str(root / "teacher"), rows_per_shard=16))
    return root, out


@pytest.fixture
def own_sample(teacher_sample, tmp_path):
    """A private copy of the small sample and its teacher (for tests that edit its files)."""
    import shutil

    root, _ = teacher_sample
    copy = tmp_path / "sample"
    shutil.copytree(root, copy)
    return copy


@pytest.fixture(scope="module")
def one_thread():
    """Torch computes with one thread in this process while a module runs (opt in with
    `pytestmark = pytest.mark.usefixtures("one_thread")`): the tests' tiny models gain
    nothing from a second thread, and on `make test`'s two workers over two cores the
    threads of both only spin against each other."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def stage_one_project(tmp_path_factory):
    """The root pipeline at the tests' tiny params after `dvc repro cache_teacher`, built
    once per run for all workers (tests/dvc_project.py); (folder, that repro's output).
    Read-only: a module copies it with `clone_project` before running or editing."""
    from tests.dvc_project import build_stage_one, shared_build

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):  # the workers' basetemps share this run's folder
        root = root.parent
    return shared_build(root, "stage-one", build_stage_one)


# `make test` runs pytest on 2 workers (pytest-xdist). The tests of a module that share an
# expensive repository fixture go to one worker as one unit, so it is built once; every
# other test is its own unit. (This is what `--dist loadgroup` does, but under pytest 9.2
# xdist 3.8's group suffix no longer reaches the node id, so the scope is computed here.)
_ONE_WORKER = {"test_ablate.py": "ablate", "test_dvc.py": "dvc",
               "test_real_data_flow.py": "real-data",
               "test_distributed.py": "distributed"}  # its two_ranks torchrun fixture: 20 s
# The longest units start first, in this order, so the wall time is about half the work:
# worker 1 builds stage one in test_dvc's fixture while worker 2 runs the README flow; as
# that unit has fewer than 3 tests, worker 2 is sent test_ablate next, whose fixture finds
# stage one built (tests/dvc_project.py). The short tests then go to whichever is free.
# Without tests/e2e (`make test`), test_distributed's unit (~70 s) is the longest: first.
_FIRST = ("dvc", "real-data", "ablate", "distributed")


def pytest_xdist_make_scheduler(config, log):
    from xdist.scheduler import LoadScopeScheduling

    class SharedFixtureScheduling(LoadScopeScheduling):
        ordered = False

        def _split_scope(self, nodeid: str) -> str:
            return _ONE_WORKER.get(nodeid.split("::", 1)[0].rsplit("/", 1)[-1], nodeid)

        def _assign_work_unit(self, node) -> None:
            if not self.ordered:  # the queue is complete at the first assignment
                self.ordered = True
                rank = {unit: i for i, unit in enumerate(_FIRST)}
                for unit in sorted(self.workqueue, key=lambda u: rank.get(u, len(rank))):
                    self.workqueue.move_to_end(unit)  # stable: the rest keep their order
            super()._assign_work_unit(node)

    return SharedFixtureScheduling(config, log)
