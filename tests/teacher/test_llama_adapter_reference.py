"""Our LLaMA-Adapter V2 against outputs the official code recorded on a tiny model.

The reference (tests/fixtures/llama_adapter_reference/, README there) was produced once by
github:OpenGVLab/LLaMA-Adapter `llama_adapter_v2_multimodal7b` (llama.load, forward_visual,
forward_inference, generate) with github:openai/CLIP (clip.load, _transform), on CPU in
float32, from files `tests/llama_files.write_reference_model` writes: a BIAS adapter, a
LoRA adapter lacking layer 2's new_gate, a training checkpoint without config (CLIP and
LLaMA weights inside, layer 0's biases missing), OpenAI's TorchScript CLIP format.
"""

from pathlib import Path

import numpy as np
import pytest
import torch

from any2seg.datasets import Sample
from stages.teacher import llama_adapter as la
from stages.teacher.captioners.llama_adapter import LlamaAdapterCaptioner
from stages.teacher.llama_adapter_checkpoint import load as load_files
from stages.teacher.openai_clip import clip_transform
from tests.llama_files import VISUAL, fingerprint, write_reference_model

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

REFERENCE = Path(__file__).parents[1] / "fixtures" / "llama_adapter_reference" / "reference.pt"
IMAGES = ["portrait", "landscape", "large"]
ADAPTERS = ["bias", "lora", "training"]


@pytest.fixture(scope="module")
def ref():
    return torch.load(REFERENCE, weights_only=True)


@pytest.fixture(scope="module")
def files(tmp_path_factory, ref):
    paths = write_reference_model(tmp_path_factory.mktemp("reference-model"))
    assert fingerprint(paths) == ref["fingerprint"], (
        "tests/llama_files.write_reference_model no longer writes the model the reference "
        "was recorded on; record it again (fixture README)")
    return paths


@pytest.fixture(scope="module")
def models(files):
    return {a: load_files(files[a], files["llama_dir"], files["clip"],
                       v_num_heads=VISUAL.v_num_heads, dtype=torch.float32) for a in ADAPTERS}


