"""Inference memory of the student's head and of the exported subset graph: the same
numbers as the plain code (bit for bit), without the stride-4 intermediates that made
mit_b2 at 1024 px run out of memory on a CPU (docs/inference.md)."""

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from stages.student.export import SubsetGraph, random_frames
from stages.student.head import AllMLPHead
from stages.student.model import StudentConfig, build_student

pytestmark = pytest.mark.usefixtures("one_thread")
MODS = ["rgb", "depth", "event", "lidar"]


def concat_decode(head: AllMLPHead, feats: list[torch.Tensor]) -> torch.Tensor:
    """The head's decode as it was written before the in-place concatenation: every stage
    projected and upsampled, then one `torch.cat` (what training and export still run)."""
    size = feats[0].shape[-2:]
    up = [F.interpolate(p(f), size=size, mode="bilinear", align_corners=False)
          for p, f in zip(head.project, feats, strict=True)]
    return head.fuse(torch.cat(up[::-1], dim=1))


def head_and_feats(embed: int, batch: int, h: int, w: int, seed: int = 0
                   ) -> tuple[AllMLPHead, list[torch.Tensor]]:
    torch.manual_seed(seed)
    channels = [8, 16, 24, 32]
    head = AllMLPHead(channels, 7, embed).eval()
    with torch.no_grad():  # non-trivial running statistics, so the norm does something
        head.fuse[1].running_mean.uniform_(-1, 1)
        head.fuse[1].running_var.uniform_(0.5, 2)
    sizes = [(h, w)]
    for _ in channels[1:]:
        sizes.append(((sizes[-1][0] + 1) // 2, (sizes[-1][1] + 1) // 2))
    feats = [torch.randn(batch, c, *s) for c, s in zip(channels, sizes, strict=True)]
    return head, feats


@pytest.mark.parametrize(("batch", "h", "w"), [(1, 16, 16), (3, 13, 21)])
def test_inference_decode_equals_the_concatenation(batch, h, w):
    head, feats = head_and_feats(12, batch, h, w)
    with torch.no_grad():
        got = head.decode(feats)
        want = concat_decode(head, feats)
        assert torch.equal(head(feats), head.classify(want))
    assert torch.equal(got, want)
    with torch.enable_grad():  # training's path is the concatenation itself
        assert torch.equal(head.decode(feats), want)


@pytest.mark.parametrize(("batch", "h", "w"), [(4, 16, 16), (3, 13, 21)])
def test_cpu_inference_head_row_by_row_equals_the_batched_head(batch, h, w):
    head, feats = head_and_feats(12, batch, h, w, seed=1)
    with torch.no_grad():
        assert torch.equal(head(feats), head.classify(concat_decode(head, feats)))


def alive_peak(fn) -> int:
    """Most CPU bytes alive at once between the top-level ops `fn` runs, counted from
    the profiler's per-op allocations (each op's allocations net of its frees)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    top = sorted((e for e in prof.events() if e.cpu_parent is None),
                 key=lambda e: e.time_range.start)
    alive = peak = 0
    for e in top:
        alive += e.cpu_memory_usage
        peak = max(peak, alive)
    return peak


def test_inference_decode_holds_at_most_five_stride4_maps():
    # old: 4 upsampled maps + their concatenation (4) + the conv's and the norm's outputs
    # = 10 maps of (B, E, h, w) at once; now the (B, 4E) input plus one map
    head, feats = head_and_feats(64, 1, 64, 64)
    one_map = 64 * 64 * 64 * 4
    with torch.no_grad():
        new = alive_peak(lambda: head.decode(feats))
        old = alive_peak(lambda: concat_decode(head, feats))
    assert old >= 9 * one_map  # the measure sees the intermediates the old code held
    assert new <= 5.5 * one_map, f"{new / one_map:.1f} stride-4 maps alive at once"


def test_cpu_inference_head_holds_one_rows_maps():
    # four rows (modalities) through the head: the stride-4 maps of one row at a time
    head, feats = head_and_feats(64, 4, 64, 64)
    one_map = 64 * 64 * 64 * 4  # one row's (1, E, h, w)
    with torch.no_grad():
        peak = alive_peak(lambda: head(feats))
    assert peak <= 6 * one_map, f"{peak / one_map:.1f} one-row stride-4 maps alive at once"


@pytest.fixture(scope="module")
def author_student():
    torch.manual_seed(3)
    return build_student(StudentConfig(backbone="mit_b0", embed_dim=16,
                                       mff={"variant": "author"}, missing="exclude"),
                         MODS, 25).eval()


def generic_graph(graph: SubsetGraph, images: torch.Tensor) -> torch.Tensor:
    """`SubsetGraph` under `exclude` as it was before it fed the head the given rows only:
    the subset's features in their slots, zeros elsewhere, the model's own fuse."""
    model = graph.model
    b, _, _, h, w = images.shape
    feats = []
    for f in model.encode_all(images):
        slots = [f.new_zeros((b, *f.shape[2:]))] * len(model.modalities)
        for j, i in enumerate(graph.subset):
            slots[i] = f[:, j]
        feats.append(torch.stack(slots, 1))
    logits = model.fuse(feats, graph.present.expand(b, -1))[0]
    return F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)


@pytest.mark.parametrize("subset", [["rgb"], ["lidar", "rgb"], MODS])
def test_subset_graph_equals_the_generic_fusion(author_student, subset):
    graph = SubsetGraph(author_student, subset).eval()
    x = torch.stack(random_frames(author_student, subset, [(64, 96)], 2, seed=2))
    with torch.inference_mode():
        assert torch.equal(graph(x), generic_graph(graph, x))


def test_exported_rgb_graph_decodes_one_row_per_frame(author_student):
    """The traced graph (what ONNX Runtime runs) applies the head's convs at stride 4 to
    the given modality's rows only, not to zero rows for the three absent slots."""
    graph = SubsetGraph(author_student, ["rgb"]).eval()
    x = torch.stack(random_frames(author_student, ["rgb"], [(64, 96)], 2, seed=2))
    program = torch.export.export(graph, (x,))
    batches = {node.meta["val"].shape[0] for node in program.graph.nodes
               if node.op == "call_function" and "conv" in str(node.target)
               and tuple(node.meta["val"].shape[-2:]) == (16, 24)}
    assert batches == {2}  # 2 frames x 1 modality (with 4 slots each the head sees 8)


def test_exported_decode_sums_the_fuse_conv_over_stages():
    """The exported form of decode (fuse conv summed over stages) is the concatenation's
    conv up to float32 summation order."""
    head, feats = head_and_feats(12, 2, 13, 21)
    with torch.no_grad():
        got, want = head._summed(feats), concat_decode(head, feats)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
