"""The fitted default teacher: deterministic, better than random, read by the unchanged loader."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from any2seg.errors import PipelineError
from any2seg.store import open_cache
from pipeline.cli import cli
from stages.teacher.captioners.template import OPENINGS
from stages.teacher.default.config import FitConfig
from stages.teacher.default.fit import fit_default_teacher
from stages.teacher.default.folders import random_clip_state, save_branch
from stages.teacher.languagebind import LanguageBind
from stages.teacher.run import TeacherConfig, cache_teacher, load_samples, model_input

TINY = FitConfig(hidden=32, layers=1, heads=2, projection=32, image_size=32, patch=16,
                 image_epochs=30, branch_epochs=2, batch_size=8)
BRANCHES = {"rgb": "image", "depth": "depth", "event": "event", "lidar": "lidar"}


@pytest.fixture(scope="module")
def fitted(small_sample, tmp_path_factory):
    root, _ = small_sample
    out = tmp_path_factory.mktemp("teacher") / "sample-teacher"
    result = fit_default_teacher(root, out, TINY, BRANCHES, progress=False)
    return root, out, result


def files(folder):
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def test_fit_is_deterministic_for_a_seed(fitted, tmp_path):
    root, out, _ = fitted
    again = tmp_path / "again"
    fit_default_teacher(root, again, TINY, BRANCHES, progress=False)
    assert files(again) == files(out)
    assert "LanguageBind_Lidar/pytorch_model.bin" in files(out)  # one branch per branch named
    for name in files(out):
        assert (again / name).read_bytes() == (out / name).read_bytes(), name
    # the same request again does nothing; another seed gives other weights
    stamp = (again / "teacher.json").stat().st_mtime_ns
    assert fit_default_teacher(root, again, TINY, BRANCHES, progress=False).status == "up-to-date"
    assert (again / "teacher.json").stat().st_mtime_ns == stamp
    other = tmp_path / "other"
    fit_default_teacher(root, other, FitConfig(**{**TINY.__dict__, "seed": 1}), BRANCHES,
                        progress=False)
    weights = "LanguageBind_Image/pytorch_model.bin"
    assert (other / weights).read_bytes() != (out / weights).read_bytes()


def weather_probe(teacher_root, root):
    """Zero-shot weather from val RGB frames with the five openings as prompts."""
    teacher = LanguageBind(teacher_root, ["image"])
    samples = load_samples(TeacherConfig(dataset="sample", root=str(root), split=["val"],
                                         modalities=["rgb"]))
    weathers = list(OPENINGS)
    pixels = torch.stack([teacher.preprocess("image", s.modalities["rgb"]) for s in samples])
    guess = (teacher.encode_pixels("image", pixels) @
             teacher.encode_text([OPENINGS[w] for w in weathers]).T).argmax(1)
    truth = torch.tensor([weathers.index(s.condition) for s in samples])
    return float((guess == truth).float().mean())


def test_fitted_teacher_beats_a_random_one_on_zero_shot_weather(fitted, tmp_path):
    root, out, result = fitted
    config = json.loads((out / "LanguageBind_Image" / "config.json").read_text())
    save_branch(tmp_path / "random" / "LanguageBind_Image", config,
                random_clip_state(config, seed=123))
    fitted_acc, random_acc = weather_probe(out, root), weather_probe(tmp_path / "random", root)
    assert fitted_acc >= 0.5 and fitted_acc >= random_acc + 0.3, (fitted_acc, random_acc)
    # the recorded figure is the same probe
    assert result.manifest["quality"]["modalities"]["rgb"]["weather"] == pytest.approx(fitted_acc)


def test_stage_one_reads_the_fitted_folders_with_the_unchanged_loader(fitted, tmp_path):
    root, out, result = fitted
    state = torch.load(out / "LanguageBind_Depth" / "pytorch_model.bin", weights_only=True)
    lora_b = [k for k in state if k.endswith("q_proj.lora_B.default.weight")]
    assert lora_b and not any("base_layer" in k for k in state)  # old peft layout
    assert all(state[k].abs().sum() > 0 for k in lora_b)  # trained (peft starts B at zero)
    store = tmp_path / "sample.zarr"
    cfg = TeacherConfig(dataset="sample", root=str(root), split=["val"], out=str(store),
                        teacher_root=str(out), modality_branch=BRANCHES, dtype="float32")
    assert cache_teacher(cfg).status == "written"
    cache = open_cache(store)
    samples = load_samples(cfg)
    got = cache.get(samples.ids, list(BRANCHES))
    loader = LanguageBind(out, sorted(set(BRANCHES.values())))
    for modality, branch in BRANCHES.items():
        pixels = torch.stack([loader.preprocess(branch, model_input(s, modality, branch))
                              for s in samples])
        model = result.models[branch]  # as trained: LoRA beside the frozen base
        with torch.no_grad():
            expected = F.normalize(model.visual_projection(
                model.vision_model(pixel_values=pixels).pooler_output), dim=-1)
        np.testing.assert_allclose(got["visual"][modality], expected.numpy(), atol=2e-5,
                                   err_msg=modality)


def test_cli_fits_prints_quality_and_reruns_as_a_no_op(small_sample, tmp_path):
    root, _ = small_sample
    params = tmp_path / "params.yaml"
    fit = {**TINY.__dict__, "image_epochs": 2, "branch_epochs": 1}
    params.write_text(json.dumps({"teacher": {"fit": fit, "modality_branch": BRANCHES}}))
    args = ["fit-teacher", "--root", str(root), "--out", str(tmp_path / "t"), "--params",
            str(params)]
    first = CliRunner().invoke(cli, args)
    assert first.exit_code == 0, first.output
    assert "zero-shot weather, rgb" in first.output and "chance" in first.output
    assert "fitting the default teacher" in first.output  # the progress line
    second = CliRunner().invoke(cli, args)
    assert second.exit_code == 0 and "up to date" in second.output
    bad = CliRunner().invoke(cli, ["fit-teacher", "--root", str(tmp_path / "no-sample"),
                                   "--out", str(tmp_path / "t2"), "--params", str(params)])
    assert isinstance(bad.exception, PipelineError) and "make-sample" in str(bad.exception)
