"""CodeAlign's recipe against the official code (github:cxliu0314/CodeAlign @ 02f68c5): the
intra-group l2, optimiser and schedule, stage-1 back-end, eval-mode quantiser, the fused
evaluation row, the split options and the DVC stages' keys (docs/codealign.md)."""

import dataclasses
from pathlib import Path

import pytest
import torch
import yaml

from stages.student.codealign import evaluate as ca_eval
from stages.student.codealign import stages as ca_stages
from stages.student.codealign.config import CodeAlignConfig
from stages.student.codealign.model import GroupModel
from stages.student.codealign.quantiser import Quantiser, hard_gumbel
from stages.student.codealign.split import assign_groups, scene_of
from stages.student.codealign.stages import CodeAlignRun, intra_l2, official_l2
from stages.student.model import StudentConfig
from tests.tiny_run import TINY_BACKBONE

ROOT = Path(__file__).resolve().parents[2]
GROUPS = [["rgb"], ["depth", "event"]]  # a single- and a two-modality group


def test_l2_is_the_official_formula_on_a_hand_built_pair():
    """Official l2_loss: sum over channels and cells of the squared difference / (valid
    cells + 1e-6). Two channels on 2 x 2 cells, differences 1 and 2 everywhere: 4 x (1 +
    4) / 4 = 5 (the earlier mean over channels gave 2.5: C = 2 times less)."""
    f0 = torch.zeros(1, 2, 2, 2)
    f1 = torch.stack([torch.ones(2, 2), 2 * torch.ones(2, 2)])[None]
    expected = 20.0 / (4 + 1e-6)
    torch.testing.assert_close(official_l2(f0, f1), torch.tensor([expected]))
    # a group of two modalities, two encoder stages (C = 2, then C = 3 with difference 1
    # on one channel of one of the 3 x 3 cells): the stages' official terms add up
    s2 = torch.zeros(1, 2, 3, 3, 3)
    s2[0, 1, 0, 1, 1] = 1.0
    total = intra_l2([torch.stack([f0, f1], 1), s2])
    torch.testing.assert_close(total, torch.tensor(expected + 1 / (9 + 1e-6)))


def test_l2_pairs_the_first_modality_with_each_other_one():
    """The official FeatureSimLoss compares the ego agent (index 0) with each agent of
    another modality, averaged over pairs and samples: never modality 1 with modality 2."""
    d = torch.zeros(2, 3, 4, 2, 2)  # B = 2, M = 3, C = 4
    d[:, 1] = 1.0
    d[:, 2] = 1.0  # modalities 1 and 2 agree, both differ from 0 by 1 on every channel
    per_pair = 4 * 4 / (4 + 1e-6)
    torch.testing.assert_close(intra_l2([d]), torch.tensor(per_pair))  # all pairs: 2/3 of it


def optimiser_after(cfg, stage, steps):
    p = torch.nn.Parameter(torch.ones(3))
    opt, schedule = ca_stages.optimiser([p], cfg, stage, steps)
    lrs = []
    for _ in range(steps):
        lrs.append(opt.param_groups[0]["lr"])
        p.grad = torch.zeros(3)
        opt.step()
        schedule.step()
    return opt, lrs, p


@pytest.mark.parametrize("stage, lr, first, second", [(0, 2e-3, 30, 60), (1, 2e-3, 30, 60),
                                                       (2, 1e-3, 33, 67)])
def test_optimiser_and_schedule_per_stage_are_the_official(stage, lr, first, second):
    """Adam (eps 1e-10, L2 weight decay 1e-4) and x0.1 at 30 % / 60 % of stages 0 and 1
    (epochs 15, 30 of 50) and at a third / two thirds of stage 2 (10, 20 of 30)."""
    opt, lrs, _ = optimiser_after(CodeAlignConfig(), stage, 100)
    assert type(opt) is torch.optim.Adam
    group = opt.param_groups[0]
    assert group["eps"] == 1e-10 and group["weight_decay"] == 1e-4
    assert lrs[:first] == [lr] * first
    assert lrs[first:second] == pytest.approx([lr * 0.1] * (second - first), rel=1e-12)
    assert lrs[second:] == pytest.approx([lr * 0.01] * (100 - second), rel=1e-12)


