"""Region JPEG decoding (resnet_core.jpeg, the _resnet_jpeg extension) against Pillow.

decode_crop(region=True) must give Pillow's pixels (full decode, then Pillow's resample) within
one uint8 level, draw the same random numbers, and hand everything it cannot decode (other
formats, CMYK, corrupt data) to Pillow so errors read exactly as before.
"""

from __future__ import annotations

import ctypes.util
import io
import subprocess
import sys
import tracemalloc
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from resnet_core import jpeg
from resnet_core.cpu_transforms import (
    CenterCrop,
    RandomResizedCrop,
    ScaleAugment,
    decode_crop,
    sample_crop,
)
from tests.fixtures_imagenet import encode, oddity_files, smooth_pixels
from tests.jpeg_decoder import EXPECTED_DECODER, HAVE_COMPILER

ROOT = Path(__file__).resolve().parents[1]

needs_extension = pytest.mark.skipif(
    not HAVE_COMPILER, reason="no C compiler: _resnet_jpeg is not built (Pillow fallback only)"
)


def photo(height: int, width: int, seed: int = 0) -> np.ndarray:
    """Smooth colour gradients plus fine noise: chroma varies, edges exist, JPEG keeps detail."""
    base = smooth_pixels(seed, height, width).astype(np.int16)
    noise = np.random.default_rng(seed).integers(-25, 26, size=base.shape)
    return np.clip(base + noise, 0, 255).astype(np.uint8)


# Every JPEG layout the decoder meets: chroma subsamplings, grayscale, progressive, odd sizes
# (partial iMCUs at the right and bottom edges), sizes where 1/2..1/8 draft scales apply.
JPEGS = {
    "420": encode(photo(375, 500), quality=90, subsampling="4:2:0"),
    "422": encode(photo(333, 517, 1), quality=90, subsampling="4:2:2"),
    "444": encode(photo(301, 457, 2), quality=95, subsampling="4:4:4"),
    "gray": encode(photo(290, 410, 3), mode="L", quality=90),
    "progressive": encode(photo(360, 480, 4), quality=85, progressive=True),
    "large": encode(photo(1500, 2000, 5), quality=85),
    "tiny": encode(photo(9, 13, 6), quality=90),
}
SAMPLERS = {
    "paper": ScaleAugment(),
    "inception": RandomResizedCrop(),
    "center": CenterCrop(224),
    "cifar_size": RandomResizedCrop(size=32),
}


def both_paths(data: bytes, sampler, seed: int, **kwargs) -> tuple[np.ndarray, np.ndarray]:
    """(region decode, Pillow decode) of the same draws; asserts they drew the same numbers."""
    rng_region, rng_pillow = np.random.default_rng(seed), np.random.default_rng(seed)
    region = decode_crop(data, sampler, rng_region, region=True, **kwargs)
    pillow = decode_crop(data, sampler, rng_pillow, region=False, **kwargs)
    assert rng_region.random() == rng_pillow.random()  # same number of draws
    return region, pillow


@needs_extension
def test_region_decoding_is_built_and_loads_pillows_libjpeg_turbo():
    assert jpeg.available(), jpeg.status()
    assert jpeg.status().startswith(EXPECTED_DECODER)


@needs_extension
@pytest.mark.parametrize("draft", [True, False], ids=["draft", "full"])
@pytest.mark.parametrize("sampler", list(SAMPLERS), ids=list(SAMPLERS))
@pytest.mark.parametrize("kind", list(JPEGS), ids=list(JPEGS))
def test_region_decode_matches_pillow_within_one_level(kind, sampler, draft):
    data = JPEGS[kind]
    size = jpeg.jpeg_size(data)
    assert size is not None
    box, _ = sample_crop(SAMPLERS[sampler], np.random.default_rng(0), *size)
    assert jpeg.decode_crop(data, *size, box, SAMPLERS[sampler].size, flip=False) is not None
    differing = total = 0
    for seed in range(12):
        region, pillow = both_paths(data, SAMPLERS[sampler], seed, draft=draft)
        assert region.dtype == np.uint8
        assert region.shape == pillow.shape == (SAMPLERS[sampler].size,) * 2 + (3,)
        assert region.flags.writeable
        diff = np.abs(region.astype(np.int16) - pillow)
        assert diff.max() <= 1, f"seed {seed}: {diff.max()} levels apart"
        differing += int((diff > 0).sum())
        total += diff.size
    # Off-by-one only where the float32 rounding of the box differs: a small minority.
    assert differing / total < 0.05


