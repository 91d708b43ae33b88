"""Writing a dataset: labelled images -> Parquet shards + manifest.json, in parallel on Ray.

The library behind ``resnet-prepare`` (pipelines.prepare, its command line) and every command
that makes a dataset of its own (the demo's synthetic shards, the benchmarks' shards).

What it does: list the source; give every split a deterministic shard plan (a seeded shuffle so
classes mix, then consecutive chunks of ``shard_rows``); write the missing shards in parallel
with Ray Data, each task reading, auditing (repairing CMYK/grayscale/PNG/... into RGB JPEG,
skipping empty/truncated/undecodable files) and writing one shard atomically plus a progress
marker; then aggregate the audit report and the training split's pixel statistics from all
markers, write ``mean_image.npy`` and finally ``manifest.json``. Running it again resumes:
finished shards are kept (shards that skipped images are redone, so fixed files count).
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import hashlib
import io
import json
import math
import random
import sys
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from PIL import Image

from pipelines import manifest as manifest_lib
from pipelines import storage
from pipelines.audit import REPAIR_REASONS, SKIP_REASONS, audit_image
from pipelines.sources import (
    SourceItem,
    SourceListing,
    list_cifar10,
    list_folder,
    list_imagenet,
    list_synthetic,
    read_item,
)
from pipelines.synthetic import SyntheticSpec

STATS_SPLIT = "train"  # pixel statistics and the mean image describe the training split only
PROGRESS_DIR = "_progress"
MEAN_IMAGE_NAME = "mean_image.npy"
PIL_MAX_PIXELS = 89_478_485  # PIL's own decompression-bomb threshold (Image.MAX_IMAGE_PIXELS)
SHARD_SCHEMA = pa.schema(
    [
        ("image", pa.binary()),  # encoded RGB JPEG
        ("label", pa.int32()),
        ("key", pa.string()),  # source-relative path, unique across the dataset
        ("height", pa.int32()),
        ("width", pa.int32()),
    ]
)
# (rows per shard, rows per row group, mean-image side): ImageNet-sized JPEGs average ~110 KB,
# so 1024 rows make ~110 MB shards read in ~7 MB row groups, one per 64-row decode chunk (a
# chunk decodes its row groups: 256-row ones cost ~0.06 ms more per image); CIFAR's are ~2 KB.
_LARGE_IMAGES = (1024, 64, 224)
_SMALL_IMAGES = (2500, 500, 32)


class PrepareError(ValueError):
    """A bad setting or location; the message is one line naming the value and the fix."""


@dataclass(frozen=True)
class PrepareConfig:
    """Everything one dataset write does (:func:`prepare_config` fills in the defaults).

    dataset: imagenet | cifar10 | folder | synthetic.
    out: local folder or s3://bucket/prefix; src: the source (None for synthetic). Absolute.
    val_labels: ImageNet validation labels (devkit or Kaggle CSV) when not found under src.
    synthetic: the generated dataset (synthetic only).
    shard_rows / row_group_rows: rows per Parquet file / per row group.
    mean_size: side in pixels of the per-pixel mean image (shorter side resized, centre crop).
    val_size: CIFAR-10 training images held out as "val" (0: val is the test batch).
    seed: shard-plan shuffle (and CIFAR hold-out / synthetic content).
    max_side: longer side to re-encode images to (FFCV-style), None keeps the source size.
    quality: JPEG quality of re-encoded images. max_pixels: larger images are skipped as bombs.
    max_skipped: skip budget, a count ("10") or a fraction of all images ("0.001").
    s3_endpoint: custom S3 endpoint. address / num_cpus: which Ray to use.
    """

    dataset: str
    out: str
    src: str | None
    val_labels: str | None
    synthetic: SyntheticSpec | None
    shard_rows: int
    row_group_rows: int
    mean_size: int
    val_size: int = 0
    seed: int = 0
    max_side: int | None = None
    quality: int = 95
    max_pixels: int = PIL_MAX_PIXELS
    max_skipped: str = "0.001"
    s3_endpoint: str | None = None
    address: str | None = None
    num_cpus: int | None = None


def prepare_config(
    dataset: str,
    out: str,
    *,
    src: str | None = None,
    val_labels: str | None = None,
    synthetic: SyntheticSpec | None = None,
    shard_rows: int | None = None,
    row_group_rows: int | None = None,
    mean_size: int | None = None,
    **options: Any,
) -> PrepareConfig:
    """A :class:`PrepareConfig` with resnet-prepare's defaults: locations made absolute, and the
    shard size, row-group size and mean-image side chosen by image size. ``options``: the other
    fields of PrepareConfig. PrepareError for a source given as a URI."""
    small = synthetic.image_kind == "cifar" if synthetic else dataset == "cifar10"
    rows, group, side = _SMALL_IMAGES if small else _LARGE_IMAGES
    for flag, uri in (("--src", src), ("--val-labels", val_labels)):
        if "://" in (uri or ""):
            raise PrepareError(
                f"{flag} {storage.redact(uri)} is a URI; sources are read from local paths — "
                "copy or mount the data on every node first"
            )
    return PrepareConfig(
        dataset=dataset,
        out=storage.absolute_uri(out),
        src=storage.absolute_uri(src) if src else None,
        val_labels=storage.absolute_uri(val_labels) if val_labels else None,
        synthetic=synthetic,
        shard_rows=rows if shard_rows is None else shard_rows,
        row_group_rows=group if row_group_rows is None else row_group_rows,
        mean_size=side if mean_size is None else mean_size,
        **options,
    )


@dataclass(frozen=True)
class ShardSpec:
    """One shard of the plan: which items go into which file, and a fingerprint for resume.

    fingerprint: sha256 over the items' keys and labels, the shard's place in the plan and every
    setting that changes the shard's bytes; a marker with another fingerprint is stale.
    with_stats: whether this shard contributes pixel statistics (training split).
    """

    split: str
    index: int
    num_shards: int
    items: tuple[SourceItem, ...]
    fingerprint: str
    with_stats: bool

    @property
    def path(self) -> str:
        return f"{self.split}/shard-{self.index:05d}-of-{self.num_shards:05d}.parquet"

    @property
    def marker_path(self) -> str:
        return f"{PROGRESS_DIR}/{self.split}-{self.index:05d}.json"

    @property
    def mean_path(self) -> str:
        return f"{PROGRESS_DIR}/{self.split}-{self.index:05d}.mean.npy"


def skip_budget(max_skipped: str, num_images: int) -> int:
    """How many skipped images are acceptable: ``"10"`` means 10, ``"0.001"`` means 0.1 %."""
    try:
        if any(c in max_skipped for c in ".eE"):
            fraction = float(max_skipped)
            if not 0 <= fraction < 1:
                raise ValueError(max_skipped)
            return math.floor(fraction * num_images)
        count = int(max_skipped)
        if count < 0:
            raise ValueError(max_skipped)
        return count
    except ValueError:
        raise PrepareError(
            f"--max-skipped {max_skipped!r} is neither a count (10) nor a fraction in [0, 1) "
            "(0.001)"
        ) from None


def check_locations(config: PrepareConfig) -> None:
    """Fail before any work when the source cannot be read or the output cannot be written."""
    for flag, uri in (("--src", config.src), ("--val-labels", config.val_labels)):
        if uri is not None:
            try:
                storage.check_readable(uri)
            except storage.StorageError as e:
                raise PrepareError(f"{flag}: {e}") from None
    try:
        storage.check_writable(config.out, s3_endpoint=config.s3_endpoint)
    except storage.StorageError as e:
        raise PrepareError(f"--out: {e}") from None


def list_source(config: PrepareConfig) -> SourceListing:
    """The listing of the configured source (SourceError when it is incomplete)."""
    if config.dataset == "imagenet":
        return list_imagenet(_path(config.src), val_labels=_path(config.val_labels))
    if config.dataset == "cifar10":
        return list_cifar10(_path(config.src), val_size=config.val_size, seed=config.seed)
    if config.dataset == "folder":
        return list_folder(_path(config.src))
    return list_synthetic(config.synthetic)


def _path(uri: str | None) -> Path | None:
    return Path(uri) if uri is not None else None


def describe_config(config: PrepareConfig) -> str:
    """The config as printed at start: one ``name = value`` line each, credentials stripped."""
    lines = [f"resnet-prepare {config.dataset}"]
    for name, value in dataclasses.asdict(config).items():
        if (
            name == "dataset"
            or value is None
            or (name == "val_size" and config.dataset != "cifar10")
        ):
            continue
        if isinstance(value, str):
            value = storage.redact(value)
        lines.append(f"  {name} = {value}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Shard plan and resume
# ---------------------------------------------------------------------------------------------


def plan_shards(
    splits: Mapping[str, Sequence[SourceItem]],
    *,
    shard_rows: int,
    seed: int,
    settings: Mapping[str, Any],
) -> list[ShardSpec]:
    """Deterministic shards for every split: a seeded shuffle, then near-equal consecutive chunks.

    The shuffle mixes classes inside every shard, so a reader that shuffles files and keeps a
    modest buffer still sees all classes. Chunk sizes differ by at most one row.
    ``settings`` (everything else that changes a shard's bytes) enters each fingerprint.
    """
    specs = []
    for split, items in splits.items():
        order = list(items)
        random.Random(f"{seed}/{split}").shuffle(order)
        num_shards = math.ceil(len(order) / shard_rows)
        for index in range(num_shards):
            chunk = tuple(
                order[index * len(order) // num_shards : (index + 1) * len(order) // num_shards]
            )
            identity = {
                "split": split,
                "index": index,
                "num_shards": num_shards,
                "keys": [item.key for item in chunk],
                "labels": [item.label for item in chunk],
                "settings": dict(settings),
            }
            fingerprint = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
            specs.append(
                ShardSpec(split, index, num_shards, chunk, fingerprint, split == STATS_SPLIT)
            )
    return specs


def finished_marker(fs: pafs.FileSystem, root: str, spec: ShardSpec) -> dict[str, Any] | None:
    """The marker of ``spec`` when its shard is complete and current, else None.

    Complete: the marker exists with this plan's fingerprint, the Parquet file exists with the
    marker's byte size and row count, the mean-image part exists (training split), and no image
    was skipped (those shards are redone so a file fixed since is picked up).
    """
    marker_path = storage.join(root, spec.marker_path)
    if not storage.exists(fs, marker_path):
        return None
    marker = json.loads(storage.read_bytes(fs, marker_path))
    if marker.get("fingerprint") != spec.fingerprint or any(marker["skipped"].values()):
        return None
    shard_path = storage.join(root, spec.path)
    info = fs.get_file_info(shard_path)
    if info.type != pafs.FileType.File or info.size != marker["bytes"]:
        return None
    with fs.open_input_file(shard_path) as f:
        if pq.read_metadata(f).num_rows != marker["num_rows"]:
            return None
    if spec.with_stats and not storage.exists(fs, storage.join(root, spec.mean_path)):
        return None
    return marker


def _parallel(fn: Any, values: Iterable[Any]) -> list[Any]:
    # Markers and footers are small objects: on S3 the time is round trips, so overlap them.
    with ThreadPoolExecutor(max_workers=16) as pool:
        return list(pool.map(fn, values))


# ---------------------------------------------------------------------------------------------
# One shard (runs in a Ray task; plain function, testable without Ray)
# ---------------------------------------------------------------------------------------------


def write_shard(
    spec: ShardSpec,
    *,
    out_uri: str,
    s3_endpoint: str | None,
    max_pixels: int,
    max_side: int | None,
    quality: int,
    row_group_rows: int,
    mean_size: int,
    keep_lossless: bool = False,
) -> dict[str, Any]:
    """Read, audit and write one shard, then its progress marker (last); return the marker.

    Bad images never raise: an unreadable or unusable file is recorded under its skip reason
    and left out; a repaired one is recorded under its repair reason and written as RGB JPEG.
    For the training split the marker also carries exact integer pixel sums (per channel, of
    values 0..255) and the shard's mean image (float32 (3, mean_size, mean_size) in [0, 1]).
    """
    fs, root = storage.resolve(out_uri, s3_endpoint=s3_endpoint)
    columns: dict[str, list[Any]] = {name: [] for name in SHARD_SCHEMA.names}
    repaired: dict[str, list[str]] = {}
    skipped: dict[str, list[dict[str, str]]] = {}
    stats = _PixelStats(mean_size) if spec.with_stats else None
    num_resized = 0
    for item in spec.items:
        try:
            data = read_item(item)
        except OSError as e:
            skipped.setdefault("unreadable", []).append({"key": item.key, "detail": str(e)})
            continue
        result = audit_image(
            data,
            max_pixels=max_pixels,
            max_side=max_side,
            quality=quality,
            keep_lossless=keep_lossless,
        )
        if result.skipped is not None:
            skipped.setdefault(result.skipped, []).append(
                {"key": item.key, "detail": result.detail}
            )
            continue
        if result.repaired is not None:
            repaired.setdefault(result.repaired, []).append(item.key)
        num_resized += result.resized
        row = (result.data, item.label, item.key, result.height, result.width)
        for name, value in zip(SHARD_SCHEMA.names, row, strict=True):
            columns[name].append(value)
        if stats is not None:
            stats.add(result.data)
    shard_bytes = _parquet_bytes(columns, row_group_rows)
    storage.write_bytes(fs, storage.join(root, spec.path), shard_bytes)
    marker: dict[str, Any] = {
        "fingerprint": spec.fingerprint,
        "path": spec.path,
        "num_items": len(spec.items),
        "num_rows": len(columns["key"]),
        "bytes": len(shard_bytes),
        "sha256": hashlib.sha256(shard_bytes).hexdigest(),
        "repaired": repaired,
        "skipped": skipped,
        "resized": num_resized,
    }
    if stats is not None:
        storage.write_bytes(fs, storage.join(root, spec.mean_path), _npy_bytes(stats.mean_image()))
        marker["pixels"] = stats.marker(spec.mean_path)
    storage.write_bytes(fs, storage.join(root, spec.marker_path), json.dumps(marker).encode())
    return marker


def _parquet_bytes(columns: dict[str, list[Any]], row_group_rows: int) -> bytes:
    buffer = pa.BufferOutputStream()
    pq.write_table(
        pa.table(columns, schema=SHARD_SCHEMA),
        buffer,
        row_group_size=row_group_rows,
        # JPEG bytes do not compress; dictionaries and min/max statistics of image bytes would
        # only bloat the footer.
        compression="none",
        use_dictionary=["label"],
        write_statistics=["label", "key", "height", "width"],
    )
    return buffer.getvalue().to_pybytes()


class _PixelStats:
    """A training shard's pixel statistics: exact integer per-channel sums and sums of squares
    (values 0..255), and the sum of its images resized and centre-cropped to ``mean_size``."""

    def __init__(self, mean_size: int) -> None:
        self.sum = np.zeros(3, dtype=np.int64)
        self.sumsq = np.zeros(3, dtype=np.int64)
        self.count = self.images = 0
        self.mean_sum = np.zeros((3, mean_size, mean_size), dtype=np.float64)

    def add(self, encoded: bytes) -> None:
        rgb = np.asarray(Image.open(io.BytesIO(encoded)).convert("RGB"))
        self.sum += rgb.sum(axis=(0, 1), dtype=np.int64)
        self.sumsq += np.square(rgb, dtype=np.int64).sum(axis=(0, 1))
        self.count += rgb.shape[0] * rgb.shape[1]
        self.images += 1
        self.mean_sum += resize_center_crop(rgb, self.mean_sum.shape[1]).transpose(2, 0, 1) / 255.0

    def mean_image(self) -> np.ndarray:
        return (self.mean_sum / max(self.images, 1)).astype(np.float32)

    def marker(self, mean_path: str) -> dict[str, Any]:
        return {
            "count": self.count,
            "sum": self.sum.tolist(),
            "sumsq": self.sumsq.tolist(),
            "mean_image": mean_path,
        }


def resize_center_crop(rgb: np.ndarray, size: int) -> np.ndarray:
    """Resize so the shorter side is ``size`` (bilinear, antialiased), then centre-crop a square.

    The same geometry as the evaluation crop, so the mean image lines up with network inputs.
    """
    height, width = rgb.shape[:2]
    if (height, width) != (size, size):
        scale = size / min(height, width)
        new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
        image = Image.fromarray(rgb).resize((new_w, new_h), Image.Resampling.BILINEAR)
        left, top = (new_w - size) // 2, (new_h - size) // 2
        rgb = np.asarray(image.crop((left, top, left + size, top + size)))
    return rgb


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _write_shard_row(row: dict[str, Any], *, spec_refs: list[Any], **options: Any) -> dict:
    """Ray Data map function: row {"shard": i} -> summary of writing spec_refs[i]."""
    import ray

    spec = ray.get(spec_refs[row["shard"]])
    marker = write_shard(spec, **options)
    return {
        "path": spec.path,
        "num_rows": marker["num_rows"],
        "skipped": sum(len(v) for v in marker["skipped"].values()),
    }


def run_shards(todo: Sequence[ShardSpec], **options: Any) -> None:
    """Write ``todo`` in parallel with Ray Data (one CPU per shard task), printing progress.

    Tasks receive the shard specs through the object store and the output location as a URI;
    ``options`` are write_shard's keyword arguments.
    """
    import ray

    spec_refs = [ray.put(spec) for spec in todo]
    rows = [{"shard": i} for i in range(len(todo))]
    dataset = ray.data.from_items(rows, override_num_blocks=len(rows)).map(
        functools.partial(_write_shard_row, spec_refs=spec_refs, **options), num_cpus=1
    )
    for done, row in enumerate(dataset.iter_rows(), start=1):
        skipped = f", {row['skipped']} skipped" if row["skipped"] else ""
        print(
            f"shards done {done}/{len(todo)}: {row['path']} ({row['num_rows']} rows{skipped})",
            flush=True,
        )


# ---------------------------------------------------------------------------------------------
# Aggregation: audit report, pixel statistics, manifest
# ---------------------------------------------------------------------------------------------


def audit_report(markers: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The manifest's audit section: keys per repair/skip reason (sorted) and the counts.

    ``resized`` (images downscaled to --max-side) is a count only: it is a choice, not a defect.
    """
    repaired: dict[str, list[str]] = {}
    skipped: dict[str, list[dict[str, str]]] = {}
    for marker in markers:
        for reason, keys in marker["repaired"].items():
            repaired.setdefault(reason, []).extend(keys)
        for reason, entries in marker["skipped"].items():
            skipped.setdefault(reason, []).extend(entries)
    repair_reasons = [*REPAIR_REASONS, *sorted(set(repaired) - set(REPAIR_REASONS))]
    skip_reasons = [*SKIP_REASONS, *sorted(set(skipped) - set(SKIP_REASONS))]
    return {
        "repaired": {r: sorted(repaired[r]) for r in repair_reasons if r in repaired},
        "skipped": {
            r: sorted(skipped[r], key=lambda e: e["key"]) for r in skip_reasons if r in skipped
        },
        "counts": {
            "images": sum(m["num_items"] for m in markers),
            "written": sum(m["num_rows"] for m in markers),
            "repaired": {r: len(repaired.get(r, [])) for r in repair_reasons},
            "skipped": {r: len(skipped.get(r, [])) for r in skip_reasons},
            "resized": sum(m["resized"] for m in markers),
        },
    }


def format_audit(report: Mapping[str, Any], *, shown: int = 3) -> str:
    """Screen summary of an audit report: totals, then each reason with its first keys."""
    counts = report["counts"]
    lines = [
        f"audit: {counts['images']} images, {counts['written']} written, "
        f"{sum(counts['repaired'].values())} repaired, {sum(counts['skipped'].values())} skipped, "
        f"{counts['resized']} resized"
    ]
    for kind in ("repaired", "skipped"):
        for reason, entries in report[kind].items():
            keys = [e if isinstance(e, str) else e["key"] for e in entries]
            more = f", ... (+{len(keys) - shown} more)" if len(keys) > shown else ""
            lines.append(f"  {kind} {reason}: {len(keys)} ({', '.join(keys[:shown])}{more})")
    return "\n".join(lines)


def pixel_statistics(
    fs: pafs.FileSystem, root: str, markers: Sequence[Mapping[str, Any]], mean_size: int
) -> tuple[list[float], list[float], np.ndarray] | None:
    """(per-channel mean, per-channel std, mean image) of the training shards; values in [0, 1].

    Channel statistics weight every pixel equally (larger images count more); the mean image
    weights every image equally after resize + centre crop to ``mean_size``. None when the
    training split wrote no image.
    """
    with_rows = [m for m in markers if m["num_rows"] > 0]
    num_pixels = sum(m["pixels"]["count"] for m in with_rows)
    if num_pixels == 0:
        return None
    total = np.sum([m["pixels"]["sum"] for m in with_rows], axis=0, dtype=np.float64)
    total_sq = np.sum([m["pixels"]["sumsq"] for m in with_rows], axis=0, dtype=np.float64)
    mean = total / (255.0 * num_pixels)
    std = np.sqrt(np.maximum(total_sq / (255.0**2 * num_pixels) - mean**2, 0.0))

    def weighted_mean(marker: Mapping[str, Any]) -> np.ndarray:
        path = storage.join(root, marker["pixels"]["mean_image"])
        part = np.load(io.BytesIO(storage.read_bytes(fs, path)), allow_pickle=False)
        return part.astype(np.float64) * marker["num_rows"]

    mean_image = np.zeros((3, mean_size, mean_size), dtype=np.float64)
    for part in _parallel(weighted_mean, with_rows):
        mean_image += part
    mean_image /= sum(m["num_rows"] for m in with_rows)
    return mean.tolist(), std.tolist(), mean_image.astype(np.float32)


def build_manifest(
    config: PrepareConfig,
    listing: SourceListing,
    specs: Sequence[ShardSpec],
    markers: Sequence[Mapping[str, Any]],
    stats: tuple[list[float], list[float], np.ndarray] | None,
) -> dict[str, Any]:
    """The manifest.json content (see pipelines.manifest); ``markers`` parallel ``specs``."""
    splits: dict[str, dict[str, Any]] = {s: {"num_rows": 0, "shards": []} for s in listing.splits}
    for spec, marker in zip(specs, markers, strict=True):
        splits[spec.split]["num_rows"] += marker["num_rows"]
        splits[spec.split]["shards"].append(
            {k: marker[k] for k in ("path", "num_rows", "bytes", "sha256")}
        )
    if config.dataset == "synthetic":
        source = "synthetic " + json.dumps(dataclasses.asdict(config.synthetic), sort_keys=True)
    else:
        source = storage.redact(config.src)
    return {
        "format_version": manifest_lib.FORMAT_VERSION,
        "dataset": listing.dataset,
        "created_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "source": source,
        "classes": list(listing.classes),
        "class_names": list(listing.class_names),
        "splits": splits,
        "image": {
            "format": "png" if _lossless(config) else "jpeg",
            "max_side": config.max_side,
            "quality": config.quality,
            "max_pixels": config.max_pixels,
        },
        "pixel_mean_rgb": stats[0] if stats else None,
        "pixel_std_rgb": stats[1] if stats else None,
        "mean_image": {"path": MEAN_IMAGE_NAME, "size": config.mean_size, "split": STATS_SPLIT}
        if stats
        else None,
        "prepare": {
            "seed": config.seed,
            "shard_rows": config.shard_rows,
            "row_group_rows": config.row_group_rows,
            "val_size": config.val_size,
            "max_skipped": config.max_skipped,
        },
        "audit": audit_report(markers),
    }


def _lossless(config: PrepareConfig) -> bool:
    """CIFAR-10 keeps its exact pixels as PNG (read_item yields PNG); everything else is JPEG."""
    return config.dataset == "cifar10"


def _same_dataset(old: Mapping[str, Any] | None, new: Mapping[str, Any]) -> bool:
    if old is None:
        return False
    return {**old, "created_utc": None} == {**new, "created_utc": None}


# ---------------------------------------------------------------------------------------------
# The whole dataset
# ---------------------------------------------------------------------------------------------


def write_dataset(config: PrepareConfig) -> int:
    """resnet-prepare's whole run: check the locations, list the source, print the settings,
    write; the exit status of :func:`prepare`. PrepareError, SourceError or StorageError (one
    line) before anything is written."""
    check_locations(config)
    listing = list_source(config)
    print(describe_config(config), flush=True)
    return prepare(config, listing)


def prepare(config: PrepareConfig, listing: SourceListing) -> int:
    """Write the shards, statistics and manifest of ``listing`` to ``config.out``; the exit
    status: 0 done, 1 a shard write failed or more images were skipped than allowed."""
    fs, root = storage.resolve(config.out, s3_endpoint=config.s3_endpoint)
    specs = plan_shards(
        listing.splits, shard_rows=config.shard_rows, seed=config.seed, settings=_settings(config)
    )
    finished = _parallel(functools.partial(finished_marker, fs, root), specs)
    missing = [i for i, marker in enumerate(finished) if marker is None]
    num_images = sum(len(items) for items in listing.splits.values())
    print(
        f"{num_images} images in {len(specs)} shards: {len(specs) - len(missing)} already "
        f"written, {len(missing)} to write",
        flush=True,
    )
    manifest_path = storage.join(root, manifest_lib.MANIFEST_NAME)
    old_manifest = None
    if storage.exists(fs, manifest_path):
        old_manifest = json.loads(storage.read_bytes(fs, manifest_path))
    if missing:
        if old_manifest is not None:
            # The manifest vouches for complete shards; withdraw it while they change.
            fs.delete_file(manifest_path)
        if not _write_missing(config, [specs[i] for i in missing]):
            return 1
        markers = _parallel(
            lambda i: json.loads(storage.read_bytes(fs, storage.join(root, specs[i].marker_path))),
            missing,
        )
        for i, marker in zip(missing, markers, strict=True):
            finished[i] = marker
    return _finish(config, listing, specs, finished, old_manifest)


def _settings(config: PrepareConfig) -> dict[str, Any]:
    """Everything besides the items that changes a shard's bytes (part of its fingerprint)."""
    return {
        "format_version": manifest_lib.FORMAT_VERSION,
        # Synthetic keys do not name the generator's settings; its images depend on them.
        "synthetic": dataclasses.asdict(config.synthetic) if config.synthetic else None,
        "max_pixels": config.max_pixels,
        "max_side": config.max_side,
        "quality": config.quality,
        "row_group_rows": config.row_group_rows,
        "mean_size": config.mean_size,
    }


def _write_missing(config: PrepareConfig, todo: Sequence[ShardSpec]) -> bool:
    """Write ``todo`` on Ray (attached, or a local Ray for the duration); False when a shard
    task failed (said on stderr; finished shards are kept)."""
    import ray

    from pipelines.job.session import local_cpus, ray_session

    cpus = config.num_cpus or local_cpus(0)
    with ray_session(config.address, num_cpus=cpus):
        try:
            run_shards(
                todo,
                out_uri=config.out,
                s3_endpoint=config.s3_endpoint,
                max_pixels=config.max_pixels,
                max_side=config.max_side,
                quality=config.quality,
                row_group_rows=config.row_group_rows,
                mean_size=config.mean_size,
                keep_lossless=_lossless(config),
            )
        except ray.exceptions.RayError as e:
            cause = getattr(e, "cause", None) or e
            print(
                f"resnet-prepare: writing shards failed ({type(cause).__name__}: {cause}); "
                "finished shards are kept — fix the cause and re-run the same command",
                file=sys.stderr,
            )
            return False
    return True


def _finish(
    config: PrepareConfig,
    listing: SourceListing,
    specs: Sequence[ShardSpec],
    finished: Sequence[Mapping[str, Any]],
    old_manifest: Mapping[str, Any] | None,
) -> int:
    """The audit against the skip budget, the pixel statistics and the manifest (written last)."""
    fs, root = storage.resolve(config.out, s3_endpoint=config.s3_endpoint)
    report = audit_report(finished)
    print(format_audit(report), flush=True)
    _note_stray_files(fs, root, specs, listing.splits)
    budget = skip_budget(config.max_skipped, report["counts"]["images"])
    num_skipped = sum(report["counts"]["skipped"].values())
    if num_skipped > budget:
        lines = [
            f"resnet-prepare: {num_skipped} images skipped, over the budget of {budget} "
            f"(--max-skipped {config.max_skipped}); manifest.json not written:"
        ]
        for reason, entries in report["skipped"].items():
            lines += [f"  {e['key']}: {reason} ({e['detail']})" for e in entries]
        lines.append(
            "fix or remove these files and re-run the same command (finished shards are kept), "
            "or raise --max-skipped"
        )
        print("\n".join(lines), file=sys.stderr)
        return 1
    train_markers = [m for s, m in zip(specs, finished, strict=True) if s.with_stats]
    stats = pixel_statistics(fs, root, train_markers, config.mean_size)
    if stats is not None:
        storage.write_bytes(fs, storage.join(root, MEAN_IMAGE_NAME), _npy_bytes(stats[2]))
    manifest = build_manifest(config, listing, specs, finished, stats)
    if _same_dataset(old_manifest, manifest):
        # Identical content keeps its creation time, so the checksum still names this dataset.
        manifest["created_utc"] = old_manifest["created_utc"]
    checksum = manifest_lib.write_manifest(fs, root, manifest)
    rows = {split: info["num_rows"] for split, info in manifest["splits"].items()}
    print(f"wrote {storage.join(storage.redact(config.out), manifest_lib.MANIFEST_NAME)}")
    print(f"  rows per split: {rows}; classes: {len(listing.classes)}; sha256 {checksum}")
    if stats is not None:
        mean = ", ".join(f"{v:.4f}" for v in stats[0])
        std = ", ".join(f"{v:.4f}" for v in stats[1])
        print(f"  pixel mean (RGB) [{mean}], std [{std}]")
    return 0


def _note_stray_files(
    fs: pafs.FileSystem,
    root: str,
    specs: Sequence[ShardSpec],
    splits: Mapping[str, Sequence[SourceItem]],
) -> None:
    """Tell the user about files in the split folders that this plan does not use."""
    planned = {storage.join(root, spec.path) for spec in specs}
    stray = [
        path
        for split in splits
        for path in storage.list_files(fs, storage.join(root, split))
        if path not in planned
    ]
    if stray:
        print(
            f"note: {len(stray)} files in the split folders are not part of this dataset "
            f"(an earlier run with other settings?), e.g. {stray[0]} — readers use manifest.json "
            "and ignore them; delete them to save space"
        )
