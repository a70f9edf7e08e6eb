"""The PNG decoder: libpng (torchvision) where it returns PIL's array, PIL elsewhere."""

import numpy as np
import pytest
from PIL import Image

from any2seg.content import file_digest
from any2seg.datasets import decode
from any2seg.datasets.decode import read_png
from any2seg.errors import DatasetError

RNG = np.random.default_rng(0)
KINDS = {
    "grey8": (RNG.integers(0, 256, (13, 17), dtype=np.uint8), None),
    "rgb8": (RNG.integers(0, 256, (13, 17, 3), dtype=np.uint8), None),
    "rgba8": (RNG.integers(0, 256, (13, 17, 4), dtype=np.uint8), None),
    "grey_alpha8": (RNG.integers(0, 256, (13, 17, 2), dtype=np.uint8), "LA"),
    "grey16": (RNG.integers(0, 65536, (13, 17), dtype=np.uint16), None),
}


def pil_array(path):
    with Image.open(path) as img:
        img.load()
        if img.mode == "P":
            img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        return np.asarray(img)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_libpng_decodes_what_pil_decodes(tmp_path, kind):
    arr, mode = KINDS[kind]
    path = tmp_path / f"{kind}.png"
    Image.fromarray(arr, mode).save(path)
    assert decode._libpng(path.read_bytes()) is not None  # the fast path is taken
    got = read_png(path)
    assert got.dtype == arr.dtype and np.array_equal(got, arr)
    assert np.array_equal(got, pil_array(path))


def test_palette_and_transparency_stay_with_pil(tmp_path):
    rgb = RNG.integers(0, 256, (9, 11, 3), dtype=np.uint8)
    palette = tmp_path / "p.png"
    Image.fromarray(rgb).convert("P").save(palette)
    grey = tmp_path / "t.png"
    Image.fromarray(rgb[:, :, 0]).save(grey, transparency=7)
    for path in (palette, grey):
        assert decode._libpng(path.read_bytes()) is None
        assert np.array_equal(read_png(path), pil_array(path))


def test_damaged_file_gets_the_decoders_error_and_digest_is_of_the_bytes(tmp_path):
    path = tmp_path / "x.png"
    Image.fromarray(KINDS["rgb8"][0]).save(path)
    digest: list[str] = []
    read_png(path, digest)
    assert digest == [file_digest(path)]
    path.write_bytes(path.read_bytes()[:60])
    with pytest.raises(DatasetError, match=r"cannot decode .*x\.png.*corrupt or truncated"):
        read_png(path)


def test_recording_digests_hashes_what_each_read_decodes(tmp_path):
    png, npy = tmp_path / "x.png", tmp_path / "y.npy"
    Image.fromarray(KINDS["grey16"][0]).save(png)
    np.save(npy, np.arange(6.0))
    with decode.recording_digests() as seen:
        read_png(png)
        np.testing.assert_array_equal(decode.read_npy(npy), np.arange(6.0))
    assert seen == {str(png.resolve()): file_digest(png), str(npy.resolve()): file_digest(npy)}
    read_png(png)  # outside a block nothing is recorded
    with decode.recording_digests() as again:
        pass
    assert again == {} and len(seen) == 2
