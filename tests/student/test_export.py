"""`pipeline export --format onnx`: ONNX Runtime's logits match PyTorch's evaluation path
for two subsets and two input sizes, under the native protocol (the checkpoint's
`exclude`) and the official one (black frames, frames through the official resize)."""

import json
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from any2seg import datasets
from pipeline.cli import main
from stages.student.eval_config import EvalConfig
from stages.student.evaluate import infer
from stages.student.export import (
    LOGIT_RTOL,
    MAX_FLIPPED_SHARE,
    check_parity,
    onnx_session,
    random_frames,
)
from stages.student.mit import MIT
from stages.student.predict import load_student
from tests.student.test_predict import tiny_checkpoint

pytest.importorskip("onnxruntime")
# one torch thread (tests/conftest.py): exports trace tiny models, and a second thread
# only spins against the other worker on make test's two cores
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", autouse=True)
def one_block_mit():
    """`mit_t`: MiT with one block per stage and a quarter of mit_b0's widths, registered
    for this module only. The exported graph has every op kind of mit_b0's (overlapping
    patch embeddings, spatially reduced attention, Mix-FFN), half its blocks, so
    torch.export traces and decomposes it in about half the time."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(MIT, "t", ([8, 16, 40, 64], [1, 1, 1, 1]))
        yield


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, one_block_mit):
    # MFF `author` (the DELIVER preset): under `pixel` / `paper` a random-init student's
    # per-pixel selection between two modalities is an exact tie (layer-normed features
    # of equal norm), decided by round-off; trained weights break the tie
    return tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "best.pt", seed=1,
                           backbone="mit_t")


def export(capsys, *args):
    with pytest.raises(SystemExit) as exit_info, warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)  # none from our exporter calls
        warnings.simplefilter("error", FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning,
                                module="torchvision.*")  # PNG decoding, not the exporter
        main(["export", *args])
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def batch_of_two(student, subset, session, size):
    """Dynamic batch: two frames at once, against `infer` on the same two."""
    x = torch.stack(random_frames(student.model, subset, [size], 2, seed=5))
    full = student.model.filler(x).expand(2, -1, 3, *size).clone()
    idx = [student.modalities.index(m) for m in subset]
    full[:, idx] = x
    mask = torch.zeros(1, 4, dtype=torch.bool)
    mask[0, idx] = True
    ref = infer(student.model, full, mask)[0]
    got = torch.from_numpy(session.run(None, {"images": x.numpy()})[0])
    assert got.shape == ref.shape == (2, 25, *size)
    assert float((got - ref).abs().max()) <= LOGIT_RTOL * float(ref.abs().max())


@pytest.mark.slow
def test_native_export_parity_two_sizes(ckpt, tmp_path, capsys):
    out = tmp_path / "onnx"
    code, stdout, err = export(capsys, "--checkpoint", str(ckpt), "--subset", "rgb,depth",
                               "--parity-sizes", "64x64,96x80", "--out", str(out))
    assert code == 0, err
    record = json.loads((out / "best.export.json").read_text())
    assert record["missing"] == "exclude" and record["protocol"] == "native"
    graph, = record["graphs"]
    assert graph["subset"] == ["rgb", "depth"] and graph["file"] == "best.rgb+depth.onnx"
    parity = graph["parity"]
    assert parity["ok"] and parity["frames"] == 4
    assert parity["sizes"] == [[64, 64], [96, 80]]
    assert parity["max_abs_logit_diff"] <= LOGIT_RTOL * parity["logit_scale"]
    assert "max |logit difference|" in stdout and "argmax differs on" in stdout
    # MiT's attention is one Attention node per block (opset 23), not MatMul + Softmax +
    # MatMul, whose (queries x keys) matrices set ONNX Runtime's peak at 1024 px
    import onnx

    onnx_graph = onnx.load(str(out / graph["file"]))
    ops = [n.op_type for n in onnx_graph.graph.node]
    assert record["opset"] == 23 and onnx_graph.opset_import[0].version == 23
    assert ops.count("Attention") == 4 and "Softmax" not in ops  # 4 blocks, modalities batched
    student = load_student(ckpt)
    batch_of_two(student, ["rgb", "depth"], onnx_session(out / graph["file"]), (72, 88))
    # the same files again are refused without --overwrite
    code, _, err = export(capsys, "--checkpoint", str(ckpt), "--subset", "rgb,depth",
                          "--out", str(out))
    assert code == 1 and "exists; pass --overwrite" in err


@pytest.mark.slow
def test_official_export_parity_black_frames(ckpt, small_sample, tmp_path, capsys,
                                             monkeypatch):
    """Official protocol: the graph feeds black frames for depth and event (MISS); parity
    on frames of the sample through the official resize (96 here) and on a second size."""
    root, _ = small_sample
    monkeypatch.setattr(datasets.get("sample"), "official_eval_size", 96)
    out = tmp_path / "onnx"
    code, _, err = export(capsys, "--checkpoint", str(ckpt), "--subset", "rgb,lidar",
                          "--protocol", "official", "--root", str(root), "--parity-frames", "2",
                          "--out", str(out))
    assert code == 0, err
    record = json.loads((out / "best.export.json").read_text())
    assert record["missing"] == "black" and record["protocol"] == "official"
    parity = record["graphs"][0]["parity"]
    assert parity["ok"] and parity["sizes"] == [[96, 96]]
    student = load_student(ckpt, config=EvalConfig(protocol="official"))
    session = onnx_session(out / "best.rgb+lidar.onnx", threads=1)
    other = check_parity(student.model, ["rgb", "lidar"], session,
                         random_frames(student.model, ["rgb", "lidar"], [(80, 112)], 1))
    assert other.ok, other.line()
    batch_of_two(student, ["rgb", "lidar"], session, (64, 96))


class _Resized:
    """A stand-in ONNX session computing another graph: the logits at stride 4 brought to
    the input size by nearest instead of bilinear upsampling."""

    def __init__(self, model, subset):
        self.model, self.subset = model, subset

    def run(self, _outputs, feed):
        from stages.student.export import SubsetGraph

        graph = SubsetGraph(self.model, self.subset)
        x = torch.from_numpy(feed["images"])
        with torch.no_grad():
            small = F.interpolate(graph(x), scale_factor=0.25, mode="bilinear")
            return [F.interpolate(small, size=x.shape[-2:], mode="nearest").numpy()]


def test_parity_check_catches_a_different_computation(ckpt):
    student = load_student(ckpt)
    frames = random_frames(student.model, ["rgb"], [(64, 64)], 1)
    parity = check_parity(student.model, ["rgb"], _Resized(student.model, ["rgb"]), frames)
    assert not parity.ok
    assert parity.max_abs > LOGIT_RTOL * parity.scale or \
        parity.flipped_share > MAX_FLIPPED_SHARE
    assert np.isfinite(parity.max_abs)
