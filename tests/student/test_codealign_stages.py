"""CodeAlign as its authors run it: isolated groups, code spaces, translators (tiny runs)."""

from dataclasses import replace

import pytest
import torch

from stages.student.checkpoint_file import load_checkpoint_file
from stages.student.codealign import stages as ca_stages
from stages.student.codealign.config import CodeAlignConfig
from stages.student.codealign.quantiser import Quantiser
from stages.student.codealign.split import assign_groups, group_indices, scene_of
from stages.student.codealign.stages import CodeAlignRun, group_loader
from stages.student.model import StudentConfig
from tests.codealign_toy import toy_part
from tests.tiny_run import TINY_BACKBONE

GROUPS = [["rgb"], ["depth", "event"]]  # a single- and a two-modality group
# one aligner block: its code path, smaller checkpoints (the translators keep the width the
# shuffled-label control needs to tell apart)
NARROW = {"aligner_blocks": 1}


@pytest.fixture(scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: threads only contend on shared cores
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def ran(small_sample, tmp_path_factory, one_thread):
    """Stages 0, 1, 2 and a shuffled-label stage 2 on the small sample; records the
    frames every stage-2 loader yielded."""
    root, _ = small_sample
    cfg = CodeAlignConfig(groups=GROUPS, stage0_steps=10, stage1_steps=6, stage2_steps=12,
                          batch_size=2, crop=64, checkpoint_every=6, stage0_lr=0.004,
                          stage1_lr=0.004, stage2_lr=0.004,
                          # constant lr: the official decay at 1/3 and 2/3 of 12 steps leaves
                          # 4 steps to learn from (the schedule: test_codealign_recipe.py)
                          stage1_milestones=[], stage2_milestones=[])
    run = CodeAlignRun("sample", root, tmp_path_factory.mktemp("codealign"),
                       StudentConfig(backbone=TINY_BACKBONE, embed_dim=32), replace(cfg, **NARROW))
    seen: dict[tuple[str, int], list[int]] = {}
    real = ca_stages.group_loader

    def recording(samples, modalities, indices, cfg, steps, start=0, seed_offset=0):
        for batch in real(samples, modalities, indices, cfg, steps, start, seed_offset):
            seen.setdefault((modalities[0], seed_offset), []).extend(batch["frame"].tolist())
            yield batch

    run.stage0()
    run.stage1()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ca_stages, "group_loader", recording)
        run.stage2()
    run.stage2(control=True, only=["rgb->1"])
    return run, seen


def states(run, name):
    return load_checkpoint_file(run.out / f"{name}.pt")["model"]


def changed(before, after):
    return {k for k in before if not torch.equal(before[k], after[k])}


def test_split_never_mixes_groups_and_is_fixed(small_sample):
    from any2seg import datasets

    root, _ = small_sample
    samples = datasets.load("sample", root, "train")
    ids = samples.ids
    a = assign_groups(ids, 2, seed=5)
    assert a == assign_groups(ids, 2, seed=5)
    assert a != assign_groups(ids, 2, seed=6)  # 12 scenes: another seed deals them otherwise
    for scene in {scene_of(i) for i in ids}:  # whole scenes
        assert len({g for i, g in zip(ids, a, strict=True) if scene_of(i) == scene}) == 1
    cfg = CodeAlignConfig(batch_size=4, crop=64)
    steps = 3 * len(ids) // 4  # three full epochs over all frames
    for g, mods in enumerate([["rgb", "depth"], ["event", "lidar"]]):
        idx = group_indices(a, g)
        frames = []
        for batch in group_loader(samples, mods, idx, cfg, steps):
            assert batch["images"].shape[1] == len(mods)  # only this group's modalities
            frames += batch["frame"].tolist()
        assert frames and all(a[f] == g for f in frames)
        assert set(frames) == set(idx)  # every frame of the group, none of the other


