"""Tests for resnet_core.cpu_transforms and resnet_core.transforms: box samplers, decoding, CIFAR
augmentation, device-side maths."""

from __future__ import annotations

import functools
import io

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as tvf

from resnet_core import transforms
from resnet_core.cpu_transforms import (
    CenterCrop,
    RandomResizedCrop,
    ScaleAugment,
    decode_batch,
    decode_crop,
    decode_resize_shorter,
    draft_for_box,
    mean_image,
    pad_crop_flip,
    resized_shorter_size,
)
from resnet_core.transforms import (
    IMAGENET_MEAN_RGB,
    IMAGENET_PCA_EIGVAL,
    IMAGENET_PCA_EIGVEC,
    IMAGENET_STD_RGB,
    ten_crop,
    to_float_batch,
)

IMAGE_SHAPES = [(500, 375), (375, 500), (640, 480), (300, 300), (1200, 250)]  # (width, height)


def smooth_rgb(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A photo-like (H, W, 3) uint8 image: gradients and low-frequency waves, asymmetric in x."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    channels = []
    for c in range(3):
        fx, fy, phase = rng.uniform(2, 6), rng.uniform(2, 6), rng.uniform(0, 2 * np.pi)
        wave = np.sin(2 * np.pi * (fx * x / width + fy * y / height) + phase)
        ramp = (x / width) * (0.5 + 0.5 * c) + (y / height) * 0.3
        channels.append(127 + 80 * wave + 40 * ramp - 20)
    return np.clip(np.stack(channels, axis=-1), 0, 255).astype(np.uint8)


def encode(img: Image.Image, fmt: str = "JPEG", **options) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format=fmt, **options)
    return buffer.getvalue()


@functools.cache  # encoded bytes are immutable; large JPEGs are reused across tests
def jpeg_bytes(width: int, height: int, seed: int = 0) -> bytes:
    return encode(Image.fromarray(smooth_rgb(width, height, seed)), quality=95)


# --- box samplers ---------------------------------------------------------------------------


def assert_inside(box, width, height, tol=1e-9):
    left, upper, right, lower = box
    assert -tol <= left < right <= width + tol
    assert -tol <= upper < lower <= height + tol


@pytest.mark.parametrize(("width", "height"), IMAGE_SHAPES)
def test_scale_augment_box_side_follows_random_shorter_side(width, height):
    sampler = ScaleAugment(min_size=256, max_size=480, size=224)
    rng = np.random.default_rng(0)
    short = min(width, height)
    sides = []
    for _ in range(400):
        box = sampler.sample_box(rng, width, height)
        assert_inside(box, width, height)
        side = box[2] - box[0]
        assert side == pytest.approx(box[3] - box[1])
        # side = 224 * short / S for an integer S in [256, 480]
        s = 224 * short / side
        assert s == pytest.approx(round(s), abs=1e-6)
        assert 256 <= round(s) <= 480
        sides.append(side)
    assert min(sides) < 224 * short / 470
    assert max(sides) > 224 * short / 266


def test_scale_augment_rejects_crop_larger_than_resized_image():
    with pytest.raises(ValueError, match="min_size"):
        ScaleAugment(min_size=200, max_size=480, size=224)


@pytest.mark.parametrize(("width", "height"), IMAGE_SHAPES)
def test_random_resized_crop_area_and_aspect_within_bounds(width, height):
    sampler = RandomResizedCrop(size=224, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3))
    rng = np.random.default_rng(1)
    fractions = []
    for _ in range(300):
        box = sampler.sample_box(rng, width, height)
        assert_inside(box, width, height)
        left, upper, right, lower = box
        assert all(float(v).is_integer() for v in box)
        w, h = right - left, lower - upper
        fractions.append(w * h / (width * height))
        # Integer rounding of w and h moves the area and aspect by at most half a pixel per side.
        slack_w, slack_h = 0.5 / w, 0.5 / h
        assert 0.08 * (1 - slack_w) * (1 - slack_h) <= fractions[-1] <= 1.0
        assert (
            3 / 4 * (1 - slack_w) / (1 + slack_h) <= w / h <= 4 / 3 * (1 + slack_w) / (1 - slack_h)
        )
    # Largest crop with aspect in [3/4, 4/3] that fits; draws should come near it.
    feasible = min(width, height * 4 / 3) * min(height, width * 4 / 3) / (width * height)
    assert min(fractions) < 0.2
    assert max(fractions) > 0.7 * feasible


