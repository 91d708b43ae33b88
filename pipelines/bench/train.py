"""resnet-bench train: the whole Ray pipeline against a bare PyTorch loop, in one run.

    resnet-bench train                                   # CIFAR ResNet-20, §4.2 augmentation
    resnet-bench train --shards data/cifar10 --steps 200 --batch-size 128

The question: what does streaming shards through Ray Data into a TorchTrainer cost over the
simplest loop a PyTorch user would write, on the same model, batch, augmentation and rows?

- ``bare``: one process, no Ray. Each step decodes and augments its rows inline
  (:func:`pipelines.data.decode_inline`: the very decode tasks Ray Data runs, in the same order,
  with the same crops and flips), then calls the job's own training step
  (:func:`pipelines.job.parts.build_training`: normalise -> model -> loss -> SGD step).
  torch runs ``--threads`` threads.
- ``ray``: the training job itself (:func:`pipelines.job.trainer.run_training`): a TorchTrainer with one
  worker reserving ``--threads`` CPUs (Ray sets the worker's OMP_NUM_THREADS from the reservation,
  so torch runs the same number of threads as in ``bare``), Ray Data decode tasks on
  ``data.decode_cpus`` more logical CPUs, the per-step metrics, the MLflow reporter, the
  end-of-epoch evaluation and checkpoint. Its figures are the job's own throughput windows
  (``log_every_steps = --warmup``), read back from its MLflow run.

Steady state is every step after the first ``--warmup``; the rates count training images only.
Start-up (Ray, worker group, model build, first pipeline fill) is reported on its own line,
outside the ratio. ``bare`` runs before and after ``ray`` and its two rates are averaged, so a
drift in the machine's load between the runs mostly cancels. Same-process timing, no warm
caches shared between the two: each builds its own model and reads its own rows.

"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipelines import data as data_lib
from pipelines.bench.common import (
    BenchError,
    JobMeasurement,
    bench_config,
    cifar_dataset,
    measure_job,
    ratio_line,
    target_line,
)
from pipelines.config import JobConfig
from pipelines.job.parts import build_training
from pipelines.job.session import local_cpus, ray_session
from pipelines.manifest import Manifest, ManifestError, read_manifest
from pipelines.recipes import RECIPES, build_recipe

TARGET = 0.9  # issue target: the Ray pipeline >= 0.9x the bare loop (CPU, ResNet-20, 1 worker)


@dataclass(frozen=True)
class LoopMeasurement:
    images_per_s: float
    data_share: float  # share of steady-state step time spent decoding (inline)
    startup_s: float  # model build + first batch


def add_parser(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("train", help="Ray pipeline vs a bare PyTorch loop, same run")
    p.add_argument("--shards", help="a prepared dataset (default: generate synthetic 32x32 shards)")
    p.add_argument("--recipe", default="cifar-paper", choices=sorted(RECIPES))
    p.add_argument("--model", default="resnet20")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=60, help="steps per run (one epoch at most)")
    p.add_argument("--warmup", type=int, default=10, help="steps left out of the steady state")
    p.add_argument(
        "--threads", type=int, default=os.cpu_count() or 1, help="torch threads in both runs"
    )


def run(args: argparse.Namespace) -> None:
    for name in ("batch_size", "steps", "warmup", "threads"):
        if getattr(args, name) < 1:
            raise BenchError(f"--{name.replace('_', '-')} {getattr(args, name)} must be >= 1")
    if args.warmup >= args.steps:
        raise BenchError(f"--warmup {args.warmup} must be below --steps {args.steps}")
    with tempfile.TemporaryDirectory(prefix="resnet-bench-train-") as tmp:
        config = bench_config(
            build_recipe(args.recipe, args.model),
            uri=args.shards or str(Path(tmp, "shards")),
            batch=args.batch_size,
            steps=args.steps,
            warmup=args.warmup,
            threads=args.threads,
            storage=str(Path(tmp, "runs")),
        )
        needed = config.scale.cpus_per_worker + config.data.decode_cpus
        started = time.perf_counter()
        with ray_session(num_cpus=local_cpus(needed)):
            ray_start_s = time.perf_counter() - started
            first, job, second = compare(config, args, shards_given=args.shards is not None)
    bare_rate = (first.images_per_s + second.images_per_s) / 2
    ratio = job.images_per_s / bare_rate
    print(ratio_line("ray", "bare", ratio))
    print(target_line("ray", "bare", TARGET, ratio))
    print(
        f"start-up (outside the ratio): Ray {ray_start_s:.1f} s; job start to first step "
        f"{job.startup_s:.1f} s; bare loop to first step {first.startup_s:.1f} s; whole job "
        f"{job.wall_s:.1f} s"
    )


def compare(
    config: JobConfig, args: argparse.Namespace, *, shards_given: bool
) -> tuple[LoopMeasurement, JobMeasurement, LoopMeasurement]:
    """bare, ray, bare again (Ray must be up); prints each figure as it comes."""
    rows_needed = args.steps * args.batch_size
    if not shards_given:
        cifar_dataset(config.data.uri, train_rows=rows_needed, classes=10)
    manifest = _read(config.data.uri)
    split = manifest.split(config.data.train_split)
    if split.num_rows < rows_needed:
        raise BenchError(
            f"--shards {args.shards} has {split.num_rows} {config.data.train_split} rows; "
            f"--steps {args.steps} x --batch-size {args.batch_size} needs {rows_needed}: "
            "lower --steps"
        )
    print(
        f"resnet-bench train: {args.model}, batch {args.batch_size}, augmentation "
        f"{config.data.augment!r}, {args.steps} steps ({args.warmup} warm-up), "
        f"{args.threads} torch threads in both runs, {split.num_rows} rows in "
        f"{len(split.shards)} shards",
        flush=True,
    )
    first = bare_loop(config, manifest, steps=args.steps, warmup=args.warmup)
    _print_bare("bare (1)", first)
    job = measure_job(config, warmup_steps=args.warmup)
    print(
        f"  ray       {job.images_per_s:8.1f} img/s   waiting for data "
        f"{job.data_wait_share:6.1%} of step time",
        flush=True,
    )
    second = bare_loop(config, manifest, steps=args.steps, warmup=args.warmup)
    _print_bare("bare (2)", second)
    return first, job, second


def _read(uri: str) -> Manifest:
    try:
        return read_manifest(uri)
    except ManifestError as e:
        raise BenchError(str(e)) from None


def _print_bare(label: str, m: LoopMeasurement) -> None:
    print(
        f"  {label:9} {m.images_per_s:8.1f} img/s   decoding inline {m.data_share:6.1%} of step time",
        flush=True,
    )


# ---------------------------------------------------------------------------------------------
# The two measurements
# ---------------------------------------------------------------------------------------------


def bare_loop(config: JobConfig, manifest: Manifest, *, steps: int, warmup: int) -> LoopMeasurement:
    """A plain single-process loop over the job's rows, on the CPU, calling the job's step."""
    d, t = config.data, config.train
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(int(config.scale.cpus_per_worker))
    try:
        started = time.perf_counter()
        training = build_training(config, manifest, torch.device("cpu"))
        plan = data_lib.plan_epoch(
            manifest,
            d.train_split,
            train=True,
            world_size=1,
            rank=0,
            epoch=0,
            seed=d.seed,
            batch_size=t.global_batch,
            max_batches=steps,
        )
        options = data_lib.DecodeOptions(mode=d.augment, image_size=d.image_size)
        batches = rebatch(data_lib.decode_inline(plan, options), t.global_batch)
        training.model.train()
        startup = data_seconds = timed_from = 0.0
        for step in range(steps):
            if step == warmup:
                timed_from, data_seconds = time.perf_counter(), 0.0
            fetch = time.perf_counter()
            images, labels = next(batches)
            data_seconds += time.perf_counter() - fetch
            training.step(torch.from_numpy(images), torch.from_numpy(labels))
            if step == 0:
                startup = time.perf_counter() - started
        seconds = time.perf_counter() - timed_from
    finally:
        torch.set_num_threads(previous_threads)
    images_done = (steps - warmup) * t.global_batch
    return LoopMeasurement(images_done / seconds, data_seconds / seconds, startup)


def rebatch(
    pieces: Iterator[dict[str, np.ndarray]], batch_size: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Decoded map batches -> ``(uint8 images, int64 labels)`` batches of exactly
    ``batch_size`` rows (the remainder is dropped, as training drops it)."""
    images: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    held = 0
    for piece in pieces:
        images.append(piece["image"])
        labels.append(piece["label"])
        held += len(piece["label"])
        while held >= batch_size:
            all_images, all_labels = np.concatenate(images), np.concatenate(labels)
            yield all_images[:batch_size], all_labels[:batch_size].astype(np.int64)
            images, labels = [all_images[batch_size:]], [all_labels[batch_size:]]
            held -= batch_size
