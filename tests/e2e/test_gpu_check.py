"""The GPU check's CPU dry run (`benchmarks/gpu_check.py --device cpu --tiny`): every
section runs at tiny sizes, so the script cannot rot between the rare GPU runs."""

import json
import os
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_dry_run_every_section_ok(tmp_path):
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--device", "cpu",
                           "--tiny", "--out", str(out)], capture_output=True, text=True,
                          timeout=900, env={**os.environ,
                                            "PYTHONPATH": ":".join(sys.path)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    sections = report["sections"]
    assert set(sections) == {"agreement", "stage_one", "training", "evaluation", "feeding",
                             "inference"}
    for name, sec in sections.items():
        assert sec["status"] == "ok", (name, sec.get("error"))
        assert sec["skipped"] == [], (name, sec["skipped"])
        assert sec["seconds"] > 0
    env = report["environment"]
    assert env["device"] == "cpu" and env["torch"] and env["gpu"] is None

    agree = sections["agreement"]["result"]
    assert all(agree["checks"].values())
    assert len(agree["losses_cpu"]) == report["sizes"]["agreement"]["steps"]
    assert agree["confusion_matrices"] >= 15 + 1  # all, 15 MISS subsets, sensor groups
    assert agree["confusion_pixels"] > 0

    one = sections["stage_one"]["result"]
    assert [r["batch"] for r in one["teacher_rows"]] == report["sizes"]["teacher_batches"]
    frames = sum(report["sizes"]["frames"].values())
    for r in one["teacher_rows"]:
        assert r["samples"] == frames and r["samples_per_s"] > 0
        assert 0 <= r["waiting_for_decode"] <= 1
    cap = one["captioner"]
    assert [r["batch"] for r in cap["rows"]] == report["sizes"]["caption_batches"]
    assert all(r["tokens_per_s"] > 0 and r["new_tokens"] > 0 for r in cap["rows"])

    train = sections["training"]["result"]
    assert [(r["batch"], r["compile"]) for r in train["rows"]] == [(1, False), (2, False)]
    assert all(r["step_s"] > 0 and r["images_per_s"] > 0 for r in train["rows"])
    ddp = train["torchrun"]
    assert ddp["backend"] == "gloo" and ddp["world_size"] == 1 and ddp["equal"]
    assert len(ddp["losses_torchrun"]) == report["sizes"]["student"]["ddp_steps"]

    ev = sections["evaluation"]["result"]
    assert ev["subsets"] == 15 and ev["sensor_groups"] >= 1 and ev["s_per_frame"] > 0

    feed = sections["feeding"]["result"]
    assert {r["source"] for r in feed["rows"]} == {"folder", "pack"}
    assert all(r["per_worker"] > 0 for r in feed["rows"])
    assert feed["workers_needed"]["workers_folder"] >= 1
    inference = sections["inference"]["result"]
    assert [r["subset"] for r in inference["rows"]] == ["all four", "rgb"]
    for r in inference["rows"]:
        assert r["agreement"]["ok"] and r["onnxruntime_provider"] == "CPUExecutionProvider"
        assert min(r["eager_graph_s"], r["eager_predict_s"], r["onnxruntime_s"]) > 0
    assert out.with_suffix(".md").read_text().count("| ok |") == 6


def test_unknown_section_is_refused(tmp_path):
    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--device", "cpu",
                           "--tiny", "--sections", "agreement,speed", "--out",
                           str(tmp_path / "x.json")], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert "unknown section 'speed'" in proc.stderr
    assert not (tmp_path / "x.json").exists()


def test_logit_agreement_absorbs_round_off_not_a_different_computation(monkeypatch):
    """The agreement section's evaluation rule: kernel round-off (~1e-6) passes even where
    it flips a near-tied pixel; a different computation (1e-2 of the scale) fails."""
    import importlib.util

    import torch

    spec = importlib.util.spec_from_file_location("gpu_check", "benchmarks/gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_check", gpu_check)  # dataclasses look it up
    spec.loader.exec_module(gpu_check)
    ref = torch.tensor([[2.0, 0.0], [0.5, 0.5 - 1e-7]]).T.reshape(2, 1, 2)  # (K, H, W)
    rounded = ref.clone()
    rounded[1, 0, 1] += 1e-6  # the second pixel's near-tie flips
    got = gpu_check.logit_agreement(ref, rounded)
    assert got["ok"] and got["flipped"] == 1 and got["widest_flipped_margin"] < 1e-6
    other = ref.clone()
    other[1] += 0.02 * ref.abs().max()
    got = gpu_check.logit_agreement(ref, other)
    assert not got["ok"] and got["flipped"] == 1
