"""The CPU side of the image transforms (He et al., CVPR 2016, §3.4 and §4.2): uint8 in, uint8
out, run inside the Ray Data decode tasks: decode, resize, crop, flip, the CIFAR augmentations
and the per-image augment policies. A random crop is sampled as a box in the *original* image's
pixel coordinates, so the JPEG is decoded only as large as the crop needs (DCT-domain draft
decoding) and resampled once. The device side (normalisation, the batched device decode,
10-crop) is :mod:`resnet_core.transforms`.

numpy, Pillow and libjpeg-turbo only: a decode process never imports torch (~2 CPU-s and ~300
MB of private memory per process), unless an augment policy (:class:`ImageAugment`, torchvision
v2) is on.

Randomness is always explicit: every transform takes a ``numpy.random.Generator``; the same seed
gives identical output. uint8 arrays are 0..255.
"""

from __future__ import annotations

import functools
import io
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, get_args

import numpy as np
from PIL import Image

from resnet_core import jpeg

# The training augmentations: paper §3.4 scale augmentation ("paper"), Inception-style random
# resized crops ("inception"), §4.2 pad-crop-flip ("cifar") and the popular CIFAR tutorial's
# pad-crop-flip plus rotation and zoom ("cifar_tutorial").
AugmentMode = Literal["paper", "inception", "cifar", "cifar_tutorial"]
AUGMENT_MODES: tuple[str, ...] = get_args(AugmentMode)

# torchvision's --auto-augment values (references/classification/presets.py): RandAugment,
# TrivialAugmentWide, AugMix, and AutoAugment's ImageNet policy.
AutoAugmentPolicy = Literal["ra", "ta_wide", "augmix", "imagenet"]


@dataclass(frozen=True)
class ImageAugment:
    """Per-image policies on uint8 training crops, after the crop and flip, as torchvision's
    reference presets apply them: an auto-augment ``policy`` (None: none), then RandomErasing
    with probability ``erase_p``. torchvision erases after normalisation with 0, i.e. the mean
    colour; on uint8 crops that is ``erase_value``, the input mean (0..255 RGB).

    Each image gets its own draw. The draws come from torch's generator seeded by the ``rng``
    the crops came from, so a map batch's output is a function of its plan (exact resume)."""

    policy: AutoAugmentPolicy | None = None
    magnitude: int = 9  # RandAugment
    severity: int = 3  # AugMix
    erase_p: float = 0.0
    erase_value: tuple[int, int, int] = (0, 0, 0)

    def __bool__(self) -> bool:
        return self.policy is not None or self.erase_p > 0

    @functools.cached_property
    def transform(self):
        """The composed v2 transforms (built once per instance, on first use)."""
        from torchvision.transforms import v2

        steps = []
        bilinear = v2.InterpolationMode.BILINEAR  # the reference presets' default
        if self.policy == "ra":
            steps.append(v2.RandAugment(interpolation=bilinear, magnitude=self.magnitude))
        elif self.policy == "ta_wide":
            steps.append(v2.TrivialAugmentWide(interpolation=bilinear))
        elif self.policy == "augmix":
            steps.append(v2.AugMix(interpolation=bilinear, severity=self.severity))
        elif self.policy == "imagenet":
            steps.append(v2.AutoAugment(v2.AutoAugmentPolicy.IMAGENET, interpolation=bilinear))
        if self.erase_p > 0:
            steps.append(v2.RandomErasing(p=self.erase_p, value=list(self.erase_value)))
        return v2.Compose(steps)

    def __call__(self, images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """``images``: uint8 (N, H, W, 3); returns a new array of the same shape."""
        import torch  # here: decode processes without a policy never load torch

        transform = self.transform
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(rng.integers(2**62)))
            out = [transform(torch.from_numpy(image).permute(2, 0, 1)) for image in images]
        return torch.stack(out).permute(0, 2, 3, 1).contiguous().numpy()


# (left, upper, right, lower) in source-image pixels, PIL convention: right/lower are exclusive
# edges, so the box width is right - left. Coordinates may be fractional.
Box = tuple[float, float, float, float]


