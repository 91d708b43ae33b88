"""The decode tasks of the streaming reader (:mod:`pipelines.data`): what runs in the Ray Data
tasks anywhere in the cluster — read a chunk's rows from its shard, decode, crop and augment
them (or, for device decode, plan their crops) — and :class:`DecodeOptions`, the one object
that travels from the job down to them. The design (plans, shuffling, what a task costs, bad
images, device and hybrid decode) is in :mod:`pipelines.data`'s docstring.

No torch here: a decode process loads this module, numpy, pyarrow, Pillow and
:mod:`resnet_core.cpu_transforms` only, ~2 CPU-s and ~300 MB of private memory less per
process than with torch (BENCHMARKS.md, "Decode processes without torch"); the device path's
``device`` is kept as a string for that reason. tests/test_data.py holds it to that (a
pickled task runs in a fresh process without torch).
"""

from __future__ import annotations

import io
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from pipelines import storage
from resnet_core.cpu_transforms import (
    AUGMENT_MODES,
    BoxSampler,
    CenterCrop,
    ImageAugment,
    RandomResizedCrop,
    ScaleAugment,
    decode_batch,
    decode_crop,
    pad_crop_flip,
    random_affine,
    sample_crop,
)

if TYPE_CHECKING:
    from pipelines.data import EpochPlan

# paper: scale augmentation of §3.4 (shorter side S in [256, 480], random 224 crop, flip).
# inception: RandomResizedCrop + flip (modern recipes). cifar: §4.2, 4-pixel pad, 32 crop, flip.
# cifar_tutorial: the popular tutorial recipe's pad-crop-flip plus random rotation (±15°) and zoom.
TRAIN_MODES = AUGMENT_MODES
# eval_center: shorter side -> eval_resize, centre image_size crop (§3.4 single-crop numbers).
# eval_full: the central eval_resize square, uncropped, as input to ten_crop(batch, image_size).
EVAL_MODES = ("eval_center", "eval_full")
MODES = TRAIN_MODES + EVAL_MODES
COLUMNS = ["image", "label", "key"]
CIFAR_PAD = 4  # §4.2: "4 pixels are padded on each side"
# The modes whose decode can move to the Train worker's device (a crop box per row).
DEVICE_DECODE_MODES = ("paper", "inception", "eval_center", "eval_full")
# What the worker-side decoder takes (MPO: a JPEG with extra frames, frame one is decoded);
# other rows are decoded in the task, as on the CPU path.
_DEVICE_FORMATS = ("JPEG", "MPO")
_DEVICE_PIL_MODES = ("RGB", "L")
# A complete JPEG ends with its end-of-image marker. One that does not (truncated, or with
# trailing bytes) is decoded in the task, so PIL judges it as on the CPU path instead of the
# device decoder, whose handling of truncation need not match.
_JPEG_END = b"\xff\xd9"