@needs_extension
def test_crops_touching_every_border_and_the_whole_image_match_pillow():
    data = JPEGS["420"]
    width, height = 500, 375
    boxes = [
        (0.0, 0.0, 200.0, 200.0),
        (300.0, 175.0, 500.0, 375.0),
        (0.0, 175.0, 200.0, 375.0),
        (300.0, 0.0, 500.0, 200.0),
        (0.0, 0.0, 500.0, 375.0),
        (123.4, 56.7, 124.9, 58.1),  # a box under two pixels wide: extreme upsampling
        (0.5, 0.25, 499.5, 374.75),
    ]
    for box in boxes:
        for flip in (False, True):
            for size in (224, 32):
                region = jpeg.decode_crop(data, width, height, box, size, flip=flip, draft=False)
                with Image.open(io.BytesIO(data)) as img:
                    pillow = img.convert("RGB").resize(
                        (size, size), Image.Resampling.BILINEAR, box=box
                    )
                if flip:
                    pillow = pillow.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
                diff = np.abs(region.astype(np.int16) - np.asarray(pillow))
                assert diff.max() <= 1, (box, flip, size)


@needs_extension
def test_flip_mirrors_the_same_crop():
    rng = np.random.default_rng(0)
    box, _ = sample_crop(ScaleAugment(), rng, 500, 375)
    plain = jpeg.decode_crop(JPEGS["420"], 500, 375, box, 224, flip=False)
    mirrored = jpeg.decode_crop(JPEGS["420"], 500, 375, box, 224, flip=True)
    np.testing.assert_array_equal(mirrored, plain[:, ::-1])


@needs_extension
@pytest.mark.parametrize("name", ["cmyk.JPEG", "png_named.JPEG", "rgba.png", "palette.png"])
def test_what_region_decoding_cannot_read_goes_through_pillow_unchanged(name):
    data = oddity_files()[name][0]
    assert jpeg.jpeg_size(data) is None
    region, pillow = both_paths(data, RandomResizedCrop(size=32), seed=3)
    np.testing.assert_array_equal(region, pillow)


