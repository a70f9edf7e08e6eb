"""The project's MiT (stages.student.mit) against transformers' SegformerModel, the reference.

Equality is exact (`torch.equal`), not within a tolerance: both run the same torch ops
with the same arguments in the same order on the same kernels, so any difference is a
real deviation (an op reordered, an epsilon, a different attention path), which a float32
tolerance of ~1e-5 could hide. Exactness holds for float32 and float64, in eval and train
mode (drop path off, and on with one seed, since the drop-path masks draw the same
random numbers in the same order).
"""

import contextlib
import copy
import functools
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import SegformerConfig, SegformerModel

from any2seg.errors import PipelineError
from stages.student.encoder import MIT, SegformerEncoder, build_encoder
from stages.student.mit import MiTDropPath
from tests.student.test_encoder import write_mit

SIZES = [(64, 64), (45, 61)]  # 45 x 61: not a multiple of 32 (odd maps at stages 1-3)


def reference(variant, drop_path_rate=0.1):
    hidden, depths = MIT[variant]
    return SegformerModel(SegformerConfig(hidden_sizes=hidden, depths=depths,
                                          num_attention_heads=[1, 2, 5, 8],
                                          drop_path_rate=drop_path_rate))


@functools.cache
def pair(variant, dtype=torch.float32):
    """transformers' model and ours with its weights (random, scaled up from N(0, 0.02)
    so the attention is not near uniform and the comparison sees every term); built once
    per variant and dtype (b2 costs seconds), every test sets the mode it needs."""
    if dtype != torch.float32:
        ref, ours = pair(variant)
        return copy.deepcopy(ref).to(dtype), copy.deepcopy(ours).to(dtype)
    torch.manual_seed(0)
    ref = reference(variant)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    ours = SegformerEncoder(variant)
    ours.model.load_state_dict(ref.state_dict())
    return ref, ours


@contextlib.contextmanager
def drop_path_off(*models):
    layers = [m for model in models for m in model.modules() if hasattr(m, "drop_prob")]
    rates = [m.drop_prob for m in layers]
    assert any(rates)  # there was drop path to switch off
    for m in layers:
        m.drop_prob = 0.0
    try:
        yield
    finally:
        for m, rate in zip(layers, rates, strict=True):
            m.drop_prob = rate


def hidden_states(ref, x):
    return list(ref(pixel_values=x, output_hidden_states=True).hidden_states)


def assert_equal(expected, got):
    assert len(expected) == len(got) == 4
    for stage, (a, b) in enumerate(zip(expected, got, strict=True)):
        assert a.shape == b.shape and a.dtype == b.dtype, stage
        assert torch.equal(a, b), f"stage {stage}: max diff {(a - b).abs().max().item():.3g}"


@pytest.mark.parametrize("variant", ["b0", "b2"])
def test_names_shapes_and_seeded_init_are_segformer_models(variant):
    """The state dict (names, order, shapes) is SegformerModel's under `model.`, so old
    checkpoints load; one seed gives the same random weights as transformers did."""
    torch.manual_seed(5)
    ref = reference(variant).state_dict()
    torch.manual_seed(5)
    ours = SegformerEncoder(variant).state_dict()
    assert list(ours) == [f"model.{k}" for k in ref]
    for key, value in ref.items():
        assert ours[f"model.{key}"].shape == value.shape, key
        assert torch.equal(ours[f"model.{key}"], value), key


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("variant", ["b0", "b2"])
def test_hidden_states_equal_transformers_in_eval_and_train(variant, size):
    ref, ours = pair(variant)
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        ref.eval(), ours.eval()
        assert_equal(hidden_states(ref, x), ours(x))
        ref.train(), ours.train()
        with drop_path_off(ref, ours):  # train mode, deterministic
            assert_equal(hidden_states(ref, x), ours(x))
        torch.manual_seed(11)  # drop path on: the same draws give the same masks
        expected = hidden_states(ref, x)
        torch.manual_seed(11)
        assert_equal(expected, ours(x))
        assert not torch.equal(expected[-1], ours(x)[-1])  # other draws: the masks are live


@pytest.mark.parametrize("variant", ["b0", "b2"])
def test_hidden_states_equal_transformers_in_float64(variant):
    ref, ours = pair(variant, torch.float64)
    ref.eval(), ours.eval()
    for size in SIZES if variant == "b0" else SIZES[1:]:  # b2 at 64x64: float32 only
        x = torch.randn(1, 3, *size, dtype=torch.float64)
        with torch.no_grad():
            got = ours(x)
            assert_equal(hidden_states(ref, x), got)
        assert all(g.dtype == torch.float64 for g in got)


def test_gradients_equal_transformers():
    ref, ours = copy.deepcopy(pair("b0"))
    ref.train(), ours.train()
    x = torch.randn(2, 3, *SIZES[1])
    with drop_path_off(ref, ours):
        sum(h.square().mean() for h in hidden_states(ref, x)).backward()
        sum(h.square().mean() for h in ours(x)).backward()
    grads = dict(ref.named_parameters())
    for name, p in ours.model.named_parameters():
        assert torch.equal(p.grad, grads[name].grad), name