def test_adam_decays_through_the_gradient_and_adamw_is_one_setting_away():
    """With a zero task gradient Adam's L2 term is the whole gradient, so the first step
    moves a weight by ~lr; AdamW shrinks it by lr x weight_decay only."""
    _, _, adam = optimiser_after(CodeAlignConfig(stage0_milestones=[]), 0, 1)
    opt, _, adamw = optimiser_after(CodeAlignConfig(stage0_milestones=[], optimizer="adamw"),
                                    0, 1)
    assert type(opt) is torch.optim.AdamW
    torch.testing.assert_close(adam.detach(), torch.full((3,), 1 - 2e-3))
    torch.testing.assert_close(adamw.detach(), torch.full((3,), 1 - 2e-3 * 1e-4))


def test_run_steps_follows_the_stage_schedule(tmp_path):
    cfg = CodeAlignConfig(checkpoint_every=100, stage2_milestones=[0.3, 0.6])
    net = torch.nn.Linear(2, 1)
    ca_stages.run_steps("s", tmp_path, net, [net], lambda s: ({"x": torch.ones(1, 2)}
                                                             for _ in range(s, 10)),
                        lambda b, g: net(b["x"]).square().mean(), 10, cfg, {}, stage=2)
    state = torch.load(tmp_path / "s.last.pt", weights_only=False)
    assert state["schedule"]["milestones"] == {3: 1, 6: 1}
    assert state["optimizer"]["param_groups"][0]["lr"] == pytest.approx(1e-5)


@pytest.fixture(scope="module")
def stage0_run(small_sample, tmp_path_factory):
    """Stage 0 only, tiny (the tiny student, embed 16, 2 steps), for the stage-1 starting
    point: the back-end and fused-row logic under test are the encoder's neighbours, not it
    (three mit_b0 encoders and their Adam state made ~140 MB per stage checkpoint)."""
    root, _ = small_sample
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    cfg = CodeAlignConfig(groups=GROUPS, stage0_steps=2, stage1_steps=2, stage2_steps=2,
                          batch_size=2, crop=64, aligner_blocks=1, translator_blocks=1,
                          translator_dim=8)
    run = CodeAlignRun("sample", root, tmp_path_factory.mktemp("ca0"),
                       StudentConfig(backbone=TINY_BACKBONE, embed_dim=16), cfg)
    run.stage0()
    yield run
    torch.set_num_threads(before)


def head_state(run, g):
    return {k: v.clone() for k, v in run.system.groups[g].student.head.state_dict().items()}


@pytest.mark.parametrize("mode", ["random", "stage0", "fixed"])
def test_stage1_backend_initialisation(stage0_run, mode, monkeypatch):
    """A multi-modality group's back-end: official `random` (fix_backend unset) is a fresh,
    seeded draw, not stage 0's; `stage0` keeps stage 0's and trains it; `fixed` keeps it
    frozen. The single-modality group's is stage 0's, frozen, whatever the mode."""
    run = stage0_run
    monkeypatch.setattr(run.cfg, "stage1_backend", mode)
    run.load(0)
    stage0 = [head_state(run, g) for g in range(2)]
    starts = []
    for _ in range(2):
        run.load(0)
        trainable = [run.stage1_start(g) for g in range(2)]
        starts.append(head_state(run, 1))
        assert all(torch.equal(v, stage0[0][k]) for k, v in head_state(run, 0).items())
        assert run.system.groups[0].student.head not in trainable[0]
    assert all(torch.equal(starts[0][k], starts[1][k]) for k in starts[0])  # seeded
    same = all(torch.equal(starts[0][k], stage0[1][k]) for k in starts[0])
    assert same == (mode != "random")
    if mode == "random":  # every tensor redrawn, BatchNorm statistics reset
        weights = [k for k in starts[0] if k.endswith("weight") and "fuse.1" not in k]
        assert all(not torch.equal(starts[0][k], stage0[1][k]) for k in weights)
        assert torch.equal(starts[0]["fuse.1.running_mean"],
                           torch.zeros_like(starts[0]["fuse.1.running_mean"]))
    assert (run.system.groups[1].student.head in trainable[1]) == (mode != "fixed")