@dataclass(frozen=True)
class DecodeOptions:
    """How a rank's rows become uint8 batches — one object from the job down to the tasks.

    mode: a training mode (:data:`TRAIN_MODES`: the augmentation) or an evaluation mode
    (:data:`EVAL_MODES`). image_size: the output side (eval_full: ``eval_resize``).
    eval_resize: evaluation's shorter side before the centre crop (default ``image_size`` x
    256 / 224, the paper's 256 for 224).
    num_cpus: CPUs per decode task; concurrency: concurrent tasks (None: Ray decides).
    map_batch_rows: rows that share one random generator; task_rows: rows per chunk, the unit
    of the epoch's order, a multiple of map_batch_rows (default :func:`default_task_rows`:
    about 16 MB of output); chunks_per_task: chunks one decode task decodes in turn, one block
    per task (execution only: the rows, order and pixels are the same for any value; None:
    :func:`chunks_per_task` for the cluster the dataset is built on; always 1 with a
    shuffle buffer, whose mixing depends on the blocks).
    device: decode on this device (a torch.device or its name, kept as the name) in the
    iterating process (the Train worker's GPU; see :mod:`pipelines.data`) instead of in the
    tasks; None: in the tasks.
    prefer_nodes: node labels (key, value) the decode tasks go to first (CPU-only decode nodes);
    when none has a free CPU, or the cluster has none, any node takes them.
    prefetch_batches, shuffle_buffer (rows of Ray's local shuffle buffer, training only; None:
    off), pin_memory (pinned host batches for ``.to(cuda, non_blocking=True)``): iteration.
    augment: per-image policies after the crop (auto-augment, random erasing; training, decoded
    in the tasks).
    cpu_share: with ``device``, the share of map batches the tasks still decode (hybrid
    decode, :meth:`decodes_on_cpu`); 0: the device decodes every JPEG.
    """

    mode: str
    image_size: int
    eval_resize: int | None = None
    num_cpus: float = 1.0
    concurrency: int | None = None
    map_batch_rows: int = 64
    task_rows: int | None = None
    chunks_per_task: int | None = None
    device: str | None = None
    prefer_nodes: tuple[tuple[str, str], ...] = ()
    prefetch_batches: int = 2
    shuffle_buffer: int | None = None
    pin_memory: bool = False
    augment: ImageAugment = field(default_factory=ImageAugment)
    cpu_share: float = 0.0

    def __post_init__(self) -> None:
        if not 0 <= self.cpu_share <= 1 or (self.cpu_share and self.device is None):
            raise ValueError(
                f"cpu_share {self.cpu_share} must be in [0, 1], and 0 without a decode device"
            )
        if self.mode not in MODES:
            raise ValueError(f"mode {self.mode!r} is unknown: use one of {MODES}")
        if self.device is not None and self.mode not in DEVICE_DECODE_MODES:
            raise ValueError(
                f"mode {self.mode!r} cannot decode on the Train worker's device (its 32x32 PNGs "
                "have no crop box to plan); decode it in the Ray Data tasks (device None), or "
                f"use one of {DEVICE_DECODE_MODES}"
            )
        if self.shuffle_buffer is not None and not self.train:
            raise ValueError("shuffle_buffer is for training; pass None to evaluate")
        if self.augment and (not self.train or self.device is not None):
            raise ValueError("per-image augment policies run in training decode tasks only")
        if self.image_size < 1:
            raise ValueError(f"image_size {self.image_size} must be positive")
        if self.chunks_per_task is not None and self.chunks_per_task < 1:
            raise ValueError(f"chunks_per_task {self.chunks_per_task} must be positive (or None)")
        if self.shuffle_buffer and (self.chunks_per_task or 1) > 1:
            raise ValueError(
                f"chunks_per_task {self.chunks_per_task} with a shuffle buffer: its mixing "
                "depends on the blocks, so it takes one chunk per task (pass None or 1)"
            )
        # Resolved defaults (the dataclass is frozen: set through object.__setattr__).
        eval_resize = self.eval_resize or round(self.image_size * 256 / 224)
        if eval_resize < self.image_size:
            raise ValueError(f"eval_resize {eval_resize} must be >= image_size {self.image_size}")
        object.__setattr__(self, "eval_resize", eval_resize)
        if self.device is not None:  # a torch.device or its name: kept as the name (no torch)
            object.__setattr__(self, "device", str(self.device))
        task_rows = self.task_rows
        if task_rows is None and self.map_batch_rows >= 1:
            task_rows = default_task_rows(self.crop_size, self.map_batch_rows)
        if (
            self.map_batch_rows < 1
            or task_rows is None
            or task_rows < 1
            or (task_rows % self.map_batch_rows)
        ):
            raise ValueError(
                f"task_rows {task_rows} must be a positive multiple of map_batch_rows "
                f"{self.map_batch_rows}"
            )
        object.__setattr__(self, "task_rows", task_rows)

    @property
    def train(self) -> bool:
        return self.mode in TRAIN_MODES

    def decodes_on_cpu(self, keys: Sequence[str]) -> bool:
        """Hybrid decode: whether the task decodes this map batch (keys ``keys``) itself and
        ships pixels, rather than planning its crops for the device. Drawn from the keys, so a
        map batch goes the same way on every run and resume; the crops are the same either
        way (the same draws), only the decoder differs."""
        if not self.cpu_share:
            return False
        return zlib.crc32("\0".join(keys).encode()) < self.cpu_share * 2**32

    @property
    def crop_size(self) -> int:
        """The side of the images that come out."""
        return self.eval_resize if self.mode == "eval_full" else self.image_size

    def check_plan(self, plan: EpochPlan) -> None:
        """A training mode needs a training plan, an evaluation mode an evaluation plan."""
        if self.train != plan.train:
            kind = "a training" if plan.train else "an evaluation"
            raise ValueError(
                f"mode {self.mode!r} does not fit {kind} plan: use one of "
                f"{TRAIN_MODES if plan.train else EVAL_MODES}"
            )


