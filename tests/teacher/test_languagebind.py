import json

import numpy as np
import pytest
import torch
from transformers import CLIPConfig, CLIPModel

from any2seg.errors import PipelineError
from stages.teacher.checkpoints import resolve_branch_dir
from stages.teacher.default.folders import write_checkpoint
from stages.teacher.languagebind import (
    OPENAI_MEAN,
    OPENAI_STD,
    LanguageBind,
    load_clip,
    preprocess_depth,
    preprocess_image,
)


def reference_model(folder, state):
    """A CLIPModel built by hand from the config with the merged weights."""
    cfg = json.loads((folder / "config.json").read_text())
    model = CLIPModel(CLIPConfig(text_config=cfg["text_config"],
                                 vision_config=cfg["vision_config"],
                                 projection_dim=cfg["projection_dim"])).eval()
    model.load_state_dict(state)
    return model


@pytest.mark.parametrize("layout,fmt", [("peft-old", "bin"), ("peft-base-layer", "bin"),
                                        ("peft-base-layer", "safetensors"), ("plain", "bin")])
def test_lora_merge_matches_merged_clip(tmp_path, layout, fmt):
    folder = tmp_path / "LanguageBind_Depth"
    merged = write_checkpoint(folder, "depth", seed=3, layout=layout, weights_format=fmt)
    sd = (torch.load(folder / "pytorch_model.bin", weights_only=True) if fmt == "bin" else None)
    if layout == "peft-old":
        assert "vision_model.encoder.base_model.model.layers.0.self_attn.q_proj.weight" in sd
        assert "vision_model.encoder.base_model.model.layers.0.self_attn.q_proj.lora_A" \
               ".default.weight" in sd
        assert not any(".base_layer." in k for k in sd)
    elif layout == "peft-base-layer" and sd is not None:
        assert "vision_model.encoder.base_model.model.layers.1.self_attn.v_proj.base_layer" \
               ".weight" in sd
    model, _ = load_clip(folder)
    ref = reference_model(folder, merged)
    pixels = torch.randn(2, 3, 224, 224)
    ids = torch.tensor([[510, 3, 4, 5, 511, 511], [510, 7, 511, 511, 511, 511]])
    with torch.no_grad():
        ours = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
        theirs = ref.visual_projection(ref.vision_model(pixel_values=pixels).pooler_output)
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
        t1 = model.text_projection(model.text_model(input_ids=ids).pooler_output)
        t2 = ref.text_projection(ref.text_model(input_ids=ids).pooler_output)
        torch.testing.assert_close(t1, t2)
    if layout != "plain":  # the LoRA really contributes: stored base weights differ
        if fmt == "bin":
            raw = torch.load(folder / "pytorch_model.bin", weights_only=True)
        else:
            from safetensors.torch import load_file

            raw = load_file(str(folder / "model.safetensors"))
        key = next(k for k in raw if "base_model.model." in k and
                   (k.endswith("q_proj.weight") or k.endswith("q_proj.base_layer.weight")))
        target = "vision_model.encoder." + key.split("base_model.model.")[1].replace(
            ".base_layer", "")
        assert not torch.allclose(raw[key], merged[target])


def _rewrite(folder, edit):
    path = folder / "pytorch_model.bin"
    sd = torch.load(path, weights_only=True)
    edit(sd)
    torch.save(sd, path)


@pytest.mark.parametrize("edit,match", [
    (lambda sd: sd.__setitem__("vision_model.temporal_embedding", torch.zeros(1)), "unexpected"),
    (lambda sd: sd.pop("visual_projection.weight"), "missing"),
    (lambda sd: sd.pop("vision_model.encoder.base_model.model.layers.0.self_attn.k_proj"
                       ".lora_B.default.weight"), "lacks lora_B"),
    (lambda sd: sd.__setitem__(
        "vision_model.encoder.base_model.model.layers.0.self_attn.k_proj.lora_A.default.weight",
        torch.zeros(3, 64)), "LoRA shapes"),
])
def test_bad_key_sets_are_refused(tmp_path, edit, match):
    folder = tmp_path / "LanguageBind_Image"
    write_checkpoint(folder, "image", seed=1)
    _rewrite(folder, edit)
    with pytest.raises(PipelineError, match=match):
        load_clip(folder)


def test_config_that_does_not_match_the_weights(tmp_path):
    folder = tmp_path / "LanguageBind_Image"
    write_checkpoint(folder, "image", seed=1)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["vision_config"]["lora_r"] = 0
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(PipelineError, match="lora_r=0"):
        load_clip(folder)
    cfg["vision_config"]["add_time_attn"] = True
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(PipelineError, match="video"):
        load_clip(folder)


