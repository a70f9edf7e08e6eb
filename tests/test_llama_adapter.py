import numpy as np
import pytest
import torch

from pipeline.errors import PipelineError
from stages.teacher import llama_adapter as la
from tests.llama_files import VISUAL, write_llama_adapter


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return write_llama_adapter(tmp_path_factory.mktemp("llama-adapter"))


@pytest.fixture(scope="module")
def lora_files(tmp_path_factory):
    return write_llama_adapter(tmp_path_factory.mktemp("llama-adapter-lora"), w_lora=True)


def load(paths, dtype=torch.float64):
    return la.load(paths["checkpoint"], paths["llama_dir"], paths["clip"],
                   v_num_heads=VISUAL.v_num_heads, dtype=dtype)


def test_official_key_layouts_load(files, lora_files):
    for paths, lora in ((files, False), (lora_files, True)):
        ckpt = torch.load(paths["checkpoint"], weights_only=True)
        keys = set(ckpt["model"])
        assert {"clip_proj.weight", "visual_query.weight", "visual_blocks.0.attn.qkv.weight",
                "adapter_query.weight", "llama.layers.0.attention.gate",
                "llama.layers.2.attention.wq.bias", "llama.layers.1.feed_forward.w3.bias",
                "llama.layers.1.ffn_norm.weight", "llama.norm.weight"} <= keys
        assert ("llama.layers.0.feed_forward.lora_w3_l2.weight" in keys) is lora
        assert ("llama.layers.0.attention.new_gate" in keys) is lora
        base = torch.load(paths["llama_dir"] / "7B" / "consolidated.00.pth", weights_only=True)
        assert {"tok_embeddings.weight", "layers.0.attention.wq.weight", "output.weight",
                "rope.freqs"} <= set(base)
        model, tok = load(paths)
        own = model.state_dict()
        for key, value in ckpt["model"].items():
            assert torch.equal(own[key], value.double()), key
        for key, value in base.items():
            if key != "rope.freqs":
                assert torch.equal(own["llama." + key], value.double()), key
        assert model.llama.layers[0].attention.w_lora is lora
        assert tok.bos_id() == 1 and tok.eos_id() == 2


def test_mismatched_checkpoints_are_refused(files, tmp_path):
    ckpt = torch.load(files["checkpoint"], weights_only=True)
    bad = tmp_path / "bad.pth"
    torch.save({"model": ckpt["model"], "config": {**ckpt["config"], "w_lora": True}}, bad)
    with pytest.raises(PipelineError, match=r"does not match its config \(w_bias=True, "
                                            r"w_lora=True\): missing"):
        la.load(bad, files["llama_dir"], files["clip"], v_num_heads=2)
    extra = dict(ckpt["model"], **{"llama.layers.0.attention.surprise": torch.zeros(1)})
    torch.save({"model": extra, "config": ckpt["config"]}, bad)
    with pytest.raises(PipelineError, match="unexpected"):
        la.load(bad, files["llama_dir"], files["clip"], v_num_heads=2)
    with pytest.raises(PipelineError, match="7B/consolidated.00.pth"):
        la.load(files["checkpoint"], tmp_path, files["clip"], v_num_heads=2)
    with pytest.raises(PipelineError, match="huggingface-cli download openai/clip-vit-large"):
        la.load(files["checkpoint"], files["llama_dir"], tmp_path / "noclip", v_num_heads=2)
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(PipelineError, match="corrupt"):
        la.load(bad, files["llama_dir"], files["clip"], v_num_heads=2)