TASK_BYTES = 16 * 2**20  # decoded bytes a decode task aims at (its output, in the object store)
MAX_TASK_ROWS = 512


def default_task_rows(side: int, map_batch_rows: int) -> int:
    """Rows per decode task for ``side`` x ``side`` outputs: whole map batches, about
    :data:`TASK_BYTES` of decoded output.

    Measured with ``resnet-bench memory`` on an 80 MiB store: 512-row tasks of 224x224 crops
    (77 MB of output each) spilled every epoch, also with their output cut into 16 MB blocks (a
    running task keeps producing); 64-row tasks (9.6 MB) never did. Small images (CIFAR: 3 KB)
    keep 512-row tasks, whose fixed cost (opening the shard, reading its footer) then spreads
    over more rows.
    """
    batches = max(1, TASK_BYTES // (side * side * 3 * map_batch_rows))
    return min(batches * map_batch_rows, max(map_batch_rows, MAX_TASK_ROWS))


def _sampler(options: DecodeOptions) -> BoxSampler | None:
    """The crop of the mode; None for the CIFAR modes (fixed-size images, pad-and-crop instead)."""
    size, mode = options.image_size, options.mode
    if mode == "paper":
        # §3.4 samples S in [256, 480] for 224 crops; other crop sizes keep those proportions.
        return ScaleAugment(
            min_size=round(size * 256 / 224), max_size=round(size * 480 / 224), size=size
        )
    if mode == "inception":
        return RandomResizedCrop(size=size)
    if mode in EVAL_MODES:
        return CenterCrop(resize=options.eval_resize, size=options.crop_size)
    return None


class ShardUnreadable(Exception):
    """A shard that is missing or no longer parses mid-run (it passed the pre-start check): a
    restarted worker would read the same bytes, so the run ends (pipelines.job.trainer)."""


def _unreadable(uri: str, problem: str) -> ShardUnreadable:
    root = storage.redact(uri.rstrip("/").rsplit("/", 2)[0])  # <root>/<split>/<shard>
    problem = " ".join(problem.split())  # one line: wrappers add theirs after the first
    return ShardUnreadable(
        f"shard {storage.redact(uri)} {problem}: the dataset changed after the run started — "
        f"restore it, or delete it and re-run resnet-prepare with --out {root} (it rewrites "
        "missing and cut-short shards), then run the command again"
    )


def unreadable_shard(error: BaseException | None) -> ShardUnreadable | None:
    """The ShardUnreadable behind an error (its first line: Ray Data appends its retry advice),
    through the wrappers of Ray Data's task errors (RayTaskError's ``cause``) and Ray Train's
    errors (a worker's: ``_base_exc`` of ``UserExceptionWithTraceback``, which has no public
    accessor; the controller's: ``ControllerError.controller_failure``)."""
    for _ in range(16):  # wrapper chains are short; never loop on a cycle
        if error is None:
            return None
        if type(error) is ShardUnreadable:
            return ShardUnreadable(str(error).strip().splitlines()[0])
        error = (
            getattr(error, "cause", None)
            or getattr(error, "_base_exc", None)
            or getattr(error, "controller_failure", None)
            or error.__cause__
            or error.__context__
        )
    return None


def read_rows(uri: str, start: int, stop: int) -> pa.Table:
    """Rows ``[start, stop)`` of a shard (image, label, key), reading only the row groups needed.
    ShardUnreadable when the shard is gone, does not parse or holds too few rows; other storage
    errors (a network error, say) propagate as they are: a restart may get past them."""
    try:
        return _read_row_groups(uri, start, stop)
    except FileNotFoundError:
        raise _unreadable(uri, "is missing") from None
    except pa.ArrowInvalid as e:
        raise _unreadable(uri, f"does not parse ({e})") from None


def _read_row_groups(uri: str, start: int, stop: int) -> pa.Table:
    fs, path = storage.resolve(uri)
    # A local shard is memory-mapped and read in this thread: read() into fresh buffers and
    # Arrow's reader threads cost ~0.1 ms of CPU per full-size image (issue 15, BENCHMARKS.md).
    local = not storage.is_s3(uri)
    with pa.memory_map(path) if local else fs.open_input_file(path) as f:
        shard = pq.ParquetFile(f)
        metadata = shard.metadata
        if stop > metadata.num_rows:
            raise _unreadable(
                uri, f"has {metadata.num_rows} rows, the manifest promised at least {stop}"
            )
        batches = []
        offset = 0
        for group in range(metadata.num_row_groups):
            rows = metadata.row_group(group).num_rows
            if max(start, offset) < min(stop, offset + rows):
                batches += _group_rows(shard, group, offset, start, stop, threads=not local)
            offset += rows
    return pa.Table.from_batches(batches)


READ_BATCH_ROWS = 16  # rows Arrow decodes at a time from a row group


def _group_rows(
    shard: pq.ParquetFile, group: int, offset: int, start: int, stop: int, *, threads: bool
) -> list[pa.RecordBatch]:
    """Rows ``[start, stop)`` of the shard from its row group ``group`` (first row ``offset``),
    decoding the group only up to ``stop``: a chunk is often a quarter of a row group, and the
    rest cost ~0.1 ms per full-size image in page faults and copies (BENCHMARKS.md)."""
    batches = []
    at = offset
    for batch in shard.iter_batches(
        READ_BATCH_ROWS, row_groups=[group], columns=COLUMNS, use_threads=threads
    ):
        lo, hi = max(start, at), min(stop, at + batch.num_rows)
        if lo < hi:
            batches.append(batch.slice(lo - at, hi - lo))
        at += batch.num_rows
        if at >= stop:
            break
    return batches


def _decode_rows(
    datas: Sequence[bytes],
    *,
    mode: str,
    sampler: BoxSampler | None,
    image_size: int,
    rng: np.random.Generator,
    out: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, str]:
    """Decode and augment; returns (uint8 (N, S, S, 3) images, bool (N,) bad, first error).

    ``datas``: encoded images (any bytes-like object). ``out``: the array to decode into (a new
    one when None). Bad rows are left black; the caller replaces or drops them.
    """
    out_size = image_size if mode != "eval_full" else sampler.size
    images = np.empty((len(datas), out_size, out_size, 3), dtype=np.uint8) if out is None else out
    bad = np.zeros(len(datas), dtype=bool)
    first_error = ""
    for i, data in enumerate(datas):
        try:
            if sampler is None:
                pixels = decode_batch([data])[0]
                if pixels.shape != images.shape[1:]:
                    raise ValueError(
                        f"image is {pixels.shape[1]}x{pixels.shape[0]}, mode {mode!r} with "
                        f"image_size {image_size} needs {image_size}x{image_size} images"
                    )
                images[i] = pixels
            else:
                flip = None if mode in TRAIN_MODES else False
                images[i] = decode_crop(data, sampler, rng, flip=flip)
        except Exception as e:  # any failure of one image's bytes makes it a bad image
            bad[i] = True
            images[i] = 0
            first_error = first_error or f"{type(e).__name__}: {e}"
    return images, bad, first_error


def _plan_rows(
    datas: Sequence[bytes],
    *,
    mode: str,
    sampler: BoxSampler,
    rng: np.random.Generator,
) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray, str]:
    """The device path's task side: read each header, draw the crop, decode nothing.

    Returns (object (N,) bytes: the encoded image, or for ``raw`` rows the (S, S, 3) uint8
    pixels of a crop decoded here; {"box": float64 (N, 4), "flip": bool (N,), "raw": bool (N,)};
    bool (N,) bad; first error). The draws are :func:`_decode_rows`' draws: row by row, once
    the header parses, the box then (training) the flip, from the same generator.
    """
    images = np.full(len(datas), b"", dtype=object)
    boxes = np.zeros((len(datas), 4))
    flips = np.zeros(len(datas), dtype=bool)
    raw = np.zeros(len(datas), dtype=bool)
    bad = np.zeros(len(datas), dtype=bool)
    first_error = ""
    flip = None if mode in TRAIN_MODES else False
    for i, data in enumerate(datas):
        try:
            with Image.open(io.BytesIO(data)) as img:
                on_device = (
                    img.format in _DEVICE_FORMATS
                    and img.mode in _DEVICE_PIL_MODES
                    and data.endswith(_JPEG_END)
                )
                if on_device:
                    box, flips[i] = sample_crop(sampler, rng, *img.size, flip=flip)
            if on_device:
                images[i], boxes[i] = data, box
            else:
                images[i], raw[i] = decode_crop(data, sampler, rng, flip=flip).tobytes(), True
        except Exception as e:  # as in _decode_rows: the row is bad, the task goes on
            bad[i] = True
            first_error = first_error or f"{type(e).__name__}: {e}"
    return images, {"box": boxes, "flip": flips, "raw": raw}, bad, first_error