class BoxSampler(Protocol):
    """Chooses the region of an image that becomes the ``size`` x ``size`` output."""

    @property
    def size(self) -> int:
        """Output side length in pixels."""
        ...

    def sample_box(self, rng: np.random.Generator, width: int, height: int) -> Box:
        """Return the crop as a box in the original ``width`` x ``height`` image."""
        ...


@dataclass(frozen=True)
class ScaleAugment:
    """Scale augmentation of the paper (§3.4, following VGG): resize the shorter side to a random
    S in [min_size, max_size] (integers, inclusive), then take a random ``size`` x ``size`` crop.

    Expressed in the original image, that crop is a square of side ``size * short / S`` at a
    uniformly random position, so decoding and resizing happen once, at the end.
    """

    min_size: int = 256
    max_size: int = 480
    size: int = 224

    def __post_init__(self) -> None:
        if not 0 < self.size <= self.min_size <= self.max_size:
            raise ValueError(
                f"ScaleAugment needs 0 < size <= min_size <= max_size, got size={self.size}, "
                f"min_size={self.min_size}, max_size={self.max_size}; the paper uses 224, 256, 480"
            )

    def sample_box(self, rng: np.random.Generator, width: int, height: int) -> Box:
        """Draws S, then the crop position (x, then y); see the class docstring."""
        _check_image_size(width, height)
        shorter_side = int(rng.integers(self.min_size, self.max_size, endpoint=True))
        side = self.size * min(width, height) / shorter_side
        left = rng.uniform(0.0, width - side)
        upper = rng.uniform(0.0, height - side)
        return (left, upper, left + side, upper + side)


@dataclass(frozen=True)
class RandomResizedCrop:
    """Inception-style crop (Szegedy et al. 2015) as in torchvision's ``RandomResizedCrop``: a box
    covering a random fraction ``scale`` of the image area with aspect ratio (w/h) log-uniform in
    ``ratio``; after 10 failed attempts, the centre crop with the aspect ratio clamped to ``ratio``.
    The modern recipe; not part of the paper (§3.4 uses :class:`ScaleAugment`).
    """

    size: int = 224
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)

    def __post_init__(self) -> None:
        if self.size <= 0:
            raise ValueError(f"RandomResizedCrop size must be positive, got {self.size}")
        if not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise ValueError(
                f"RandomResizedCrop scale must satisfy 0 < low <= high <= 1, got {self.scale}"
            )
        if not 0 < self.ratio[0] <= self.ratio[1]:
            raise ValueError(
                f"RandomResizedCrop ratio must satisfy 0 < low <= high, got {self.ratio}"
            )

    def sample_box(self, rng: np.random.Generator, width: int, height: int) -> Box:
        """Same algorithm and integer rounding as torchvision's ``RandomResizedCrop.get_params``."""
        _check_image_size(width, height)
        area = width * height
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target_area = area * rng.uniform(self.scale[0], self.scale[1])
            aspect_ratio = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
            w = round(math.sqrt(target_area * aspect_ratio))
            h = round(math.sqrt(target_area / aspect_ratio))
            if 0 < w <= width and 0 < h <= height:
                top = int(rng.integers(0, height - h, endpoint=True))
                left = int(rng.integers(0, width - w, endpoint=True))
                return (left, top, left + w, top + h)
        # Fallback: centre crop, aspect ratio clamped into `ratio`.
        in_ratio = width / height
        if in_ratio < self.ratio[0]:
            w = width
            h = round(w / self.ratio[0])
        elif in_ratio > self.ratio[1]:
            h = height
            w = round(h * self.ratio[1])
        else:
            w = width
            h = height
        top = (height - h) // 2
        left = (width - w) // 2
        return (left, top, left + w, top + h)


