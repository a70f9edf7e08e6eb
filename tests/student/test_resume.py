"""`--resume auto` (what the DVC train and CodeAlign stages run): continue a run only when
its settings, data, teacher and code are this run's, start fresh saying why otherwise, and
recognise a finished run of the same settings only."""

import logging

import pytest
import torch

from any2seg.errors import PipelineError
from stages.student.codealign import stages as ca_stages
from stages.student.train import train
from tests.codealign_toy import toy_part
from tests.student.test_train_cache import run_until, tiny
from tests.tiny_run import TINY_STUDENT, logged

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def weights(run):
    return torch.load(run / "last.pt", weights_only=False)["model"]


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_auto_continues_a_killed_run_to_the_uninterrupted_weights(sample_cache, tmp_path,
                                                                  monkeypatch, caplog):
    """Killed after 5 of 6 steps (checkpoint at 4); a rerun with another device spelling and
    checkpoint interval (neither changes the weights) continues at step 4 and ends at the
    uninterrupted run's weights, with each step logged once."""
    root, cache = sample_cache
    run_until(monkeypatch, tiny(root, cache, tmp_path / "a", val_every=3), steps_done=5)
    caplog.set_level(logging.INFO, "pipeline")
    again = tiny(root, cache, tmp_path / "a", val_every=3, device="cpu", checkpoint_every=3)
    resumed = train(TINY_STUDENT, again, progress=False, resume="auto")
    assert resumed["start"] == 4 and resumed["status"] == "trained"
    assert f"resuming {tmp_path / 'a' / 'last.pt'} at step 4 of 6" in caplog.text
    train(TINY_STUDENT, tiny(root, cache, tmp_path / "b", val_every=3), progress=False)
    assert_same_weights(weights(tmp_path / "a"), weights(tmp_path / "b"))
    assert logged(tmp_path / "a") == logged(tmp_path / "b")
    # finished with the same settings: nothing to do, nothing rewritten
    before = (tmp_path / "a" / "last.pt").stat().st_mtime_ns
    done = train(TINY_STUDENT, tiny(root, cache, tmp_path / "a", val_every=3), progress=False,
                 resume="auto")
    assert done["status"] == "finished" and done["start"] == 6
    assert (tmp_path / "a" / "last.pt").stat().st_mtime_ns == before


def test_auto_starts_fresh_in_one_line_when_a_setting_differs(sample_cache, tmp_path,
                                                              monkeypatch, caplog):
    """A killed run, then other lr: a fresh run that says which setting differs, and ends
    where a run of the new lr from scratch ends; its log has no step of the old run."""
    root, cache = sample_cache
    run_until(monkeypatch, tiny(root, cache, tmp_path / "a"), steps_done=3)
    caplog.set_level(logging.INFO, "pipeline")
    fresh = train(TINY_STUDENT, tiny(root, cache, tmp_path / "a", lr=1e-3), progress=False,
                  resume="auto")
    assert fresh["start"] == 0 and fresh["status"] == "trained"
    lines = [r.getMessage() for r in caplog.records if "does not continue" in r.getMessage()]
    assert lines == [f"{tmp_path / 'a' / 'last.pt'} (step 2) does not continue this run: "
                     "train.lr (0.002 at the checkpoint, 0.001 now); starting fresh"]
    train(TINY_STUDENT, tiny(root, cache, tmp_path / "b", lr=1e-3), progress=False)
    assert_same_weights(weights(tmp_path / "a"), weights(tmp_path / "b"))
    assert logged(tmp_path / "a") == logged(tmp_path / "b")


def test_a_finished_run_of_other_settings_is_never_taken_for_this_one(sample_cache, tmp_path,
                                                                      caplog):
    """DVC keeps a persisted output: a finished run of lr 0.002 must not pass for lr 0.001,
    and a best.pt of the old run must not outlive the new one (here: no validation scores,
    so the new run writes best.pt only at its end)."""
    root, cache = sample_cache
    run = tmp_path / "a"
    train(TINY_STUDENT, tiny(root, cache, run), progress=False)
    old_best = torch.load(run / "best.pt", weights_only=False)["model"]
    caplog.set_level(logging.INFO, "pipeline")
    again = train(TINY_STUDENT, tiny(root, cache, run, lr=1e-3), progress=False,
                  resume="auto")
    assert again["status"] == "trained" and again["start"] == 0
    assert "(step 6) does not continue this run: train.lr" in caplog.text
    new_best = torch.load(run / "best.pt", weights_only=False)
    assert new_best["meta"]["train"]["lr"] == 1e-3
    assert any(not torch.equal(old_best[k], new_best["model"][k]) for k in old_best)


