import numpy as np
import pytest
import torch
import torch.nn.functional as F

from stages.student.encoder import build_encoder
from stages.student.losses import LossConfig, correlation, prototypes, semantic, supervised
from stages.student.mff import MFF, MFFConfig
from stages.student.model import Any2Seg

ALL = torch.ones(2, 3, dtype=torch.bool)


def test_identical_inputs_reweighted_mean_is_the_input():
    f = torch.randn(2, 1, 8, 5, 5).expand(2, 3, 8, 5, 5).contiguous()
    out = MFF()(f, ALL)
    torch.testing.assert_close(out.mean, f[:, 0])
    torch.testing.assert_close(out.reweighted, f[:, 0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.fused, 2 * f[:, 0], rtol=1e-5, atol=1e-5)  # f_mb + f_ms


def test_selection_picks_the_most_consistent_modality():
    torch.manual_seed(0)
    a, b = torch.randn(1, 1, 16, 4, 4), torch.randn(1, 1, 16, 4, 4)
    f = torch.cat([b, a, a], dim=1)  # two modalities agree, one is an outlier
    present = torch.ones(1, 3, dtype=torch.bool)
    out = MFF()(f, present)
    assert (out.selected == 1).all()  # first of the consistent pair, never the outlier
    torch.testing.assert_close(out.fused, out.reweighted + a[:, 0])
    no_res = MFF(MFFConfig(residual=False))(f, present)
    torch.testing.assert_close(no_res.fused, a[:, 0])
    # with the pair absent, the outlier is the only choice
    only_b = MFF()(f, torch.tensor([[True, False, False]]))
    assert (only_b.selected == 0).all()


def test_absent_modality_has_no_influence_and_no_gradient():
    torch.manual_seed(1)
    f = torch.randn(2, 3, 8, 4, 4, requires_grad=True)
    present = torch.tensor([[True, False, True], [True, True, False]])
    out = MFF()(f, present)
    g = f.detach().clone()
    g[0, 1] = 100 * torch.randn(8, 4, 4)  # change only absent entries
    g[1, 2] = -7.0
    torch.testing.assert_close(MFF()(g, present).fused, out.fused.detach())
    assert not (out.selected[0] == 1).any() and not (out.selected[1] == 2).any()
    out.fused.sum().backward()
    assert f.grad[0, 1].abs().max() == 0 and f.grad[1, 2].abs().max() == 0
    assert f.grad[0, 0].abs().max() > 0


def test_switches_and_iterations():
    f = torch.randn(2, 3, 8, 4, 4)
    mean = MFF(MFFConfig(reweight=False, select=False))(f, ALL)
    torch.testing.assert_close(mean.fused, f.mean(1))
    no_select = MFF(MFFConfig(select=False))(f, ALL)
    torch.testing.assert_close(no_select.fused, no_select.reweighted)
    one = MFF(MFFConfig(iterations=1))(f, ALL).fused
    two = MFF(MFFConfig(iterations=2))(f, ALL).fused
    assert not torch.allclose(one, two)
    with pytest.raises(ValueError):
        MFF()(f, torch.zeros(2, 3, dtype=torch.bool))


@pytest.mark.parametrize("backbone", ["mit_b0", "timm:resnet18"])
def test_student_shapes_per_stage(backbone):
    model = Any2Seg(build_encoder(backbone), ["rgb", "depth", "event", "lidar"], 25,
                    embed_dim=32)
    x = torch.randn(2, 4, 3, 64, 96)
    present = torch.tensor([[1, 1, 0, 1], [0, 0, 1, 0]], dtype=torch.bool)
    out = model(x, present)
    assert out.logits.shape == (2, 25, 16, 24)
    for stage, (f, fused, c) in enumerate(zip(out.feats, out.fused, model.encoder.channels,
                                              strict=True)):
        h, w = 64 // 2 ** (stage + 2), 96 // 2 ** (stage + 2)
        assert f.shape == (2, 4, c, h, w) and fused.fused.shape == (2, c, h, w)
        assert f[0, 2].abs().max() == 0 and f[1, 0].abs().max() == 0  # not encoded


def test_zero_fill_feeds_black_inputs_as_present():
    torch.manual_seed(0)
    model = Any2Seg(build_encoder("mit_b0"), ["rgb", "depth"], 5, embed_dim=16,
                    missing="zero-fill").eval()
    x = torch.randn(1, 2, 3, 64, 64)
    present = torch.tensor([[True, False]])
    out = model(x, present)
    assert out.present.all()
    x2 = x.clone()
    x2[:, 1] = 0
    torch.testing.assert_close(model(x2, torch.ones_like(present)).logits, out.logits)
    model.missing = "exclude"  # the zero modality now stays out of the fusion
    assert not torch.allclose(model(x, present).logits, out.logits)


def test_correlation_loss_zero_when_matching_positive_otherwise():
    torch.manual_seed(0)
    feats = torch.randn(2, 3, 16, 4, 4)
    fused = feats.mean(1) + 0.3 * torch.randn(2, 16, 4, 4)
    present = torch.tensor([[True, True, True], [True, False, True]])
    teacher_visual = feats.mean(dim=(-2, -1))  # same geometry as the student
    teacher_scene = fused.mean(dim=(-2, -1))
    zero = correlation(feats, fused, present, teacher_visual, teacher_scene)
    assert abs(zero.item()) < 1e-6
    other = correlation(feats, fused, present, torch.randn(2, 3, 16), teacher_scene)
    assert other.item() > 1e-3
    single = correlation(feats, fused, torch.tensor([[True, False, False]] * 2),
                         teacher_visual, teacher_scene)
    assert single.item() == 0.0


def test_semantic_loss_is_invariant_to_consistent_class_permutation():
    torch.manual_seed(0)
    fused = torch.randn(2, 16, 8, 8, requires_grad=True)
    label = torch.randint(0, 6, (2, 32, 32))
    label[0, :4] = 255
    classes = torch.randn(6, 32)
    loss = semantic(fused, label, classes)
    perm = torch.randperm(6)
    relabel = torch.where(label == 255, label, perm[label.clamp(max=5)])
    permuted = torch.empty_like(classes)
    permuted[perm] = classes
    torch.testing.assert_close(semantic(fused, relabel, permuted), loss)
    assert loss.item() > 0
    loss.backward()
    assert fused.grad.abs().sum() > 0
    assert semantic(fused, torch.full((2, 32, 32), 3), classes).item() == 0.0


def test_supervised_ignores_255_and_ohem_keeps_hard_pixels():
    logits = torch.zeros(1, 3, 4, 4)
    logits[0, 0] = 5.0  # confident class 0 everywhere
    label = torch.zeros(1, 4, 4, dtype=torch.long)
    label[0, 0, 0] = 2  # one hard pixel
    label[0, 3, 3] = 255
    ce = supervised(logits, label, LossConfig())
    expected = F.cross_entropy(logits, label, ignore_index=255)
    torch.testing.assert_close(ce, expected)
    ohem = supervised(logits, label, LossConfig(ohem=True, ohem_min_fraction=1 / 16))
    hard = F.cross_entropy(logits[:, :, 0, 0], torch.tensor([2]))
    torch.testing.assert_close(ohem, hard)


def test_prototypes_equal_masked_average_of_upsampled_features():
    torch.manual_seed(0)
    fused = torch.randn(2, 8, 5, 7, requires_grad=True)
    label = torch.randint(0, 4, (2, 40, 56))
    label[:, :3] = 255
    protos, classes = prototypes(fused, label, 6)
    up = F.interpolate(fused, size=(40, 56), mode="bilinear", align_corners=False)
    flat = up.permute(0, 2, 3, 1).reshape(-1, 8)
    lab = label.reshape(-1)
    naive = torch.stack([flat[lab == c].mean(0) for c in classes.tolist()])
    assert classes.tolist() == [0, 1, 2, 3]
    torch.testing.assert_close(protos, naive, rtol=1e-5, atol=1e-5)
    protos.sum().backward()
    assert fused.grad is not None and fused.grad.abs().sum() > 0


def test_zero_fill_evaluation_matches_feeding_zeros():
    from stages.student.evaluate import infer

    torch.manual_seed(0)
    model = Any2Seg(build_encoder("mit_b0"), ["rgb", "depth", "event"], 5, embed_dim=16,
                    missing="zero-fill").eval()
    images = torch.randn(2, 3, 3, 64, 64)
    masks = torch.tensor([[True, False, True], [False, True, False]])
    cache = {}
    got = infer(model, images, masks, filler_cache=cache)
    assert len(cache) == 1  # the all-zero input was encoded once for both masks
    again = infer(model, images, masks, filler_cache=cache)
    torch.testing.assert_close(again, got)
    for i, mask in enumerate(masks):
        zeroed = images * mask[None, :, None, None, None]
        with torch.no_grad():
            ref = model(zeroed, torch.ones(2, 3, dtype=torch.bool)).logits
        ref = F.interpolate(ref, size=(64, 64), mode="bilinear", align_corners=False)
        torch.testing.assert_close(got[i], ref, rtol=1e-4, atol=1e-4)


def test_black_frame_is_black_through_the_normal_preprocessing():
    """RuipingL/MISS README ("black images") fed through semseg/augmentations_mm.py:35-41:
    RGB (0 / 255 - mean) / std, depth / event / lidar 0 / 255 = 0."""
    from stages.student.data import black, normalise, to_unit

    frame = np.zeros((4, 5, 3), np.uint8)
    rgb = normalise("rgb", to_unit(frame))
    expected = [(0 - 0.485) / 0.229, (0 - 0.456) / 0.224, (0 - 0.406) / 0.225]
    for c in range(3):
        torch.testing.assert_close(rgb[c], torch.full((4, 5), expected[c]))
    assert [round(v, 3) for v in black("rgb").tolist()] == [-2.118, -2.036, -1.804]
    for name in ("depth", "event", "lidar", "aolp"):
        assert normalise(name, to_unit(frame)).abs().max() == 0 and black(name).abs().max() == 0


def test_black_missing_feeds_black_frames_and_evaluation_caches_them():
    from stages.student.data import black
    from stages.student.evaluate import infer

    torch.manual_seed(0)
    mods = ["rgb", "depth", "event"]
    model = Any2Seg(build_encoder("mit_b0"), mods, 5, embed_dim=16, missing="black").eval()
    images = torch.randn(2, 3, 3, 64, 64)
    masks = torch.tensor([[False, True, True], [True, False, False]])
    fill = torch.stack([black(m) for m in mods])[None, :, :, None, None]
    cache = {}
    got = infer(model, images, masks, filler_cache=cache)
    assert list(cache) == [("black", 3, 3, 64, 64)]  # encoded once for both masks
    for i, mask in enumerate(masks):
        fed = torch.where(mask[None, :, None, None, None], images, fill)
        with torch.no_grad():
            ref = model(fed, torch.ones(2, 3, dtype=torch.bool)).logits
            direct = model(images, mask[None].expand(2, -1)).logits
        torch.testing.assert_close(direct, ref)
        ref = F.interpolate(ref, size=(64, 64), mode="bilinear", align_corners=False)
        torch.testing.assert_close(got[i], ref, rtol=1e-4, atol=1e-4)
    model.missing = "zero-fill"  # grey, not black, for RGB: other logits
    assert not torch.allclose(infer(model, images, masks), got, atol=1e-4)


@pytest.mark.parametrize("variant", ["pixel", "author"])
def test_all_present_step_uses_the_encoder_features_without_copies(variant):
    """With nothing absent the features are the encoder's own tensors (no zeros tensor, no
    scatter) and every output equals the gather / scatter path's."""
    torch.manual_seed(0)
    model = Any2Seg(build_encoder("mit_b0"), ["rgb", "depth", "event"], 5, embed_dim=16,
                    mff=MFFConfig(variant=variant)).eval()
    x = torch.randn(2, 3, 3, 64, 64)
    present = torch.ones(2, 3, dtype=torch.bool)
    stages = model.encoder(x.flatten(0, 1))
    model.encoder.forward = lambda _: stages  # the features the forward pass receives
    out = model(x, present)
    assert [f.data_ptr() for f in out.feats] == [s.data_ptr() for s in stages]
    keep = present.flatten().nonzero().squeeze(1)
    scattered = []
    for f in stages:  # what the general path builds
        full = f.new_zeros((6, *f.shape[1:]))
        full[keep] = f
        scattered.append(full.view(2, 3, *f.shape[1:]))
    if variant == "author":
        head = model.head([f.flatten(0, 1)[keep] for f in scattered])
        assert torch.equal(model.modality_logits(scattered, present), head.view(2, 3, 5, 16, 16))
    assert torch.equal(out.logits, model.fuse(scattered, present)[0])


@pytest.mark.parametrize("mode", ["whole", "slide"])
def test_predict_is_the_argmax_of_infer(mode):
    """Scoring each subset as soon as it is decoded gives infer's classes exactly."""
    from stages.student.evaluate import infer, predict

    torch.manual_seed(0)
    model = Any2Seg(build_encoder("mit_b0"), ["rgb", "depth"], 5, embed_dim=16,
                    missing="black").eval()
    images = torch.randn(1, 2, 3, 64, 96)
    masks = torch.tensor([[True, False], [False, True], [True, True]])
    logits = infer(model, images, masks, mode, crop=64, stride=32)
    assert torch.equal(predict(model, images, masks, mode, crop=64, stride=32),
                       logits.argmax(2))


def test_author_evaluation_runs_the_head_once_per_frame_kind_with_the_same_numbers():
    """Under `author` with black frames, every subset's logits equal decoding the
    substituted features (the path every other variant takes), bit for bit."""
    from stages.student.evaluate import infer

    torch.manual_seed(0)
    mods = ["rgb", "depth", "event"]
    model = Any2Seg(build_encoder("mit_b0"), mods, 5, embed_dim=16, missing="black",
                    mff=MFFConfig(variant="author")).eval()
    images = torch.randn(2, 3, 3, 64, 70)
    masks = torch.tensor([[True, False, True], [False, True, False], [True, True, True]])
    got = infer(model, images, masks)
    with torch.no_grad():
        feats = model.encode_all(images)
        fill = model.encode_all(model.filler(images).expand_as(images[:1]).contiguous())
        for i, mask in enumerate(masks):
            f = [torch.where(mask[None, :, None, None, None], a, z.expand_as(a))
                 for a, z in zip(feats, fill, strict=True)]
            ref = F.interpolate(model.decode(f, torch.ones(2, 3, dtype=torch.bool)),
                                size=(64, 70), mode="bilinear", align_corners=False)
            assert torch.equal(got[i], ref)