def test_codes_one_hot_forward_and_codebook_learns_only_through_task_loss():
    torch.manual_seed(0)
    q = Quantiser(8, codes=16, eval_sampling="argmax").train()
    x = torch.randn(2, 8, 5, 5)
    before = q.codebook.detach().clone()
    decoded, onehot = q(x, torch.Generator().manual_seed(1))
    assert set(onehot.detach().unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(onehot.detach().sum(-1), torch.ones(2, 5, 5))
    assert torch.equal(q.codebook, before)  # no EMA / k-means update in the forward
    assert q.codebook.grad is None
    decoded.square().mean().backward()  # a task loss on the decoded features
    assert q.codebook.grad is not None and q.codebook.grad.abs().sum() > 0
    q.eval()
    _, hard = q(x)
    assert torch.equal(hard, torch.nn.functional.one_hot(q.logits(x).argmax(-1), 16).float())


def test_stage1_codebook_gradient_is_the_task_loss(ran):
    """No commitment / auxiliary codebook term: for a single-modality group the codebook
    gradient of the stage-1 loss is exactly the CE's, and the code space keeps no
    state besides parameters (no EMA counts)."""
    run, _ = ran
    gm = run.system.groups[0].train()
    gm.requires_grad_(True)
    assert not list(gm.quantisers.buffers())
    batch = next(iter(group_loader(run.samples, GROUPS[0], run.indices(0), run.cfg, 1)))
    books = [q.codebook for q in gm.quantisers]
    torch.manual_seed(0)  # the same dropout masks in both passes
    total = run.stage1_loss(gm, batch, torch.Generator().manual_seed(3))
    torch.manual_seed(0)
    logits, _, _ = gm.coded(batch["images"], torch.Generator().manual_seed(3))
    ce = ca_stages.seg_loss(logits, batch["label"])
    for g_total, g_ce in zip(torch.autograd.grad(total, books), torch.autograd.grad(ce, books),
                             strict=True):
        assert g_ce.abs().sum() > 0
        torch.testing.assert_close(g_total, g_ce, rtol=1e-5, atol=1e-7)


def test_stage1_changes_only_aligners_and_code_spaces(ran):
    run, _ = ran
    before, after = states(run, "stage0"), states(run, "stage1")
    diff = changed(before, after)
    allowed = ("groups.0.aligners.", "groups.0.quantisers.", "groups.1.aligners.",
               "groups.1.quantisers.", "groups.1.student.mff.", "groups.1.student.head.")
    assert diff and all(k.startswith(allowed) for k in diff), sorted(diff)[:5]
    assert any(k.startswith("groups.0.quantisers.") and k.endswith("codebook") for k in diff)
    assert any(k.startswith("groups.0.aligners.") for k in diff)
    # the single-modality group's back-end and every encoder stay bit-identical
    assert not any(k.startswith(("groups.0.student.", "groups.1.student.encoder.",
                                 "translators.")) for k in diff)


def test_stage2_trains_only_translators_on_source_group_frames(ran):
    run, seen = ran
    before, after = states(run, "stage1"), states(run, "stage2")
    diff = changed(before, after)
    assert diff and all(k.startswith("translators.") for k in diff)
    for name in run.system.translators:
        assert any(k.startswith(f"translators.{name}.") for k in diff), name
    assert set(seen) == {("rgb", 20), ("depth", 21), ("event", 21)}
    for (m, offset), frames in seen.items():
        a = offset - 20
        assert m in GROUPS[a] and frames
        assert all(run.assignment[f] == a for f in frames)


def test_shuffled_label_control_translates_worse(ran):
    """rgb -> the two-modality group, whose back-end learnt in stage 1: a translator
    fitted to pixel-shuffled labels decodes the group's frames worse (segmentation CE of
    the argmax codes through the frozen target) than the one fitted to the real labels."""
    run, _ = ran
    loader = group_loader(run.samples, ["rgb"], run.indices(0), run.cfg, 4)
    batches = [(b["images"][:, 0], b["label"]) for b in loader]

    def translated_ce(stage):
        run.load_file(run.out / f"{stage}.pt")
        run.system.eval()
        with torch.no_grad():
            return sum(float(ca_stages.seg_loss(run.system.translate("rgb", 1, x), y))
                       for x, y in batches)

    assert translated_ce("stage2") < translated_ce("stage2.control")


def test_stage_resumes_where_it_stopped(tmp_path):
    """An interrupted stage resumes from its last checkpoint to the same weights as an
    uninterrupted one (same batches, same noise per step, the schedule where it was: the
    interruption falls between the two lr milestones)."""
    cfg, net, init, loader_at, step = toy_part()
    ca_stages.run_steps("s", tmp_path / "a", net, [net], loader_at, step, 6, cfg, {},
                        stage=0)
    straight = {k: v.clone() for k, v in net.state_dict().items()}

    net.load_state_dict(init)

    def stop_after_three(start):
        for i, batch in enumerate(loader_at(start)):
            if i == 4:  # killed during step 4, after the step-3 checkpoint
                raise KeyboardInterrupt
            yield batch

    with pytest.raises(KeyboardInterrupt):
        ca_stages.run_steps("s", tmp_path / "b", net, [net], stop_after_three, step, 6, cfg,
                            {}, stage=0)
    assert not (tmp_path / "b" / "s.pt").exists()
    net.load_state_dict(init)  # a fresh process: weights come from the checkpoint
    ca_stages.run_steps("s", tmp_path / "b", net, [net], loader_at, step, 6, cfg, {}, stage=0)
    for k in straight:
        assert torch.equal(net.state_dict()[k], straight[k]), k


@pytest.mark.parametrize("params, named", [
    ({"groups": [["rgb", "depth"], ["depth"]]}, "params.yaml: codealign.groups"),
    ({"groups": [["rgb", "depth", "event", "lidar"]]}, "params.yaml: codealign.groups"),
    ({"codes": 1}, "params.yaml: codealign.codes"),
    ({"stage2_steps": "many"}, "codealign.stage2_steps"),
    ({"codebook": 16}, "codealign: unknown key 'codebook'"),
])
def test_bad_codealign_params_name_the_key(params, named):
    from any2seg.errors import PipelineError

    with pytest.raises(PipelineError, match=named.replace(".", r"\.")):
        CodeAlignConfig.from_params({"codealign": params})


def test_groups_must_name_the_data_sets_modalities():
    from any2seg.errors import PipelineError

    with pytest.raises(PipelineError, match="codealign.groups names thermal"):
        CodeAlignConfig(groups=[["rgb"], ["thermal"]]).validate(
            modalities=["rgb", "depth", "event", "lidar"])


def test_a_stage_prints_progress_with_an_eta(tmp_path, capsys, monkeypatch):
    """Off a terminal a CodeAlign part prints plain progress lines with an ETA (`make
    demo-codealign` runs minutes on CPUs), and a resumed part counts from its checkpoint."""
    import time

    from any2seg import progress

    monkeypatch.setattr(progress, "LINE_GAP_S", 0.0)  # a line at every 10 % of the steps
    cfg = CodeAlignConfig(checkpoint_every=3)
    net = torch.nn.Linear(4, 2)
    data = torch.randn(6, 4)

    def slow_step(batch, gen):
        time.sleep(0.6)  # an ETA needs 1 s of elapsed time
        return net(batch["x"]).square().mean()

    def stop_after_three(start):
        for i in range(start, 6):
            if i == 3:
                raise KeyboardInterrupt
            yield {"x": data[i:i + 1]}

    with pytest.raises(KeyboardInterrupt):
        ca_stages.run_steps("stage0/group0", tmp_path, net, [net], stop_after_three,
                            slow_step, 6, cfg, {}, stage=0)
    first = capsys.readouterr().err.splitlines()
    assert first[-1].startswith("codealign stage0/group0: 3/6 step (50%)"), first
    ca_stages.run_steps("stage0/group0", tmp_path, net, [net],
                        lambda s: ({"x": data[i:i + 1]} for i in range(s, 6)), slow_step, 6,
                        cfg, {}, stage=0)
    lines = capsys.readouterr().err.splitlines()
    assert any(", ETA " in line for line in lines), lines
    assert lines[-1].startswith("codealign stage0/group0: 6/6 step (100%)"), lines
    assert all(" 1/6 " not in line for line in lines), lines  # resumed at step 3, not 0
