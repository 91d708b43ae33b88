"""manifest.json: the table of contents of a prepared dataset, written last by resnet-prepare.

Its presence means the dataset is complete. It names the classes in label order, every shard of
every split with its row count, byte size and sha256, the image encoding, the training split's
pixel statistics (per-channel mean/std and the per-pixel mean image of paper §3.4/§4.2), and the
audit report (which images were repaired or skipped, and why). Readers and training jobs open a
dataset through :func:`read_manifest` and never list folders.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow.fs as pafs

from pipelines import storage

__all__ = [
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "Manifest",
    "ManifestError",
    "ShardInfo",
    "SplitInfo",
    "encode_manifest",
    "load_mean_image",
    "parse_manifest",
    "read_manifest",
    "verify_shards",
    "write_manifest",
]

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"


class ManifestError(ValueError):
    """A missing or unusable manifest; the message is one line naming the location and the fix."""


@dataclass(frozen=True)
class ShardInfo:
    """One Parquet shard: ``path`` relative to the dataset root, its rows, size and sha256."""

    path: str
    num_rows: int
    num_bytes: int
    sha256: str


@dataclass(frozen=True)
class SplitInfo:
    """One split: total rows and its shards in order."""

    num_rows: int
    shards: tuple[ShardInfo, ...]


@dataclass(frozen=True)
class Manifest:
    """Read-only view of a manifest.json.

    root: absolute URI of the dataset folder (local path or ``s3://bucket/prefix``).
    classes: class ids in label order; class_names: human-readable names, same order.
    pixel_mean_rgb / pixel_std_rgb: per-channel statistics of the training split, pixel values
        scaled to [0, 1]; None when the dataset has no training split.
    mean_image_size: side in pixels of the per-pixel mean image (None without one).
    image_max_side: longer side images were re-encoded to, or None when kept at source size.
    checksum: sha256 of the manifest's bytes; it identifies this exact dataset.
    raw: the parsed JSON, for fields without an attribute (audit report, source, ...).
    """

    root: str
    dataset: str
    classes: tuple[str, ...]
    class_names: tuple[str, ...]
    splits: dict[str, SplitInfo]
    image_max_side: int | None
    image_quality: int
    pixel_mean_rgb: tuple[float, float, float] | None
    pixel_std_rgb: tuple[float, float, float] | None
    mean_image_size: int | None
    checksum: str
    raw: dict[str, Any]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def split(self, split: str) -> SplitInfo:
        """The named split; ManifestError listing the available ones when absent."""
        if split not in self.splits:
            raise ManifestError(
                f"split {split!r} is not in the dataset at {self.root} — "
                f"choose one of {sorted(self.splits)}"
            )
        return self.splits[split]

    def num_rows(self, split: str) -> int:
        return self.split(split).num_rows

    def shard_uris(self, split: str) -> list[str]:
        """Absolute URIs (local paths or ``s3://``) of the split's shards, in manifest order."""
        return [storage.join(self.root, shard.path) for shard in self.split(split).shards]

    @property
    def mean_image_uri(self) -> str | None:
        """Absolute URI of mean_image.npy, or None when the dataset has no training split."""
        mean_image = self.raw.get("mean_image")
        return storage.join(self.root, mean_image["path"]) if mean_image else None


def encode_manifest(data: dict[str, Any]) -> bytes:
    """The canonical bytes of a manifest dict (UTF-8 JSON, 2-space indent, trailing newline)."""
    return (json.dumps(data, indent=2, ensure_ascii=False) + "\n").encode()


def parse_manifest(data: bytes, root: str) -> Manifest:
    """Validate manifest bytes found at ``root`` and return the view; ManifestError when invalid."""
    where = storage.join(storage.redact(root), MANIFEST_NAME)
    try:
        raw = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ManifestError(f"{where} is not valid JSON ({e}) — re-run resnet-prepare") from None
    if not isinstance(raw, dict):
        raise ManifestError(f"{where} is not a JSON object — re-run resnet-prepare")
    version = raw.get("format_version")
    if version != FORMAT_VERSION:
        raise ManifestError(
            f"{where} has format_version {version!r}; this code reads version {FORMAT_VERSION} — "
            "re-run resnet-prepare with this version of the code"
        )
    try:
        splits = {
            name: SplitInfo(
                num_rows=int(split["num_rows"]),
                shards=tuple(
                    ShardInfo(s["path"], int(s["num_rows"]), int(s["bytes"]), str(s["sha256"]))
                    for s in split["shards"]
                ),
            )
            for name, split in raw["splits"].items()
        }
        classes = tuple(str(c) for c in raw["classes"])
        class_names = tuple(str(c) for c in raw["class_names"])
        image = raw["image"]
        mean_image = raw.get("mean_image")
        manifest = Manifest(
            root=root,
            dataset=str(raw["dataset"]),
            classes=classes,
            class_names=class_names,
            splits=splits,
            image_max_side=image["max_side"],
            image_quality=int(image["quality"]),
            pixel_mean_rgb=_rgb(raw.get("pixel_mean_rgb")),
            pixel_std_rgb=_rgb(raw.get("pixel_std_rgb")),
            mean_image_size=int(mean_image["size"]) if mean_image else None,
            checksum=hashlib.sha256(data).hexdigest(),
            raw=raw,
        )
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ManifestError(
            f"{where} is malformed ({type(e).__name__}: {e}) — re-run resnet-prepare"
        ) from None
    if len(class_names) != len(classes):
        raise ManifestError(
            f"{where} has {len(class_names)} class names for {len(classes)} classes"
        )
    for name, split in splits.items():
        if split.num_rows != sum(s.num_rows for s in split.shards):
            raise ManifestError(
                f"{where}: split {name!r} rows do not add up over its shards — re-run resnet-prepare"
            )
    return manifest


def read_manifest(uri: str, filesystem: pafs.FileSystem | None = None) -> Manifest:
    """Open the dataset at ``uri`` (its folder, or the manifest.json inside it).

    ``filesystem``: a pyarrow filesystem to read through (e.g. an S3FileSystem with a custom
    endpoint); by default it is derived from ``uri`` and the environment (see pipelines.storage).
    """
    root = storage.absolute_uri(uri)
    if root.endswith("/" + MANIFEST_NAME):
        root = root[: -len(MANIFEST_NAME) - 1]
    if filesystem is None:
        filesystem, root_path = storage.resolve(root)
    else:
        root_path = storage.fs_path(root)
    path = storage.join(root_path, MANIFEST_NAME)
    if not storage.exists(filesystem, path):
        raise ManifestError(
            f"no {MANIFEST_NAME} at {storage.redact(root)} — run resnet-prepare with "
            f"--out {storage.redact(root)} first (or finish an interrupted run by re-running it)"
        )
    return parse_manifest(storage.read_bytes(filesystem, path), root)


def verify_shards(manifest: Manifest, splits: Sequence[str], *, sha256: bool = False) -> None:
    """Every shard of ``splits`` is there with the manifest's byte size (one listing per folder
    of shards: cheap, also on S3) and, with ``sha256``, its checksum (reads every byte, in
    parallel). ManifestError naming the first bad shard, where it is and the fix."""
    fs, root_path = storage.resolve(manifest.root)
    shards = [shard for split in splits for shard in manifest.split(split).shards]
    paths = [storage.join(root_path, shard.path) for shard in shards]
    sizes: dict[str, int] = {}
    for folder in sorted({path.rpartition("/")[0] for path in paths}):
        selector = pafs.FileSelector(folder, allow_not_found=True)
        sizes.update((info.path, info.size) for info in fs.get_file_info(selector))
    for shard, path in zip(shards, paths, strict=True):
        size = sizes.get(path)
        if size != shard.num_bytes:
            found = "is missing" if size is None else f"is {size} bytes"
            _bad_shard(manifest, shard, f"{found}, the manifest says {shard.num_bytes}")
    if sha256:
        with ThreadPoolExecutor(max_workers=8) as pool:
            digests = list(pool.map(lambda path: _sha256(fs, path), paths))
        for shard, digest in zip(shards, digests, strict=True):
            if digest != shard.sha256:
                _bad_shard(
                    manifest, shard, "has other bytes than the manifest's sha256", delete=True
                )


def _sha256(fs: pafs.FileSystem, path: str) -> str:
    digest = hashlib.sha256()
    with fs.open_input_stream(path) as f:
        while chunk := f.read(8 * 2**20):
            digest.update(chunk)
    return digest.hexdigest()


def _bad_shard(manifest: Manifest, shard: ShardInfo, problem: str, *, delete: bool = False) -> None:
    root = storage.redact(manifest.root)
    fix = "delete it and re-run" if delete else "re-run"
    raise ManifestError(
        f"shard {shard.path} of {root} {problem}: the dataset changed or a copy was cut short "
        f"— {fix} resnet-prepare with --out {root} (it rewrites missing and cut-short shards)"
    )


def write_manifest(fs: pafs.FileSystem, root_path: str, data: dict[str, Any]) -> str:
    """Validate ``data`` and write it atomically as ``root_path``/manifest.json; return its sha256."""
    encoded = encode_manifest(data)
    parse_manifest(encoded, root_path)
    storage.write_bytes(fs, storage.join(root_path, MANIFEST_NAME), encoded)
    return hashlib.sha256(encoded).hexdigest()


def load_mean_image(manifest: Manifest, filesystem: pafs.FileSystem | None = None) -> np.ndarray:
    """The training split's per-pixel mean image: float32 (3, S, S), values in [0, 1]."""
    uri = manifest.mean_image_uri
    if uri is None:
        raise ManifestError(
            f"the dataset at {storage.redact(manifest.root)} has no mean image (no training "
            "split) — use per-channel normalisation or prepare a training split"
        )
    if filesystem is None:
        filesystem, path = storage.resolve(uri)
    else:
        path = storage.fs_path(uri)
    array = np.load(io.BytesIO(storage.read_bytes(filesystem, path)), allow_pickle=False)
    size = manifest.mean_image_size
    if array.shape != (3, size, size) or array.dtype != np.float32:
        raise ManifestError(
            f"{storage.redact(uri)} holds {array.dtype} {array.shape}, expected float32 "
            f"(3, {size}, {size}) — re-run resnet-prepare"
        )
    return array


def _rgb(value: Any) -> tuple[float, float, float] | None:
    if value is None:
        return None
    r, g, b = (float(v) for v in value)
    return (r, g, b)