def test_drop_path_rates_and_keyed_noise():
    """Linear over depth as transformers (0 on the first block: no layer there), and
    stages.student.noise finds every drop-path layer by its class name."""
    from stages.student.noise import KeyedDropPath, make_keyed

    enc = SegformerEncoder("b2", drop_path_rate=0.3)
    total = sum(MIT["b2"][1])
    rates = [m.drop_prob for m in enc.modules() if isinstance(m, MiTDropPath)]
    assert rates == pytest.approx([0.3 * i / (total - 1) for i in range(1, total)])
    keyed = make_keyed(enc)
    assert not any(isinstance(m, MiTDropPath) for m in keyed.modules())
    assert [m.p for m in keyed.modules() if isinstance(m, KeyedDropPath)] == rates


@pytest.mark.parametrize("weights", ["model.safetensors", "pytorch_model.bin"])
def test_pretrained_folder_gives_from_pretrained_outputs(tmp_path, weights):
    """An nvidia/mit-bN folder (written by transformers' save_pretrained; the hub's older
    uploads hold pytorch_model.bin) loads to what SegformerModel.from_pretrained gives."""
    folder = tmp_path / "mit-b0"
    write_mit(folder, seed=3)
    if weights == "pytorch_model.bin":
        state = load_file(str(folder / "model.safetensors"))
        (folder / "model.safetensors").unlink()
        torch.save(state, folder / "pytorch_model.bin")
    ref = SegformerModel.from_pretrained(str(folder), local_files_only=True).eval()
    enc = build_encoder("mit_b0", str(folder)).eval()
    x = torch.randn(1, 3, *SIZES[1])
    with torch.no_grad():
        assert_equal(hidden_states(ref, x), enc(x))


def rewrite(folder, edit):
    path = folder / "model.safetensors"
    state = load_file(str(path))
    edit(state)
    save_file(state, str(path))


def test_pretrained_folder_errors_name_the_folder(tmp_path):
    folder = tmp_path / "mit-b0"
    write_mit(folder)
    good = load_file(str(folder / "model.safetensors"))
    key = "segformer.encoder.block.0.0.attention.self.query.weight"
    assert key in good  # the hub's original names, mapped on load

    def fails(match, edit=None):
        save_file(good, str(folder / "model.safetensors"))
        if edit:
            edit()
        with pytest.raises(PipelineError, match=match) as err:
            build_encoder("mit_b0", str(folder))
        assert "\n" not in str(err.value) and str(folder) in str(err.value)

    fails("misses 1 encoder keys", lambda: rewrite(folder, lambda s: s.pop(key)))
    fails("has 1 unknown keys", lambda: rewrite(folder, lambda s: s.update(
        {"segformer.encoder.extra.weight": torch.zeros(1)})))
    fails(r"is a \(32, 16\) torch.float32 tensor, mit_b0 needs \(32, 32\)",
          lambda: rewrite(folder, lambda s: s.update({key: torch.zeros(32, 16)})))
    fails("cannot read MiT weights", lambda: (folder / "model.safetensors").write_bytes(b"x"))
    fails("hf download nvidia/mit-b0", lambda: (folder / "model.safetensors").unlink())
    config = json.loads((folder / "config.json").read_text())
    fails("no buildable MiT", lambda: (folder / "config.json").write_text(
        json.dumps({**config, "hidden_act": "cubic"})))
    fails("cannot read", lambda: (folder / "config.json").write_text("{"))


def test_a_bin_whose_pickle_runs_code_is_refused(tmp_path):
    folder = tmp_path / "mit-b0"
    write_mit(folder)
    (folder / "model.safetensors").unlink()
    victim = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(victim), "w"))

    torch.save({"segformer.x": Payload()}, folder / "pytorch_model.bin")
    with pytest.raises(PipelineError, match="cannot read MiT weights"):
        build_encoder("mit_b0", str(folder))
    assert not victim.exists()


def test_a_mit_student_never_imports_transformers(tmp_path):
    """The point of the module: building and running a MiT student (random and from a
    pretrained folder) leaves transformers unimported, saving ~3 s per process."""
    write_mit(tmp_path / "mit-b0")
    code = textwrap.dedent(f"""
        import sys, torch
        from stages.student.encoder import SegformerEncoder
        from stages.student.model import StudentConfig, build_student
        feats = SegformerEncoder("b0")(torch.randn(1, 3, 64, 64))
        assert [f.shape[1] for f in feats] == [32, 64, 160, 256]
        cfg = StudentConfig(embed_dim=16, pretrained={str(tmp_path / "mit-b0")!r})
        student = build_student(cfg, ["rgb", "depth"], 5)
        student(torch.randn(1, 2, 3, 64, 64))
        print(sorted(m for m in sys.modules if m.split(".")[0] == "transformers"))
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, check=False, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
