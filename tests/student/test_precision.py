"""Every model component keeps float64 end to end (the precision rule of any2seg/precision).

A component that calls `.float()` computes a float64 input in float32: its output is then
float32, or float64 but only float32-accurate. Each check compares with a float64 formula
at a tolerance float32 cannot meet, and runs with 1 and 2 threads.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from any2seg.precision import stable_dtype, upcast
from stages.student.encoder import build_encoder
from stages.student.losses import LossConfig, correlation, semantic, supervised
from stages.student.mff import MFF
from stages.student.model import Any2Seg
from stages.teacher import llama_adapter as la
from stages.teacher.default.folders import write_checkpoint
from stages.teacher.languagebind import LanguageBind
from stages.teacher.llama_adapter_checkpoint import load as load_files
from tests.llama_files import VISUAL, write_llama_adapter

F64 = 1e-12  # float32 round-off is ~1e-7: a float32 detour fails these


@pytest.fixture(params=[1, 2], ids=["1-thread", "2-threads"])
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def test_stable_dtype_upcasts_and_never_downcasts():
    assert stable_dtype(torch.float16) == torch.float32
    assert stable_dtype(torch.bfloat16) == torch.float32
    assert stable_dtype(torch.float32) == torch.float32
    assert stable_dtype(torch.float64) == torch.float64
    x = torch.tensor([1 + 2**-40], dtype=torch.float64)
    assert upcast(x).dtype == torch.float64 and upcast(x).item() == 1 + 2**-40


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    paths = write_llama_adapter(tmp_path_factory.mktemp("llama64"), w_lora=True)
    model, _ = load_files(paths["checkpoint"], paths["llama_dir"], paths["clip"],
                       v_num_heads=VISUAL.v_num_heads, dtype=torch.float64)
    return model


def test_llama_adapter_blocks_compute_in_float64(llama, threads):
    torch.manual_seed(0)
    norm = llama.llama.norm
    x = torch.randn(2, 5, norm.weight.numel(), dtype=torch.float64) * 1e3
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight
    got = norm(x)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, expected, rtol=F64, atol=F64)

    q = torch.randn(2, 5, 2, 8, dtype=torch.float64)
    positions = torch.arange(5).expand(2, -1) * 997  # large angles expose float32 phases
    rotated = la.rope(q, positions)
    freqs = 1.0 / 10000.0 ** (torch.arange(0, 8, 2, dtype=torch.float64) / 8)
    angle = positions.double()[..., None, None] * freqs
    a, b = q[..., 0::2], q[..., 1::2]
    expected = torch.stack([a * angle.cos() - b * angle.sin(),
                            a * angle.sin() + b * angle.cos()], -1).flatten(-2)
    assert rotated.dtype == torch.float64
    torch.testing.assert_close(rotated, expected, rtol=F64, atol=1e-9)

    visual = llama.visual(torch.randn(2, 257, VISUAL.clip_dim, dtype=torch.float64))
    tokens = torch.randint(3, 100, (2, 6))
    valid = torch.ones(2, 6, dtype=torch.bool)
    logits = llama(tokens, torch.arange(6).expand(2, -1), valid, None, 0,
                   llama.adapter_kv(visual))
    assert visual.dtype == torch.float64 and logits.dtype == torch.float64


def test_clip_tower_encodes_in_float64(tmp_path, threads):
    write_checkpoint(tmp_path / "LanguageBind_Image", "image", seed=1)
    teacher = LanguageBind(tmp_path, ["image"], compute_dtype=torch.float64)
    rng = np.random.default_rng(0)
    pixels = teacher.preprocess("image", rng.integers(0, 256, (40, 50, 3), dtype=np.uint8))
    image = teacher.encode_pixels("image", pixels[None])
    text = teacher.encode_text(["a street in fog"])
    assert image.dtype == torch.float64 and text.dtype == torch.float64
    model = teacher.branches["image"].model
    with torch.no_grad():
        ref = model.visual_projection(model.vision_model(
            pixel_values=pixels[None].double()).pooler_output)
    torch.testing.assert_close(image, F.normalize(ref, dim=-1), rtol=F64, atol=F64)


def test_student_mff_losses_and_model_keep_float64(threads):
    torch.manual_seed(0)
    feats = torch.randn(2, 3, 8, 4, 4, dtype=torch.float64)
    present = torch.tensor([[True, True, False], [True, True, True]])
    out = MFF()(feats, present)
    assert out.fused.dtype == torch.float64
    label = torch.randint(0, 4, (2, 16, 16))
    logits = torch.randn(2, 4, 4, 4, dtype=torch.float64)
    for cfg in (LossConfig(), LossConfig(ohem=True)):
        assert supervised(logits, label, cfg).dtype == torch.float64
    cr = correlation(feats, out.fused, present, torch.randn(2, 3, 6, dtype=torch.float64),
                     torch.randn(2, 6, dtype=torch.float64))
    se = semantic(out.fused, label, torch.randn(4, 6, dtype=torch.float64))
    assert cr.dtype == torch.float64 and se.dtype == torch.float64
    model = Any2Seg(build_encoder("mit_b0"), ["rgb", "depth"], 5, embed_dim=16).double().eval()
    with torch.no_grad():
        result = model(torch.randn(1, 2, 3, 64, 64, dtype=torch.float64))
    assert result.logits.dtype == torch.float64
    assert all(f.dtype == torch.float64 for f in result.feats)