def test_auto_starts_fresh_when_the_code_changed(sample_cache, tmp_path, caplog):
    """A run whose recorded source of stages.student.losses differs from the code now: the
    weights would come from two versions of the losses, so the run starts again."""
    root, cache = sample_cache
    run = tmp_path / "a"
    train(TINY_STUDENT, tiny(root, cache, run, steps=2), progress=False)
    ckpt = torch.load(run / "last.pt", weights_only=False)
    assert "stages.student.losses" in ckpt["meta"]["code"]
    ckpt["meta"]["code"]["stages.student.losses"] = "0" * 16
    ckpt["step"] = 1  # and not finished
    torch.save(ckpt, run / "last.pt")
    caplog.set_level(logging.INFO, "pipeline")
    again = train(TINY_STUDENT, tiny(root, cache, run, steps=2), progress=False,
                  resume="auto")
    assert again["start"] == 0
    assert "code of stages.student.losses (edited since the checkpoint); starting fresh" \
        in caplog.text


def test_an_unreadable_last_pt_is_refused_and_kept(sample_cache, tmp_path):
    root, cache = sample_cache
    run = tmp_path / "a"
    run.mkdir()
    (run / "last.pt").write_bytes(b"not a checkpoint")
    for mode in ("auto", True):
        with pytest.raises(PipelineError, match="is not a readable checkpoint") as err:
            train(TINY_STUDENT, tiny(root, cache, run), progress=False, resume=mode)
        assert "\n" not in str(err.value)
    assert (run / "last.pt").read_bytes() == b"not a checkpoint"


def test_strict_resume_still_refuses_other_settings_but_not_another_device(sample_cache,
                                                                          tmp_path,
                                                                          monkeypatch):
    root, cache = sample_cache
    run_until(monkeypatch, tiny(root, cache, tmp_path / "a"), steps_done=3)
    with pytest.raises(PipelineError, match=r"other settings \(train.lr \(0.002 at the "
                                            r"checkpoint, 0.001 now\)\)"):
        train(TINY_STUDENT, tiny(root, cache, tmp_path / "a", lr=1e-3), progress=False,
              resume=True)
    done = train(TINY_STUDENT, tiny(root, cache, tmp_path / "a", device="cpu",
                                    checkpoint_every=5), progress=False, resume=True)
    assert done["start"] == 2


def test_codealign_auto_retrains_a_part_of_other_settings(tmp_path, caplog):
    """A CodeAlign part's checkpoint of other settings: strict refuses it (as before), auto
    trains the part from scratch, saying why, to the weights of a clean run."""
    cfg, net, init, loader_at, step = toy_part()
    ca_stages.run_steps("s", tmp_path / "a", net, [net], loader_at, step, 6, cfg,
                        {"codealign": {"lr": 0.02}}, stage=0)
    net.load_state_dict(init)
    ca_stages.run_steps("s", tmp_path / "b", net, [net], loader_at, step, 6, cfg,
                        {"codealign": {"lr": 0.01}}, stage=0)
    clean = {k: v.clone() for k, v in net.state_dict().items()}
    net.load_state_dict(init)
    with pytest.raises(PipelineError, match="written for other codealign settings"):
        ca_stages.run_steps("s", tmp_path / "a", net, [net], loader_at, step, 6, cfg,
                            {"codealign": {"lr": 0.01}}, stage=0)
    net.load_state_dict(init)
    caplog.set_level(logging.INFO, "pipeline")
    ca_stages.run_steps("s", tmp_path / "a", net, [net], loader_at, step, 6, cfg,
                        {"codealign": {"lr": 0.01}}, stage=0, resume="auto")
    assert "s.last.pt (step 6) does not continue this run: codealign.lr (0.02 at the " \
        "checkpoint, 0.01 now); starting s fresh" in caplog.text
    assert_same_weights(net.state_dict(), clean)
