"""resnet-bench memory: stream epochs several times larger than the Ray object store.

    resnet-bench memory --images /work/shared/data/imagenet-sample --store-mb 128 --epochs 3

The question: does the input pipeline stay within bounded memory when an epoch of decoded crops
is far larger than the object store, as it always is on ImageNet (1.28M x 150 KB = 192 GB of
224x224 uint8 crops per epoch)? It must neither spill to disk in steady state nor grow the
trainer's memory from epoch to epoch.

What runs: a local Ray with an object store of ``--store-mb``; shards prepared from ``--images``
(repeated until one epoch of decoded crops is ``--epoch-factor`` times the store); a TorchTrainer
with one worker that streams ``--epochs`` epochs through the training job's reader
(:func:`pipelines.data.iter_batches`, the job's default prefetch and shuffle buffer, the paper's
scale augmentation) and does the first thing training does with each batch — the uint8 -> float
conversion on the worker's device — then drops it. No model: a consumer faster than any real
step is the worst case for memory (nothing slows the producers down). ``--step-ms`` adds a
simulated step time.

What it found (BENCHMARKS.md): decode tasks of 512 rows of 224 px (77 MB of output each)
spilled an 80 MiB store, hence tasks of ~16 MB (:func:`pipelines.decode.default_task_rows`); and
Ray's local shuffle buffer holds decoded rows (1,024 rows of 224 px: 147 MiB of object store),
which spilled a 256 MiB store every epoch and ran 4x slower, and a 256-row one still made the
worker's RSS swing between epochs; hence the shuffle before decoding and no buffer in the
ImageNet recipes (``--shuffle-buffer N`` shows the difference).

Measured: the object store's use, polled every 0.2 s from the driver (peak), its spilled and
fallback-allocated bytes (totals over the run, from the raylet), and the trainer process's RSS at
the end of every epoch (``/proc/self/status``), its own and the object store's pages it has
read (shared memory, bounded by the store: a faster pipeline uses more of the store and shows
more of it here), the target on its own. Also checked on every batch: it arrives as uint8
(a float32 copy would be 4x larger) in (N, H, W, 3).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipelines.bench.common import BenchError, find_images, image_dataset, ratio_line
from pipelines.config import JobConfig, from_dict, to_dict
from pipelines.job.checkpoints import CHECKPOINT_SCORE
from pipelines.job.session import ray_session
from pipelines.manifest import read_manifest
from pipelines.recipes import build_recipe

MIB = 1024 * 1024
MIN_STORE_MB = 76  # Ray's object store minimum is 75 MiB
EPOCHS_FILE = "epochs.json"  # the worker's figures, in the checkpoint it reports
TARGET_RSS_GROWTH = 0.05  # issue target: < 5% between the second and the last epoch


@dataclass
class StoreStats:
    """The object store over a run, from the raylet's memory info (one node: the local Ray)."""

    capacity: int = 0
    peak_used: int = 0
    spilled: int = 0
    fallback_peak: int = 0
    samples: int = 0
    errors: list[str] = field(default_factory=list)