def test_corrupt_weights_are_named(tmp_path):
    folder = tmp_path / "LanguageBind_Image"
    write_checkpoint(folder, "image", seed=1)
    data = (folder / "pytorch_model.bin").read_bytes()
    (folder / "pytorch_model.bin").write_bytes(data[: len(data) // 3])
    with pytest.raises(PipelineError, match="pytorch_model.bin.*corrupt"):
        load_clip(folder)


def test_missing_branch_and_offline_hub_id(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(PipelineError, match="hf download LanguageBind/"
                                            "LanguageBind_Depth"):
        resolve_branch_dir(tmp_path, "depth")
    with pytest.raises(PipelineError, match="not in the local Hugging Face cache.*"
                                            "hf download"):
        resolve_branch_dir("LanguageBind", "depth")


def test_depth_preprocessing_on_known_values():
    mm = np.array([[0, 5, 2000, 10000, 30000]] * 5, dtype=np.uint16)
    x = preprocess_depth(mm, max_depth=10.0, size=5)
    expected = np.array([0.01, 0.01, 2.0, 10.0, 10.0]) / 10.0  # m, clip [0.01, 10], / 10
    for c in range(3):
        got = x[c, 0].numpy() * OPENAI_STD[c] + OPENAI_MEAN[c]
        np.testing.assert_allclose(got, expected, atol=1e-6)
    unbounded = preprocess_depth(mm, max_depth=0, size=5)  # / max when max_depth is 0
    np.testing.assert_allclose(unbounded[0, 0, -1].item() * OPENAI_STD[0] + OPENAI_MEAN[0], 1.0,
                               atol=1e-6)


def test_image_preprocessing_resizes_short_side_and_centre_crops():
    img = np.zeros((100, 300, 3), np.uint8)
    img[:, 100:200] = 255  # the middle third is white
    x = preprocess_image(img, size=64)
    assert x.shape == (3, 64, 64)
    white = (1.0 - OPENAI_MEAN[0]) / OPENAI_STD[0]
    np.testing.assert_allclose(x[0, :, 4:60].numpy(), white, atol=1e-3)
    flat = preprocess_image(np.full((40, 30, 3), 128, np.uint8), size=224)
    np.testing.assert_allclose(flat[1].numpy(), (128 / 255 - OPENAI_MEAN[1]) / OPENAI_STD[1],
                               atol=1e-4)


def test_teacher_embeddings_are_unit_vectors_and_text_is_shared(tmp_path):
    for i, branch in enumerate(("image", "depth")):
        write_checkpoint(tmp_path / f"LanguageBind_{branch.capitalize()}", branch,
                         seed=10 + i, text_seed=5)
    lb = LanguageBind(tmp_path, ["depth", "image"])
    assert lb.text_branch.name == "image" and lb.dim == 64
    text = lb.encode_text(["a foggy street with road and sky", "cars"])
    torch.testing.assert_close(text.norm(dim=-1), torch.ones(2))
    depth_text = lb.branches["depth"].model.text_projection(
        lb.branches["depth"].model.text_model(
            **{k: v for k, v in lb.tokenizer(["cars"], padding="max_length", max_length=77,
                                              return_tensors="pt").items()}).pooler_output)
    torch.testing.assert_close(torch.nn.functional.normalize(depth_text, dim=-1)[0], text[1])
    img = lb.encode_pixels("image", lb.preprocess("image", np.zeros((50, 60, 3), np.uint8))[None])
    depth = np.full((50, 60), 3000, np.uint16)
    dep = lb.encode_pixels("depth", lb.preprocess("depth", depth)[None])
    assert img.shape == dep.shape == (1, 64)
    assert not torch.allclose(img, dep)


@pytest.mark.parametrize("raw,clean", [
    ("a \u2018foggy\u2019 street with \u201ccars\u201d", "a 'foggy' street with \"cars\""),
    ("road &amp;amp; sky", "road & sky"),
    ("a <b> &amp; c", "a <b> & c"),  # ftfy leaves HTML-looking text; html.unescape does not
    ("caf\u00c3\u00a9 \ufb01re", "caf\u00e9 fire"),  # mojibake and a ligature
    ("  a\tfoggy\n\n street  ", "a foggy street"),
])
def test_text_cleaning_as_languagebind(raw, clean):
    """PKU-YuanGroup/LanguageBind open_clip/tokenizer.py:60-69 (`basic_clean`: ftfy.fix_text,
    html.unescape twice, strip; `whitespace_clean`), applied before BPE at line 206."""
    from stages.teacher.languagebind import clean_text

    assert clean_text(raw) == clean


def test_caption_ids_follow_the_cleaned_text(tmp_path):
    """The ids of a caption with typographic quotes and an entity are those of its cleaned
    ASCII form (what the official tokenizer encodes), not of the raw bytes."""
    write_checkpoint(tmp_path / "LanguageBind_Image", "image", seed=1)
    lb = LanguageBind(tmp_path, ["image"])
    raw = "A \u201cfoggy\u201d  street &amp; CARS"
    ids = lb.tokenize([raw])["input_ids"]
    expected = lb.tokenizer(['a "foggy" street & cars'], padding="max_length", max_length=77,
                            return_tensors="pt")["input_ids"]
    assert torch.equal(ids, expected)
    naive = lb.tokenizer([raw], padding="max_length", max_length=77, return_tensors="pt")
    assert not torch.equal(naive["input_ids"], expected)
    torch.testing.assert_close(lb.encode_text([raw]), lb.encode_text(['a "foggy" street & cars']))


def test_config_with_a_list_image_size_loads(tmp_path):
    """LanguageBind's `resize_pos` (languagebind/image/modeling_image.py:799) leaves
    `config.image_size = [224, 224]`, which `save_pretrained` writes; both forms load the
    same model, a non-square size is refused by name."""
    folder = tmp_path / "LanguageBind_Image"
    write_checkpoint(folder, "image", seed=1)
    ref, _ = load_clip(folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["vision_config"]["image_size"] = [224, 224]
    (folder / "config.json").write_text(json.dumps(cfg))
    model, loaded = load_clip(folder)
    assert loaded["vision_config"]["image_size"] == 224
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(model.get_image_features(pixel_values=x),
                                   ref.get_image_features(pixel_values=x), rtol=0, atol=0)
    assert LanguageBind(tmp_path, ["image"]).branches["image"].image_size == 224
    cfg["vision_config"]["image_size"] = [224, 192]
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(PipelineError, match=r"image_size must be a size or a square.*224, 192"):
        load_clip(folder)


def test_float_images_enter_the_image_branch_over_their_value_range():
    """A float image in [0, 1] is what the official `ToTensor` makes of an 8-bit one, so both
    give the same pixels; MCubeS AoLP in [-1, 1] enters as (x + 1) / 2."""
    from any2seg.datasets import Sample
    from stages.teacher.run import model_input

    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
    torch.testing.assert_close(preprocess_image(img.astype(np.float32) / 255, size=32),
                               preprocess_image(img, size=32), rtol=0, atol=0)
    aolp = rng.uniform(-1, 1, (6, 8, 3))
    sample = Sample(id="x", modalities={"aolp": aolp}, label=np.zeros((6, 8), np.int64),
                    ranges={"aolp": (-1.0, 1.0)})
    np.testing.assert_allclose(model_input(sample, "aolp", "image"), (aolp + 1) / 2, atol=1e-6)


def test_image_preprocessing_is_languagebinds_torchvision_transform():
    """LanguageBind's image processor: ToTensor, Resize(224, BICUBIC) on the tensor
    (antialiased), CenterCrop(224), Normalize(OpenAI mean/std); bit for bit, down- and
    upscaling, odd crop offsets."""
    tv = pytest.importorskip("torchvision.transforms")
    transform = tv.Compose([tv.ToTensor(), tv.Resize(224, tv.InterpolationMode.BICUBIC),
                            tv.CenterCrop(224), tv.Normalize(OPENAI_MEAN, OPENAI_STD)])
    for size in ((300, 451), (131, 90), (224, 224)):
        img = np.random.default_rng(sum(size)).integers(0, 256, (*size, 3), dtype=np.uint8)
        torch.testing.assert_close(preprocess_image(img), transform(img), rtol=0, atol=0)


def test_depth_preprocessing_is_the_transform_of_the_repeated_depth_map():
    """LanguageBind's depth processor: DepthNorm (mm -> m, clip 0.01..max_depth, / max),
    repeat to 3 channels, then Resize / CenterCrop / Normalize; resizing one channel and
    broadcasting must give the same numbers bit for bit."""
    tv = pytest.importorskip("torchvision.transforms")
    transform = tv.Compose([tv.Resize(224, tv.InterpolationMode.BICUBIC), tv.CenterCrop(224),
                            tv.Normalize(OPENAI_MEAN, OPENAI_STD)])
    mm = np.random.default_rng(5).integers(0, 30000, (150, 201)).astype(np.uint16)
    metres = torch.from_numpy(mm.astype(np.float32)) / 1000.0
    for max_depth in (10.0, 0.0):
        d = metres.clamp(min=0.01)
        d = d.clamp(max=max_depth) / max_depth if max_depth else d / d.max()
        torch.testing.assert_close(preprocess_depth(mm, max_depth), transform(
            d[None].repeat(3, 1, 1)), rtol=0, atol=0)
