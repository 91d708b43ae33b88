"""audit_image on every kind of file real ImageNet-like copies hold."""

import io
import struct
from collections import Counter

import numpy as np
import pytest
from PIL import Image, ImageFile

from pipelines.audit import REPAIR_REASONS, SKIP_REASONS, AuditResult, audit_image
from pipelines.sources import list_imagenet, read_item
from tests.fixtures_imagenet import (
    encode,
    jpeg_bytes,
    make_devkit,
    make_imagenet_tree,
    oddity_files,
    smooth_pixels,
)


def decode(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


@pytest.mark.parametrize("name", sorted(oddity_files()))
def test_each_oddity_gets_its_reason(name):
    data, repaired, skipped = oddity_files()[name]
    result = audit_image(data)
    assert (result.repaired, result.skipped) == (repaired, skipped), result.detail
    assert repaired is None or repaired in REPAIR_REASONS
    assert skipped is None or skipped in SKIP_REASONS
    if skipped:
        assert (result.data, result.height, result.width) == (None, 0, 0)
        assert result.detail
    else:
        image = decode(result.data)
        assert (image.format, image.mode) == ("JPEG", "RGB")
        assert image.size == (result.width, result.height) == (64, 48)
        assert not result.resized


def test_exact_counts_per_reason():
    results = [audit_image(data) for data, _, _ in oddity_files().values()]
    assert Counter(r.repaired for r in results if r.repaired) == Counter(
        cmyk=1, grayscale=1, rgba=1, palette=1, png=1
    )
    assert Counter(r.skipped for r in results if r.skipped) == Counter(
        truncated=1, empty=1, not_an_image=1, decompression_bomb=1
    )
    assert sum(r.repaired is None and r.skipped is None for r in results) == 1


def test_clean_jpeg_passes_through_byte_identical():
    data = jpeg_bytes(3, height=40, width=70)
    assert audit_image(data) == AuditResult(data, 40, 70, None, None)
    # Smaller than max_side: still untouched.
    assert audit_image(data, max_side=70).data is data


def test_repairs_keep_the_picture():
    pixels = smooth_pixels(11).astype(np.int32)
    for mode in ("CMYK", "RGB"):
        fmt = "JPEG" if mode == "CMYK" else "PNG"  # CMYK JPEG, RGB PNG named anything
        repaired = np.asarray(decode(audit_image(encode(pixels.astype(np.uint8), fmt, mode)).data))
        assert np.abs(repaired.astype(np.int32) - pixels).mean() < 6, mode
    gray = np.asarray(decode(audit_image(encode(pixels.astype(np.uint8), mode="L")).data))
    assert np.abs(gray[..., 0].astype(np.int32) - gray[..., 2]).max() <= 2  # still gray, as RGB


def test_transparency_is_composited_on_white():
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[:, :8] = (0, 0, 255, 255)  # opaque blue left half, transparent black right half
    buffer = io.BytesIO()
    Image.fromarray(rgba, mode="RGBA").save(buffer, format="PNG")
    result = audit_image(buffer.getvalue())
    assert result.repaired == "rgba"
    pixels = np.asarray(decode(result.data)).astype(int)
    assert (pixels[:, 12:] > 245).all()
    assert (pixels[:, :4, 2] > 230).all()
    assert (pixels[:, :4, :2] < 25).all()

    palette = Image.fromarray(rgba[..., :3]).convert("P")
    index_of_black = palette.getpixel((12, 0))
    buffer = io.BytesIO()
    palette.save(buffer, format="PNG", transparency=index_of_black)
    result = audit_image(buffer.getvalue())
    assert result.repaired == "palette"
    assert (np.asarray(decode(result.data))[:, 12:] > 245).all()


def test_sixteen_bit_grayscale_keeps_its_range():
    gray16 = np.full((8, 8), 40000, np.uint16)  # 40000 / 65535 of full scale -> 156 of 255
    buffer = io.BytesIO()
    Image.fromarray(gray16).save(buffer, format="PNG")
    result = audit_image(buffer.getvalue())
    assert result.repaired == "grayscale"
    assert abs(int(np.asarray(decode(result.data)).mean()) - 156) <= 2


def test_decompression_bomb_checked_from_the_header():
    data = jpeg_bytes(1)  # 64 x 48 = 3072 pixels
    bomb = audit_image(data, max_pixels=3071)
    assert bomb.skipped == "decompression_bomb"
    assert "64x48" in bomb.detail
    assert audit_image(data, max_pixels=3072).data is data
    # A JPEG whose frame header claims 60000 x 60000 over a few bytes of data.
    marker = data.index(b"\xff\xc0")
    forged = data[: marker + 5] + struct.pack(">HH", 60000, 60000) + data[marker + 9 :]
    assert audit_image(forged).skipped == "decompression_bomb"
    # Below Pillow's own limit but above ours: decided before decoding, so it is cheap.
    assert audit_image(forged, max_pixels=10**6).skipped == "decompression_bomb"


def test_max_side_downscales_and_is_recorded_apart_from_repairs():
    data = jpeg_bytes(2, height=300, width=400)
    result = audit_image(data, max_side=100, quality=90)
    assert (result.repaired, result.resized, result.width, result.height) == (None, True, 100, 75)
    assert decode(result.data).size == (100, 75)
    cmyk = audit_image(encode(smooth_pixels(2, 300, 400), mode="CMYK"), max_side=100)
    assert (cmyk.repaired, cmyk.resized, cmyk.width, cmyk.height) == ("cmyk", True, 100, 75)
    assert decode(cmyk.data).mode == "RGB"


def test_truncation_is_caught_even_if_someone_allowed_truncated_images():
    full = jpeg_bytes(4)
    previous = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = True
    try:
        assert audit_image(full[: len(full) // 2]).skipped == "truncated"
        assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # restored, not leaked
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous


@pytest.mark.parametrize("format", ["JPEG", "PNG", "GIF", "BMP", "WEBP"])
def test_never_raises_on_any_prefix(format):
    data = encode(smooth_pixels(5, 16, 16), format=format)
    for end in range(0, len(data), max(1, len(data) // 60)):
        result = audit_image(data[:end])
        if result.skipped is None:
            assert decode(result.data).mode == "RGB"
        else:
            assert result.skipped in SKIP_REASONS
    flipped = bytearray(data)
    flipped[len(data) // 3 : len(data) // 3 + 8] = b"\xff" * 8
    assert audit_image(bytes(flipped)).skipped in (None, *SKIP_REASONS)


def test_other_formats_are_reencoded():
    result = audit_image(encode(smooth_pixels(6), format="BMP"))
    assert result.repaired == "other_format"
    assert decode(result.data).format == "JPEG"


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="max_side=0"):
        audit_image(b"x", max_side=0)
    with pytest.raises(ValueError, match="quality=0"):
        audit_image(b"x", quality=0)


def test_audit_counts_over_a_listed_imagenet_tree(tmp_path):
    val_truth = make_imagenet_tree(tmp_path, oddities=True)
    make_devkit(tmp_path, val_truth)
    listing = list_imagenet(tmp_path)
    results = {
        item.key: audit_image(read_item(item))
        for items in listing.splits.values()
        for item in items
    }
    counts = Counter(r.repaired or r.skipped or "clean" for r in results.values())
    assert counts == Counter(
        clean=3 * 3 + 6 + 1,
        cmyk=1,
        grayscale=1,
        rgba=1,
        palette=1,
        png=1,
        truncated=1,
        empty=1,
        not_an_image=1,
        decompression_bomb=1,
    )
    assert results["train/n01440764/n01440764_png_named.JPEG"].repaired == "png"


def test_keep_lossless_passes_clean_rgb_png_through_unchanged():
    rgb = np.random.default_rng(0).integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    png = buffer.getvalue()
    kept = audit_image(png, keep_lossless=True)
    assert kept.data == png
    assert kept.repaired is None
    converted = audit_image(png)
    assert converted.repaired == "png"
    assert converted.data[:2] == b"\xff\xd8"  # re-encoded as JPEG
    # Small images are re-encoded with full-resolution chroma (4:4:4): colour survives.
    decoded = np.asarray(Image.open(io.BytesIO(converted.data)).convert("RGB"), dtype=int)
    assert np.abs(decoded - rgb).mean() < 12