def _raw_rows(images: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Crops decoded in the task, in the device path's columns (see :func:`_plan_rows`)."""
    out = np.empty(len(images), dtype=object)
    out[:] = [image.tobytes() for image in images]
    crops = {"box": np.zeros((len(images), 4)), "flip": np.zeros(len(images), dtype=bool)}
    return out, crops | {"raw": np.ones(len(images), dtype=bool)}


def _decode_chunks(
    chunks: dict[str, np.ndarray], *, options: DecodeOptions, seed: int, epoch: int
) -> Iterator[dict[str, np.ndarray]]:
    """Ray Data task: a batch of chunks ``{"uri", "start", "stop", "base", "copy"}`` (see
    :class:`ShardRange`), decoded in turn -> decoded rows.

    Output columns: image uint8 (N, S, S, 3), label int64, key str, row int64 (the row's id in
    the split, see :class:`ShardRange`), bad bool (a replaced copy in training, a row to drop in
    evaluation). The CPU path yields one block for the whole task: its map batches decode into
    slices of one array (see "What a task costs" above). Device decode (``options.device``):
    image is bytes (see :func:`_plan_rows`), plus box float64 (N, 4), flip bool and raw bool,
    one block per map batch; bad rows stay as they are, for the worker to replace or drop.
    """
    size, rows = options.crop_size, int(np.sum(chunks["stop"] - chunks["start"]))
    out = np.empty((rows, size, size, 3), np.uint8) if options.device is None else None
    parts, at = [], 0
    for i in range(len(chunks["uri"])):
        chunk = {name: column[i] for name, column in chunks.items()}
        into = None if out is None else out[at:]
        for part in _decode_chunk(chunk, options=options, seed=seed, epoch=epoch, out=into):
            if out is None:
                yield part
            else:
                parts.append(part)
        at += int(chunk["stop"] - chunk["start"])
    if out is not None:
        names = [name for name in parts[0] if name != "image"]
        yield {"image": out} | {name: np.concatenate([p[name] for p in parts]) for name in names}


def _decode_chunk(
    chunk: dict[str, Any],
    *,
    options: DecodeOptions,
    seed: int,
    epoch: int,
    out: np.ndarray | None,
) -> Iterator[dict[str, np.ndarray]]:
    """One chunk of a decode task (see :func:`_decode_chunks`) -> its decoded map batches, in
    task order; the CPU path decodes them into the leading rows of ``out``."""
    uri, start, stop, copy = (
        str(chunk["uri"]),
        int(chunk["start"]),
        int(chunk["stop"]),
        int(chunk["copy"]),
    )
    table = read_rows(uri, start, stop)
    order = np.arange(stop - start)
    if options.train:  # a fresh order of the chunk's rows every epoch ("Shuffling" above)
        order = _task_order(uri, start, stop, seed=seed, epoch=epoch, copy=copy)
    # The rows in task order by index (Table.take would copy every encoded image); the CPU path
    # decodes from zero-copy views of the Arrow buffers.
    keys = np.asarray(table.column("key").to_pylist(), dtype=object)[order]
    labels = table.column("label").to_numpy().astype(np.int64)[order]
    column = table.column("image")
    datas = column.to_pylist() if options.device is not None else _binary_views(column)
    datas = [datas[i] for i in order]
    row_ids = int(chunk["base"]) + start + order
    sampler = _sampler(options)
    # Map batches: fixed slices of the (permuted) chunk, map_batch_rows each and cut at the
    # multiples of map_batch_rows from the shard start, so their random draws depend on the
    # plan, not on which node decodes them or which chunks share a task.
    for lo, hi in aligned_pieces(start, stop, options.map_batch_rows):
        part = slice(lo - start, hi - start)
        batch_keys = keys[part].tolist()
        key = [seed, epoch, zlib.crc32("\0".join(batch_keys).encode())] + ([copy] if copy else [])
        rng = np.random.default_rng(key)  # a repeat of the rows gets draws of its own
        where = f"rows {lo}..{hi - 1} of {storage.redact(uri)}"
        into = None if out is None else out[part]
        decoded = _decode_map_batch(
            datas[part], labels[part], batch_keys, options, sampler, rng, where, out=into
        )
        yield {**decoded, "row": row_ids[part]}


def _binary_views(column: pa.ChunkedArray) -> list[memoryview]:
    """Each value of a binary column as a zero-copy view of its Arrow buffer."""
    views: list[memoryview] = []
    for chunk in column.chunks:
        _, offsets, values = chunk.buffers()
        width = 8 if pa.types.is_large_binary(chunk.type) else 4
        ends = np.frombuffer(offsets, f"<i{width}", len(chunk) + 1, chunk.offset * width).tolist()
        data = memoryview(values if values is not None else b"")
        views += [data[a:b] for a, b in pairwise(ends)]
    return views


def _decode_map_batch(
    datas: Sequence[bytes | memoryview],
    labels: np.ndarray,
    keys: list[str],
    options: DecodeOptions,
    sampler: BoxSampler | None,
    rng: np.random.Generator,
    where: str,
    out: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """One map batch of a decode task (see :func:`_decode_chunk`); ``where`` names its rows.
    ``labels`` is modified in place; the CPU path decodes into ``out`` (a new array if None)."""
    mode = options.mode
    crops: dict[str, np.ndarray] = {}  # the device path's per-row crop columns
    if options.device is not None and not options.decodes_on_cpu(keys):
        images, crops, bad, error = _plan_rows(datas, mode=mode, sampler=sampler, rng=rng)
    else:
        images, bad, error = _decode_rows(
            datas, mode=mode, sampler=sampler, image_size=options.image_size, rng=rng, out=out
        )
        if options.device is not None:  # hybrid decode: this map batch travels as pixels
            images, crops = _raw_rows(images)
    keys_out = np.asarray(keys, dtype=object)
    # The device path replaces bad rows on the worker, where decode failures show up too.
    if options.train and bad.any() and options.device is None:
        good = np.flatnonzero(~bad)
        if len(good) == 0:
            raise ValueError(
                f"all {len(keys)} images in {where} failed to decode ({error}): check mode "
                f"{mode!r} / image_size {options.image_size} against the dataset, or re-run "
                "resnet-prepare, which audits every image"
            )
        # Copies of good rows of the same batch keep the step count exact.
        substitutes = good[np.arange(int(bad.sum())) % len(good)]
        images[bad], labels[bad] = images[substitutes], labels[substitutes]
        keys_out[bad] = keys_out[substitutes]
    if mode in ("cifar", "cifar_tutorial"):
        images = pad_crop_flip(images, rng, pad=CIFAR_PAD)
    if mode == "cifar_tutorial":
        images = random_affine(images, rng)
    if options.augment:
        images = options.augment(images, rng)
    if out is not None and images is not out:  # the CIFAR crops and the policies make new arrays
        out[...] = images
        images = out
    return {"image": images, "label": labels, "key": keys_out, "bad": bad, **crops}


def _task_order(
    uri: str, start: int, stop: int, *, seed: int, epoch: int, copy: int = 0
) -> np.ndarray:
    """The permutation of a training task's rows ``[start, stop)`` of shard ``uri`` in ``epoch``
    (keyed by the shard's file name, so a dataset copied elsewhere keeps its orders; and by the
    repeat, ``copy``, under repeated augmentation)."""
    name = zlib.crc32(uri.rstrip("/").rpartition("/")[2].encode())
    key = [seed, epoch, name, start] + ([copy] if copy else [])
    return np.random.default_rng(key).permutation(stop - start)


def aligned_pieces(start: int, stop: int, step: int, offset: int = 0) -> list[tuple[int, int]]:
    """``[start, stop)`` cut at ``offset`` plus the multiples of ``step``."""
    first = ((start - offset) // step + 1) * step + offset
    return list(pairwise([start, *range(first, stop, step), stop]))
