"""The streaming reader: Parquet shards -> decoded, augmented uint8 batches on each Train worker.

Used by the training job on every rank, once per epoch::

    options = DecodeOptions(mode="paper", image_size=224, pin_memory=True)
    batches = iter_batches(manifest, options, split="train", world_size=8, rank=r, epoch=e,
                           seed=0, batch_size=32)
    for images, labels in batches:          # uint8 (N, H, W, 3) and int64 (N,), on the CPU
        x = to_float_batch(images.to(device, non_blocking=True), mean=...)
    batches.num_bad                          # undecodable images met in this epoch

Why each worker builds its own pipeline. Ray Train's ``get_dataset_shard`` + ``streaming_split``
hand blocks to workers dynamically: which worker sees which sample, and in which order, changes
from run to run, and Ray 2.60 has no iterator state, so an exact mid-epoch resume is impossible.
Here every epoch is planned up front (:class:`EpochPlan`): the split's shards are permuted by
``(seed, epoch)``, laid end to end and cut into one contiguous row range per rank, so the rows,
their order and the number of steps are a pure function of the manifest and those numbers. Each
worker then runs its own Ray Data pipeline over its range: the decode tasks still run as Ray Data
tasks anywhere in the cluster (CPU-only nodes included); only the iteration happens on the worker.

How the pipeline reads. It is ``from_items(row chunks in plan order) -> map_batches(read the
chunk's rows + decode + augment)`` with ``preserve_order`` on, not ``read_parquet``: measured on
Ray 2.60 (2 cores), ``read_parquet`` bin-packs row groups of different files into one read task
(it does not keep the file order we planned) and starts a footer-reading actor pool on every
execution: 9-13 s per epoch and rank on a 300-row split, against 0.4 s for ``from_items`` +
``map_batches`` over the same files. Reading inside the decode task also keeps the encoded bytes
out of the object store: only crops travel. Any shard count works: a shard may be split between
two ranks (each reads only the row groups it needs).

What a task costs besides the decode (issue 15, BENCHMARKS.md "Ray Data overhead"): Ray Data
notices that a task ended only ~0.1-0.2 s late (its scheduler polls), so a task decodes several
chunks in turn (:func:`chunks_per_task`: ~512 rows, within a share of the object store) and its
CPU idles less; a local shard is memory-mapped and read in the task's thread, only up to the
chunk's last row; rows are taken in chunk order by index and decoded from zero-copy views of
the Arrow buffers (no ``take`` of the encoded bytes); the map batches decode into slices of one
array and the task yields it as one block (map batches yielded one by one made a block of
several pieces: ~0.15 ms more CPU per 224px image in the task and ~0.07 ms in the iterating
process, which combines them). The device path yields its map batches one by one.

Shuffling, at no memory cost. resnet-prepare shuffles every split before cutting it into
shards, so any run of rows is a random sample of its split. A training epoch then (1) permutes
the shards by ``(seed, epoch)`` (the plan), (2) takes the rank's chunks (``task_rows``
consecutive rows each) in an order drawn from ``(seed, epoch, rank)`` and (3) permutes the rows
inside each chunk by ``(seed, epoch, shard, start)`` before decoding — FFCV's "quasi-random"
order. Chunks hold about 16 MB of decoded output (:func:`default_task_rows`: 512 rows of 32x32,
64 of 224x224) and are cut at an offset drawn per epoch (:func:`task_offset`), so the rows that
share a chunk, and so a batch, change from epoch to epoch; which chunks share a decode task
changes nothing. Only encoded bytes are reordered: this
costs no memory. Ray's local shuffle buffer (``local_shuffle_buffer_size``) mixes across tasks
but holds decoded rows: 1,024 rows of 224x224 are 147 MiB of object store per worker, which
spilled a 256 MiB store every epoch and ran 4x slower, and even 256 rows made the worker's RSS
swing by 10-17% between epochs (``resnet-bench memory``); the ImageNet recipes go without it, the
CIFAR ones keep 1,024 rows (3 KB each).

Determinism. Augmentation randomness comes from ``numpy.random.default_rng([seed, epoch,
crc32(keys of the map batch)])``; map batches are fixed slices of each task (cut at the
multiples of ``map_batch_rows`` from the shard start and at the rank's range ends), so the draws
do not depend on which node decodes them. The local shuffle buffer is seeded from ``(seed,
epoch, rank)``. Same manifest, world size and arguments give the same batches, pixel for pixel.

Epoch boundaries: the training job iterates the next epoch in a helper thread
(:class:`Prefetched`) from the current epoch's last batch on, so its pipeline starts and its
first batches decode during validation and the checkpoint.

Mid-epoch resume: ``skip_batches=k`` reproduces the epoch's batch sequence and discards its first
``k`` batches. Honest cost: those rows are still read and decoded (a shuffle buffer needs them to
reproduce the order), they are only not trained on. At ~3-4 ms of CPU per full-size ImageNet
image (BENCHMARKS.md), resuming 1,000 steps of batch 32 into an epoch costs ~100-130 CPU seconds,
spread over the decode CPUs.

Bad images: the shards were audited by resnet-prepare, but a row that still fails to decode never
crashes the job. Training replaces it with a copy of another good row of the same map batch (the
step count stays exact); evaluation drops it. Both count it (``EpochBatches.num_bad``).

Decoding on the Train worker's device (``decode_device``, for GPU nodes short of CPU cores): the
Ray Data tasks then only read rows and JPEG headers and draw each row's crop box and flip
(:func:`resnet_core.transforms.sample_crop`, the same draws from the same generator as the CPU
path), and ship the encoded bytes; the worker decodes each batch on its device
(:func:`resnet_core.transforms.decode_jpeg_crops`: nvJPEG's batched decode on a GPU, then every
crop's resample in a few batched matrix products), one batch ahead in a helper thread, on a
CUDA stream of its own. Rows, order, boxes and flips are those of the CPU path; pixels differ
by a fraction of a level on average (full-resolution decode where the CPU path drafts).
Hybrid decode (``cpu_share``, ``data.decode_device=auto``): the tasks still decode a share of
the map batches, drawn from their keys, and ship those as pixels (``raw`` rows); the worker
decodes the rest. :class:`DecodeWaits` measures which side kept the worker waiting, for the
job's rebalancing (pipelines.job.hybrid). Rows that are not complete RGB or grayscale JPEGs (a hand-made shard's
PNG, CMYK or truncated JPEG; resnet-prepare writes none) are decoded in the task as on the CPU
path and travel as pixels. A row whose header does not parse or that fails there is bad in the
task; one that nvJPEG or libjpeg rejects (a broken Huffman table, say) is bad on the worker.
Either is replaced on the worker by a copy of a good row of the same batch (training; the CPU
path copies within a map batch) or dropped (evaluation), and counted once. The CIFAR modes stay
on the CPU path (32x32 PNGs).
"""