@dataclass(frozen=True)
class CenterCrop:
    """Evaluation crop: shorter side resized to ``resize``, then the central ``size`` x ``size``.

    Reproduces torchvision's ``Resize(resize)`` + ``CenterCrop(size)`` geometry including its
    integer rounding (resized size truncated, crop offset rounded half to even), so that
    ``decode_crop(..., draft=False)`` gives the same pixels as that PIL pipeline while resampling
    only the cropped region.
    """

    resize: int = 256
    size: int = 224

    def __post_init__(self) -> None:
        if not 0 < self.size <= self.resize:
            raise ValueError(
                f"CenterCrop needs 0 < size <= resize, got size={self.size}, "
                f"resize={self.resize}; the usual pair is resize=256, size=224"
            )

    def sample_box(self, rng: np.random.Generator, width: int, height: int) -> Box:
        """Deterministic; ``rng`` is accepted (and unused) to share the :class:`BoxSampler` protocol."""
        resized_width, resized_height = resized_shorter_size(width, height, self.resize)
        left = round((resized_width - self.size) / 2)  # in resized pixels, like torchvision
        upper = round((resized_height - self.size) / 2)
        fx = width / resized_width  # original pixels per resized pixel
        fy = height / resized_height
        return (left * fx, upper * fy, (left + self.size) * fx, (upper + self.size) * fy)


def _check_image_size(width: int, height: int) -> None:
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got width={width}, height={height}")