def test_eval_quantiser_gumbel_is_seeded_and_argmax_deterministic():
    """Official: Gumbel sampling in eval mode too; named `gumbel`, drawn from the caller's
    generator (same seed, same codes); `argmax` ignores the generator."""
    torch.manual_seed(0)
    x = torch.randn(2, 8, 6, 6)
    q = Quantiser(8, codes=16, temperature=1e-3, eval_sampling="gumbel").eval()
    logits = q.logits(x)
    a = q(x, torch.Generator().manual_seed(5))[1]
    assert torch.equal(a, q(x, torch.Generator().manual_seed(5))[1])
    assert torch.equal(a, hard_gumbel(logits, 1.0, torch.Generator().manual_seed(5)))
    argmax = torch.nn.functional.one_hot(logits.argmax(-1), 16).float()
    assert not torch.equal(a, argmax)  # near-flat logits: the noise decides
    assert not torch.equal(a, q(x, torch.Generator().manual_seed(6))[1])
    q.eval_sampling = "argmax"
    for seed in (5, 6):
        assert torch.equal(q(x, torch.Generator().manual_seed(seed))[1], argmax)


def test_eval_quantiser_reaches_every_code_space():
    cfg = CodeAlignConfig(eval_quantiser="argmax", aligner_blocks=0)
    from stages.student.model import build_student

    gm = GroupModel(build_student(StudentConfig(backbone=TINY_BACKBONE, embed_dim=16), ["rgb"],
                                  3), cfg)
    assert {q.eval_sampling for q in gm.quantisers} == {"argmax"}
    assert {q.eval_sampling for q in GroupModel(gm.student, CodeAlignConfig(
        aligner_blocks=0)).quantisers} == {"gumbel"}


@pytest.fixture(scope="module")
def stage2_run(stage0_run):
    stage0_run.stage1()
    stage0_run.stage2(only=["rgb->1"])
    return stage0_run


def test_fused_row_reads_own_modalities_and_the_translation(stage2_run, monkeypatch):
    """The fused row of rgb -> {depth, event}: group 1's back-end gets exactly group 1's
    own decoded features of the frame (depth, event, from its code space) plus rgb's
    translated codes (from rgb's image), all present; the evaluation is reproducible."""
    run = stage2_run
    calls = {"coded": [], "codes": [], "fused": [], "alone": []}
    real_coded, real_codes = GroupModel.coded, type(run.system).translated_codes
    real_fused, real_alone = GroupModel.collaborate, GroupModel.coded_alone

    def coded(self, images, generator=None):
        out = real_coded(self, images, generator)
        calls["coded"].append((self, images, out))
        return out

    def codes(self, source, target, image, generator=None):
        out = real_codes(self, source, target, image, generator)
        calls["codes"].append((source, target, image, out))
        return out

    def fused(self, own, onehots):
        out = real_fused(self, own, onehots)
        calls["fused"].append((self, own, onehots, out))
        return out

    def alone(self, modality, image, generator=None):
        calls["alone"].append((self, modality, image))
        return real_alone(self, modality, image, generator)

    monkeypatch.setattr(GroupModel, "coded_alone", alone)
    monkeypatch.setattr(GroupModel, "coded", coded)
    monkeypatch.setattr(type(run.system), "translated_codes", codes)
    monkeypatch.setattr(GroupModel, "collaborate", fused)
    rows = ca_eval.evaluate_run(run, "stage2", "val", limit=1, only=["rgb->1"])
    (self, own, onehots, logits), = calls["fused"]
    (cself, images, (own_logits, decoded, _)), = calls["coded"]
    (source, target, image, out), = calls["codes"]
    assert self is cself is run.system.groups[1] and (source, target) == ("rgb", 1)
    assert own is decoded and onehots is out
    assert images.shape[1] == 2  # depth and event of the same frames
    # the inputs of the rows are the frame's modalities: rgb for the translation
    from any2seg import datasets
    from stages.student.evaluate import evaluation_loader

    samples = datasets.load("sample", run.root, "val")[:1]
    batch = next(iter(evaluation_loader(samples, ["rgb", "depth", "event"])))
    assert torch.equal(image, batch["images"][:, 0])
    assert torch.equal(images, batch["images"][:, 1:])
    # source own: rgb's own group after stage 1, through rgb's aligner and code space
    (aself, modality, aimage), = calls["alone"]
    assert aself is run.system.groups[0] and modality == "rgb" and torch.equal(aimage, image)
    # all M + 1 inputs reach MFF: not the translation alone, not the own model alone
    assert own[0].shape[1] == 2 and onehots[0].shape[-1] == run.cfg.codes
    assert not torch.equal(logits, own_logits)
    assert not torch.equal(logits, run.system.groups[1].from_codes(onehots))
    assert set(rows[0]) >= set(ca_eval.KINDS)
    monkeypatch.undo()
    again = ca_eval.evaluate_run(run, "stage2", "val", limit=1, only=["rgb->1"])
    assert again == rows  # seeded Gumbel noise: the same codes every run
    assert "| fused |" in ca_eval.markdown(rows)


