import numpy as np
import pytest
import torch
from transformers import (
    BertTokenizer,
    BlipConfig,
    BlipForConditionalGeneration,
    BlipImageProcessor,
    BlipProcessor,
)

from any2seg.errors import PipelineError
from stages.teacher import captioners

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "a", "street", "road", "car",
         "sky", "foggy", "with", "and", "the", "of", "photo", "building", "night", "rain"]


def write_blip(folder):
    """A small BLIP captioner saved as `save_pretrained` leaves Salesforce/blip-* folders."""
    folder.mkdir(parents=True)
    tok = BertTokenizer(vocab={w: i for i, w in enumerate(WORDS)}, bos_token="[DEC]")
    processor = BlipProcessor(image_processor=BlipImageProcessor(size={"height": 64,
                                                                       "width": 64}),
                              tokenizer=tok)
    torch.manual_seed(0)
    cfg = BlipConfig(
        text_config=dict(vocab_size=len(WORDS), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=2, encoder_hidden_size=32,
                         bos_token_id=5, pad_token_id=0, sep_token_id=3, eos_token_id=3),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2, image_size=64, patch_size=16),
        projection_dim=16)
    model = BlipForConditionalGeneration(cfg)
    with torch.no_grad():  # make the random decoder prefer real words over [SEP]
        model.text_decoder.cls.predictions.decoder.bias[3] = -100.0
        model.text_decoder.cls.predictions.decoder.bias[:6] = -100.0
    model.save_pretrained(folder)
    processor.save_pretrained(folder)


def test_hf_captioner_fills_the_cache(teacher_sample, tmp_path):
    from any2seg.store import open_cache
    from stages.teacher.run import TeacherConfig, cache_teacher

    root, _ = teacher_sample
    write_blip(tmp_path / "blip")
    out = tmp_path / "hf.zarr"
    cache_teacher(TeacherConfig(dataset="sample", root=str(root), out=str(out), split=["val"],
                                teacher_root=str(root / "teacher"), captioner="hf",
                                captioner_options={"model": str(tmp_path / "blip"),
                                                   "max_new_tokens": 5},
                                batch_size=4))
    cache = open_cache(out)
    captions = cache.captions()
    assert cache.done.all() and all(captions)
    assert all(set(c.split()) <= set(WORDS) for c in captions)
    fp = cache.teacher_fingerprint["captioner"]
    assert fp["name"] == "hf" and fp["model"] == "blip" and "model.safetensors" in fp["weights"]
    assert fp["max_new_tokens"] == 5
    scene = cache.get(cache.ids)["scene"]
    np.testing.assert_allclose(np.linalg.norm(scene, axis=1), 1.0, atol=2e-3)


def test_hf_captioner_needs_a_local_model(tmp_path):
    with pytest.raises(PipelineError, match="needs --captioner-option model=PATH"):
        captioners.create("hf", ["a"])
    with pytest.raises(PipelineError, match="hf download"):
        captioners.create("hf", ["a"], model=str(tmp_path / "missing"))
    with pytest.raises(PipelineError, match="needs --captioner-option checkpoint=PATH"):
        captioners.create("llama-adapter", ["a"])
    assert {"template", "hf", "llama-adapter"} <= set(captioners.available())
