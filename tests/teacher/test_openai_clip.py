"""OpenAI CLIP's preprocessing and files (`ViT-L-14.pt`), as LLaMA-Adapter V2 uses them.

Official code: github:openai/CLIP `clip/clip.py` (`_transform` :79-86, `load` :129-141)
and `clip/model.py` (`build_model` :399-435, `convert_weights` :375); LLaMA-Adapter's
`clip_encode_image` (llama_adapter_v2_multimodal7b/llama/llama_adapter.py) keeps all tokens
through `ln_post` and `proj`.
"""

import pickle
import warnings
import zipfile

import numpy as np
import pytest
import torch

from any2seg.errors import PipelineError
from stages.teacher.openai_clip import (
    clip_transform,
    map_visual_state,
    read_openai_clip,
    vision_tower,
)
from tests.llama_files import OPENAI, openai_clip, write_openai_clip


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    path = tmp_path_factory.mktemp("openai-clip") / "ViT-L-14.pt"
    write_openai_clip(path)
    return path


def test_torchscript_archive_is_read_without_running_it(archive, monkeypatch):
    """The state dict `clip.load` gets from `torch.jit.load(...).state_dict()`, key for key
    and dtype for dtype (float16 where convert_weights made it so), with torch.jit unused."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit's deprecation notice
        expected = torch.jit.load(str(archive)).state_dict()

    def no_jit(*_, **__):
        raise AssertionError("torch.jit.load must not be used")

    monkeypatch.setattr(torch.jit, "load", no_jit)
    state = read_openai_clip(archive)
    assert set(state) == set(expected)
    for key, value in expected.items():
        assert state[key].dtype == value.dtype and torch.equal(state[key], value), key
    assert state["visual.conv1.weight"].dtype == torch.float16
    assert state["visual.ln_pre.weight"].dtype == torch.float32


def test_archive_with_other_code_is_refused(archive, tmp_path):
    """A data.pkl that calls anything but tensor rebuilding is refused, and nothing runs."""
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    bad = tmp_path / "bad.pt"
    with zipfile.ZipFile(archive) as src, zipfile.ZipFile(bad, "w") as dst:
        for name in src.namelist():
            data = src.read(name)
            if name.endswith("/data.pkl"):
                data = pickle.dumps({"visual": Payload()}, protocol=2)
            dst.writestr(name, data)
    with pytest.raises(PipelineError, match="cannot read .* as an OpenAI CLIP checkpoint"):
        read_openai_clip(bad)
    assert not marker.exists()


def test_plain_state_dict_and_broken_files(archive, tmp_path):
    """`clip.load`'s fallback (a saved state dict) is read too; broken files fail clearly."""
    plain = tmp_path / "plain.pt"
    expected = read_openai_clip(archive)
    torch.save(expected, plain)
    assert all(torch.equal(read_openai_clip(plain)[k], v) for k, v in expected.items())
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(archive.read_bytes()[:5000])
    with pytest.raises(PipelineError, match="cannot read .*truncated.pt"):
        read_openai_clip(truncated)
    with pytest.raises(PipelineError, match="missing .*nothere.pt"):
        read_openai_clip(tmp_path / "nothere.pt")
    resnet = tmp_path / "RN50.pt"
    torch.save({k: v for k, v in expected.items() if k != "visual.proj"}, resnet)
    with pytest.raises(PipelineError, match="not a ViT CLIP"):
        vision_tower(resnet)
    with pytest.raises(PipelineError, match="unexpected CLIP key 'visual.surprise'"):
        map_visual_state({**expected, "visual.surprise": torch.zeros(1)}, "file")


def test_vision_tower_computes_what_openai_clip_computes(archive):
    """The mapped transformers tower (q/k/v split from in_proj, proj transposed, heads =
    width // 64 as build_model infers) gives OpenAI's all-token `ln_post(x) @ proj`, in
    float64 to 1e-10."""
    tower = vision_tower(archive).double()
    reference = openai_clip().double()
    assert tower.config.num_attention_heads == OPENAI["width"] // 64 == 2
    assert tower.config.image_size == OPENAI["resolution"]
    x = torch.randn(2, 3, OPENAI["resolution"], OPENAI["resolution"], dtype=torch.float64)
    with torch.no_grad():
        vision = tower.vision_model
        ours = tower.visual_projection(vision.post_layernorm(vision(pixel_values=x)
                                                             .last_hidden_state))
        theirs = reference.visual(x)
    assert ours.dtype == torch.float64
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-10)


def test_float32_weights_are_rounded_as_clip_load_does(archive, tmp_path):
    """`build_model` loads into float16 conv/linear/attention weights and proj
    (convert_weights) before `.float()`: a float32 file's values end up rounded."""
    state = {k: v.float() if v.is_floating_point() else v
             for k, v in read_openai_clip(archive).items()}
    state["visual.proj"] = state["visual.proj"] + 1e-4
    state["visual.ln_pre.weight"] = state["visual.ln_pre.weight"] + 1e-4
    path = tmp_path / "float32.pt"
    torch.save(state, path)
    tower = vision_tower(path)
    proj = tower.visual_projection.weight.t()
    assert torch.equal(proj, state["visual.proj"].half().float())
    assert not torch.equal(proj, state["visual.proj"])
    assert torch.equal(tower.vision_model.pre_layrnorm.weight, state["visual.ln_pre.weight"])


SIZES = [(224, 224), (50, 37), (37, 50), (40, 81), (81, 40), (150, 203), (225, 224),
         (224, 227), (300, 301), (17, 500)]


@pytest.mark.parametrize("size", SIZES, ids=[f"{h}x{w}" for h, w in SIZES])
def test_clip_transform_is_clips_transform(size):
    """Against torchvision's Compose as `_transform(224)` builds it (Resize bicubic on the
    PIL image, CenterCrop, RGB, ToTensor, Normalize): odd crop offsets both ways, up- and
    downscaling, already 224."""
    tv = pytest.importorskip("torchvision.transforms")
    from PIL import Image

    transform = tv.Compose([
        tv.Resize(224, interpolation=tv.InterpolationMode.BICUBIC), tv.CenterCrop(224),
        lambda im: im.convert("RGB"), tv.ToTensor(),
        tv.Normalize((0.48145466, 0.4578275, 0.40821073),
                     (0.26862954, 0.26130258, 0.27577711))])
    img = np.random.default_rng(sum(size)).integers(0, 256, (*size, 3), dtype=np.uint8)
    ours = clip_transform(img, 224)
    assert ours.shape == (3, 224, 224) and ours.dtype == torch.float32
    torch.testing.assert_close(ours, transform(Image.fromarray(img)), rtol=0, atol=1e-6)


def test_clip_transform_differs_from_languagebinds_on_purpose():
    """LanguageBind's preprocessing (float tensor resize) stays as it is; CLIP's resizes
    the uint8 PIL image, which differs by far more than round-off."""
    from stages.teacher.languagebind import preprocess_image

    img = np.random.default_rng(0).integers(0, 256, (50, 37, 3), dtype=np.uint8)
    assert (clip_transform(img) - preprocess_image(img)).abs().max() > 0.1
    with pytest.raises(ValueError, match="uint8"):
        clip_transform(img.astype(np.float32))