def test_random_resized_crop_falls_back_to_clamped_centre_crop():
    # A 1000x10 strip: no crop with aspect <= 4/3 covers >= 90% of it, so all 10 attempts fail.
    sampler = RandomResizedCrop(size=8, scale=(0.9, 1.0))
    box = sampler.sample_box(np.random.default_rng(0), 1000, 10)
    w = round(10 * 4 / 3)
    left = (1000 - w) // 2
    assert box == (left, 0, left + w, 10)


def test_center_crop_box_is_the_central_crop_of_the_resized_image():
    box = CenterCrop(resize=256, size=224).sample_box(np.random.default_rng(0), 500, 375)
    # torchvision: resized to (341, 256), crop offset (round(58.5), 16) = (58, 16) resized pixels.
    fx, fy = 500 / 341, 375 / 256
    assert box == pytest.approx((58 * fx, 16 * fy, (58 + 224) * fx, (16 + 224) * fy))
    assert_inside(box, 500, 375)


# --- decode_crop ----------------------------------------------------------------------------


@pytest.mark.parametrize("sampler", [ScaleAugment(), RandomResizedCrop(), CenterCrop()])
def test_decode_crop_shape_dtype_and_seed_reproducibility(sampler):
    data = jpeg_bytes(500, 375)
    a = decode_crop(data, sampler, np.random.default_rng(7))
    b = decode_crop(data, sampler, np.random.default_rng(7))
    assert a.shape == (224, 224, 3)
    assert a.dtype == np.uint8
    assert a.flags.writeable  # torch.from_numpy in the reader must not warn
    np.testing.assert_array_equal(a, b)
    if not isinstance(sampler, CenterCrop):
        outputs = [decode_crop(data, sampler, np.random.default_rng(s)) for s in range(4)]
        assert any(not np.array_equal(outputs[0], other) for other in outputs[1:])


def test_decode_crop_flip_mirrors_the_same_crop():
    data = jpeg_bytes(500, 375)
    plain = decode_crop(data, ScaleAugment(), np.random.default_rng(3), flip=False)
    mirrored = decode_crop(data, ScaleAugment(), np.random.default_rng(3), flip=True)
    np.testing.assert_array_equal(mirrored, plain[:, ::-1])
    assert not np.array_equal(mirrored, plain)


def test_decode_crop_random_flip_happens_about_half_the_time():
    data = jpeg_bytes(320, 240)
    sampler = CenterCrop(resize=240, size=224)
    plain = decode_crop(data, sampler, np.random.default_rng(0), flip=False)
    flips = [
        np.array_equal(decode_crop(data, sampler, np.random.default_rng(s)), plain[:, ::-1])
        for s in range(40)
    ]
    assert 8 <= sum(flips) <= 32


@pytest.mark.parametrize(("width", "height"), IMAGE_SHAPES)
def test_center_crop_decode_matches_torchvision_resize_then_center_crop(width, height):
    data = jpeg_bytes(width, height)
    ours = decode_crop(data, CenterCrop(256, 224), np.random.default_rng(0), draft=False)
    reference = v2.Compose([v2.Resize(256), v2.CenterCrop(224)])(Image.open(io.BytesIO(data)))
    diff = np.abs(ours.astype(np.int16) - np.asarray(reference).astype(np.int16))
    # Same filter taps; only float rounding of the box coordinates may flip a level.
    assert diff.max() <= 1


def test_draft_reduces_decoded_size_as_far_as_the_crop_allows():
    data = jpeg_bytes(2000, 1500)
    sampler = CenterCrop(resize=256, size=224)
    box = sampler.sample_box(np.random.default_rng(0), 2000, 1500)  # side 1312.5 -> scale 4
    with Image.open(io.BytesIO(data)) as img:
        drafted_box = draft_for_box(img, box, (224, 224))
        img.load()
        assert img.size == (500, 375)
    assert drafted_box == pytest.approx(tuple(v / 4 for v in box))
    side = drafted_box[2] - drafted_box[0]
    assert 224 <= side < 2 * 224  # the next DCT factor (1/8) would leave fewer than 224 pixels


