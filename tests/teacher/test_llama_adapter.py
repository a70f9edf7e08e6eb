import numpy as np
import pytest
import torch

from any2seg.errors import PipelineError
from stages.teacher import llama_adapter as la
from stages.teacher.llama_adapter_checkpoint import load as load_files
from tests.llama_files import VISUAL, write_llama_adapter


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return write_llama_adapter(tmp_path_factory.mktemp("llama-adapter"))


@pytest.fixture(scope="module")
def lora_files(tmp_path_factory):
    return write_llama_adapter(tmp_path_factory.mktemp("llama-adapter-lora"), w_lora=True)


def load(paths, dtype=torch.float64):
    return load_files(paths["checkpoint"], paths["llama_dir"], paths["clip"],
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


def _first_logits(model, seed=0):
    torch.manual_seed(seed)
    visual = _visual(model, 2)
    tokens = torch.randint(3, 100, (2, 7))
    valid = torch.ones(2, 7, dtype=torch.bool)
    return model(tokens, torch.arange(7).expand(2, -1), valid, None, 0, model.adapter_kv(visual))


def test_bad_checkpoints_are_refused(files, tmp_path):
    """Unexpected keys fail as the official `assert len(load_result.unexpected_keys) == 0`
    (llama_adapter.py:324); weights the official code would leave random fail too."""
    ckpt = torch.load(files["checkpoint"], weights_only=True)
    bad = tmp_path / "bad.pth"
    extra = dict(ckpt["model"], **{"llama.layers.0.attention.surprise": torch.zeros(1)})
    torch.save({"model": extra, "config": ckpt["config"]}, bad)
    with pytest.raises(PipelineError, match="does not have .*llama.layers.0.attention.surprise"):
        load_files(bad, files["llama_dir"], files["clip"], v_num_heads=2)
    lora = torch.load(write_llama_adapter(tmp_path / "lora", w_lora=True)["checkpoint"],
                      weights_only=True)
    torch.save({"model": lora["model"]}, bad)  # no config: w_lora False, LoRA unexpected
    with pytest.raises(PipelineError, match=r"w_lora=False\): .*lora_wq_l1.weight \(3\)"):
        load_files(bad, files["llama_dir"], files["clip"], v_num_heads=2)
    partial = {k: v for k, v in ckpt["model"].items() if k != "visual_proj.weight"}
    torch.save({"model": partial, "config": ckpt["config"]}, bad)
    with pytest.raises(PipelineError, match="lack visual_proj.weight: the official loader "
                                            "would leave them at random initialisation"):
        load_files(bad, files["llama_dir"], files["clip"], v_num_heads=2)
    with pytest.raises(PipelineError, match="7B/consolidated.00.pth"):
        load_files(files["checkpoint"], tmp_path, files["clip"], v_num_heads=2)
    with pytest.raises(PipelineError, match="hf download openai/clip-vit-large"):
        load_files(files["checkpoint"], files["llama_dir"], tmp_path / "noclip", v_num_heads=2)
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(PipelineError, match="corrupt"):
        load_files(bad, files["llama_dir"], files["clip"], v_num_heads=2)


def test_missing_keys_keep_the_official_initial_values(files, tmp_path, caplog):
    """A config asking for LoRA in a BIAS file: the official strict=False load keeps
    LoRA's up-projections at 0 and new_gate at 1 (llama.py:120-123, :252-254), so the
    model is the BIAS model; the load warns, naming the keys."""
    ckpt = torch.load(files["checkpoint"], weights_only=True)
    bad = tmp_path / "lora-config.pth"
    torch.save({"model": ckpt["model"], "config": {**ckpt["config"], "w_lora": True}}, bad)
    with caplog.at_level("WARNING", logger="pipeline.teacher"):
        model, _ = load_files(bad, files["llama_dir"], files["clip"], v_num_heads=2,
                           dtype=torch.float64)
    assert model.llama.layers[0].attention.w_lora
    assert "lora-config.pth lacks " in caplog.text
    assert "llama.layers.*.attention.lora_wq_l2.weight (3)" in caplog.text
    assert "llama.layers.*.attention.new_gate (3)" in caplog.text
    plain, _ = load(files)
    torch.testing.assert_close(_first_logits(model), _first_logits(plain), rtol=1e-12,
                               atol=1e-12)


def test_no_config_means_bias_tuning_from_the_phase(files, tmp_path):
    """The official constructor sets `w_bias = phase == "finetune"` whatever the config says
    (llama_adapter.py:32; `load` reads `ckpt.get('config', {})`, :307): a file without
    config, or with w_bias False, still has its biases loaded."""
    ckpt = torch.load(files["checkpoint"], weights_only=True)
    reference = _first_logits(load(files)[0])
    for name, extra in (("none", {}), ("false", {"config": {"w_bias": False}})):
        path = tmp_path / f"{name}.pth"
        torch.save({"model": ckpt["model"], **extra}, path)
        model, _ = load_files(path, files["llama_dir"], files["clip"], v_num_heads=2,
                           dtype=torch.float64)
        bias = model.llama.layers[1].attention.wq.bias
        assert torch.equal(bias, ckpt["model"]["llama.layers.1.attention.wq.bias"].double())
        torch.testing.assert_close(_first_logits(model), reference, rtol=1e-12, atol=1e-12)


def test_every_pth_of_the_llama_folder_is_loaded_in_turn(files, tmp_path):
    """`sorted(Path(llama_ckpt_dir).glob("*.pth"))`, each `load_state_dict(strict=False)`
    (llama_adapter.py:72-75): keys spread over files all arrive, a later file wins, and
    model-parallel slices are refused clearly (the official load fails on them too)."""
    import shutil

    llama = tmp_path / "llama"
    shutil.copytree(files["llama_dir"], llama)
    base = torch.load(llama / "7B" / "consolidated.00.pth", weights_only=True)
    torch.save({k: v for k, v in base.items() if k != "output.weight"},
               llama / "7B" / "consolidated.00.pth")
    torch.save({"output.weight": base["output.weight"]}, llama / "7B" / "consolidated.01.pth")
    split, _ = load_files(files["checkpoint"], llama, files["clip"], v_num_heads=2,
                       dtype=torch.float64)
    torch.testing.assert_close(_first_logits(split), _first_logits(load(files)[0]), rtol=0,
                               atol=0)
    torch.save({"output.weight": torch.full_like(base["output.weight"], 3.0)},
               llama / "7B" / "consolidated.02.pth")
    later, _ = load_files(files["checkpoint"], llama, files["clip"], v_num_heads=2)
    assert torch.equal(later.llama.output.weight, torch.full_like(base["output.weight"], 3.0))
    wq = base["layers.0.attention.wq.weight"]
    torch.save({"layers.0.attention.wq.weight": wq[: len(wq) // 2]},
               llama / "7B" / "consolidated.02.pth")
    with pytest.raises(PipelineError, match="consolidated.02.pth: llama.layers.0.attention.wq"
                                            ".weight has shape .*model-parallel"):
        load_files(files["checkpoint"], llama, files["clip"], v_num_heads=2)
    (llama / "7B" / "consolidated.02.pth").unlink()
    (llama / "7B" / "consolidated.01.pth").unlink()  # output.weight nowhere
    with pytest.raises(PipelineError, match="lack llama.output.weight: the official loader"):
        load_files(files["checkpoint"], llama, files["clip"], v_num_heads=2)


def test_openai_clip_file_as_the_clip(tmp_path):
    """`clip=ViT-L-14.pt` (OpenAI's TorchScript archive) works like a transformers folder;
    the captioner's preprocessing follows its resolution."""
    paths = write_llama_adapter(tmp_path, clip="openai")
    model, tok = load(paths)
    assert model.image_size == 64
    visual = model.visual(model.clip_tokens(torch.randn(2, 3, 64, 64, dtype=torch.float64)))
    assert visual.shape == (2, VISUAL.query_len, 32) and visual.dtype == torch.float64
    out = la.generate(model, visual, [[1, 5, 6], [1, 7]], 5, tok.eos_id())
    assert len(out) == 2
    ckpt = torch.load(paths["checkpoint"], weights_only=True)
    ckpt["model"]["clip.visual.transformer.resblocks.7.ln_1.weight"] = torch.ones(128)
    other = tmp_path / "other-clip.pth"
    torch.save(ckpt, other)
    with pytest.raises(PipelineError, match="holds a CLIP other than"):
        load_files(other, paths["llama_dir"], paths["clip"], v_num_heads=2)


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
    from any2seg.store import open_cache

    cache = open_cache(out)
    captions = cache.captions()
    assert cache.done.all() and len(captions) == 12
    assert any(captions) and not any(c.startswith("a cloudy street with") for c in captions)
    scene = cache.get(cache.ids)["scene"]
    np.testing.assert_allclose(np.linalg.norm(scene, axis=1), 1.0, atol=2e-3)
    fp = cache.teacher_fingerprint["captioner"]
    assert fp["name"] == "llama-adapter" and set(fp["files"]) == {"checkpoint", "llama",
                                                                   "tokenizer", "clip"}


def test_generation_is_shortened_at_max_seq_len_per_prompt(files):
    """Official `total_len = min(max_seq_len, max_gen_len + prompt)` (:234): each prompt
    gets at most max_seq_len - its length new tokens, the same first tokens as without
    the limit; a prompt longer than max_seq_len is refused (the official code crashes)."""
    short, _ = load_files(files["checkpoint"], files["llama_dir"], files["clip"], v_num_heads=2,
                       max_seq_len=20, dtype=torch.float64)
    long, _ = load_files(files["checkpoint"], files["llama_dir"], files["clip"], v_num_heads=2,
                      max_seq_len=60, dtype=torch.float64)
    visual = _visual(short, 3)
    prompts = [[1, 5, 6, 7, 8], [1, *range(10, 21)], [1, *range(30, 49)]]  # 5, 12, 20 tokens
    cut = la.generate(short, visual, prompts, 30, eos_id=-1)
    assert [len(t) for t in cut] == [15, 8, 0]
    full = la.generate(long, visual, prompts, 30, eos_id=-1)
    assert [t[:len(c)] for t, c in zip(full, cut, strict=True)] == cut
    with pytest.raises(PipelineError, match="prompt of 21 tokens exceeds max_seq_len 20"):
        la.generate(short, visual[:1], [[1, *range(30, 50)]], 5, eos_id=-1)
