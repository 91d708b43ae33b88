"""resnet-bench train: the whole Ray pipeline against a bare PyTorch loop, in one run.

    resnet-bench train                                   # CIFAR ResNet-20, §4.2 augmentation
    resnet-bench train --shards data/cifar10 --steps 200 --batch-size 128

The question: what does streaming shards through Ray Data into a TorchTrainer cost over the
simplest loop a PyTorch user would write, on the same model, batch, augmentation and rows?

- ``bare``: one process, no Ray. Each step decodes and augments its rows inline
  (:func:`pipelines.data.decode_inline`: the very decode tasks Ray Data runs, in the same order,
  with the same crops and flips), then uint8 -> ``to_float_batch`` -> model -> loss -> SGD step.
  torch runs ``--threads`` threads.
- ``ray``: the training job itself (:func:`pipelines.train.run_training`): a TorchTrainer with one
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

``measure_job`` is also the end-to-end measurement of ``resnet-bench gpu``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipelines import data as data_lib
from pipelines.bench.common import BenchError, ratio_line, target_line
from pipelines.config import JobConfig
from pipelines.manifest import Manifest, ManifestError, read_manifest
from pipelines.recipes import RECIPES, build_recipe
from resnet_core.models import create_model
from resnet_core.transforms import to_float_batch

TARGET = 0.9  # issue target: the Ray pipeline >= 0.9x the bare loop (CPU, ResNet-20, 1 worker)


@dataclass(frozen=True)
class JobMeasurement:
    """The training job's figures, from its own metric windows."""

    images_per_s: float  # steady state: the windows after the warm-up steps
    data_wait_share: float  # share of steady-state step time spent waiting for a batch
    startup_s: float  # from the job's start to its first step
    steps: int
    wall_s: float  # the whole job: start-up, steps, evaluation, checkpoint, final model


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
    import ray

    from pipelines import train

    with tempfile.TemporaryDirectory(prefix="resnet-bench-train-") as tmp:
        config = build_recipe(args.recipe, args.model)
        rows_needed = args.steps * args.batch_size
        config = bench_config(
            config,
            uri=args.shards or str(Path(tmp, "shards")),
            batch=args.batch_size,
            steps=args.steps,
            warmup=args.warmup,
            threads=args.threads,
            storage=str(Path(tmp, "runs")),
        )
        started = time.perf_counter()
        train.start_ray(config, address=None)
        ray_start_s = time.perf_counter() - started
        train.quiet_framework_logs()
        try:
            if args.shards is None:
                make_cifar_shards(config.data.uri, rows=rows_needed, classes=10)
            manifest = _read(config.data.uri)
            split = manifest.split(config.data.train_split)
            rows = split.num_rows
            if rows < rows_needed:
                raise BenchError(
                    f"--shards {args.shards} has {rows} {config.data.train_split} rows; "
                    f"--steps {args.steps} x --batch-size {args.batch_size} needs {rows_needed}: "
                    "lower --steps"
                )
            print(
                f"resnet-bench train: {args.model}, batch {args.batch_size}, augmentation "
                f"{config.data.augment!r}, {args.steps} steps ({args.warmup} warm-up), "
                f"{args.threads} torch threads in both runs, {rows} rows in "
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
        finally:
            ray.shutdown()
    bare_rate = (first.images_per_s + second.images_per_s) / 2
    ratio = job.images_per_s / bare_rate
    print(ratio_line("ray", "bare", ratio))
    print(target_line("ray", "bare", TARGET, ratio))
    print(
        f"start-up (outside the ratio): Ray {ray_start_s:.1f} s; job start to first step "
        f"{job.startup_s:.1f} s; bare loop to first step {first.startup_s:.1f} s; whole job "
        f"{job.wall_s:.1f} s"
    )


def bench_config(
    config: JobConfig,
    *,
    uri: str,
    batch: int,
    steps: int,
    warmup: int,
    threads: int,
    storage: str,
) -> JobConfig:
    """``config`` as one worker running ``steps`` steps of one epoch, reporting every
    ``warmup`` steps (so the first window is exactly the warm-up)."""
    return replace(
        config,
        data=replace(config.data, uri=uri),
        train=replace(
            config.train,
            global_batch=batch,
            epochs=1,
            max_steps=steps,
            log_every_steps=warmup,
            checkpoint_every_steps=None,
        ),
        scale=replace(config.scale, num_workers=1, cpus_per_worker=float(threads)),
        run=replace(
            config.run,
            storage_path=storage,
            name=f"bench-{uuid.uuid4().hex[:8]}",
            experiment="resnet-bench",
        ),
    )


def make_cifar_shards(uri: str, *, rows: int, classes: int) -> None:
    """Synthetic 32x32 JPEG shards with at least ``rows`` training rows (Ray must be up)."""
    from pipelines import prepare

    per_class = -(-rows // classes)
    log = io.StringIO()
    with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        status = prepare.main(
            [
                "synthetic", "--kind", "cifar", "--classes", str(classes),
                "--train-per-class", str(per_class), "--val-per-class", "10", "--out", uri,
            ]
        )  # fmt: skip
    if status != 0:
        raise BenchError(
            f"generating the benchmark shards at {uri} failed (exit {status}):\n{log.getvalue()}"
        )


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
    """A plain single-process PyTorch training loop over the job's rows, on the CPU."""
    from pipelines.train import make_optimizer, model_options, normalization

    d, o = config.data, config.optim
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(int(config.scale.cpus_per_worker))
    try:
        started = time.perf_counter()
        torch.manual_seed(config.train.seed)
        model = create_model(
            config.model.name, num_classes=manifest.num_classes, **model_options(config)
        )
        optimizer = make_optimizer(model, config)
        criterion = nn.CrossEntropyLoss(label_smoothing=o.label_smoothing)
        mean, std = normalization(config, manifest, torch.device("cpu"))
        plan = data_lib.plan_epoch(
            manifest,
            d.train_split,
            train=True,
            world_size=1,
            rank=0,
            epoch=0,
            seed=d.seed,
            batch_size=config.train.global_batch,
            max_batches=steps,
        )
        batches = rebatch(
            data_lib.decode_inline(plan, mode=d.augment, image_size=d.image_size),
            config.train.global_batch,
        )
        model.train()
        startup = data_seconds = 0.0
        timed_from = 0.0
        for step in range(steps):
            if step == warmup:
                timed_from, data_seconds = time.perf_counter(), 0.0
            fetch = time.perf_counter()
            images, labels = next(batches)
            data_seconds += time.perf_counter() - fetch
            x = to_float_batch(
                torch.from_numpy(images), mean=mean, std=std, lighting_std=d.lighting_std
            )
            loss = criterion(model(x), torch.from_numpy(labels))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if step == 0:
                startup = time.perf_counter() - started
        seconds = time.perf_counter() - timed_from
    finally:
        torch.set_num_threads(previous_threads)
    images_done = (steps - warmup) * config.train.global_batch
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


def measure_job(config: JobConfig, *, warmup_steps: int) -> JobMeasurement:
    """Run the training job (Ray must be up) and read its steady state from its MLflow run.

    ``config.train.log_every_steps`` should equal ``warmup_steps`` so the first window is the
    warm-up. The run goes to a temporary MLflow store unless ``MLFLOW_TRACKING_URI`` is set.
    """
    from mlflow.tracking import MlflowClient

    from pipelines import train

    manifest = read_manifest(config.data.uri)
    plan = train.plan_steps(config, manifest)
    with _mlflow_store() as uri:
        started = time.time()
        metrics = train.run_training(config, manifest, plan)
        wall = time.time() - started
        client = MlflowClient(tracking_uri=uri)
        run_id = metrics["mlflow_run_id"]

        def by_step(key: str) -> dict:
            return {m.step: m for m in client.get_metric_history(run_id, key)}

        rates = by_step("throughput/images_per_s")
        waits = by_step("throughput/data_wait_share")
        seconds = by_step("time/window_s")
    first = min(seconds)
    startup = seconds[first].timestamp / 1000 - seconds[first].value - started
    steady = [step for step in sorted(seconds) if step > warmup_steps]
    if not steady:
        raise BenchError(
            f"the job reported no window after step {warmup_steps}: raise --steps above --warmup"
        )
    total_s = sum(seconds[s].value for s in steady)
    images = sum(rates[s].value * seconds[s].value for s in steady)
    wait = sum(waits[s].value * seconds[s].value for s in steady)
    return JobMeasurement(images / total_s, wait / total_s, startup, plan.total_steps, wall)


@contextlib.contextmanager
def _mlflow_store() -> Iterator[str]:
    """The tracking URI in force, or a temporary SQLite store for the duration."""
    from pipelines import tracking

    if os.environ.get("MLFLOW_TRACKING_URI"):
        yield tracking.tracking_uri()
        return
    with tempfile.TemporaryDirectory(prefix="resnet-bench-mlflow-") as tmp:
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{Path(tmp, 'mlflow.db')}"
        try:
            yield os.environ["MLFLOW_TRACKING_URI"]
        finally:
            del os.environ["MLFLOW_TRACKING_URI"]
