"""Image transforms for ResNet training and evaluation (He et al., CVPR 2016, §3.4 and §4.2).

The work is split by cost and by where it runs:

* CPU side, uint8 (runs inside Ray Data ``map_batches`` workers): decode, resize, crop, flip.
  A random crop is sampled as a box in the *original* image's pixel coordinates, so the JPEG is
  decoded only as large as the crop needs (DCT-domain draft decoding) and resampled once.
* Device side, float (runs on the training GPU): ``/255``, PCA colour augmentation, mean
  subtraction, optional per-channel std division. Only uint8 crosses the host-to-device link.

Randomness is always explicit: CPU transforms take a ``numpy.random.Generator``, device transforms
a ``torch.Generator``; the same seed gives identical output.

Pixel units: uint8 arrays are 0..255; float statistics (means, stds, PCA eigenvalues) are in
[0, 1] units, i.e. for images divided by 255.
"""

from __future__ import annotations

import functools
import io
import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, get_args

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from resnet_core import jpeg

# resample_crops pads ragged images with torch.nested's strided layout (the jagged one holds
# one ragged dimension, images have two); its "prototype" warning would print once per process.
warnings.filterwarnings("ignore", message="The PyTorch API of nested tensors is in prototype")

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
        transform = self.transform
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(rng.integers(2**62)))
            out = [transform(torch.from_numpy(image).permute(2, 0, 1)) for image in images]
        return torch.stack(out).permute(0, 2, 3, 1).contiguous().numpy()


# Per-channel statistics of the ImageNet training set, [0, 1] units, RGB order (torchvision).
IMAGENET_MEAN_RGB = (0.485, 0.456, 0.406)
IMAGENET_STD_RGB = (0.229, 0.224, 0.225)

# PCA of ImageNet RGB pixel values in [0, 1] units, used by AlexNet-style "lighting" colour
# augmentation (Krizhevsky et al. 2012, the paper's [21]); values from fb.resnet.torch.
# Columns of IMAGENET_PCA_EIGVEC are eigenvectors; rows are R, G, B.
IMAGENET_PCA_EIGVAL = (0.2175, 0.0188, 0.0045)
IMAGENET_PCA_EIGVEC = (
    (-0.5675, 0.7192, 0.4009),
    (-0.5808, -0.0045, -0.8140),
    (-0.5836, -0.6948, 0.4203),
)

# Per-channel statistics of the CIFAR-10 training set, [0, 1] units, RGB order.
CIFAR10_MEAN_RGB = (0.4914, 0.4822, 0.4465)
CIFAR10_STD_RGB = (0.2470, 0.2435, 0.2616)

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


def decode_jpeg_crops(
    datas: Sequence[Tensor],
    boxes: Sequence[Box] | np.ndarray,
    flips: Sequence[bool] | np.ndarray,
    size: int,
    *,
    device: torch.device | str = "cpu",
) -> tuple[Tensor, Tensor]:
    """The device-side twin of :func:`decode_crop` for a batch of JPEGs whose crops were sampled
    beforehand (:func:`sample_crop` on the header size, e.g. in a CPU task that never decodes):
    decode all of them on ``device`` (CUDA: nvJPEG's batched decode, on its hardware engine
    where the GPU has one; CPU: libjpeg-turbo), then cut, resample and flip every crop at once
    (:func:`resample_crops`).

    ``datas``: 1-D uint8 CPU tensors of encoded bytes. Returns ``(images, bad)``: uint8
    (N, size, size, 3) on ``device`` (NHWC in memory, which is what ``to_float_batch(...,
    channels_last=True)`` wants without a copy) and a bool (N,) CPU tensor marking rows that
    failed to decode (left black; the caller replaces or drops them). EXIF orientation is
    ignored, as in :func:`decode_crop`. Pixels differ from :func:`decode_crop` only where it
    decodes at reduced resolution (draft) and by rounding: the boxes and filter are the same.
    """
    if not len(datas) == len(boxes) == len(flips):
        raise ValueError(
            f"decode_jpeg_crops got {len(datas)} images, {len(boxes)} boxes and {len(flips)} "
            "flips; pass one box and one flip per image"
        )
    device = torch.device(device)
    images = torch.zeros((len(datas), size, size, 3), dtype=torch.uint8, device=device)
    decoded = _decode_jpegs(datas, device)
    good = [i for i, image in enumerate(decoded) if image is not None]
    bad = torch.ones(len(datas), dtype=torch.bool)
    bad[good] = False
    if good:
        boxes_good = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)[good]
        flips_good = np.asarray(flips, dtype=bool)[good]
        crops = resample_crops([decoded[i] for i in good], boxes_good, flips_good, size)
        images[torch.as_tensor(good, device=device)] = crops
    return images, bad


