"""MFF as the paper's text (`paper`), as the authors' code (`author`) and this project's
first reading (`pixel`); L_cr's student side under `author`; the optimiser's groups.

The authors' arithmetic is read from their compiled module of 2024-02-20,
github:zhengxuJosh/AnySeg semseg/models/segformer/__pycache__/modal_seg.cpython-38.pyc
(`Seg.forward`: per-modality decoder outputs, corr_m = cosine of the flattened map and
f_ma, x_mm = sum corr_m * f_m, per-pixel argmax of the cosine to x_mm, output
select + mean).
"""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from stages.student.encoder import build_encoder
from stages.student.mff import MFF, VARIANTS, MFFConfig
from stages.student.model import Any2Seg, StudentConfig, build_student
from stages.student.train import param_groups

ALL = torch.ones(2, 3, dtype=torch.bool)


@pytest.mark.parametrize("variant", VARIANTS)
def test_identical_modalities_give_the_fusion_of_one(variant):
    f = torch.randn(2, 1, 8, 5, 5).expand(2, 3, 8, 5, 5).contiguous()
    out = MFF(MFFConfig(variant=variant))(f, ALL)
    # every weight is cos(f, f) = 1: f_mb is the weighted mean (sum of 3 under `author`)
    torch.testing.assert_close(out.reweighted, f[:, 0] * (3 if variant == "author" else 1),
                               rtol=1e-5, atol=1e-5)
    # f_ma = f_mb + f_ms (paper, pixel) or f_ms + mean (author): twice the input
    torch.testing.assert_close(out.fused, 2 * f[:, 0], rtol=1e-5, atol=1e-5)
    single = MFF(MFFConfig(variant=variant, residual=False))(f, ALL)
    torch.testing.assert_close(single.fused, f[:, 0], rtol=1e-5, atol=1e-5)  # f_ms alone


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("switches", [{}, {"select": False}, {"reweight": False},
                                      {"iterations": 2}])
def test_an_excluded_modality_has_no_influence_and_no_gradient(variant, switches):
    torch.manual_seed(1)
    cfg = MFFConfig(variant=variant, **switches)
    f = torch.randn(2, 3, 8, 4, 4, requires_grad=True)
    present = torch.tensor([[True, False, True], [True, True, False]])
    out = MFF(cfg)(f, present)
    g = f.detach().clone()
    g[0, 1] = 100 * torch.randn(8, 4, 4)  # change only absent entries
    g[1, 2] = -7.0
    again = MFF(cfg)(g, present)
    torch.testing.assert_close(again.fused, out.fused.detach())
    if out.selected is not None:
        assert not (out.selected[0] == 1).any() and not (out.selected[1] == 2).any()
    if out.correlation is not None:
        assert out.correlation[0, 1] == 0 and out.correlation[1, 2] == 0
    (out.fused.sum() + (out.correlation.sum() if out.correlation is not None else 0)).backward()
    assert f.grad[0, 1].abs().max() == 0 and f.grad[1, 2].abs().max() == 0
    assert f.grad[0, 0].abs().max() > 0


@pytest.mark.parametrize("variant", ["author", "paper"])
def test_global_variants_weigh_each_modality_and_sample_once(variant):
    torch.manual_seed(2)
    f = torch.randn(2, 3, 8, 4, 5)
    out = MFF(MFFConfig(variant=variant))(f, ALL)
    assert out.weights.shape == (2, 3)  # one weight per sample and modality
    anchor = f.mean(1)  # first iteration: the mean
    expected = torch.stack([torch.stack([F.cosine_similarity(f[b, m].flatten(),
                                                             anchor[b].flatten(), dim=0)
                                         for m in range(3)]) for b in range(2)])
    torch.testing.assert_close(out.weights, expected)
    torch.testing.assert_close(out.correlation, expected)
    weighted = (expected[:, :, None, None, None] * f).sum(1)
    torch.testing.assert_close(out.reweighted, weighted / (1 if variant == "author" else 3))


def test_pixel_variant_weighs_per_pixel():
    f = torch.randn(2, 3, 8, 4, 5)
    out = MFF(MFFConfig(variant="pixel"))(f, ALL)
    assert out.weights.shape == (2, 3, 4, 5) and out.correlation is None
    torch.testing.assert_close(out.weights, F.cosine_similarity(f, f.mean(1, keepdim=True),
                                                                dim=2, eps=1e-6))


def authors_fusion(rgb, depth, previous=None):
    """modal_seg.py `Seg.forward` on two modalities (where its event slip cannot show),
    re-stated from the bytecode: f_ma anchor, corr_r/corr_d, x_mm, select, output."""
    b = rgb.shape[0]
    stacked = torch.stack([rgb, depth])
    f_ma = stacked.mean(0) if previous is None else (previous + stacked.mean(0)) / 2
    corr_r = F.cosine_similarity(rgb.reshape(b, -1), f_ma.reshape(b, -1), dim=1).unsqueeze(1)
    corr_d = F.cosine_similarity(depth.reshape(b, -1), f_ma.reshape(b, -1), dim=1).unsqueeze(1)
    x_mm = corr_r[:, :, None, None] * rgb + corr_d[:, :, None, None] * depth
    index = F.cosine_similarity(stacked, x_mm.unsqueeze(0), dim=2).max(0).indices
    select = torch.where((index == 0)[:, None], rgb, depth)
    return select + stacked.mean(0), torch.cat([corr_r, corr_d], 1)