@pytest.mark.parametrize(
    "data",
    [
        JPEGS["420"][: len(JPEGS["420"]) // 2],  # truncated: libjpeg warns
        JPEGS["420"][:200],  # cut inside the header
        JPEGS["420"][:600] + bytes(range(256)) * 40,  # garbage entropy data
        b"",
        b"<html>404</html>",
    ],
    ids=["truncated", "cut_header", "garbage", "empty", "text"],
)
@needs_extension
def test_corrupt_files_fail_exactly_as_they_do_in_pillow(data):
    errors = []
    for region in (True, False):
        try:
            decode_crop(data, ScaleAugment(), np.random.default_rng(0), region=region)
        except Exception as e:  # the reader counts any exception as a bad image
            errors.append((type(e), str(e)))
        else:
            errors.append(None)
    assert errors[0] == errors[1]


@needs_extension
def test_decoding_in_threads_gives_the_sequential_result():
    data = JPEGS["large"]
    boxes = [
        sample_crop(RandomResizedCrop(), np.random.default_rng(s), 2000, 1500)[0] for s in range(24)
    ]
    sequential = [
        jpeg.decode_crop(data, 2000, 1500, b, 224, flip=False, draft=False) for b in boxes
    ]
    with ThreadPoolExecutor(4) as pool:
        threaded = list(
            pool.map(
                lambda b: jpeg.decode_crop(data, 2000, 1500, b, 224, flip=False, draft=False), boxes
            )
        )
    for a, b in zip(sequential, threaded, strict=True):
        np.testing.assert_array_equal(a, b)


@needs_extension
def test_loading_a_wrong_library_says_why_and_keeps_the_loaded_one():
    import _resnet_jpeg

    assert jpeg.available()
    with pytest.raises(OSError, match=r"cannot load libjpeg from /nonexistent/libjpeg\.so"):
        _resnet_jpeg.load("/nonexistent/libjpeg.so")
    libc = ctypes.util.find_library("c")
    with pytest.raises(OSError, match="has no jpeg_std_error: region decoding needs libjpeg-turbo"):
        _resnet_jpeg.load(libc)
    # The library Pillow loaded is still in use.
    region, pillow = both_paths(JPEGS["444"], ScaleAugment(), seed=1)
    assert np.abs(region.astype(np.int16) - pillow).max() <= 1


@needs_extension
def test_bad_arguments_to_the_extension_are_one_line_errors():
    import _resnet_jpeg

    data = JPEGS["420"]
    with pytest.raises(ValueError, match="denom must be 1, 2, 4 or 8"):
        _resnet_jpeg.decode_crop(data, 3, (0, 0, 10, 10), (0.0, 0.0, 10.0, 10.0), (8, 8), False)
    with pytest.raises(ValueError, match=r"outside the 500x375 image at 1/1 scale"):
        _resnet_jpeg.decode_crop(data, 1, (0, 0, 501, 10), (0.0, 0.0, 10.0, 10.0), (8, 8), False)
    with pytest.raises(ValueError, match="not a JPEG"):
        _resnet_jpeg.decode_crop(
            b"\x89PNG....", 1, (0, 0, 1, 1), (0.0, 0.0, 1.0, 1.0), (8, 8), False
        )


def test_without_the_extension_everything_decodes_through_pillow():
    code = (
        "import sys; sys.modules['_resnet_jpeg'] = None\n"  # as if the build had failed
        "import numpy as np\n"
        "from resnet_core import jpeg\n"
        "from resnet_core.cpu_transforms import ScaleAugment, decode_crop\n"
        "from tests.test_jpeg_region import JPEGS\n"
        "out = decode_crop(JPEGS['420'], ScaleAugment(), np.random.default_rng(0))\n"
        "ref = decode_crop(JPEGS['420'], ScaleAugment(), np.random.default_rng(0), region=False)\n"
        "print(jpeg.available(), (out == ref).all(), jpeg.jpeg_size(JPEGS['420']))\n"
        "print(jpeg.status())\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.splitlines()
    assert out[0] == "False True None"
    assert out[1].startswith("Pillow (the _resnet_jpeg extension is not built:")


@needs_extension
def test_fatal_decoding_errors_free_everything_they_allocated():
    import _resnet_jpeg

    # Damaged copies of a baseline and a progressive JPEG (whose scans all decode while
    # starting): about one in ten fails fatally, in the header tables or in the scans; most of
    # the rest only make libjpeg warn (None: Pillow decides) or still decode.
    rng = np.random.default_rng(0)
    broken = []
    for kind in ("420", "progressive"):
        for _ in range(150):
            damaged = bytearray(JPEGS[kind])
            for i in rng.integers(2, len(damaged), size=8):
                damaged[i] = int(rng.integers(0, 256))
            broken.append(bytes(damaged))
    args = ((0, 0, 300, 300), (10.0, 10.0, 290.0, 290.0), (224, 224), False)

    def decode_all() -> int:
        failures = 0
        for data in broken:
            try:
                _resnet_jpeg.decode_crop(data, 1, *args)
            except ValueError:
                failures += 1
        return failures

    assert decode_all() > 20
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(3):
            decode_all()
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < 1_000_000  # one leaked 224x224 output per failure would be ~60 MB