def resample_crops(
    images: Sequence[Tensor], boxes: np.ndarray, flips: np.ndarray, size: int
) -> Tensor:
    """Each ``box`` (left, upper, right, lower in source pixels, sub-pixel) of each (3, H, W)
    uint8 image resampled to ``size`` x ``size`` with PIL's BILINEAR filter (the triangle
    widened by the downscale factor, as :func:`decode_crop` resamples), flipped where ``flips``
    says: uint8 (N, size, size, 3), NHWC.

    A resize is linear: each image's is two small matrices, the filter weights of every output
    row over the source rows and of every output column over the source columns. The images
    are padded into one batch (``torch.nested``) and both passes are batched matrix products,
    so a whole batch takes a constant number of kernels, where one ``interpolate`` per image
    took ~5 launches per image and halved nvJPEG's rate. Images are grouped by size
    (:func:`_size_groups`) so that one large photo does not pad the whole batch to its size.
    """
    device = images[0].device
    # fp16 on CUDA (tensor cores: ~10x the fp32 rate; integers up to 2048 are exact in fp16, the
    # weights' rounding moves ~4% of pixels by one level); fp32 on the CPU, which has no fast fp16.
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    out = torch.empty((len(images), size, size, 3), dtype=torch.uint8, device=device)
    for group in _size_groups([image.shape[1:] for image in images]):
        members = [images[i] for i in group]
        padded = torch.nested.as_nested_tensor(members, dtype=dtype).to_padded_tensor(0.0)
        heights = torch.tensor([image.shape[1] for image in members])
        widths = torch.tensor([image.shape[2] for image in members])
        box = torch.as_tensor(boxes[group], dtype=torch.float64)
        rows = _filter_weights(box[:, 1], box[:, 3], heights, padded.shape[2], size)
        cols = _filter_weights(box[:, 0], box[:, 2], widths, padded.shape[3], size)
        flip = torch.as_tensor(flips[group], dtype=torch.bool)[:, None, None]
        cols = torch.where(flip, cols.flip(1), cols)
        rows, cols = rows.to(device, dtype), cols.to(device, dtype)
        resized = rows[:, None] @ padded @ cols.transpose(1, 2)[:, None]
        pixels = resized.float().round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
        out[torch.as_tensor(group, device=device)] = pixels
    return out


def _filter_weights(start: Tensor, stop: Tensor, lengths: Tensor, padded: int, size: int) -> Tensor:
    """float32 (N, size, padded): PIL's BILINEAR weights (``precompute_coeffs`` in Pillow's
    Resample.c) of each output pixel over the source pixels of one axis, for the span
    ``start..stop`` of images ``lengths`` long; zero past each image's end, rows summing to 1."""
    scale = ((stop - start) / size)[:, None, None]
    support = scale.clamp(min=1.0)  # the triangle widens when downscaling (antialiasing)
    centers = (
        start[:, None, None] + (torch.arange(size, dtype=torch.float64)[:, None] + 0.5) * scale
    )
    source = torch.arange(padded, dtype=torch.float64)
    weights = (1.0 - ((source + 0.5 - centers) / support).abs()).clamp(min=0.0)
    weights = weights * (source < lengths[:, None, None])
    return (weights / weights.sum(dim=2, keepdim=True)).float()


# Padding waste a size group may carry (padded pixels / the images' own), and the most groups
# a batch is cut into: the waste bound grows until the groups fit.
MAX_PAD_RATIO, MAX_SIZE_GROUPS = 1.5, 8


def _size_groups(shapes: Sequence[tuple[int, int]]) -> list[list[int]]:
    """Indices of images grouped for padding, at most :data:`MAX_SIZE_GROUPS` groups."""
    ratio = MAX_PAD_RATIO
    groups = _groups_within(shapes, ratio)
    while len(groups) > MAX_SIZE_GROUPS:
        ratio *= 1.5
        groups = _groups_within(shapes, ratio)
    return groups


def _groups_within(shapes: Sequence[tuple[int, int]], ratio: float) -> list[list[int]]:
    """Largest first; a group is closed when padding it to its largest height and width would
    exceed ``ratio`` times its pixels (ImageNet's 500x375 and 375x500 share one at 1.33x)."""
    order = sorted(range(len(shapes)), key=lambda i: shapes[i][0] * shapes[i][1], reverse=True)
    groups: list[list[int]] = []
    height = width = area = 0
    for i in order:
        h, w = shapes[i]
        grown = (max(height, h), max(width, w), area + h * w)
        if groups and grown[0] * grown[1] * (len(groups[-1]) + 1) <= ratio * grown[2]:
            groups[-1].append(i)
            height, width, area = grown
        else:
            groups.append([i])
            height, width, area = h, w, h * w
    return groups


