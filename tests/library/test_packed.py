"""Packed data sets (`pipeline pack`, `any2seg.datasets.packed`): a pack reads exactly as
the folder it was packed from, refuses other data, and survives being killed."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from any2seg import datasets
from any2seg.datasets.packed import PackedPath
from any2seg.errors import DatasetError, PipelineError
from any2seg.pack import pack
from pipeline.cli import main
from stages.student.checkpoint_file import load_checkpoint_file
from tests.layouts import write_deliver

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def assert_same_samples(folder, packed):
    """Every sample equal array for array (values and dtypes), with the same metadata."""
    assert packed.ids == folder.ids and len(folder) > 0
    assert packed.classes == folder.classes and packed.modalities == folder.modalities
    for a, b in zip(folder, packed, strict=True):
        assert list(b.modalities) == list(a.modalities)
        for m in a.modalities:
            assert b.modalities[m].dtype == a.modalities[m].dtype, (a.id, m)
            np.testing.assert_array_equal(b.modalities[m], a.modalities[m], err_msg=f"{a.id} {m}")
        assert b.label.dtype == a.label.dtype
        np.testing.assert_array_equal(b.label, a.label)
        assert (b.condition, b.case, b.ranges) == (a.condition, a.case, a.ranges)
        assert list(b.raw) == list(a.raw)
        for m in a.raw:
            np.testing.assert_array_equal(b.raw[m], a.raw[m])
        assert {k: relative(p) for k, p in b.files.items()} == \
            {k: relative(p) for k, p in a.files.items()}


def relative(path):
    """A sample file's path below its root (folder or pack)."""
    if isinstance(path, PackedPath):
        return path.rel
    parts = path.parts
    top = next(i for i, part in enumerate(parts) if part in TOP_FOLDERS)
    return "/".join(parts[top:])


TOP_FOLDERS = {"img", "hha", "depth", "event", "lidar", "semantic", "polL_color",
               "polL_aolp_sin", "polL_aolp_cos", "polL_dolp", "NIR_warped", "GT"}


def run_cli(capsys, *args):
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def test_deliver_pack_reads_like_the_folder(deliver_root, tmp_path):
    root, _ = deliver_root
    out = tmp_path / "deliver.h5"
    report = pack("deliver", root, out)
    assert report["status"] == "written" and report["missing"] == []
    # hha/ and depth/ are both packed: either depth source reads as from the folder
    for depth_source in ("hha", "raw"):
        assert_same_samples(datasets.load("deliver", root, "train,val,test",
                                          depth_source=depth_source),
                            datasets.load("deliver", out, "train,val,test",
                                          depth_source=depth_source))
    # filters and modality subsets go through the same reader code
    for options in ({"condition": "fog"}, {"case": "none"}, {"case": "eventlowres"},
                    {"modalities": ["lidar", "rgb"]}):
        assert_same_samples(datasets.load("deliver", root, "train,val", **options),
                            datasets.load("deliver", out, "train,val", **options))
    folder_info, packed_info = datasets.info("deliver", root), datasets.info("deliver", out)
    assert packed_info.pop("root") == str(out)
    folder_info.pop("root")
    assert packed_info == folder_info


def test_mcubes_pack_reads_like_the_folder(mcubes_root, tmp_path):
    """PNG RGB / NIR / GT and float .npy AoLP / DoLP, split lists packed with them."""
    root, _ = mcubes_root
    out = tmp_path / "mcubes.h5"
    pack("mcubes", root, out)
    # the official 1024 frame upsamples these tiny maps, so most checks keep frame=None
    for split, options in (("val", {}), ("train", {"frame": None}),
                           ("val", {"frame": None, "cmnext_val": False}),
                           ("test", {"frame": None, "modalities": ["dolp", "aolp"]})):
        assert_same_samples(datasets.load("mcubes", root, split, **options),
                            datasets.load("mcubes", out, split, **options))
    sample = datasets.load("mcubes", out, "train")[0]
    assert sample.modalities["aolp"].dtype == np.float32 and sample.ranges["aolp"] == (-1, 1)


def test_generated_sample_pack_by_cli(small_sample, tmp_path, capsys):
    root, spec = small_sample
    out = tmp_path / "sample.h5"
    code, text, _ = run_cli(capsys, "pack", "--dataset", "sample", "--root", str(root),
                            "--out", str(out))
    assert code == 0 and "packed 48 samples" in text
    assert [p.name for p in tmp_path.iterdir()] == ["sample.h5"]  # one file, no leftovers
    assert_same_samples(datasets.load("sample", root, "train,val,test"),
                        datasets.load("sample", out, "train,val,test"))
    assert_same_samples(datasets.load("sample", root, "val", depth_source="raw"),
                        datasets.load("sample", out, "val", depth_source="raw"))
    code, text, _ = run_cli(capsys, "pack", "--dataset", "sample", "--root", str(root),
                            "--out", str(out))
    assert code == 0 and "up to date" in text
    code, text, _ = run_cli(capsys, "datasets", "check", "--dataset", "sample", "--root",
                            str(out))
    assert code == 0 and "checked 48 samples" in text and ": 0 bad" in text


