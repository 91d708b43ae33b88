"""Decode only the part of a JPEG that a crop needs (libjpeg-turbo partial decoding).

A training crop covers 15-60% of a typical ImageNet photo, yet a plain decoder (Pillow's, and so
torchvision's loaders) decodes every pixel first. libjpeg-turbo can do less: skip the inverse
DCT, upsampling and colour conversion of the columns left and right of the crop
(``jpeg_crop_scanline``) and of the rows above it (``jpeg_skip_scanlines``), and stop entropy
decoding after its last row. Together with DCT-domain scaling (1/2, 1/4, 1/8, as Pillow's draft
mode) this is what :func:`decode_crop` does, through the small C extension ``_resnet_jpeg``
(``resnet_core/csrc/jpegregion.c``) over the libjpeg-turbo that Pillow itself loads; the
extension then resamples the crop with Pillow's own BILINEAR algorithm, on packed RGB.

The result equals Pillow's full decode followed by Pillow's resample, within one uint8 level
(Pillow rounds the box to float32 in whole-image coordinates, this in the region's): the region
decoded has a margin of a few pixels beyond the filter's reach, so the pixels the filter reads
are the full decode's pixels (tests/test_jpeg_region.py checks this). Files the extension cannot
decode (not JPEG, CMYK, 12-bit) or that make libjpeg warn (corrupt, truncated) are left to
Pillow by the caller, so bad input behaves exactly as it does there.

Without a C compiler at install time the extension is missing and :func:`available` is false:
everything still works, through Pillow, only slower; :func:`status` says which decoder runs.
"""

from __future__ import annotations

import ctypes.util
import functools
import math
from pathlib import Path
from types import ModuleType

import numpy as np

# DCT-domain scale factors libjpeg-turbo decodes with SIMD, largest first (Pillow's draft set).
SCALE_DENOMS = (8, 4, 2)
# Extra pixels around the filter's reach: fancy chroma upsampling reads one chroma sample (two
# pixels) beyond each output pixel, and the region's own edge rows and columns are upsampled
# as if they were the image edge.
MARGIN = 4


def draft_scale(box: tuple[float, float, float, float], out_size: tuple[int, int]) -> int:
    """The largest of 8, 4, 2 (else 1) by which a JPEG can be DCT-scaled while ``box`` still
    spans ``out_size`` = (width, height) pixels, so the resample never upsamples because of it."""
    left, upper, right, lower = box
    max_scale = min((right - left) / out_size[0], (lower - upper) / out_size[1])
    return next((s for s in SCALE_DENOMS if s <= max_scale), 1)


def _libjpeg_candidates() -> list[str]:
    """The libjpeg-turbo Pillow bundles (Linux wheels: ``pillow.libs``, macOS: ``PIL/.dylibs``),
    then the system's ``libjpeg``."""
    import PIL

    pil_dir = Path(PIL.__file__).resolve().parent
    paths = sorted(str(p) for p in (pil_dir.parent / "pillow.libs").glob("libjpeg*.so*"))
    paths += sorted(str(p) for p in (pil_dir / ".dylibs").glob("libjpeg*.dylib"))
    system = ctypes.util.find_library("jpeg")
    if system:
        paths.append(system)
    return paths


@functools.cache
def _decoder() -> tuple[ModuleType | None, str]:
    """The loaded extension (or None) and a one-line description of the decoder in use."""
    try:
        import _resnet_jpeg
    except ImportError as e:
        return None, (
            f"Pillow (the _resnet_jpeg extension is not built: {e}; reinstall resnet-ray on a "
            "machine with a C compiler for region decoding)"
        )
    errors = []
    for path in _libjpeg_candidates():
        try:
            _resnet_jpeg.load(path)
        except OSError as e:
            errors.append(str(e))
            continue
        return _resnet_jpeg, f"libjpeg-turbo region decoding ({path})"
    return None, "Pillow (" + ("; ".join(errors) or "no libjpeg shared library found") + ")"


def available() -> bool:
    """Whether region decoding is in use (else every decode goes through Pillow)."""
    return _decoder()[0] is not None


def status() -> str:
    """One line naming the JPEG decoder in use and, for Pillow, why."""
    return _decoder()[1]


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) of a JPEG that :func:`decode_crop` can decode; None for anything else
    (other formats, CMYK/YCCK, 12-bit, a broken header, no extension): use Pillow for those."""
    decoder = _decoder()[0]
    if decoder is None:
        return None
    try:
        header = decoder.header(data)
    except ValueError:
        return None  # Pillow reports the broken header in its own words
    return None if header is None else (header[0], header[1])


def decode_crop(
    data: bytes,
    width: int,
    height: int,
    box: tuple[float, float, float, float],
    size: int,
    *,
    flip: bool,
    draft: bool = True,
) -> np.ndarray | None:
    """``box`` (PIL convention, original pixels) of a ``width`` x ``height`` JPEG resampled to
    ``size`` x ``size`` with Pillow's antialiased bilinear filter (then mirrored if ``flip``),
    decoding only the region the filter reads. ``draft``: decode at the largest of 1/8, 1/4,
    1/2 scale at which the box still spans ``size`` pixels, as Pillow's draft mode
    (``cpu_transforms.draft_for_box``).

    Returns (size, size, 3) uint8 RGB (writable), or None when libjpeg warned or failed (corrupt
    data): decode with Pillow then, which judges the file as it always does. Call only for data
    :func:`jpeg_size` accepted.
    """
    decoder = _decoder()[0]
    if decoder is None:
        raise RuntimeError(f"region decoding is unavailable: {status()}")
    scale = draft_scale(box, (size, size)) if draft else 1
    left, upper, right, lower = box
    # libjpeg's 1/scale output has ceil(size / scale) pixels; pixel i covers original pixels
    # [i * scale, (i + 1) * scale), so coordinates map by 1/scale (as Pillow's draft box says).
    scaled_width, scaled_height = -(-width // scale), -(-height // scale)
    left, upper, right, lower = left / scale, upper / scale, right / scale, lower / scale
    # Pillow's bilinear filter reads max(1, box / size) pixels on each side of a sample centre.
    reach_x = math.ceil(max((right - left) / size, 1.0)) + MARGIN
    reach_y = math.ceil(max((lower - upper) / size, 1.0)) + MARGIN
    x0 = min(max(math.floor(left) - reach_x, 0), scaled_width - 1)
    y0 = min(max(math.floor(upper) - reach_y, 0), scaled_height - 1)
    x1 = max(min(math.ceil(right) + reach_x, scaled_width), x0 + 1)
    y1 = max(min(math.ceil(lower) + reach_y, scaled_height), y0 + 1)
    try:
        pixels = decoder.decode_crop(
            data, scale, (x0, y0, x1, y1), (left, upper, right, lower), (size, size), flip
        )
    except ValueError:
        return None  # a fatal libjpeg error: Pillow reports the file in its own words
    if pixels is None:
        return None
    return np.frombuffer(pixels, dtype=np.uint8).reshape(size, size, 3)