def test_author_variant_matches_the_authors_arithmetic():
    torch.manual_seed(3)
    rgb, depth = torch.randn(2, 25, 6, 7), torch.randn(2, 25, 6, 7)
    out = MFF(MFFConfig(variant="author"))(torch.stack([rgb, depth], 1),
                                           torch.ones(2, 2, dtype=torch.bool))
    fused, corr = authors_fusion(rgb, depth)
    torch.testing.assert_close(out.fused, fused)
    torch.testing.assert_close(out.correlation, corr)
    # second iteration: the anchor is (previous f_ma + mean) / 2
    two = MFF(MFFConfig(variant="author", iterations=2))(torch.stack([rgb, depth], 1),
                                                         torch.ones(2, 2, dtype=torch.bool))
    torch.testing.assert_close(two.fused, authors_fusion(rgb, depth, previous=fused)[0])


def test_author_selection_considers_every_present_modality():
    """The recovered code selects only among RGB and depth (event never wins); here a
    third modality that matches the re-weighted sum best is selected."""
    a = torch.randn(1, 16, 3, 3)
    f = torch.stack([-a, torch.randn(1, 16, 3, 3), a, a], 1)  # event and lidar agree
    out = MFF(MFFConfig(variant="author"))(f, torch.ones(1, 4, dtype=torch.bool))
    assert (out.selected == 2).all()


def test_author_model_fuses_per_modality_class_maps_once():
    torch.manual_seed(0)
    model = Any2Seg(build_encoder("mit_b0"), ["rgb", "depth", "event"], 7,
                    MFFConfig(variant="author"), embed_dim=16).eval()
    x = torch.randn(2, 3, 3, 64, 64)
    present = torch.tensor([[True, True, False], [True, False, True]])
    out = model(x, present)
    assert len(out.fused) == 1 and out.logits.shape == (2, 7, 16, 16)
    maps = model.modality_logits(out.feats, present)  # the shared head on each modality
    assert maps.shape == (2, 3, 7, 16, 16) and maps[0, 2].abs().max() == 0
    alone = model.head([f[:, 0] for f in out.feats])  # rgb through the head by itself
    torch.testing.assert_close(maps[:, 0], alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.logits, MFF(model.mff.config)(maps, present).fused)
    assert out.fused[0].correlation.shape == (2, 3)
    # an absent modality's input changes nothing
    x2 = x.clone()
    x2[0, 2] = 50.0
    torch.testing.assert_close(model(x2, present).logits, out.logits)


def test_paper_and_pixel_models_fuse_encoder_features_at_every_stage():
    model = build_student(StudentConfig(mff={"variant": "paper"}, embed_dim=16),
                          ["rgb", "depth"], 5).eval()
    out = model(torch.randn(1, 2, 3, 64, 64))
    assert len(out.fused) == 4 and out.fused[0].weights.shape == (1, 2)
    # the head's stride-4 features of the fused input (what L_se may read instead)
    assert out.decoded.shape == (1, 16, 16, 16)
    torch.testing.assert_close(model.head.classify(out.decoded), out.logits)


def test_unknown_variant_is_refused():
    from any2seg.errors import PipelineError

    with pytest.raises(PipelineError, match="variant"):
        StudentConfig(mff={"variant": "nope"}).mff_config()


def test_no_weight_decay_on_one_dimensional_parameters():
    model = build_student(StudentConfig(embed_dim=16), ["rgb", "depth"], 5)
    decay, no_decay = param_groups(model, 0.01)
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decay["params"])
    assert all(p.ndim == 1 for p in no_decay["params"])  # norms and biases
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    # a step with zero gradients moves only the decayed parameters
    opt = torch.optim.AdamW([decay, no_decay], lr=0.1)
    before = {id(p): p.detach().clone() for p in model.parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    assert all(torch.equal(p, before[id(p)]) for p in no_decay["params"])
    assert all(not torch.equal(p, before[id(p)]) for p in decay["params"] if p.abs().sum() > 0)


def test_deliver_preset_is_a_complete_params_file_with_the_authors_recipe():
    import yaml

    from any2seg.config import load_yaml
    from stages.student.config import TrainConfig
    from stages.teacher.run import TeacherConfig

    root = Path(__file__).resolve().parents[2]
    preset = load_yaml(root / "pipelines" / "deliver" / "params.yaml")
    params = yaml.safe_load((root / "params.yaml").read_text())

    def keys(d, prefix=""):
        return {prefix + k for k in d} | {x for k, v in d.items() if isinstance(v, dict)
                                         and k not in ("mff", "fit", "sample", "loss",
                                                       "augment", "modality_branch",
                                                       "captioner_options")
                                         for x in keys(v, prefix + k + ".")}

    length = {"train.steps", "train.epochs"}  # the preset counts epochs, the sample steps
    assert keys(preset) - length == keys(params) - length  # usable with dvc.yaml as it is
    assert set(preset["train"]["loss"]) == set(params["train"]["loss"])  # every loss key
    student, cfg = TrainConfig.from_params(preset, {})
    TeacherConfig.from_params(preset, {})
    assert (student.backbone, student.embed_dim, student.mff_config().variant) == \
        ("mit_b2", 768, "author")
    assert student.pretrained and cfg.loss_config().ohem
    assert (cfg.epochs, cfg.warmup, cfg.lr, cfg.weight_decay, cfg.crop) == \
        (200, 0.05, 6e-5, 0.01, 1024)
