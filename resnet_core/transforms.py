"""The device side of the image transforms (He et al., CVPR 2016, §3.4): float work on the
training device — ``/255``, PCA colour augmentation, mean subtraction, optional per-channel std
division (:class:`Normalize`) — the batched device decode of planned crops
(:func:`decode_jpeg_crops`) and 10-crop testing views. Only uint8 crosses the host-to-device
link. The CPU side (decode, crop, flip in the Ray Data tasks) is :mod:`resnet_core.cpu_transforms`.

Randomness is explicit: device transforms take a ``torch.Generator``; the same seed gives
identical output. Float statistics (means, stds, PCA eigenvalues) are in [0, 1] units, i.e. for
images divided by 255.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from resnet_core.cpu_transforms import Box

# resample_crops pads ragged images with torch.nested's strided layout (the jagged one holds
# one ragged dimension, images have two); its "prototype" warning would print once per process.
warnings.filterwarnings("ignore", message="The PyTorch API of nested tensors is in prototype")

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
    # Imported here: torchvision.io costs ~2 s to import, and only device decode calls this.
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