def test_pack_of_other_data_is_refused(deliver_root, tmp_path):
    root, _ = deliver_root
    out = tmp_path / "deliver.h5"
    pack("deliver", root, out)
    packed = out.read_bytes()

    other = tmp_path / "other"
    write_deliver(other, seed=1)  # same file names, other bytes
    with pytest.raises(PipelineError, match="packed from other data .*changed since"):
        pack("deliver", other, out)
    fewer = tmp_path / "fewer"
    write_deliver(fewer)  # the same bytes, one sample less
    (fewer / "img/sun/test/MAP_6_point9_overexposure/000130_rgb_front.png").unlink()
    with pytest.raises(PipelineError, match="packed from other data .*other samples or files"):
        pack("deliver", fewer, out)
    with pytest.raises(PipelineError, match="packed from other data .*splits train"):
        pack("deliver", root, out, ["train"])
    with pytest.raises(PipelineError, match="packed from other data .*dataset deliver"):
        pack("sample", root, out)
    assert out.read_bytes() == packed  # refusals leave the pack alone

    # a file edited in place is other data; a file only touched is not
    victim = root / "lidar" / "fog" / "val" / "MAP_4_point7" / "000120_lidar_front.png"
    os.utime(victim, ns=(1, 1))
    assert pack("deliver", root, out)["status"] == "up-to-date"
    victim.write_bytes((other / victim.relative_to(root)).read_bytes())
    with pytest.raises(PipelineError, match=r"1 file\(s\) changed .*lidar/fog/val"):
        pack("deliver", root, out)
    assert pack("deliver", root, out, overwrite=True)["status"] == "written"
    np.testing.assert_array_equal(
        datasets.load("deliver", out, "val")[0].modalities["lidar"],
        datasets.load("deliver", other, "val")[0].modalities["lidar"])

    foreign = tmp_path / "notes.h5"
    foreign.write_text("mine")
    with pytest.raises(PipelineError, match="not a packed data set"):
        pack("deliver", root, foreign)
    assert foreign.read_text() == "mine"


KILLER = """
import os, signal, sys
import any2seg.pack as packing

read, calls = packing._read, [0]

def read_then_die(path):
    calls[0] += 1
    if calls[0] == 20:
        os.kill(os.getpid(), signal.SIGKILL)
    return read(path)

packing._read = read_then_die
packing.pack("deliver", sys.argv[1], sys.argv[2], overwrite=True, workers=1)
"""


def test_killed_pack_leaves_no_half_file_under_the_final_name(deliver_root, tmp_path):
    root, _ = deliver_root
    out = tmp_path / "deliver.h5"
    script = tmp_path / "killer.py"
    script.write_text(textwrap.dedent(KILLER))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}

    def killed_run():
        result = subprocess.run([sys.executable, str(script), str(root), str(out)], env=env,
                                capture_output=True, timeout=300)
        assert result.returncode == -signal.SIGKILL, result.stderr.decode()

    killed_run()
    assert not out.exists()
    assert [p.name.split("-")[0] for p in tmp_path.glob(".deliver.h5.tmp-*")] == \
        [".deliver.h5.tmp"]  # the half file, under its temporary name
    pack("deliver", root, out)  # the next run cleans up and packs whole
    assert not list(tmp_path.glob(".deliver.h5.tmp-*"))
    good = out.read_bytes()
    killed_run()  # killed while repacking over a good pack: the good one stays
    assert out.read_bytes() == good
    assert_same_samples(datasets.load("deliver", root, "train,val,test"),
                        datasets.load("deliver", out, "train,val,test"))


class WhoRead(torch.utils.data.Dataset):
    """A sample and whether the process reading it had opened the pack itself."""

    def __init__(self, samples):
        self.samples = samples

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        sample = self.samples[i]
        pack_state = sample.files["rgb"].pack._open
        return sample, os.getpid(), pack_state.pid == os.getpid()


def test_dataloader_workers_open_their_own_handle(deliver_root, tmp_path):
    root, _ = deliver_root
    out = tmp_path / "deliver.h5"
    pack("deliver", root, out)
    packed = datasets.load("deliver", out, "train,val,test")
    packed[0]  # the parent has read (opened the file) before the workers fork
    loader = torch.utils.data.DataLoader(WhoRead(packed), batch_size=None, num_workers=2,
                                         collate_fn=lambda item: item)
    got = list(loader)
    assert {pid for _, pid, _ in got} - {os.getpid()}  # read in worker processes
    assert all(own for _, _, own in got)
    folder = datasets.load("deliver", root, "train,val,test")
    by_id = {s.id: s for s, _, _ in got}
    for a in folder:
        np.testing.assert_array_equal(by_id[a.id].modalities["rgb"], a.modalities["rgb"])
        np.testing.assert_array_equal(by_id[a.id].label, a.label)