def _rel(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return float((ours - theirs).abs().max() / theirs.abs().max())


def _samples(ref) -> list[Sample]:
    return [Sample(id=n, modalities={"rgb": ref["images"][n].numpy()},
                   label=np.zeros(ref["images"][n].shape[:2], dtype=np.int64))
            for n in IMAGES]


def test_clip_transform_matches_clip_preprocess(ref):
    """CLIP's `_transform` (clip/clip.py:79-86: PIL bicubic Resize, CenterCrop, ToTensor,
    Normalize) on `Image.fromarray(cv2.imread(png))`: upscaled portrait and landscape (a
    half-pixel crop offset) and a downscaled image, to 1e-6."""
    for i, name in enumerate(IMAGES):
        bgr = ref["images"][name].numpy()[:, :, ::-1]  # what cv2.imread gave
        torch.testing.assert_close(clip_transform(bgr, 64), ref["pixels"][i], rtol=0, atol=1e-6)


def test_captioner_feeds_bgr_by_default_and_rgb_on_request(ref, files):
    """Upstream feeds `Image.fromarray(cv2.imread(...))` (demo.py:15, gradio_app.py:25,
    data/dataset.py:69): BGR by default, `bgr=false` for RGB."""
    common = dict(checkpoint=str(files["bias"]), llama_dir=str(files["llama_dir"]),
                  clip=str(files["clip"]))
    default = LlamaAdapterCaptioner(["road"], **common)
    assert default.options["bgr"] is True and default.options["max_new_tokens"] == 256
    torch.testing.assert_close(default.pixels(_samples(ref), 64), ref["pixels"], rtol=0,
                               atol=1e-6)
    rgb = LlamaAdapterCaptioner(["road"], bgr=False, **common).pixels(_samples(ref), 64)
    assert (rgb - ref["pixels"]).abs().max() > 0.1
    torch.testing.assert_close(rgb[0], clip_transform(ref["images"]["portrait"].numpy(), 64))


def test_prompt_ids_are_format_prompt(ref, files, models):
    """The captioner's prompt is `format_prompt(instruction)` (llama/utils.py:21) encoded
    with BOS, id for id."""
    captioner = LlamaAdapterCaptioner(["road"], checkpoint=str(files["bias"]),
                                      llama_dir=str(files["llama_dir"]), clip=str(files["clip"]))
    _, tok = models["bias"]
    sample = _samples(ref)[0]
    assert [tok.bos_id(), *tok.encode(captioner.prompt(sample))] == ref["prompt_ids"]


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_visual_query_and_first_logits_match(ref, models, adapter):
    """CLIP tokens (`clip_encode_image`), visual query (`forward_visual`, timm 0.3.2 Block
    with nn.LayerNorm eps 1e-5, llama_adapter.py:50,135) and first-step logits
    (`forward_inference`, :188) to 1e-5 relative in float32; the LoRA file lacks
    layer 2's new_gate and the training checkpoint has no config and lacks layer 0's
    biases, which the official strict=False load (:322) leaves at 1 and 0."""
    model, _ = models[adapter]
    expected = ref["adapters"][adapter]
    ids = ref["prompt_ids"]
    with torch.inference_mode():
        tokens = model.clip_tokens(ref["pixels"])
        visual = model.visual(tokens)
        logits = model(torch.tensor([ids] * 3), torch.arange(len(ids)).expand(3, -1),
                       torch.ones(3, len(ids), dtype=torch.bool), None, 0,
                       model.adapter_kv(visual))[:, -1]
    assert visual.dtype == logits.dtype == torch.float32
    assert _rel(tokens, expected["clip_tokens"]) < 1e-5
    assert _rel(visual, expected["visual_query"]) < 1e-5
    assert _rel(logits, expected["logits"]) < 1e-5


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_greedy_tokens_identical_batched_and_not(ref, models, adapter):
    """Greedy ids as the official `generate(temperature=0, max_gen_len=24)` (:212-273,
    cut at EOS: the LoRA captions end early), per image and in one batch."""
    model, tok = models[adapter]
    expected = ref["adapters"][adapter]["greedy_ids"]
    with torch.inference_mode():
        visual = model.visual(model.clip_tokens(ref["pixels"]))
    batched = la.generate(model, visual, [ref["prompt_ids"]] * 3, 24, tok.eos_id())
    single = [la.generate(model, visual[i:i + 1], [ref["prompt_ids"]], 24, tok.eos_id())[0]
              for i in range(3)]
    assert batched == single == expected
    assert [tok.decode(t) for t in batched] == ref["adapters"][adapter]["greedy_text"]


@pytest.mark.slow
def test_generation_past_512_tokens_is_shortened_as_official(ref, models):
    """max_gen_len 600 after a 73-token prompt: officially total_len = min(max_seq_len,
    max_gen_len + prompt) (:234), so 512 - 73 = 439 tokens, the same ones."""
    model, tok = models["bias"]
    with torch.inference_mode():
        visual = model.visual(model.clip_tokens(ref["pixels"][:1]))
    out = la.generate(model, visual, [ref["prompt_ids"]], 600, tok.eos_id())[0]
    assert len(out) == 512 - len(ref["prompt_ids"]) == len(ref["adapters"]["bias"]["long_ids"])
    assert out == ref["adapters"]["bias"]["long_ids"]


def test_captioner_end_to_end_matches_official_captions(ref, files):
    """RGB samples in, the official greedy captions out: BGR, CLIP's transform, prompt,
    visual query and decoding together (the LoRA file: EOS after 3 tokens, and at once)."""
    captioner = LlamaAdapterCaptioner(
        ["road"], checkpoint=str(files["lora"]), llama_dir=str(files["llama_dir"]),
        clip=str(files["clip"]), v_num_heads=VISUAL.v_num_heads, temperature=0,
        max_new_tokens=24, device="cpu", dtype="float32")
    captions = captioner.caption(_samples(ref))
    assert captions == [t.strip() for t in ref["adapters"]["lora"]["greedy_text"]]
    assert len({len(c) for c in captions}) > 1