def test_draft_is_a_no_op_when_the_crop_needs_full_resolution_or_format_has_no_draft():
    box = (0.0, 0.0, 300.0, 300.0)
    with Image.open(io.BytesIO(jpeg_bytes(400, 300))) as img:
        assert draft_for_box(img, box, (224, 224)) == box
        img.load()
        assert img.size == (400, 300)
    png = encode(Image.fromarray(smooth_rgb(1000, 800)), "PNG", compress_level=1)
    with Image.open(io.BytesIO(png)) as img:
        assert draft_for_box(img, (0.0, 0.0, 800.0, 800.0), (224, 224)) == (0, 0, 800, 800)
        img.load()
        assert img.size == (1000, 800)


@pytest.mark.parametrize("sampler", [CenterCrop(), ScaleAugment(), RandomResizedCrop()])
def test_draft_decode_is_close_to_full_decode(sampler):
    data = jpeg_bytes(2000, 1500, seed=2)
    drafted = decode_crop(data, sampler, np.random.default_rng(5), draft=True)
    full = decode_crop(data, sampler, np.random.default_rng(5), draft=False)
    diff = np.abs(drafted.astype(np.int16) - full.astype(np.int16))
    assert diff.mean() < 2.0


@pytest.mark.parametrize("mode", ["CMYK", "L"])
def test_draft_works_for_cmyk_and_grayscale_jpegs(mode):
    data = encode(Image.fromarray(smooth_rgb(2000, 1500, seed=1)).convert(mode), quality=95)
    with Image.open(io.BytesIO(data)) as img:
        draft_for_box(img, (0.0, 0.0, 1500.0, 1500.0), (224, 224))
        img.load()
        assert (img.mode, img.size) == (mode, (500, 375))
    drafted = decode_crop(data, CenterCrop(), np.random.default_rng(0))
    full = decode_crop(data, CenterCrop(), np.random.default_rng(0), draft=False)
    assert drafted.shape == (224, 224, 3)
    assert np.abs(drafted.astype(np.int16) - full.astype(np.int16)).mean() < 2.0


@functools.cache
def _mode_images() -> dict[str, bytes]:
    rgb = Image.fromarray(smooth_rgb(300, 260, seed=3))
    rgba = rgb.convert("RGBA")
    rgba.putalpha(Image.fromarray(np.full((260, 300), 128, np.uint8)))
    palette = rgb.quantize(colors=64)
    palette_transparent = palette.copy()
    palette_transparent.info["transparency"] = 0
    return {
        "RGB JPEG": encode(rgb, quality=95),
        "CMYK JPEG": encode(rgb.convert("CMYK"), quality=95),
        "L JPEG": encode(rgb.convert("L"), quality=95),
        "L PNG": encode(rgb.convert("L"), "PNG"),
        "P PNG": encode(palette, "PNG"),
        "P PNG transparency": encode(palette_transparent, "PNG", transparency=0),
        "RGBA PNG": encode(rgba, "PNG"),
        "LA PNG": encode(rgb.convert("LA"), "PNG"),
    }


@pytest.mark.filterwarnings("error")
@pytest.mark.parametrize("name", list(_mode_images()))
def test_every_colour_mode_decodes_to_rgb_uint8(name):
    data = _mode_images()[name]
    reference = decode_crop(
        _mode_images()["RGB JPEG"], CenterCrop(256, 224), np.random.default_rng(0), flip=False
    ).astype(np.int16)
    out = decode_crop(data, CenterCrop(256, 224), np.random.default_rng(0), flip=False)
    assert out.shape == (224, 224, 3)
    assert out.dtype == np.uint8
    if name.startswith(("L ", "LA ")):
        np.testing.assert_array_equal(out[..., 0], out[..., 1])
        np.testing.assert_array_equal(out[..., 0], out[..., 2])
    else:
        # CMYK round trip, palette quantisation and dropped alpha keep the colours.
        assert np.abs(out.astype(np.int16) - reference).mean() < 12


# --- decode_resize_shorter ------------------------------------------------------------------