def test_pickled_sequence_reads_and_notices_a_replaced_pack(deliver_root, tmp_path):
    """What spawn / dask workers receive: the path and file identity, no handle."""
    root, _ = deliver_root
    out = tmp_path / "deliver.h5"
    pack("deliver", root, out)
    packed = datasets.load("deliver", out, "val")
    copy = pickle.loads(pickle.dumps(packed))
    assert_same_samples(packed, copy)
    stale = pickle.dumps(packed)
    other = tmp_path / "other"
    write_deliver(other, seed=2)
    pack("deliver", other, out, overwrite=True)
    with pytest.raises(DatasetError, match="was replaced while it was being read"):
        pickle.loads(stale)[0]


def test_bad_packs_fail_in_one_line(deliver_root, tmp_path, capsys):
    root, _ = deliver_root
    code, _, err = run_cli(capsys, "datasets", "info", "--dataset", "deliver", "--root",
                           str(tmp_path / "absent.h5"))
    assert code == 1 and err.count("\n") == 1 and "pipeline pack" in err
    import h5py

    with h5py.File(tmp_path / "plain.h5", "w") as f:
        f["x"] = [1, 2]
    code, _, err = run_cli(capsys, "datasets", "info", "--dataset", "deliver", "--root",
                           str(tmp_path / "plain.h5"))
    assert code == 1 and "not a packed data set" in err and err.count("\n") == 1
    out = tmp_path / "deliver.h5"
    pack("deliver", root, out)
    cut = tmp_path / "cut.h5"
    cut.write_bytes(out.read_bytes()[: out.stat().st_size * 3 // 4])
    with pytest.raises(DatasetError) as err:
        for _ in datasets.load("deliver", cut, "train,val,test"):
            pass
    assert "\n" not in str(err.value) and str(cut) in str(err.value)
    code, _, err = run_cli(capsys, "pack", "--dataset", "deliver", "--root", str(out),
                           "--out", str(tmp_path / "again.h5"))
    assert code == 1 and "already a packed data set" in err


def test_teacher_store_is_the_same_from_folder_and_pack(sample_cache, tmp_path):
    """The store built from the pack has the folder store's dataset fingerprint and the
    same bytes in every array (the teacher saw identical inputs)."""
    from any2seg.store import open_cache
    from stages.teacher.run import TeacherConfig, cache_teacher

    root, folder_store = sample_cache
    packed = tmp_path / "sample.h5"
    pack("sample", root, packed)
    out = tmp_path / "packed.zarr"
    cache_teacher(TeacherConfig(dataset="sample", root=str(packed), out=str(out),
                                teacher_root=str(root / "teacher"), rows_per_shard=16))
    a, b = open_cache(folder_store), open_cache(out)
    assert b.dataset_fingerprint == a.dataset_fingerprint
    assert b.ids == a.ids
    for name in ("scene", "classes", *(f"visual/{m}" for m in a.modalities)):
        np.testing.assert_array_equal(b.group[name][:], a.group[name][:])
    assert list(b.group["caption"][:]) == list(a.group["caption"][:])


@pytest.mark.slow
def test_train_and_evaluate_read_the_pack_like_the_folder(sample_cache, tmp_path, capsys):
    """Training steps read by two loader workers give the same weights from the pack as
    from the folder, and `pipeline evaluate --root PACK` the same metrics (the tests' tiny
    student: what is compared is what the readers feed it)."""
    import json

    from stages.student.config import TrainConfig
    from stages.student.train import train
    from tests.tiny_run import TINY_STUDENT

    root, cache = sample_cache
    packed = tmp_path / "sample.h5"
    pack("sample", root, packed)
    weights = {}
    for name, source in (("folder", root), ("pack", packed)):
        cfg = TrainConfig(dataset="sample", root=str(source), cache=str(cache),
                          out=str(tmp_path / name), steps=2, batch_size=2, crop=64,
                          workers=2, val_limit=2, seed=7)
        train(TINY_STUDENT, cfg, progress=False)
        weights[name] = load_checkpoint_file(tmp_path / name / "last.pt")["model"]
    for key, value in weights["folder"].items():
        torch.testing.assert_close(weights["pack"][key], value, rtol=0, atol=0)
    metrics = {}
    for name, source in (("folder", root), ("pack", packed)):
        code, _, err = run_cli(capsys, "evaluate", "--checkpoint",
                               str(tmp_path / "pack" / "best.pt"), "--root", str(source),
                               "--setting", "mss", "--limit", "2", "--examples", "1",
                               "--out", str(tmp_path / f"metrics-{name}"))
        assert code == 0, err
        metrics[name] = json.loads((tmp_path / f"metrics-{name}" / "mss.json").read_text())
    assert metrics["pack"] == metrics["folder"]