from __future__ import annotations

import functools
import io
import math
import queue
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from itertools import pairwise
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import torch
from PIL import Image
from ray.data.collate_fn import NumpyBatchCollateFn
from torch import Tensor

from pipelines import storage
from pipelines.manifest import Manifest
from resnet_core.transforms import (
    AUGMENT_MODES,
    BoxSampler,
    CenterCrop,
    ImageAugment,
    RandomResizedCrop,
    ScaleAugment,
    decode_batch,
    decode_crop,
    decode_jpeg_crops,
    pad_crop_flip,
    random_affine,
    sample_crop,
)

__all__ = [
    "DEVICE_DECODE_MODES",
    "EVAL_MODES",
    "MODES",
    "TRAIN_MODES",
    "Batch",
    "DecodeOptions",
    "EpochBatches",
    "EpochPlan",
    "Prefetched",
    "ShardRange",
    "ShardUnreadable",
    "build_dataset",
    "iter_batches",
    "plan_epoch",
    "plan_remainder",
    "read_plan_rows",
    "read_split_keys",
    "steps_per_epoch",
    "unreadable_shard",
]

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
    device: decode on this device in the iterating process (the Train worker's GPU; see the
    module docstring) instead of in the tasks; None: in the tasks.
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
    device: torch.device | None = None
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
        if self.device is not None:
            object.__setattr__(self, "device", torch.device(self.device))
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