@pytest.mark.parametrize(("width", "height"), [(500, 375), (375, 500), (333, 333)])
@pytest.mark.parametrize("shorter", [224, 256, 384, 480, 640])
def test_decode_resize_shorter_matches_torchvision_resize_exactly_without_draft(
    width, height, shorter
):
    data = jpeg_bytes(width, height)
    ours = decode_resize_shorter(data, shorter, draft=False)
    reference = np.asarray(tvf.resize(Image.open(io.BytesIO(data)), [shorter]))
    assert ours.dtype == np.uint8
    assert min(ours.shape[:2]) == shorter
    np.testing.assert_array_equal(ours, reference)


def test_decode_resize_shorter_caps_longer_side_like_torchvision_max_size():
    assert resized_shorter_size(1200, 250, 224, max_longer=800) == (800, 166)
    data = jpeg_bytes(1200, 250)
    ours = decode_resize_shorter(data, 224, max_longer=800, draft=False)
    reference = np.asarray(tvf.resize(Image.open(io.BytesIO(data)), [224], max_size=800))
    np.testing.assert_array_equal(ours, reference)
    with pytest.raises(ValueError, match="max_longer"):
        resized_shorter_size(1200, 250, 224, max_longer=224)


def test_decode_resize_shorter_drafts_large_jpegs_and_stays_close():
    data = jpeg_bytes(2000, 1500, seed=2)
    drafted = decode_resize_shorter(data, 224)
    full = decode_resize_shorter(data, 224, draft=False)
    assert drafted.shape == full.shape == (224, 298, 3)
    assert np.abs(drafted.astype(np.int16) - full.astype(np.int16)).mean() < 2.0


# --- CIFAR side -----------------------------------------------------------------------------


def _matching_shifts(out: np.ndarray, padded: np.ndarray, pad: int) -> list[tuple[int, int, bool]]:
    h, w = out.shape[:2]
    return [
        (dy, dx, flipped)
        for dy in range(2 * pad + 1)
        for dx in range(2 * pad + 1)
        for flipped in (False, True)
        if np.array_equal(
            out,
            padded[dy : dy + h, dx : dx + w][:, ::-1]
            if flipped
            else padded[dy : dy + h, dx : dx + w],
        )
    ]


def test_pad_crop_flip_outputs_are_shifts_of_the_padded_image():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(300, 32, 32, 3), dtype=np.uint8)
    out = pad_crop_flip(images, np.random.default_rng(1))
    assert out.shape == images.shape
    assert out.dtype == np.uint8
    padded = np.pad(images, ((0, 0), (4, 4), (4, 4), (0, 0)))
    seen = set()
    for i in range(len(images)):
        matches = _matching_shifts(out[i], padded[i], pad=4)
        assert len(matches) == 1, f"image {i} is not a unique shift of its padded original"
        seen.add(matches[0])
    dys = {dy for dy, _, _ in seen}
    dxs = {dx for _, dx, _ in seen}
    assert dys == dxs == set(range(9))
    assert {flipped for _, _, flipped in seen} == {False, True}


def test_pad_crop_flip_is_reproducible_and_pad_zero_only_flips():
    images = np.random.default_rng(0).integers(0, 256, size=(64, 32, 32, 3), dtype=np.uint8)
    a = pad_crop_flip(images, np.random.default_rng(2))
    b = pad_crop_flip(images, np.random.default_rng(2))
    c = pad_crop_flip(images, np.random.default_rng(3))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    unpadded = pad_crop_flip(images, np.random.default_rng(4), pad=0)
    for image, result in zip(images, unpadded, strict=True):
        assert np.array_equal(result, image) or np.array_equal(result, image[:, ::-1])


def test_decode_batch_png_is_lossless_and_rejects_mixed_sizes():
    images = np.random.default_rng(0).integers(0, 256, size=(5, 32, 32, 3), dtype=np.uint8)
    datas = [encode(Image.fromarray(image), "PNG") for image in images]
    datas.append(encode(Image.fromarray(images[0]).convert("L"), "PNG"))
    out = decode_batch(datas)
    assert out.shape == (6, 32, 32, 3)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out[:5], images)
    np.testing.assert_array_equal(out[5, ..., 0], out[5, ..., 2])
    with pytest.raises(ValueError, match="image 1"):
        decode_batch([datas[0], encode(Image.fromarray(smooth_rgb(40, 32)), "PNG")])