def test_split_all_trains_every_group_on_every_frame(stage0_run, monkeypatch):
    run = stage0_run
    frames = set(range(len(run.samples)))
    dealt = [set(run.indices(g)) for g in range(2)]
    assert dealt[0] and dealt[1] and not dealt[0] & dealt[1] and dealt[0] | dealt[1] == frames
    monkeypatch.setattr(run.cfg, "split", "all")
    assert all(set(run.indices(g)) == frames for g in range(2))


def test_mcubes_is_split_by_frame():
    """MCubeS ids are split/frame: no scene folder, so each frame is its own scene (read
    as DELIVER's rule, the whole split would be one scene and one group)."""
    ids = [f"train/outscene{i:04d}" for i in range(8)]
    assert scene_of(ids[0], "mcubes") == ids[0]
    groups = assign_groups(ids, 2, 0, "mcubes")
    assert sorted(groups) == [0] * 4 + [1] * 4
    assert len(set(assign_groups(ids, 2, 0, "deliver"))) == 1


@pytest.mark.parametrize("dvc_file", ["dvc.yaml", "pipelines/deliver/dvc.yaml",
                                      "pipelines/mcubes/dvc.yaml"])
def test_each_dvc_stage_lists_exactly_the_codealign_keys_it_reads(dvc_file):
    stages = yaml.safe_load((ROOT / dvc_file).read_text())["stages"]
    names = {0: "codealign_stage0", 1: "codealign_stage1", 2: "codealign_stage2",
             "evaluate": "codealign_evaluate"}
    listed_all = []
    for n, name in names.items():
        params = stages[name].get("params", [])
        keys = [k for p in params for k in ([p] if isinstance(p, str) else
                                            next(iter(p.values())))]
        listed = [k.split(".", 1)[1] for k in keys if k.startswith("codealign.")]
        expected = STAGE_KEYS[n] + (ca_stages.UNRECORDED if n == 0 else ())
        assert sorted(listed) == sorted(expected), name
        listed_all += listed
    fields = {f.name for f in dataclasses.fields(CodeAlignConfig)}
    assert sorted(listed_all) == sorted(fields)  # every key read by exactly one stage
    params = yaml.safe_load((ROOT / dvc_file).with_name("params.yaml").read_text())
    assert set(params["codealign"]) == fields  # DVC needs every listed key in the file


STAGE_KEYS = ca_stages.STAGE_KEYS