def draft_for_box(img: Image.Image, box: Box, out_size: tuple[int, int]) -> Box:
    """Configure DCT-domain reduced decoding of an opened, not yet loaded JPEG, and return ``box``
    in the coordinates of the image that ``img.load()`` will now produce.

    libjpeg can decode at 1/2, 1/4 or 1/8 of the full resolution almost for free (it skips most of
    the inverse DCT work). The largest such factor is chosen for which ``box`` still spans at least
    ``out_size`` = (width, height) pixels, so the final resize always downsamples or keeps size.
    The result is an approximation of full decoding followed by an antialiased resize: the DCT
    scaling is its own low-pass filter. For non-JPEG images (``img.draft`` unsupported) or when no
    reduction is possible, nothing changes and ``box`` is returned as is.
    """
    scale = jpeg.draft_scale(box, out_size)
    if scale == 1:
        return box
    width, height = img.size
    # PIL picks the largest factor in (8, 4, 2, 1) not above min(width // w, height // h); with
    # (w, h) = (width // scale, height // scale) that is exactly `scale`.
    drafted = img.draft("RGB", (width // scale, height // scale))
    if drafted is None:
        return box
    # The second item is where the whole original image lies in the drafted image.
    _, (_, _, drafted_width, drafted_height) = drafted
    fx = drafted_width / width
    fy = drafted_height / height
    left, upper, right, lower = box
    return (left * fx, upper * fy, right * fx, lower * fy)


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode (CMYK, L, P, RGBA, LA, 1, ...) to RGB; alpha is dropped."""
    if img.mode == "RGB":
        return img
    if img.mode == "P" and "transparency" in img.info:
        # PIL asks for palette images with transparency to go through RGBA.
        img = img.convert("RGBA")
    return img.convert("RGB")


def sample_crop(
    sampler: BoxSampler,
    rng: np.random.Generator,
    width: int,
    height: int,
    *,
    flip: bool | None = None,
) -> tuple[Box, bool]:
    """The random part of :func:`decode_crop` for a ``width`` x ``height`` image: the box, then
    (``flip=None``) a horizontal flip with probability 0.5. One function for the CPU path and the
    device path (:func:`decode_jpeg_crops`), so both draw the same numbers in the same order."""
    box = sampler.sample_box(rng, width, height)
    if flip is None:
        flip = bool(rng.random() < 0.5)
    return box, flip


def decode_crop(
    data: bytes,
    sampler: BoxSampler,
    rng: np.random.Generator,
    *,
    flip: bool | None = None,
    draft: bool = True,
    region: bool = True,
) -> np.ndarray:
    """Decode an encoded image and return a (size, size, 3) uint8 RGB crop chosen by ``sampler``.

    Steps: read the header size, sample the box (``sampler.sample_box``), then with ``flip=None``
    draw a horizontal flip with probability 0.5 (``rng.random() < 0.5``; ``flip=True/False`` forces
    it and draws nothing). With ``draft=True`` a JPEG is decoded at 1/2, 1/4 or 1/8 resolution when
    the box still has at least ``size`` pixels on each side there (see :func:`draft_for_box`) — an
    approximation through DCT scaling, typically a few uint8 levels from the exact result and much
    faster on large photos; ``draft=False`` gives the exact full decode. The box is finally
    resampled once with PIL's antialiased bilinear filter.

    ``region=True`` decodes only the part of a JPEG the resample reads (:mod:`resnet_core.jpeg`,
    libjpeg-turbo partial decoding), with the same pixels as the full decode; other formats,
    CMYK and corrupt files go through Pillow, as does everything when the extension is not built.
    EXIF orientation is ignored, as in torchvision's ImageFolder loaders.
    """
    size = sampler.size
    jpeg_size = jpeg.jpeg_size(data) if region else None
    if jpeg_size is not None:
        box, flip = sample_crop(sampler, rng, *jpeg_size, flip=flip)
        pixels = jpeg.decode_crop(data, *jpeg_size, box, size, flip=flip, draft=draft)
        if pixels is not None:
            return pixels
        out = _pil_crop(data, box, size, draft=draft)  # libjpeg warned: let Pillow judge it
    else:
        with Image.open(io.BytesIO(data)) as img:
            box, flip = sample_crop(sampler, rng, *img.size, flip=flip)
            out = _pil_crop(img, box, size, draft=draft)
    if flip:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.array(out)  # writable copy; np.asarray of a PIL image is read-only


def _pil_crop(source: bytes | Image.Image, box: Box, size: int, *, draft: bool) -> Image.Image:
    """``box`` of an image (encoded bytes, or opened and not yet loaded) resampled to ``size``."""
    if not isinstance(source, Image.Image):
        with Image.open(io.BytesIO(source)) as img:
            return _pil_crop(img, box, size, draft=draft)
    if draft:
        box = draft_for_box(source, box, (size, size))
    return _to_rgb(source).resize((size, size), Image.Resampling.BILINEAR, box=box)


def resized_shorter_size(
    width: int, height: int, shorter: int, max_longer: int | None = None
) -> tuple[int, int]:
    """Output (width, height) when the shorter side becomes ``shorter``; the longer side is
    truncated like torchvision's ``Resize(shorter, max_size=max_longer)``: if it would exceed
    ``max_longer`` it becomes ``max_longer`` and the shorter side shrinks to keep the aspect ratio.
    """
    _check_image_size(width, height)
    if max_longer is not None and max_longer <= shorter:
        raise ValueError(
            f"max_longer={max_longer} must be greater than shorter={shorter}, or None for no cap"
        )
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = shorter, int(shorter * long / short)
    if max_longer is not None and new_long > max_longer:
        new_short, new_long = int(max_longer * new_short / new_long), max_longer
    return (new_short, new_long) if width <= height else (new_long, new_short)


def decode_resize_shorter(
    data: bytes, shorter: int, *, max_longer: int | None = None, draft: bool = True
) -> np.ndarray:
    """Decode a whole image with its shorter side resized to ``shorter`` pixels, as (H, W, 3) uint8
    RGB, for fully-convolutional multi-scale testing (§3.4). Sizes follow
    :func:`resized_shorter_size`; ``draft`` as in :func:`decode_crop` (used only when downscaling
    by 2x or more).
    """
    with Image.open(io.BytesIO(data)) as img:
        width, height = img.size
        out_size = resized_shorter_size(width, height, shorter, max_longer)
        box: Box = (0.0, 0.0, float(width), float(height))
        if draft:
            box = draft_for_box(img, box, out_size)
        out = _to_rgb(img).resize(out_size, Image.Resampling.BILINEAR, box=box)
    return np.array(out)  # writable copy; np.asarray of a PIL image is read-only


def decode_batch(datas: Sequence[bytes]) -> np.ndarray:
    """Decode same-size encoded images (CIFAR-like 32x32 PNG/JPEG) into an (N, H, W, 3) uint8
    RGB batch, without resizing."""
    if len(datas) == 0:
        raise ValueError("decode_batch got no images; pass at least one encoded image")
    out: np.ndarray | None = None
    for i, data in enumerate(datas):
        with Image.open(io.BytesIO(data)) as img:
            pixels = np.asarray(_to_rgb(img))
        if out is None:
            out = np.empty((len(datas), *pixels.shape), dtype=np.uint8)
        elif pixels.shape != out.shape[1:]:
            raise ValueError(
                f"decode_batch needs same-size images: image {i} is {pixels.shape}, image 0 is "
                f"{out.shape[1:]}; use decode_crop for variable-size images"
            )
        out[i] = pixels
    assert out is not None
    return out


def pad_crop_flip(images: np.ndarray, rng: np.random.Generator, pad: int = 4) -> np.ndarray:
    """CIFAR training augmentation (§4.2): pad ``pad`` zero pixels on each side, take a random crop
    of the original size, flip horizontally with probability 0.5. One gather for the whole batch.

    ``images``: (N, H, W, C) uint8. Random draws, in order: row offsets (N,), column offsets (N,),
    flips (N,). Zero padding is black in uint8; fb.resnet.torch pads after mean subtraction, i.e.
    with the mean colour — a small difference in the border pixels only.
    """
    if images.ndim != 4:
        raise ValueError(f"pad_crop_flip expects an NHWC batch, got shape {images.shape}")
    if pad < 0:
        raise ValueError(f"pad must be >= 0, got {pad}")
    n, h, w, _ = images.shape
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    dy = rng.integers(0, 2 * pad, size=n, endpoint=True)
    dx = rng.integers(0, 2 * pad, size=n, endpoint=True)
    flip = rng.random(n) < 0.5
    rows = dy[:, None] + np.arange(h)  # (N, H) rows of `padded` to read
    columns = np.where(flip[:, None], np.arange(w)[::-1], np.arange(w))
    columns = dx[:, None] + columns  # (N, W) columns, reversed for flipped images
    return padded[np.arange(n)[:, None, None], rows[:, :, None], columns[:, None, :]]


def random_affine(
    images: np.ndarray,
    rng: np.random.Generator,
    *,
    degrees: float = 15.0,
    scale: tuple[float, float] = (0.9, 1.1),
) -> np.ndarray:
    """The CIFAR tutorial recipe's extra augmentation: random rotation in ±``degrees`` and zoom in
    ``scale`` about the image centre, bilinear, black fill; (N, H, W, C) uint8 in and out.

    Not in the paper (§4.2 uses only padding, crops and flips); it is here so the tutorial recipe
    can be compared against the paper's on equal terms. Random draws, in order: angles (N,),
    scales (N,).
    """
    if images.ndim != 4:
        raise ValueError(f"random_affine expects an NHWC batch, got shape {images.shape}")
    n, h, w, _ = images.shape
    angles = rng.uniform(-degrees, degrees, size=n)
    zooms = rng.uniform(scale[0], scale[1], size=n)
    out = np.empty_like(images)
    cx, cy = w / 2.0, h / 2.0
    for i in range(n):  # 32×32 images: PIL's C affine costs microseconds; no batched op in PIL
        theta = math.radians(angles[i])
        cos, sin = math.cos(theta) / zooms[i], math.sin(theta) / zooms[i]
        # PIL maps output (x, y) to input (a x + b y + c, d x + e y + f): the inverse transform.
        coeffs = (cos, sin, cx - cos * cx - sin * cy, -sin, cos, cy + sin * cx - cos * cy)
        img = Image.fromarray(images[i])
        out[i] = np.asarray(img.transform((w, h), Image.AFFINE, coeffs, Image.BILINEAR))
    return out


def mean_image(images: Iterable[np.ndarray]) -> np.ndarray:
    """Per-pixel mean image, (3, H, W) float64 in [0, 1] units, of uint8 (N, H, W, 3) batches.

    Sums exactly in integers, so the result does not depend on how images are split into batches.
    Use it on training crops of the model's input size to get the paper's per-pixel mean (§3.4).
    """
    total: np.ndarray | None = None
    count = 0
    for batch in images:
        if batch.dtype != np.uint8 or batch.ndim != 4 or batch.shape[-1] != 3:
            raise ValueError(
                f"mean_image expects uint8 (N, H, W, 3) batches, got {batch.dtype} {batch.shape}"
            )
        if total is None:
            total = np.zeros(batch.shape[1:], dtype=np.uint64)
        elif batch.shape[1:] != total.shape:
            raise ValueError(
                f"mean_image needs same-size images: got {batch.shape[1:]} after {total.shape}"
            )
        total += batch.sum(axis=0, dtype=np.uint64)
        count += batch.shape[0]
    if total is None or count == 0:
        raise ValueError("mean_image got no images; pass at least one non-empty batch")
    return (total / (count * 255.0)).transpose(2, 0, 1)