def _visual(model, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randn(n, 3, 224, 224, generator=g, dtype=torch.float64)
    with torch.inference_mode():
        return model.visual(model.clip_tokens(pixels))


def test_batched_greedy_equals_per_sample(files):
    model, tok = load(files)
    visual = _visual(model, 3)
    texts = ["Generate caption of this image", "a foggy street",
             "a rainy street at night with trucks, buses and poles"]
    prompts = [[tok.bos_id(), *tok.encode(t)] for t in texts]
    assert len({len(p) for p in prompts}) == 3
    batched = la.generate(model, visual, prompts, 12, tok.eos_id())
    single = [la.generate(model, visual[i:i + 1], [p], 12, tok.eos_id())[0]
              for i, p in enumerate(prompts)]
    assert batched == single
    assert any(len(t) > 3 for t in batched)


def test_kv_cache_logits_equal_full_recomputation(lora_files):
    model, tok = load(lora_files)
    visual = _visual(model, 2)
    adapter = model.adapter_kv(visual)
    tokens = torch.randint(3, 100, (2, 9))
    valid = torch.ones(2, 9, dtype=torch.bool)
    valid[1, :3] = False  # left padding of the second row
    positions = (valid.long().cumsum(1) - 1).clamp(min=0)
    full = model(tokens, positions, valid, None, 0, adapter)
    heads, hd = model.llama.args.n_heads, model.llama.args.dim // model.llama.args.n_heads
    caches = [(torch.zeros(2, 9, heads, hd, dtype=torch.float64),
               torch.zeros(2, 9, heads, hd, dtype=torch.float64)) for _ in model.llama.layers]
    steps = [model(tokens[:, :5], positions[:, :5], valid, caches, 0, adapter)]
    for slot in range(5, 9):
        steps.append(model(tokens[:, slot:slot + 1], positions[:, slot:slot + 1], valid, caches,
                           slot, adapter))
    incremental = torch.cat(steps, dim=1)
    torch.testing.assert_close(incremental[0], full[0], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(incremental[1, 3:], full[1, 3:], rtol=1e-10, atol=1e-10)
    cached = la.generate(model, visual, [[1, 5, 6, 7], [1, 8]], 6, tok.eos_id())
    uncached = la.generate(model, visual, [[1, 5, 6, 7], [1, 8]], 6, tok.eos_id(),
                           use_cache=False)
    assert cached == uncached


def test_zero_gates_make_the_adapter_a_no_op(tmp_path):
    paths = write_llama_adapter(tmp_path, w_lora=True, zero_gates=True)
    model, _ = load(paths)
    visual = _visual(model, 2)
    tokens = torch.randint(3, 100, (2, 6))
    valid = torch.ones(2, 6, dtype=torch.bool)
    positions = torch.arange(6).expand(2, -1)
    with_adapter = model(tokens, positions, valid, None, 0, model.adapter_kv(visual))
    plain = model(tokens, positions, valid, None, 0, None)
    torch.testing.assert_close(with_adapter, plain, rtol=0, atol=0)
    for layer in model.llama.layers:
        layer.attention.gate.data.fill_(0.5)
    assert not torch.allclose(model(tokens, positions, valid, None, 0,
                                    model.adapter_kv(visual)), plain)


def test_sampling_is_seeded(files):
    model, tok = load(files, dtype=torch.float32)
    visual = _visual(model, 2).float()
    prompts = [[1, 5, 6], [1, 7]]
    runs = [la.generate(model, visual, prompts, 8, tok.eos_id(), temperature=1.0, top_p=0.9,
                        generator=torch.Generator().manual_seed(3)) for _ in range(2)]
    assert runs[0] == runs[1]


def test_captioners_in_cache_teacher(teacher_sample, files, tmp_path):
    from stages.teacher.run import TeacherConfig, cache_teacher

    root, _ = teacher_sample
    options = {k: str(v) for k, v in files.items()}
    options.update(v_num_heads=2, max_new_tokens=6, temperature=1.0, top_p=1.0,
                   with_classes=True, seed=1)
    out = tmp_path / "la.zarr"
    cache_teacher(TeacherConfig(dataset="sample", root=str(root), out=str(out), split=["val"],
                                teacher_root=str(root / "teacher"), captioner="llama-adapter",
                                captioner_options=options, batch_size=4))
    from pipeline.store import open_cache

    cache = open_cache(out)
    captions = cache.captions()
    assert cache.done.all() and len(captions) == 12
    assert any(captions) and not any(c.startswith("a cloudy street with") for c in captions)
    scene = cache.get(cache.ids)["scene"]
    np.testing.assert_allclose(np.linalg.norm(scene, axis=1), 1.0, atol=2e-3)
    fp = cache.teacher_fingerprint["captioner"]
    assert fp["name"] == "llama-adapter" and set(fp["files"]) == {"checkpoint", "llama",
                                                                   "tokenizer", "clip"}
