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
two ranks (each reads only the row groups it needs). The tasks' code is :mod:`pipelines.decode`,
which imports no torch: a decode process starts ~2 CPU-s faster and holds ~300 MB less memory.

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
(:func:`resnet_core.cpu_transforms.sample_crop`, the same draws from the same generator as the CPU
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
import math
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from itertools import pairwise
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import torch
from ray.data.collate_fn import NumpyBatchCollateFn
from torch import Tensor

from pipelines import storage
from pipelines.decode import (
    DEVICE_DECODE_MODES,
    EVAL_MODES,
    MODES,
    TRAIN_MODES,
    DecodeOptions,
    ShardUnreadable,
    _decode_chunks,  # private by name: it names the Ray task ("MapBatches(_decode_chunks)")
    aligned_pieces,
    read_rows,
    unreadable_shard,
)
from pipelines.manifest import Manifest
from resnet_core.transforms import decode_jpeg_crops

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
        for lo, hi in aligned_pieces(r.start, r.stop, chunk_rows):
            yield read_rows(r.uri, lo, hi)


# ---------------------------------------------------------------------------------------------
# Decode tasks (run as Ray Data tasks anywhere in the cluster)
# ---------------------------------------------------------------------------------------------


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
            for lo, hi in aligned_pieces(r.start, r.stop, task_rows, offset)
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
            device = torch.device(options.device)
            decode = functools.partial(
                _decode_on_worker, size=options.crop_size, device=device, train=plan.train
            )
            batches = _decode_ahead(batches, decode, device, self.waits)
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
