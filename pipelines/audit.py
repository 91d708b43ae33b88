"""Audit one encoded image: pass a clean RGB JPEG through, repair what can be repaired, skip the rest.

Real ImageNet copies hold CMYK and grayscale JPEGs, a PNG named .JPEG, and (in copies that went
through other tools) truncated, empty or non-image files; folder datasets add RGBA and palette
PNGs. `audit_image` decides by content, never by file name, and never raises for bad input:

    clean RGB JPEG                  -> the original bytes (still fully decoded once, to catch truncation)
    CMYK, grayscale, RGBA, palette, other modes, PNG or other formats
                                    -> re-encoded RGB JPEG, `repaired` says why (transparency is
                                       composited on white)
    empty, not an image, truncated, larger than max_pixels, undecodable
                                    -> skipped, `skipped` says why, `detail` gives the error

The optional `max_side` downscale (FFCV-style storage at reduced resolution) is recorded in
`resized`, separate from `repaired`, so the audit's repair counts stay counts of real defects and
a downscaled copy of ImageNet does not list a million keys as "repaired".
"""

from __future__ import annotations

import contextlib
import io
import struct
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

SKIP_REASONS = ("empty", "not_an_image", "truncated", "decompression_bomb", "unreadable")
REPAIR_REASONS = ("cmyk", "grayscale", "png", "rgba", "palette", "other_mode", "other_format")

# Pillow's default decompression-bomb limit (Image.MAX_IMAGE_PIXELS): 89.5 megapixels.
DEFAULT_MAX_PIXELS = 89_478_485

_JPEG_FORMATS = ("JPEG", "MPO")  # MPO: a JPEG with extra frames in APP2; decoders read frame one.
_GRAYSCALE_MODES = ("1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N")
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
_IMAGE_SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF8", b"BM", b"II*\x00", b"MM\x00*")
_DECODE_ERRORS = (OSError, EOFError, SyntaxError, ValueError, struct.error, IndexError)


@dataclass(frozen=True)
class AuditResult:
    """What to store for one image, or why not.

    data: RGB JPEG bytes for the shard (the original bytes when they already were a clean RGB
        JPEG and no downscale applied); None when skipped.
    height, width: of `data` in pixels; 0 when skipped.
    repaired: a REPAIR_REASONS value when the image had to be converted; None otherwise.
    skipped: a SKIP_REASONS value when the image is unusable; None otherwise.
    detail: for the audit report: the error or offending size of a skip, the original format,
        mode and size of a re-encoded image.
    resized: True when `max_side` downscaled (and so re-encoded) the image.
    """

    data: bytes | None
    height: int
    width: int
    repaired: str | None
    skipped: str | None
    detail: str = ""
    resized: bool = False


def _skip(reason: str, detail: str) -> AuditResult:
    return AuditResult(data=None, height=0, width=0, repaired=None, skipped=reason, detail=detail)


@contextlib.contextmanager
def _strict_decoding() -> Iterator[None]:
    """Decode with Pillow's truncation check on and its bomb warning muted; restore both after.

    Pillow keeps both as process globals; Ray Data runs one task per worker process, so the
    temporary setting is not seen by concurrent decodes.
    """
    previous = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with warnings.catch_warnings():
            # max_pixels is checked below; Pillow's own hard limit (2x) still raises.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous


def _failure_reason(error: Exception) -> str:
    """'truncated' when the decoder ran out of data, else 'unreadable'."""
    truncated = isinstance(error, EOFError | struct.error) or "truncated" in str(error).lower()
    return "truncated" if truncated else "unreadable"