def _decode_jpegs(datas: Sequence[Tensor], device: torch.device) -> list[Tensor | None]:
    """(3, H, W) uint8 RGB tensors on ``device``, None where an image does not decode."""
    # Imported here: torchvision.io costs ~2 s to import, and this module is imported by every
    # CPU decode task, which never calls this.
    from torchvision.io import ImageReadMode, decode_jpeg

    if not datas:
        return []
    try:
        return list(decode_jpeg(list(datas), mode=ImageReadMode.RGB, device=device))
    except (RuntimeError, ValueError):
        pass  # the batched call fails as a whole: find the culprits one by one
    images: list[Tensor | None] = []
    for data in datas:
        try:
            images.append(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
        except (RuntimeError, ValueError):
            images.append(None)
    return images


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


def _as_channel_stats(values: Sequence[float] | np.ndarray | Tensor, like: Tensor) -> Tensor:
    """(3,) or (3, 1, 1) per-channel or (3, H, W) per-pixel statistics as a float32 tensor
    broadcastable against the NCHW batch ``like``, on its device."""
    stats = torch.as_tensor(values, dtype=torch.float32, device=like.device)
    if stats.shape in ((3,), (3, 1, 1)):
        return stats.view(1, 3, 1, 1)
    if stats.shape == (3, *like.shape[-2:]):
        return stats.unsqueeze(0)
    raise ValueError(
        f"statistics must have shape (3,) or (3, H, W) = (3, {like.shape[-2]}, {like.shape[-1]}) "
        f"to match the images, got {tuple(stats.shape)}"
    )


def to_float_batch(
    images: Tensor,
    *,
    mean: Sequence[float] | np.ndarray | Tensor,
    std: Sequence[float] | np.ndarray | Tensor | None = None,
    lighting_std: float = 0.0,
    generator: torch.Generator | None = None,
    channels_last: bool = False,
    pca: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """uint8 images -> normalised float32 NCHW batch, computed on ``images.device``.

    ``images``: (N, H, W, 3) as Ray Data delivers it, or (N, 3, H, W); the layout is read from
    which dimension has size 3. Steps, all in [0, 1] pixel units:

    1. divide by 255;
    2. if ``lighting_std > 0``: AlexNet PCA colour augmentation (§3.4, "the standard color
       augmentation in [21]"; sigma = 0.1 there): per image, alpha ~ N(0, lighting_std^2) of
       shape (3,) drawn from ``generator`` (on the generator's device), and
       ``IMAGENET_PCA_EIGVEC @ (alpha * IMAGENET_PCA_EIGVAL)`` is added to every pixel;
    3. subtract ``mean``: (3,) per channel, or (3, H, W) per pixel (the paper's "per-pixel mean
       subtracted", see :func:`mean_image`);
    4. if ``std`` is given, divide by it (the modern per-channel normalisation; not in the paper).

    Pass ``mean``/``std`` (and ``pca``: the eigenvalues and eigenvectors, as :class:`Normalize`
    keeps them) as tensors already on the device to avoid a copy per call, which on CUDA also
    waits for the queued work.
    ``channels_last=True`` returns the logical NCHW tensor in ``torch.channels_last`` memory
    format (no transpose copy from NHWC input).
    """
    if images.dtype != torch.uint8:
        raise TypeError(f"to_float_batch expects uint8 images, got {images.dtype}")
    if images.ndim != 4:
        raise ValueError(f"to_float_batch expects a 4-D batch, got shape {tuple(images.shape)}")
    if lighting_std < 0:
        raise ValueError(f"lighting_std must be >= 0 (0 disables it), got {lighting_std}")
    if images.shape[-1] == 3 and images.shape[1] != 3:
        images = images.permute(0, 3, 1, 2)
    elif not (images.shape[1] == 3 and images.shape[-1] != 3):
        raise ValueError(
            f"cannot tell NHWC from NCHW for shape {tuple(images.shape)}: exactly one of "
            "dimension 1 or 3 must be the 3 colour channels"
        )
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    # Lay out in uint8 (1 byte/value) before the float conversion, which preserves the layout.
    x = images.contiguous(memory_format=memory_format).to(torch.float32).div_(255)
    if lighting_std > 0:
        alpha_device = generator.device if generator is not None else x.device
        alpha = torch.randn(x.shape[0], 3, generator=generator, device=alpha_device)
        alpha = alpha.to(x.device) * lighting_std
        eigval, eigvec = pca if pca is not None else _pca_tensors(x.device)
        rgb_shift = (alpha * eigval) @ eigvec.T  # (N, 3): row n is eigvec @ (alpha_n * eigval)
        x.add_(rgb_shift.view(-1, 3, 1, 1))
    x.sub_(_as_channel_stats(mean, x))
    if std is not None:
        x.div_(_as_channel_stats(std, x))
    return x


def _pca_tensors(device: torch.device) -> tuple[Tensor, Tensor]:
    """ImageNet's RGB eigenvalues (3,) and eigenvectors (3, 3) on ``device``."""
    eigval = torch.tensor(IMAGENET_PCA_EIGVAL, device=device, dtype=torch.float32)
    return eigval, torch.tensor(IMAGENET_PCA_EIGVEC, device=device, dtype=torch.float32)


class Normalize(nn.Module):
    """uint8 images -> the model's input: :func:`to_float_batch` as a module, so the training
    step, evaluation and the served model normalise the same way.

    ``mean``: (3,) per channel or (3, S, S) per pixel (paper §3.4), [0, 1] units; a per-pixel
    mean is bilinearly resized to inputs of another size (10-crop and multi-scale testing).
    ``std``: (3,) or None. ``lighting_std``: PCA colour augmentation, in training mode only.
    ``channels_last``: the output's memory format (GPU training).
    """

    def __init__(
        self,
        mean: Tensor,
        std: Tensor | None = None,
        *,
        lighting_std: float = 0.0,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        mean = torch.as_tensor(mean, dtype=torch.float32)
        self.register_buffer("mean", mean.view(3, 1, 1) if mean.ndim == 1 else mean.clone())
        std = None if std is None else torch.as_tensor(std, dtype=torch.float32).view(3, 1, 1)
        self.register_buffer("std", std)
        self.lighting_std = lighting_std
        self.channels_last = channels_last
        # Kept on the module's device, out of state dicts (constants, not state).
        eigval, eigvec = _pca_tensors(torch.device("cpu"))
        self.register_buffer("pca_eigval", eigval, persistent=False)
        self.register_buffer("pca_eigvec", eigvec, persistent=False)

    def _mean_for(self, height: int, width: int) -> Tensor:
        if self.mean.shape[-2:] in ((1, 1), (height, width)):
            return self.mean
        # Not cached: whole images come in as many sizes as a dataset has; this costs far less
        # than the forward pass it precedes.
        return nn.functional.interpolate(
            self.mean[None], size=(height, width), mode="bilinear", align_corners=False
        )[0]

    def forward(self, images: Tensor) -> Tensor:
        nhwc = images.shape[-1] == 3 and images.shape[1] != 3
        height, width = images.shape[1:3] if nhwc else images.shape[2:4]
        return to_float_batch(
            images,
            mean=self._mean_for(height, width),
            std=self.std,
            lighting_std=self.lighting_std if self.training else 0.0,
            channels_last=self.channels_last,
            pca=(self.pca_eigval, self.pca_eigvec),
        )


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


def _five_crop(images: Tensor, size: int) -> list[Tensor]:
    height, width = images.shape[-2:]
    top = round((height - size) / 2)  # round-half-even, like torchvision's center_crop
    left = round((width - size) / 2)
    return [
        images[..., :size, :size],
        images[..., :size, width - size :],
        images[..., height - size :, :size],
        images[..., height - size :, width - size :],
        images[..., top : top + size, left : left + size],
    ]


def ten_crop(images: Tensor, size: int) -> Tensor:
    """10-crop testing views (§3.4, Krizhevsky et al. 2012): (N, C, H, W) -> (N, 10, C, size, size).

    Order as torchvision's ``TenCrop`` / ``ten_crop``: top-left, top-right, bottom-left,
    bottom-right, centre of the image, then the same five crops of the horizontally flipped image
    (so view 5 is the mirror of view 1, view 6 of view 0). Any dtype and device.
    """
    if images.ndim != 4:
        raise ValueError(f"ten_crop expects (N, C, H, W), got shape {tuple(images.shape)}")
    height, width = images.shape[-2:]
    if not 0 < size <= min(height, width):
        raise ValueError(
            f"ten_crop size {size} must be in 1..{min(height, width)} for {height}x{width} images"
        )
    crops = _five_crop(images, size) + _five_crop(images.flip(-1), size)
    return torch.stack(crops, dim=1)