# --- device-side float maths ----------------------------------------------------------------


def _uint8_batch(n=4, h=12, w=10, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, h, w, 3), dtype=torch.uint8, generator=g)


def test_to_float_batch_per_channel_normalisation_nhwc_and_nchw():
    nhwc = _uint8_batch()
    expected = (
        nhwc.double().permute(0, 3, 1, 2) / 255
        - torch.tensor(IMAGENET_MEAN_RGB).double().view(1, 3, 1, 1)
    ) / torch.tensor(IMAGENET_STD_RGB).double().view(1, 3, 1, 1)
    from_nhwc = to_float_batch(nhwc, mean=IMAGENET_MEAN_RGB, std=IMAGENET_STD_RGB)
    from_nchw = to_float_batch(
        nhwc.permute(0, 3, 1, 2).contiguous(), mean=IMAGENET_MEAN_RGB, std=IMAGENET_STD_RGB
    )
    assert from_nhwc.dtype == torch.float32
    assert from_nhwc.shape == (4, 3, 12, 10)
    assert from_nhwc.is_contiguous()
    torch.testing.assert_close(from_nhwc.double(), expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(from_nchw, from_nhwc, rtol=0, atol=0)


def test_to_float_batch_per_pixel_mean_without_std():
    nhwc = _uint8_batch(h=6, w=5)
    mean = mean_image([nhwc.numpy()])
    out = to_float_batch(nhwc, mean=mean)
    expected = nhwc.double().permute(0, 3, 1, 2) / 255 - torch.from_numpy(mean)
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=1e-6)
    # Per-pixel mean subtraction leaves each pixel's batch mean at zero.
    assert out.double().mean(dim=0).abs().max() < 1e-6
    with pytest.raises(ValueError, match=r"\(3, H, W\)"):
        to_float_batch(nhwc, mean=np.zeros((3, 5, 6)))


def test_to_float_batch_lighting_adds_pca_shift_per_image():
    nhwc = _uint8_batch(n=5)
    plain = to_float_batch(nhwc, mean=IMAGENET_MEAN_RGB)
    lit = to_float_batch(
        nhwc, mean=IMAGENET_MEAN_RGB, lighting_std=0.1, generator=torch.Generator().manual_seed(9)
    )
    alpha = torch.randn(5, 3, generator=torch.Generator().manual_seed(9)) * 0.1
    eigvec = torch.tensor(IMAGENET_PCA_EIGVEC)
    eigval = torch.tensor(IMAGENET_PCA_EIGVAL)
    shift = lit - plain
    for n in range(5):
        expected = eigvec @ (alpha[n] * eigval)  # (3,) RGB
        torch.testing.assert_close(
            shift[n], expected.view(3, 1, 1).expand(3, 12, 10), rtol=0, atol=1e-6
        )
    assert shift[:, 0, 0, 0].unique().numel() == 5  # one alpha per image
    again = to_float_batch(
        nhwc, mean=IMAGENET_MEAN_RGB, lighting_std=0.1, generator=torch.Generator().manual_seed(9)
    )
    other = to_float_batch(
        nhwc, mean=IMAGENET_MEAN_RGB, lighting_std=0.1, generator=torch.Generator().manual_seed(10)
    )
    torch.testing.assert_close(again, lit, rtol=0, atol=0)
    assert not torch.equal(other, lit)
    # Normalize keeps the PCA constants on its device (no copy per step), out of state dicts.
    module = transforms.Normalize(torch.tensor(IMAGENET_MEAN_RGB), lighting_std=0.1)
    assert set(module.state_dict()) == {"mean"}
    torch.manual_seed(9)
    by_module = module(nhwc)
    torch.manual_seed(9)
    by_function = to_float_batch(nhwc, mean=IMAGENET_MEAN_RGB, lighting_std=0.1)
    torch.testing.assert_close(by_module, by_function, rtol=0, atol=0)