def _repair_reason(image: Image.Image) -> str | None:
    """Why a decoded image cannot be stored as is; None for an RGB JPEG."""
    if image.mode == "CMYK":
        return "cmyk"
    if image.mode in _GRAYSCALE_MODES:
        return "grayscale"
    if image.mode in ("RGBA", "RGBa"):
        return "rgba"
    if image.mode in ("P", "PA"):
        return "palette"
    if image.mode != "RGB":
        return "other_mode"
    if image.format not in _JPEG_FORMATS:
        return "png" if image.format == "PNG" else "other_format"
    return None


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB version of `image`; transparency is composited on white, 16-bit gray scaled to 8 bits."""
    if image.mode.startswith("I"):
        # 16-bit grayscale (PNG, TIFF): keep the high byte instead of clipping at 255.
        gray = np.clip(np.asarray(image).astype(np.int64) >> 8, 0, 255).astype(np.uint8)
        image = Image.fromarray(gray)
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def audit_image(
    data: bytes,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_side: int | None = None,
    quality: int = 95,
    keep_lossless: bool = False,
) -> AuditResult:
    """Check one encoded image and return RGB JPEG bytes ready for a shard, or why to skip it.

    data: the file's bytes, whatever its name claims.
    max_pixels: images whose header declares more pixels (width x height) are skipped as
        "decompression_bomb" before any pixel is decoded.
    max_side: when set, images whose longer side exceeds it are downscaled (Lanczos) to exactly
        that longer side and re-encoded; smaller images are untouched.
    quality: JPEG quality (1-100) of every re-encoded image.
    keep_lossless: a clean RGB PNG passes through unchanged instead of being re-encoded as JPEG
        (CIFAR-10: its 32x32 images are small and the paper's numbers are on exact pixels).
    """
    if max_pixels < 1:
        raise ValueError(
            f"max_pixels={max_pixels} must be positive: pass e.g. {DEFAULT_MAX_PIXELS}"
        )
    if max_side is not None and max_side < 1:
        raise ValueError(
            f"max_side={max_side} must be positive: pass e.g. 320, or None to keep sizes"
        )
    if not 1 <= quality <= 100:
        raise ValueError(f"quality={quality} is outside 1..100: pass e.g. 95")
    if not data:
        return _skip("empty", "0 bytes")
    data = bytes(data)
    try:
        return _audit(data, max_pixels, max_side, quality, keep_lossless)
    except Exception as error:  # Anything Pillow raises on hostile input is a skip, not a crash.
        return _skip("unreadable", f"{type(error).__name__}: {error}")


def _audit(
    data: bytes, max_pixels: int, max_side: int | None, quality: int, keep_lossless: bool
) -> AuditResult:
    with _strict_decoding():
        try:
            image = Image.open(io.BytesIO(data))  # Reads the header only.
        except Image.DecompressionBombError as error:
            return _skip("decompression_bomb", str(error))
        except UnidentifiedImageError:
            if data.startswith(_IMAGE_SIGNATURES):
                return _skip(
                    "unreadable", "starts like an image file but its header cannot be parsed"
                )
            return _skip("not_an_image", f"no known image format; starts with {data[:8]!r}")
        except _DECODE_ERRORS as error:
            return _skip(_failure_reason(error), f"{type(error).__name__}: {error}")
        with image:
            width, height = image.size
            if width * height > max_pixels:
                detail = f"header declares {width}x{height} = {width * height} pixels > max_pixels={max_pixels}"
                return _skip("decompression_bomb", detail)
            try:
                image.load()
            except _DECODE_ERRORS as error:
                return _skip(_failure_reason(error), f"{type(error).__name__}: {error}")
            repaired = _repair_reason(image)
            if keep_lossless and repaired == "png" and image.mode == "RGB":
                repaired = None
            resize = max_side is not None and max(width, height) > max_side
            if repaired is None and not resize:
                return AuditResult(
                    data=data, height=height, width=width, repaired=None, skipped=None
                )
            fmt, mode = image.format, image.mode
            rgb = _to_rgb(image)
    if resize:
        scale = max_side / max(width, height)
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        rgb = rgb.resize(size, Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    # Small images keep full-resolution chroma (4:4:4): 4:2:0 on a 32x32 image halves the colour
    # resolution of what little there is. Large ones use libjpeg's default 4:2:0 (faster decode).
    subsampling = 0 if min(rgb.size) <= 64 else 2
    rgb.save(buffer, format="JPEG", quality=quality, subsampling=subsampling)
    return AuditResult(
        data=buffer.getvalue(),
        height=rgb.height,
        width=rgb.width,
        repaired=repaired,
        skipped=None,
        detail=f"{fmt} {mode} {width}x{height}",
        resized=resize,
    )
