import pytest
import torch
from transformers import SegformerConfig, SegformerForImageClassification

from any2seg.errors import PipelineError
from stages.student.encoder import MIT, build_encoder


def write_mit(folder, variant="b0", seed=0):
    """A checkpoint in the on-disk format of nvidia/mit-bN (SegformerForImageClassification:
    config.json + model.safetensors with `segformer.` and `classifier.` keys)."""
    torch.manual_seed(seed)
    hidden, depths = MIT[variant]
    config = SegformerConfig(hidden_sizes=hidden, depths=depths, num_attention_heads=[1, 2, 5, 8],
                             num_labels=10, architectures=["SegformerForImageClassification"])
    model = SegformerForImageClassification(config)
    model.save_pretrained(folder)
    return model


def test_pretrained_mit_folder_loads_its_weights(tmp_path):
    ref = write_mit(tmp_path / "mit-b0")
    from safetensors.torch import load_file

    keys = load_file(str(tmp_path / "mit-b0" / "model.safetensors"))
    assert any(k.startswith("segformer.encoder.") for k in keys) and "classifier.weight" in keys
    enc = build_encoder("mit_b0", str(tmp_path / "mit-b0"))
    ours = enc.model.state_dict()
    for key, value in ref.segformer.state_dict().items():
        assert torch.equal(ours[key], value), key
    feats = enc(torch.randn(1, 3, 64, 64))
    assert [f.shape[1] for f in feats] == enc.channels == MIT["b0"][0]


def test_pretrained_errors(tmp_path):
    write_mit(tmp_path / "mit-b0")
    with pytest.raises(PipelineError, match="not mit_b1"):
        build_encoder("mit_b1", str(tmp_path / "mit-b0"))
    with pytest.raises(PipelineError, match="hf download nvidia/mit-b2"):
        build_encoder("mit_b2", str(tmp_path / "missing"))
    with pytest.raises(PipelineError, match="unknown backbone"):
        build_encoder("vgg16")
    with pytest.raises(PipelineError, match="unknown MiT variant"):
        build_encoder("mit_b9")
