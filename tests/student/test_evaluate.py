import json

import numpy as np
import pytest
from PIL import Image

from any2seg import datasets
from stages.student.config import TrainConfig
from stages.student.eval_config import EvalConfig
from stages.student.evaluate import evaluate, load_checkpoint
from stages.student.model import StudentConfig
from stages.student.protocol import official_resize
from stages.student.train import train
from tests.tiny_run import TINY_BACKBONE

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def checkpoint(sample_cache, tmp_path_factory):
    root, cache = sample_cache
    out = tmp_path_factory.mktemp("run")
    cfg = TrainConfig(dataset="sample", root=str(root), cache=str(cache), out=str(out), steps=2,
                      batch_size=2, crop=64, lr=2e-3, workers=0, val_limit=2, seed=7)
    # the evaluation options are the subject, not the encoder: the tiny student
    train(StudentConfig(backbone=TINY_BACKBONE, embed_dim=32), cfg, progress=False)
    return root, out / "best.pt"


def run_cli(args):
    from pipeline.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", *args])
    assert exit_info.value.code == 0


def test_protocol_and_missing_reach_the_outputs(checkpoint, tmp_path, monkeypatch):
    """`--protocol official` scores at the official size (shrunk from DELIVER's 1024 to 96
    here to stay fast) and feeds black frames for missing sensors unless told otherwise;
    the sample's default is native with the checkpoint's missing mode."""
    root, ckpt = checkpoint
    monkeypatch.setattr(datasets.get("sample"), "official_eval_size", 96)
    from stages.student import report as pictures

    drawn, draw = [], pictures.predictions_grid  # the resolution the examples are drawn at

    def spy(examples, *args):
        drawn.append([ex["rgb"].shape[:2] for ex in examples])
        return draw(examples, *args)

    monkeypatch.setattr(pictures, "predictions_grid", spy)
    runs = [  # arguments -> the protocol, missing mode and drawing size the run reports
        (["--protocol", "official", "--limit", "2"], "official", "black", (96, 96)),
        (["--setting", "mss", "--limit", "1"], "native", "exclude", (64, 64)),
    ]
    for args, protocol, missing, size in runs:
        out = tmp_path / protocol
        run_cli(["--checkpoint", str(ckpt), "--root", str(root), *args, "--examples", "1",
                 "--out", str(out)])
        report = (out / "report.md").read_text()
        assert f"Protocol `{protocol}`" in report and f"(`{missing}`)" in report
        assert drawn[-1] == [size] and Image.open(out / "plots" / "predictions.png").size
    official = tmp_path / "official"
    sensor = json.loads((official / "sensor.json").read_text())
    assert sensor["whole_split_mIoU"] == json.loads((official / "mss.json").read_text())["mIoU"]

    params = tmp_path / "params.yaml"
    params.write_text("eval: {protocol: official, missing: zero-fill, setting: mss}\n")
    run_cli(["--checkpoint", str(ckpt), "--root", str(root), "--params", str(params),
             "--limit", "1", "--examples", "0", "--out", str(tmp_path / "zf")])
    assert "(`zero-fill`)" in (tmp_path / "zf" / "report.md").read_text()


def test_official_protocol_scores_the_resized_label(checkpoint, monkeypatch):
    """What is scored is the label after the official Resize (augmentations_mm.py:288-312)."""
    root, ckpt = checkpoint
    monkeypatch.setattr(datasets.get("sample"), "official_eval_size", 80)
    model, meta = load_checkpoint(ckpt)
    samples = datasets.load("sample", root, "val", modalities=meta["modalities"])[:1]
    result = evaluate(model, samples, ("mss",), examples=1, protocol="official")
    sample = samples[0]
    _, label = official_resize(dict(sample.modalities), sample.label, 80)
    assert result.protocol == "official" and label.shape == (96, 96)  # 80 -> 32-aligned
    np.testing.assert_array_equal(result.examples[0]["label"], label)
    assert result.examples[0]["pred"].shape == (96, 96)


def test_eval_config_resolution():
    cfg = EvalConfig()
    assert cfg.resolved_protocol("deliver") == "official"
    assert cfg.resolved_missing("deliver", "exclude") == "black"
    assert cfg.resolved_missing("sample", "zero-fill") == "zero-fill"
    assert EvalConfig(missing="exclude").resolved_missing("deliver", "black") == "exclude"
    with pytest.raises(Exception, match="eval.protocol must be one of official, native"):
        EvalConfig(protocol="paper").validate()
    with pytest.raises(Exception, match="eval.missing must be one of exclude, zero-fill, black"):
        EvalConfig(missing="grey").validate()