def add_parser(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("memory", help="epochs larger than the object store: spilling, RSS")
    p.add_argument("--images", required=True, help="folder of JPEGs (searched recursively)")
    p.add_argument("--store-mb", type=int, default=256, help="object store size in MiB")
    p.add_argument(
        "--epoch-factor",
        type=float,
        default=4.0,
        help="one epoch of decoded crops as a multiple of the object store",
    )
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--step-ms", type=float, default=0.0, help="simulated step time per batch")
    p.add_argument(
        "--shuffle-buffer",
        type=int,
        default=build_recipe("imagenet-paper").data.shuffle_buffer,
        help="rows in the worker's local shuffle buffer (default: the ImageNet recipes')",
    )
    p.add_argument("--num-cpus", type=int, help="CPUs of the local Ray (default: all)")


def run(args: argparse.Namespace) -> None:
    if args.store_mb < MIN_STORE_MB:
        raise BenchError(
            f"--store-mb {args.store_mb} is below Ray's minimum: use >= {MIN_STORE_MB}"
        )
    if args.epochs < 3:
        raise BenchError(f"--epochs {args.epochs}: use >= 3 (growth is measured from epoch 2 on)")
    if args.shuffle_buffer < 0:
        raise BenchError(f"--shuffle-buffer {args.shuffle_buffer} must be >= 0 (0: no buffer)")
    if args.epoch_factor <= 0 or args.batch_size < 1 or args.image_size < 1 or args.step_ms < 0:
        raise BenchError(
            f"--epoch-factor {args.epoch_factor}, --batch-size {args.batch_size} and "
            f"--image-size {args.image_size} must be positive, --step-ms {args.step_ms} >= 0"
        )
    paths = find_images(Path(args.images))
    crop_bytes = args.image_size * args.image_size * 3
    store = args.store_mb * MIB
    rows = max(args.batch_size, math.ceil(args.epoch_factor * store / crop_bytes))
    cpus = args.num_cpus or os.cpu_count() or 1
    with (
        tempfile.TemporaryDirectory(prefix="resnet-bench-memory-") as tmp,
        ray_session(num_cpus=cpus, object_store_memory=store),
    ):
        uri = image_dataset(paths, Path(tmp), train_rows=rows)
        split = read_manifest(uri).split("train")
        shard_bytes = sum(s.num_bytes for s in split.shards)
        epoch_bytes = (split.num_rows // args.batch_size) * args.batch_size * crop_bytes
        print(
            f"resnet-bench memory: {split.num_rows} rows, {shard_bytes / MIB:.0f} MiB of "
            f"shards; one epoch is {epoch_bytes / MIB:.0f} MiB of {args.image_size}px uint8 "
            f"crops; object store {args.store_mb} MiB; shuffle buffer {args.shuffle_buffer} "
            f"rows = {args.shuffle_buffer * crop_bytes / MIB:.0f} MiB of crops",
            flush=True,
        )
        with StorePoller() as poller:
            epochs = stream_epochs(consumer_config(uri, args, Path(tmp)), args.step_ms / 1000)
    report(epochs, poller.stats, epoch_bytes=epoch_bytes, shard_bytes=shard_bytes)


def consumer_config(uri: str, args: argparse.Namespace, workdir: Path) -> JobConfig:
    """The ImageNet paper recipe's reader settings on ``uri``, one worker of one CPU."""
    config = build_recipe("imagenet-paper")
    return dataclasses.replace(
        config,
        data=dataclasses.replace(
            config.data, uri=uri, image_size=args.image_size, shuffle_buffer=args.shuffle_buffer
        ),
        train=dataclasses.replace(config.train, global_batch=args.batch_size, epochs=args.epochs),
        scale=dataclasses.replace(config.scale, num_workers=1, use_gpu=False, cpus_per_worker=1.0),
        run=dataclasses.replace(
            config.run, name="bench-memory", storage_path=str(workdir / "runs")
        ),
    )


def report(
    epochs: list[dict[str, float]], stats: StoreStats, *, epoch_bytes: int, shard_bytes: int
) -> None:
    """The per-epoch lines, the ratios and the targets."""
    for e in epochs:
        print(
            f"  epoch {int(e['epoch'])}: {e['images_per_s']:7.1f} img/s, trainer RSS "
            f"{e['rss_bytes'] / MIB:7.1f} MiB (its own {_own(e) / MIB:.1f}, object store's "
            f"{e['shared_bytes'] / MIB:.1f}), batches uint8 (N, H, W, 3): "
            f"{'all' if e['uint8_batches'] == e['batches'] else 'NOT ALL'}"
        )
    if not stats.samples:
        raise BenchError(f"could not read the object store's stats: {'; '.join(stats.errors)}")
    print(
        f"  object store: peak {stats.peak_used / MIB:.1f} MiB of {stats.capacity / MIB:.0f} MiB "
        f"({stats.peak_used / stats.capacity:.0%}), spilled {stats.spilled / MIB:.1f} MiB, "
        f"fallback-allocated peak {stats.fallback_peak / MIB:.1f} MiB ({stats.samples} samples)"
    )
    print(ratio_line("epoch_bytes", "object_store", epoch_bytes / stats.capacity))
    print(ratio_line("shard_bytes", "object_store", shard_bytes / stats.capacity))
    growth = _own(epochs[-1]) / _own(epochs[1]) - 1
    total = epochs[-1]["rss_bytes"] / epochs[1]["rss_bytes"] - 1
    no_spill = stats.spilled == 0 and stats.fallback_peak == 0
    all_uint8 = all(e["uint8_batches"] == e["batches"] for e in epochs)
    print(f"target no spilling: {'met' if no_spill else 'missed'} ({stats.spilled} B spilled)")
    print(
        f"target trainer RSS growth epoch 2 -> {len(epochs)} < {TARGET_RSS_GROWTH:.0%}: "
        f"{'met' if growth < TARGET_RSS_GROWTH else 'missed'} ({growth:+.1%} of its own "
        f"memory; {total:+.1%} with the object store's pages it has read)"
    )
    print(f"target batches never float32 on the CPU: {'met' if all_uint8 else 'missed'}")


def _own(epoch: dict[str, float]) -> float:
    """The trainer's own resident memory at an epoch's end: RSS less the object store's pages."""
    return epoch["rss_bytes"] - epoch["shared_bytes"]


class StorePoller:
    """Polls the raylet's object store stats on a thread while the block runs."""

    def __init__(self, interval_s: float = 0.2) -> None:
        self.interval_s = interval_s
        self.stats = StoreStats()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self) -> StorePoller:
        import ray
        from ray._private.internal_api import get_state_from_address

        # Ray's own `ray memory --stats-only` source: not a public API, hence kept in one place.
        self._state = get_state_from_address(ray.get_runtime_context().gcs_address)
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()  # the totals at the end

    def _poll(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def sample(self) -> None:
        from ray._private.internal_api import get_memory_info_reply

        try:
            s = get_memory_info_reply(self._state, timeout_seconds=10).store_stats
        except Exception as e:  # a missed sample is reported, never fatal
            self.stats.errors.append(f"{type(e).__name__}: {e}")
            return
        st = self.stats
        st.samples += 1
        st.capacity = max(st.capacity, int(s.object_store_bytes_avail))
        st.peak_used = max(st.peak_used, int(s.object_store_bytes_used))
        st.spilled = max(st.spilled, int(s.spilled_bytes_total))
        st.fallback_peak = max(st.fallback_peak, int(s.object_store_bytes_fallback))


def stream_epochs(config: JobConfig, step_s: float) -> list[dict[str, float]]:
    """Run the consumer in the job's TorchTrainer (one worker); its per-epoch figures."""
    from pipelines.job.trainer import build_trainer

    trainer = build_trainer(
        config, loop=consume_epochs, loop_config={"config": to_dict(config), "step_s": step_s}
    )
    result = trainer.fit()
    # Ray Train V2 keeps only the metrics reported with a checkpoint.
    return json.loads(Path(result.checkpoint.path, EPOCHS_FILE).read_text())


def consume_epochs(loop_config: dict[str, Any]) -> None:
    """The Train worker: the job's reader, epoch after epoch, each batch made float on the
    device (the job's input normalisation) and dropped; RSS at every epoch end."""
    import ray.train
    import ray.train.torch
    import torch

    from pipelines import data as data_lib
    from pipelines.job.parts import decode_options, normalization
    from pipelines.job.session import quiet_ray_logs
    from pipelines.manifest import read_manifest
    from resnet_core.transforms import Normalize

    quiet_ray_logs()
    config: JobConfig = from_dict(JobConfig, loop_config["config"])
    device = ray.train.torch.get_device()
    manifest = read_manifest(config.data.uri)
    normalize = Normalize(*normalization(config, manifest)).to(device)
    options = decode_options(config, manifest, mode=config.data.augment, device=device)
    epochs = []
    for epoch in range(config.train.epochs):
        started = time.perf_counter()
        batches = images = uint8 = 0
        for batch, _labels in data_lib.iter_batches(
            manifest,
            options,
            split="train",
            world_size=1,
            rank=0,
            epoch=epoch,
            seed=0,
            batch_size=config.train.global_batch,
        ):
            uint8 += batch.dtype == torch.uint8 and batch.shape[-1] == 3
            x = normalize(batch.to(device, non_blocking=True))
            del x
            if loop_config["step_s"]:
                time.sleep(loop_config["step_s"])
            batches += 1
            images += len(batch)
        seconds = time.perf_counter() - started
        epochs.append(
            {
                "epoch": epoch + 1,
                "images_per_s": images / seconds,
                **{f"{name}_bytes": value for name, value in rss_bytes().items()},
                "batches": batches,
                "uint8_batches": uint8,
            }
        )
    with tempfile.TemporaryDirectory() as folder:
        Path(folder, EPOCHS_FILE).write_text(json.dumps(epochs))
        checkpoint = ray.train.Checkpoint.from_directory(folder)
        ray.train.report({CHECKPOINT_SCORE: 0.0}, checkpoint=checkpoint)


def rss_bytes() -> dict[str, int]:
    """This process's resident set size now: "rss" in all and its "shared" part, the object
    store's pages it has read (Linux ``/proc/self/status``: RssShmem; elsewhere peak RSS and
    0). The shared pages are the store's, bounded by its size, not this process's own."""
    try:
        fields = dict(
            line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines()
        )
        kib = {name: int(fields[name].split()[0]) * 1024 for name in ("VmRSS", "RssShmem")}
        return {"rss": kib["VmRSS"], "shared": kib["RssShmem"]}
    except (OSError, KeyError):
        import resource
        import sys

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return {"rss": peak if sys.platform == "darwin" else peak * 1024, "shared": 0}