def test_to_float_batch_channels_last_and_input_checks():
    nhwc = _uint8_batch()
    out = to_float_batch(nhwc, mean=IMAGENET_MEAN_RGB, std=IMAGENET_STD_RGB, channels_last=True)
    assert out.shape == (4, 3, 12, 10)
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(
        out, to_float_batch(nhwc, mean=IMAGENET_MEAN_RGB, std=IMAGENET_STD_RGB)
    )
    with pytest.raises(TypeError, match="uint8"):
        to_float_batch(nhwc.float(), mean=IMAGENET_MEAN_RGB)
    with pytest.raises(ValueError, match="NHWC from NCHW"):
        to_float_batch(torch.zeros(2, 3, 5, 3, dtype=torch.uint8), mean=IMAGENET_MEAN_RGB)
    with pytest.raises(ValueError, match="lighting_std"):
        to_float_batch(nhwc, mean=IMAGENET_MEAN_RGB, lighting_std=-0.1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_to_float_batch_runs_on_cuda_with_a_cpu_generator():
    nhwc = _uint8_batch(n=8, h=32, w=32)
    options = {"mean": IMAGENET_MEAN_RGB, "std": IMAGENET_STD_RGB, "lighting_std": 0.1}
    on_cpu = to_float_batch(nhwc, generator=torch.Generator().manual_seed(1), **options)
    on_gpu = to_float_batch(nhwc.cuda(), generator=torch.Generator().manual_seed(1), **options)
    assert on_gpu.device.type == "cuda"
    torch.testing.assert_close(on_gpu.cpu(), on_cpu, rtol=0, atol=1e-5)


def test_mean_image_is_exact_and_independent_of_batching():
    images = np.random.default_rng(0).integers(0, 256, size=(10, 7, 6, 3), dtype=np.uint8)
    whole = mean_image([images])
    split = mean_image([images[:3], images[3:4], images[4:]])
    assert whole.shape == (3, 7, 6)
    assert whole.dtype == np.float64
    np.testing.assert_array_equal(whole, split)
    np.testing.assert_allclose(
        whole, images.mean(axis=0).transpose(2, 0, 1) / 255, rtol=0, atol=1e-12
    )
    with pytest.raises(ValueError, match="no images"):
        mean_image([])


# --- evaluation views -----------------------------------------------------------------------


@pytest.mark.parametrize(("height", "width", "size"), [(256, 300, 224), (37, 50, 24), (33, 33, 30)])
def test_ten_crop_matches_torchvision(height, width, size):
    images = torch.randint(0, 256, (2, 3, height, width), dtype=torch.uint8)
    ours = ten_crop(images, size)
    assert ours.shape == (2, 10, 3, size, size)
    functional = torch.stack(tvf.ten_crop(images, [size, size]), dim=1)
    module = torch.stack(v2.TenCrop(size)(images), dim=1)
    assert torch.equal(ours, functional)
    assert torch.equal(ours, module)
    assert torch.equal(ours[:, 5], ours[:, 1].flip(-1))  # flipped top-left = mirror of top-right
    with pytest.raises(ValueError, match="ten_crop size"):
        ten_crop(images, min(height, width) + 1)


def test_pca_eigenvectors_are_orthonormal_columns():
    eigvec = np.array(IMAGENET_PCA_EIGVEC)
    # Orthonormal to the 4 published decimals; a transposed or mistyped entry breaks this.
    np.testing.assert_allclose(eigvec.T @ eigvec, np.eye(3), atol=2e-3)


def test_random_affine_identity_range_and_reproducibility():
    from resnet_core.cpu_transforms import random_affine

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(6, 32, 32, 3), dtype=np.uint8)
    same = random_affine(images, np.random.default_rng(1), degrees=0.0, scale=(1.0, 1.0))
    assert np.array_equal(same, images)  # zero rotation, unit zoom: the identity
    a = random_affine(images, np.random.default_rng(5))
    b = random_affine(images, np.random.default_rng(5))
    assert a.dtype == np.uint8
    assert a.shape == images.shape
    assert np.array_equal(a, b)
    assert not np.array_equal(a, images)
    # Rotation and zoom are about the image centre: a bright centre block stays lit, a bright
    # corner pixel moves away whenever the angle is not tiny.
    spot = np.zeros((8, 32, 32, 3), np.uint8)
    spot[:, 14:18, 14:18] = 255
    moved = random_affine(spot, np.random.default_rng(3), degrees=45.0)
    assert (moved[:, 15:17, 15:17] > 200).all()