@dataclass(frozen=True)
class ShardRange:
    """Rows ``[start, stop)`` of the shard at ``uri`` (0-based, in file order); ``base``: the
    split-wide index of the shard's first row (shards in manifest order), which makes
    ``base + row`` the row's id in the split (the ``row`` column of decoded batches)."""

    uri: str
    start: int
    stop: int
    base: int = 0
    copy: int = 0  # repeated augmentation: which repeat of these rows (its own random draws)

    @property
    def num_rows(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class EpochPlan:
    """What one rank reads in one epoch of one split, decided before any data is touched.

    Training (``train=True``): the shards are permuted with ``default_rng([seed, epoch])``, laid
    end to end and cut into ``world_size`` contiguous ranges of ``total_rows // world_size`` rows;
    every rank reads the first ``steps * batch_size`` rows of its range, so every rank runs the
    same number of steps (DDP and ``ray.train.report`` are collective) and ``steps`` is the same
    in every epoch. The rows not read (fewer than ``world_size * (batch_size + 1)``, like
    ``drop_last``) change with the epoch's permutation.
    Evaluation (``train=False``): manifest order, cut into ``world_size`` ranges whose sizes differ
    by at most one row; every row is read exactly once across ranks, without padding, and
    ``steps`` (the rank's batch count, the last one possibly partial) may differ between ranks.

    ranges: this rank's rows in read order. rank_rows: rows read by each rank.
    :func:`plan_remainder` plans the rest of an interrupted training epoch on another world
    size: its ranges are the rows not trained yet, ``steps`` the batches left.
    """

    split: str
    train: bool
    epoch: int
    seed: int
    rank: int
    world_size: int
    batch_size: int
    ranges: tuple[ShardRange, ...]
    rank_rows: tuple[int, ...]
    steps: int

    @property
    def num_rows(self) -> int:
        """Rows this rank reads in the epoch."""
        return self.rank_rows[self.rank]

    @classmethod
    def create(
        cls,
        shards: Sequence[tuple[str, int]],
        *,
        split: str,
        train: bool,
        world_size: int,
        rank: int,
        epoch: int,
        seed: int,
        batch_size: int,
        max_batches: int | None = None,
        repeats: int = 1,
    ) -> EpochPlan:
        """Plan from the split's shards as ``(uri, num_rows)`` in manifest order.

        ``max_batches`` (training) caps the epoch at that many steps; only their rows are read.
        ``repeats`` (training; torchvision's repeated augmentation, ``--ra-reps``): the epoch
        trains ``total_rows // repeats`` distinct rows, each ``repeats`` times, its copies on
        consecutive ranks (as torchvision's RASampler deals them) with their own augmentation
        draws (``ShardRange.copy``); the epoch keeps its length in rows.
        """
        _check_plan_args(world_size, rank, epoch, seed, batch_size, max_batches)
        bases = np.cumsum([0] + [rows for _, rows in shards[:-1]]).tolist()
        shards = [(uri, rows, base) for (uri, rows), base in zip(shards, bases, strict=True)]
        if train:
            order = np.random.default_rng([seed, epoch]).permutation(len(shards)).tolist()
            laid = [shards[i] for i in order]
            ranges, rank_rows, steps = _training_ranges(
                laid, split, world_size, rank, batch_size, max_batches, repeats
            )
        else:
            ranges, rank_rows, steps = _evaluation_ranges(
                shards, world_size, rank, batch_size, max_batches
            )
        return cls(
            split, train, epoch, seed, rank, world_size, batch_size, ranges, rank_rows, steps
        )


def _training_ranges(
    laid: list[tuple[str, int, int]],
    split: str,
    world_size: int,
    rank: int,
    batch_size: int,
    max_batches: int | None,
    repeats: int,
) -> tuple[tuple[ShardRange, ...], tuple[int, ...], int]:
    """A training epoch's ranges of ``rank`` over the permuted shards ``laid`` end to end
    (see :class:`EpochPlan`): the distinct rows cut into one part per rank; copy ``c`` of part
    ``p`` goes to rank ``p + c``; every rank reads the first ``steps * batch_size`` rows."""
    total = sum(rows for _, rows, _ in laid)
    part = total // repeats // world_size
    steps = part * repeats // batch_size
    if steps == 0:
        repeated = f" x repeats {repeats}" if repeats > 1 else ""
        raise ValueError(
            f"split {split!r} has {total} rows, fewer than world_size {world_size} x "
            f"batch_size {batch_size}{repeated} = {world_size * batch_size * repeats}: lower the "
            "batch size or the number of workers"
        )
    if max_batches is not None:
        steps = min(steps, max_batches)
    parts = [(c, (rank - c) % world_size) for c in range(repeats)]
    ranges = [replace(r, copy=c) for c, p in parts for r in _cut(laid, p * part, (p + 1) * part)]
    return _first_rows(ranges, steps * batch_size), (steps * batch_size,) * world_size, steps


def _evaluation_ranges(
    shards: list[tuple[str, int, int]],
    world_size: int,
    rank: int,
    batch_size: int,
    max_batches: int | None,
) -> tuple[tuple[ShardRange, ...], tuple[int, ...], int]:
    """An evaluation's ranges of ``rank``: manifest order, sizes differing by at most a row."""
    total = sum(rows for _, rows, _ in shards)
    bounds = [r * total // world_size for r in range(world_size + 1)]
    rank_rows = tuple(b - a for a, b in pairwise(bounds))
    steps = math.ceil(rank_rows[rank] / batch_size)
    if max_batches is not None:
        steps = min(steps, max_batches)
        rank_rows = tuple(min(n, steps * batch_size) for n in rank_rows)
    return _cut(shards, bounds[rank], bounds[rank] + rank_rows[rank]), rank_rows, steps


def _check_plan_args(
    world_size: int, rank: int, epoch: int, seed: int, batch_size: int, max_batches: int | None
) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} / world_size {world_size}: need 0 <= rank < world_size")
    if epoch < 0 or seed < 0:
        raise ValueError(f"epoch {epoch} and seed {seed} must be >= 0")
    if batch_size < 1:
        raise ValueError(f"batch_size {batch_size} must be >= 1")
    if max_batches is not None and max_batches < 0:
        raise ValueError(f"max_batches {max_batches} must be >= 0 (or None for the whole epoch)")


def _first_rows(ranges: Sequence[ShardRange], rows: int) -> tuple[ShardRange, ...]:
    """The first ``rows`` rows of ``ranges``."""
    taken = []
    for r in ranges:
        if rows <= 0:
            break
        taken.append(replace(r, stop=r.start + min(r.num_rows, rows)))
        rows -= taken[-1].num_rows
    return tuple(taken)


def _cut(shards: Sequence[tuple[str, int, int]], start: int, stop: int) -> tuple[ShardRange, ...]:
    """Rows ``[start, stop)`` of the concatenation of ``shards`` ``(uri, rows, base)``, as
    per-shard ranges."""
    ranges = []
    offset = 0
    for uri, rows, base in shards:
        lo, hi = max(start, offset), min(stop, offset + rows)
        if lo < hi:
            ranges.append(ShardRange(uri, lo - offset, hi - offset, base))
        offset += rows
    return tuple(ranges)


def _shards(manifest: Manifest, split: str) -> list[tuple[str, int]]:
    info = manifest.split(split)
    return [
        (uri, shard.num_rows)
        for uri, shard in zip(manifest.shard_uris(split), info.shards, strict=True)
    ]


def plan_epoch(
    manifest: Manifest,
    split: str,
    *,
    train: bool,
    world_size: int,
    rank: int,
    epoch: int,
    seed: int,
    batch_size: int,
    max_batches: int | None = None,
    repeats: int = 1,
) -> EpochPlan:
    """:meth:`EpochPlan.create` for a split of a prepared dataset."""
    return EpochPlan.create(
        _shards(manifest, split),
        split=split,
        train=train,
        world_size=world_size,
        rank=rank,
        epoch=epoch,
        seed=seed,
        batch_size=batch_size,
        max_batches=max_batches,
        repeats=repeats,
    )


def plan_remainder(
    manifest: Manifest,
    split: str,
    *,
    done: np.ndarray,
    planned_world: int,
    world_size: int,
    rank: int,
    epoch: int,
    seed: int,
    global_batch: int,
    steps: int,
    batches_done: int,
) -> EpochPlan:
    """The rest of a training epoch planned on ``planned_world`` ranks (``steps`` batches of
    ``global_batch``) that stopped after ``batches_done`` and continues on ``world_size``: the
    planned rows not in ``done`` (bool, one per row of the split), in the epoch's order, cut
    into ``world_size`` contiguous parts of ``steps - batches_done`` batches of
    ``global_batch // world_size``. Over the whole epoch every planned row is trained exactly
    once, whatever the world sizes it ran on."""
    shards = _shards(manifest, split)
    planned = [
        EpochPlan.create(
            shards,
            split=split,
            train=True,
            world_size=planned_world,
            rank=r,
            epoch=epoch,
            seed=seed,
            batch_size=global_batch // planned_world,
            max_batches=steps,
        )
        for r in range(planned_world)
    ]
    ids = np.concatenate(
        [np.arange(r.base + r.start, r.base + r.stop) for p in planned for r in p.ranges]
    )
    if len(done) != sum(rows for _, rows in shards):
        raise ValueError(
            f"the record of trained rows covers {len(done)} rows, split {split!r} has "
            f"{sum(rows for _, rows in shards)}: the dataset changed since the checkpoint"
        )
    left = ids[~done[ids]]
    batch_size, steps_left = global_batch // world_size, steps - batches_done
    per_rank = steps_left * batch_size
    if len(left) != per_rank * world_size:
        raise ValueError(
            f"{len(left)} rows of epoch {epoch + 1} are left, {steps_left} steps of "
            f"{global_batch} need {per_rank * world_size}: the checkpoint's record of trained "
            "rows does not match its position"
        )
    mine = left[rank * per_rank : (rank + 1) * per_rank]
    rank_rows = (per_rank,) * world_size
    return EpochPlan(
        split, True, epoch, seed, rank, world_size, batch_size, _id_ranges(mine, shards),
        rank_rows, steps_left,
    )  # fmt: skip


def _id_ranges(ids: np.ndarray, shards: Sequence[tuple[str, int]]) -> tuple[ShardRange, ...]:
    """Row ids of the split (in read order) as the fewest shard ranges: runs of consecutive
    rows of one shard."""
    bases = np.cumsum([0] + [rows for _, rows in shards])
    shard = np.searchsorted(bases, ids, side="right") - 1
    breaks = np.flatnonzero((np.diff(ids) != 1) | (np.diff(shard) != 0)) + 1
    ranges = []
    for run in np.split(np.arange(len(ids)), breaks):
        if len(run):
            i, first, last = shard[run[0]], ids[run[0]], ids[run[-1]]
            base = int(bases[i])
            ranges.append(ShardRange(shards[i][0], int(first) - base, int(last) + 1 - base, base))
    return tuple(ranges)


def steps_per_epoch(
    manifest: Manifest, split: str, *, world_size: int, batch_size: int, repeats: int = 1
) -> int:
    """Optimizer steps per training epoch (every rank, every epoch): needs only the manifest."""
    return plan_epoch(
        manifest,
        split,
        train=True,
        world_size=world_size,
        rank=0,
        epoch=0,
        seed=0,
        batch_size=batch_size,
        repeats=repeats,
    ).steps


def read_split_keys(manifest: Manifest, split: str) -> list[str]:
    """Every key of a split, in manifest (shard, then row) order."""
    keys: list[str] = []
    for uri in manifest.shard_uris(split):
        fs, path = storage.resolve(uri)
        with fs.open_input_file(path) as f:
            keys += pq.read_table(f, columns=["key"]).column("key").to_pylist()
    return keys


def read_plan_rows(plan: EpochPlan, chunk_rows: int) -> Iterator[pa.Table]:
    """The plan's rows as Arrow tables (``image`` encoded bytes, ``label``, ``key``) of at most
    ``chunk_rows`` rows, in plan order, read in the calling process (no Ray Data): for tasks
    that decode their own rows, such as resnet-eval's workers."""
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows {chunk_rows} must be >= 1")
    for r in plan.ranges:
        for lo, hi in _aligned_pieces(r.start, r.stop, chunk_rows):
            yield _read_rows(r.uri, lo, hi)


# ---------------------------------------------------------------------------------------------
# Decode tasks (run as Ray Data tasks anywhere in the cluster)
# ---------------------------------------------------------------------------------------------


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


def _read_rows(uri: str, start: int, stop: int) -> pa.Table:
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
    table = _read_rows(uri, start, stop)
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
    for lo, hi in _aligned_pieces(start, stop, options.map_batch_rows):
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


def _aligned_pieces(start: int, stop: int, step: int, offset: int = 0) -> list[tuple[int, int]]:
    """``[start, stop)`` cut at ``offset`` plus the multiples of ``step``."""
    first = ((start - offset) // step + 1) * step + offset
    return list(pairwise([start, *range(first, stop, step), stop]))


def task_offset(plan: EpochPlan, task_rows: int) -> int:
    """Where a training epoch's decode tasks are cut (``offset`` + multiples of ``task_rows``
    from each shard's start): drawn per epoch, so the rows that share a task change every epoch."""
    if not plan.train:
        return 0
    return int(np.random.default_rng([plan.seed, plan.epoch, 7]).integers(task_rows))


def _chunks(plan: EpochPlan, task_rows: int) -> list[dict[str, Any]]:
    """The plan's ranges cut into decode tasks of at most ``task_rows`` rows (within a shard, at
    :func:`task_offset`); a training epoch takes them in an order drawn from ``(seed, epoch,
    rank)``."""
    items = []
    offset = task_offset(plan, task_rows)
    for r in plan.ranges:
        items += [
            {"uri": r.uri, "start": lo, "stop": hi, "base": r.base, "copy": r.copy}
            for lo, hi in _aligned_pieces(r.start, r.stop, task_rows, offset)
        ]
    if plan.train:
        order = np.random.default_rng([plan.seed, plan.epoch, plan.rank]).permutation(len(items))
        items = [items[i] for i in order]
    return items


def decode_inline(plan: EpochPlan, options: DecodeOptions) -> Iterator[dict[str, np.ndarray]]:
    """The plan's decode tasks run one after another in this process, without Ray: the same
    rows, order, crops and flips as :func:`build_dataset`, in the blocks of tasks of one chunk
    each (``options.chunks_per_task`` when set). For a bare single-process loop measured against
    the Ray pipeline."""
    options.check_plan(plan)
    chunks, per_task = _chunks(plan, options.task_rows), options.chunks_per_task or 1
    for lo in range(0, len(chunks), per_task):
        group = chunks[lo : lo + per_task]
        yield from _decode_chunks(
            {key: np.asarray([chunk[key] for chunk in group]) for key in group[0]},
            options=options,
            seed=plan.seed,
            epoch=plan.epoch,
        )


def build_dataset(plan: EpochPlan, options: DecodeOptions) -> ray.data.Dataset:
    """The rank's epoch as a Ray Dataset of decoded rows, in plan order.

    Columns: image uint8 (``options.crop_size`` square), label int64, key str, bad bool. Each
    decode task decodes ``options.chunks_per_task`` chunks of ``options.task_rows`` rows (None:
    :func:`chunks_per_task` for this cluster) with ``options.num_cpus`` CPUs. With
    ``options.device`` the tasks only plan the crops: image is then the encoded bytes, with box,
    flip and raw columns (see the module docstring, "Decoding on the Train worker's device").
    """
    options.check_plan(plan)
    chunks = _chunks(plan, options.task_rows)
    if not chunks:
        raise ValueError(f"rank {plan.rank} reads no rows of split {plan.split!r} in this plan")
    per_task = task_chunks(options)
    # One chunk per input block: the map below bundles exactly ``per_task`` of them per task.
    ds = ray.data.from_items(chunks, override_num_blocks=len(chunks))
    # Blocks leave in input order whichever task finishes first; this dataset's own context (and
    # its descendants'), not the process-wide one. No progress bars in Train workers' logs.
    ds.context.execution_options.preserve_order = True
    ds.context.enable_progress_bars = False
    placement = {}
    if options.prefer_nodes:
        # Ray's label scheduling: the labelled nodes first, then (the fallback) any node.
        placement = {
            "label_selector": dict(options.prefer_nodes),
            "fallback_strategy": [{"label_selector": {}}],
        }
    return ds.map_batches(
        _decode_chunks,
        batch_size=per_task,
        batch_format="numpy",
        fn_kwargs={"options": options, "seed": plan.seed, "epoch": plan.epoch},
        num_cpus=options.num_cpus,
        concurrency=options.concurrency,
        **placement,
    )


# ---------------------------------------------------------------------------------------------
# Iteration on the Train worker
# ---------------------------------------------------------------------------------------------


class Batch(NamedTuple):
    """One batch: uint8 (N, H, W, 3) images (on the CPU; on the decode device when the worker
    decodes), int64 (N,) CPU labels, their keys, how many of its rows were undecodable
    (training: replaced copies; evaluation: dropped), and the split-wide ids of the planned rows
    it consumed (int64 (N,); a replaced row keeps its own id, while its key is the copy's)."""

    images: Tensor
    labels: Tensor
    keys: tuple[str, ...]
    num_bad: int
    rows: np.ndarray


class _ToBatch(NumpyBatchCollateFn):
    """numpy rows -> :class:`Batch`; runs in Ray's prefetch threads (pinning included)."""

    def __init__(self, *, drop_bad: bool, pin_memory: bool) -> None:
        self.drop_bad = drop_bad
        self.pin_memory = pin_memory

    def __call__(self, batch: dict[str, np.ndarray]) -> Batch:
        bad = batch["bad"].astype(bool)
        images, labels, keys, rows = batch["image"], batch["label"], batch["key"], batch["row"]
        if self.drop_bad and bad.any():
            images, labels, keys, rows = images[~bad], labels[~bad], keys[~bad], rows[~bad]
        # A copy (Ray's arrays are read-only views), made straight into pinned memory on GPU.
        images_t = torch.empty(images.shape, dtype=torch.uint8, pin_memory=self.pin_memory)
        images_t.numpy()[...] = images
        labels_t = torch.from_numpy(labels.astype(np.int64))
        if self.pin_memory:
            labels_t = labels_t.pin_memory()
        keys = tuple(str(k) for k in keys)
        return Batch(images_t, labels_t, keys, int(bad.sum()), rows.astype(np.int64))


class _Encoded(NamedTuple):
    """A batch of the device path before its decode: one 1-D uint8 CPU tensor per row (encoded
    JPEG, or a ``raw`` row's decoded crop), float64 (N, 4) crop boxes, bool (N,) flips, raw
    flags and bad flags (rows the tasks could not read or decode), int64 labels, keys and row
    ids."""

    datas: list[Tensor]
    boxes: np.ndarray
    flips: np.ndarray
    raw: np.ndarray
    bad: np.ndarray
    labels: Tensor
    keys: tuple[str, ...]
    rows: np.ndarray


class _ToEncoded(NumpyBatchCollateFn):
    """numpy rows of the device path -> :class:`_Encoded`; runs in Ray's prefetch threads."""

    def __init__(self, *, pin_memory: bool) -> None:
        self.pin_memory = pin_memory

    def __call__(self, batch: dict[str, np.ndarray]) -> _Encoded:
        # Copies: the decoders want tensors, and Ray's buffers are read-only.
        datas = [torch.from_numpy(np.frombuffer(d, dtype=np.uint8).copy()) for d in batch["image"]]
        labels = torch.from_numpy(batch["label"].astype(np.int64))
        if self.pin_memory:
            labels = labels.pin_memory()
        return _Encoded(
            datas,
            batch["box"],
            batch["flip"].astype(bool),
            batch["raw"].astype(bool),
            batch["bad"].astype(bool),
            labels,
            tuple(str(k) for k in batch["key"]),
            batch["row"].astype(np.int64),
        )


def _decode_on_worker(encoded: _Encoded, *, size: int, device: torch.device, train: bool) -> Batch:
    """Decode an :class:`_Encoded` batch on ``device`` into a :class:`Batch` of ``size`` crops.

    Bad rows, the tasks' and those the decoder rejects, are replaced in training by copies of
    good rows of this batch (the step count stays exact) and dropped in evaluation; each is
    counted once in ``num_bad``.
    """
    n = len(encoded.datas)
    jpeg = np.flatnonzero(~encoded.raw & ~encoded.bad)
    decoded, failed = decode_jpeg_crops(
        [encoded.datas[i] for i in jpeg],
        encoded.boxes[jpeg],
        encoded.flips[jpeg],
        size,
        device=device,
    )
    bad = encoded.bad.copy()
    bad[jpeg] = failed.numpy()
    images = decoded
    if len(jpeg) < n:  # bad rows, and rows the tasks decoded (not complete RGB/gray JPEGs)
        images = torch.zeros((n, size, size, 3), dtype=torch.uint8, device=device)
        images[torch.from_numpy(jpeg).to(device)] = decoded
        raw = np.flatnonzero(encoded.raw & ~encoded.bad)
        if len(raw):
            pixels = torch.stack([encoded.datas[i].view(size, size, 3) for i in raw])
            images[torch.from_numpy(raw).to(device)] = pixels.to(device)
    labels, keys, rows = encoded.labels, encoded.keys, encoded.rows
    if bad.any():
        good = np.flatnonzero(~bad)
        if train and len(good) == 0:
            raise ValueError(
                f"none of the {n} images of a batch (keys {keys[0]} ...) decodes on {device}: "
                "re-run resnet-prepare, which audits every image, or set data.decode_device=cpu"
            )
        # Training: copies of good rows of the same batch (as the CPU path does within a map
        # batch); evaluation: bad rows are dropped.
        source = np.arange(n) if train else good
        if train:
            source[bad] = good[np.arange(int(bad.sum())) % len(good)]
        index = torch.from_numpy(source)
        images, labels = images[index.to(device)], labels[index]
        keys = tuple(keys[i] for i in source)
        rows = rows if train else rows[good]  # a replaced row was consumed all the same
    return Batch(images, labels, keys, int(bad.sum()), rows)


@dataclass
class DecodeWaits:
    """Seconds the device path's consumer waited, per cause: for the Ray Data tasks' next batch
    (``stream_s``: the CPU side is behind) and for the device's decode of the batch it needs
    (``decode_s``: the device side is behind). Hybrid decode balances the two."""

    stream_s: float = 0.0
    decode_s: float = 0.0


def _decode_ahead(
    items: Iterator[_Encoded],
    decode: Callable[[_Encoded], Batch],
    device: torch.device,
    waits: DecodeWaits,
) -> Iterator[Batch]:
    """``decode`` every item in a helper thread, one batch ahead of the caller: the decode of
    batch k + 1 (nvJPEG and the resample; libjpeg on CPU) overlaps the training step on batch
    k. On CUDA the helper decodes on a side stream of its own, so its kernels run beside the
    step's instead of queueing behind them on the default stream; the caller's stream waits for
    each batch's event before using it. ``waits`` adds up the caller's waits by cause."""
    side = torch.cuda.Stream(device) if device.type == "cuda" else None

    def run(item: _Encoded) -> tuple[Batch, torch.cuda.Event | None]:
        if side is None:
            return decode(item), None
        with torch.cuda.stream(side):
            batch, ready = decode(item), torch.cuda.Event()
            ready.record(side)
        return batch, ready

    def handed_over(future: Future[tuple[Batch, torch.cuda.Event | None]]) -> Batch:
        started = time.perf_counter()
        batch, ready = future.result()
        waits.decode_s += time.perf_counter() - started
        if ready is not None:
            consumer = torch.cuda.current_stream(device)
            consumer.wait_event(ready)
            batch.images.record_stream(consumer)  # the allocator must not reuse it too early
        return batch

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="device-decode") as pool:
        pending = None
        while True:
            started = time.perf_counter()
            item = next(items, None)
            waits.stream_s += time.perf_counter() - started
            if item is None:
                break
            submitted = pool.submit(run, item)
            if pending is not None:
                yield handed_over(pending)
            pending = submitted
        if pending is not None:
            yield handed_over(pending)


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


RAY_TASK_ROWS = 512  # rows a decode task aims to work through (several chunks of large crops)
STORE_SHARE = 16  # a decode task's output stays under this share of the smallest node's store


def chunks_per_task(options: DecodeOptions, store_bytes: float) -> int:
    """How many chunks (``options.task_rows`` rows each) one decode task decodes: about
    :data:`RAY_TASK_ROWS` rows, so that the gap between a CPU's tasks stays small against their
    work — Ray Data's scheduling loop learns that a task ended up to 0.2 s late (it polls
    every 0.1 s; ray-project/ray#42377, BENCHMARKS.md "Ray Data overhead"); and its output,
    one block, at most ``1 / STORE_SHARE`` of ``store_bytes``, the smallest node's object store
    (77 MB blocks spilled an 80 MiB store, see :func:`default_task_rows`). Which chunks share a
    task changes nothing in the rows, their order or their pixels."""
    chunk_bytes = options.task_rows * options.crop_size**2 * 3
    by_work = RAY_TASK_ROWS // options.task_rows
    by_memory = int(store_bytes // (STORE_SHARE * chunk_bytes))
    return max(1, min(by_work, by_memory))


def task_chunks(options: DecodeOptions) -> int:
    """The chunks each decode task of a dataset built now takes: ``options.chunks_per_task``,
    else 1 with a shuffle buffer, else :func:`chunks_per_task` for this cluster."""
    if options.chunks_per_task or options.shuffle_buffer:
        return options.chunks_per_task or 1
    return chunks_per_task(options, smallest_object_store())


def smallest_object_store() -> float:
    """The object store of the cluster's smallest live node with CPUs, in bytes (0: none)."""
    stores = [
        node["Resources"].get("object_store_memory", 0.0)
        for node in ray.nodes()
        if node["Alive"] and node["Resources"].get("CPU")
    ]
    return min(stores, default=0.0)


class EpochBatches:
    """One rank's batches of one epoch; iterate for ``(images, labels)`` or use :meth:`batches`.

    ``num_bad`` counts the undecodable images in the batches yielded so far. In training exactly
    ``plan.steps - skip_batches`` batches of ``plan.batch_size`` come out; in evaluation every
    row of the rank's range once (minus dropped bad rows), the last batch possibly smaller.
    """

    def __init__(self, plan: EpochPlan, options: DecodeOptions, *, skip_batches: int = 0) -> None:
        if not 0 <= skip_batches <= plan.steps:
            raise ValueError(
                f"skip_batches {skip_batches} is outside 0..{plan.steps} (the epoch's batches)"
            )
        options.check_plan(plan)
        self.plan = plan
        self.options = options
        self.skip_batches = skip_batches
        self.num_bad = 0
        self.waits = DecodeWaits()

    def __len__(self) -> int:
        """Batches still to come out of a fresh iteration."""
        return self.plan.steps - self.skip_batches

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for batch in self.batches():
            yield batch.images, batch.labels

    def batches(self) -> Iterator[Batch]:
        """The epoch's :class:`Batch` es (with keys and bad-row counts), after the skipped ones."""
        plan, options = self.plan, self.options
        if plan.steps == 0 or plan.num_rows == 0:
            return
        shuffle_seed = None
        if options.shuffle_buffer is not None:
            state = np.random.SeedSequence([plan.seed, plan.epoch, plan.rank]).generate_state(1)
            shuffle_seed = int(state[0])
        if options.device is None:
            collate = _ToBatch(drop_bad=not plan.train, pin_memory=options.pin_memory)
        else:
            collate = _ToEncoded(pin_memory=options.pin_memory)
        stream = build_dataset(plan, options).iter_torch_batches(
            batch_size=plan.batch_size,
            collate_fn=collate,
            device="cpu",  # the caller moves batches to its device (non_blocking when pinned)
            drop_last=plan.train,
            local_shuffle_buffer_size=options.shuffle_buffer,
            local_shuffle_seed=shuffle_seed,
            prefetch_batches=options.prefetch_batches,
        )
        batches = self._planned(stream)
        if options.device is not None:  # skipped batches are never decoded
            decode = functools.partial(
                _decode_on_worker, size=options.crop_size, device=options.device, train=plan.train
            )
            batches = _decode_ahead(batches, decode, options.device, self.waits)
        try:
            for batch in batches:
                self.num_bad += batch.num_bad
                yield batch
        except Exception as e:  # a decode task's ShardUnreadable arrives wrapped by Ray
            shard_error = unreadable_shard(e)
            if shard_error is None:
                raise
            raise shard_error from None

    def _planned(self, stream: Iterable[Any]) -> Iterator[Any]:
        """The stream's batches after the skipped ones, up to the plan's step count."""
        plan = self.plan
        produced = 0
        for batch in stream:
            produced += 1
            if produced > self.skip_batches:
                yield batch
            if produced == plan.steps:
                break
        if plan.train and produced < plan.steps:
            raise RuntimeError(
                f"rank {plan.rank} got {produced} batches of split {plan.split!r}, planned "
                f"{plan.steps}: the shards hold fewer rows than the manifest says; re-run "
                "resnet-prepare"
            )


class Prefetched:
    """An epoch's batches fetched in a helper thread, up to ``depth`` ahead of the consumer.

    The training job starts the next epoch this way at the end of an epoch, so that its Ray
    Data pipeline starts and its first batches are decoded while the epoch's validation and
    checkpoint run: without it every epoch began by waiting for data (42-64% of the first
    window of ``make demo``). Errors reach the consumer; :meth:`close` stops the thread.
    """

    _END = object()

    def __init__(self, epoch: EpochBatches, depth: int = 2) -> None:
        self.epoch = epoch
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._fill, name="prefetch-epoch", daemon=True)
        self._thread.start()

    @property
    def num_bad(self) -> int:
        return self.epoch.num_bad

    @property
    def waits(self) -> DecodeWaits:
        return self.epoch.waits

    def __len__(self) -> int:
        return len(self.epoch)

    def batches(self) -> Iterator[Batch]:
        while (item := self._queue.get()) is not self._END:
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self) -> None:
        """Stop fetching (an epoch abandoned: the run failed or was stopped)."""
        self._stop.set()
        self._thread.join(timeout=30)

    def _fill(self) -> None:
        try:
            for batch in self.epoch.batches():
                if not self._put(batch):
                    return
            self._put(self._END)
        except BaseException as e:  # handed to the consumer, who raises it
            self._put(e)

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False


def iter_batches(
    manifest: Manifest,
    options: DecodeOptions,
    *,
    split: str,
    world_size: int,
    rank: int,
    epoch: int,
    seed: int,
    batch_size: int,
    skip_batches: int = 0,
    max_batches: int | None = None,
    repeats: int = 1,
) -> EpochBatches:
    """One rank's epoch of ``split`` as ``(uint8 images, int64 labels)`` batches.

    A training mode (``options.mode`` in :data:`TRAIN_MODES`) plans a training epoch, an
    evaluation mode an exactly-once pass (``epoch`` is then irrelevant). ``max_batches`` ends
    the epoch early (e.g. at the job's last step); ``skip_batches`` resumes mid-epoch (batches
    ``skip_batches .. max_batches - 1`` come out). ``repeats``: repeated augmentation (see
    :meth:`EpochPlan.create`). Images are on the CPU, or on ``options.device`` when the worker
    decodes (see the module docstring).
    """
    plan = plan_epoch(
        manifest,
        split,
        train=options.train,
        world_size=world_size,
        rank=rank,
        epoch=epoch,
        seed=seed,
        batch_size=batch_size,
        max_batches=max_batches,
        repeats=repeats,
    )
    return EpochBatches(plan, options, skip_batches=skip_batches)
