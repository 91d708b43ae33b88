"""Pieces the benchmarks share: the error type and the ratio lines, the datasets they make from
a folder of images, and the measurement of the training job itself from its own metrics."""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from pipelines import shards
from pipelines.config import JobConfig
from pipelines.sources import IMG_EXTENSIONS
from pipelines.synthetic import SyntheticSpec


class BenchError(ValueError):
    """A bad command-line value; the message is one line naming the value and the fix."""


def ratio_line(name: str, baseline: str, ratio: float) -> str:
    """The line tests and readers look for: ``ratio NAME/BASELINE: 1.23x``."""
    return f"ratio {name}/{baseline}: {ratio:.2f}x"


def target_line(name: str, baseline: str, target: float, ratio: float) -> str:
    """``target NAME/BASELINE >= 0.9x: met (0.95x)``."""
    verdict = "met" if ratio >= target else "missed"
    return f"target {name}/{baseline} >= {target:g}x: {verdict} ({ratio:.2f}x)"


def print_machine() -> None:
    """``machine: 2 CPUs, load average 0.9``: what else was running bears on every figure."""
    if hasattr(os, "getloadavg"):
        print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}", flush=True)


# ---------------------------------------------------------------------------------------------
# Datasets made for a benchmark
# ---------------------------------------------------------------------------------------------


def find_images(folder: Path) -> list[Path]:
    """Image files under ``folder`` (recursively, common extensions, any case), sorted."""
    paths = sorted(
        p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS
    )
    if not paths:
        raise BenchError(f"no images under {folder}: pass --images a folder of JPEG files")
    return paths


def image_dataset(
    image_paths: Sequence[Path], workdir: Path, *, train_rows: int, max_side: int | None = None
) -> str:
    """A dataset of ``image_paths`` written by resnet-prepare's library (its output hidden) to
    ``workdir`` (or reused from there): one class per image; split "train" holds the images
    repeated to at least ``train_rows`` rows, so epochs are long enough to time; "val" each
    image once. ``max_side``: re-encode to that longer side. Returns the dataset's location."""
    src = workdir / "src"
    if not src.exists():
        copies = {"train": -(-train_rows // len(image_paths)), "val": 1}
        for split, count in copies.items():
            for i, path in enumerate(image_paths):
                folder = src / split / f"c{i:05d}"
                folder.mkdir(parents=True)
                for copy in range(count):
                    (folder / f"{copy:05d}{path.suffix.lower()}").symlink_to(path.resolve())
    out = workdir / ("shards" if max_side is None else f"shards-{max_side}")
    config = shards.prepare_config(
        "folder", str(out), src=str(src), max_side=max_side, max_skipped="0.5"
    )
    _write_quietly(config)
    return str(out)


def cifar_dataset(uri: str, *, train_rows: int, classes: int) -> None:
    """Synthetic 32x32 JPEG shards with at least ``train_rows`` training rows at ``uri``."""
    spec = SyntheticSpec(
        num_classes=classes, train_per_class=-(-train_rows // classes), val_per_class=10
    )
    _write_quietly(shards.prepare_config("synthetic", uri, synthetic=spec))


def _write_quietly(config: shards.PrepareConfig) -> None:
    log = io.StringIO()
    with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        status = shards.write_dataset(config)
    if status != 0:
        raise BenchError(f"writing the benchmark shards failed (exit {status}):\n{log.getvalue()}")


# ---------------------------------------------------------------------------------------------
# The training job, measured from its own metric windows
# ---------------------------------------------------------------------------------------------


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


@dataclass(frozen=True)
class JobMeasurement:
    """The training job's figures, from its own metric windows."""

    images_per_s: float  # steady state: the windows after the warm-up steps
    data_wait_share: float  # share of steady-state step time spent waiting for a batch
    startup_s: float  # from the job's start to its first step
    steps: int
    wall_s: float  # the whole job: start-up, steps, evaluation, checkpoint, final model
    startup: dict[str, float] = field(default_factory=dict)  # the run's startup/* split


def measure_job(config: JobConfig, *, warmup_steps: int) -> JobMeasurement:
    """Run the training job (Ray must be up) and read its steady state from its MLflow run.

    ``config.train.log_every_steps`` should equal ``warmup_steps`` so the first window is the
    warm-up. The run goes to a temporary MLflow store unless ``MLFLOW_TRACKING_URI`` is set.
    """
    from mlflow.tracking import MlflowClient

    from pipelines.job.checks import check_dataset
    from pipelines.job.trainer import run_training

    config = replace(config, train=replace(config.train, export_onnx=False))  # not training
    manifest, plan = check_dataset(config)
    with _mlflow_store() as uri:
        started = time.time()
        metrics = run_training(config, manifest, plan)
        wall = time.time() - started
        client = MlflowClient(tracking_uri=uri)
        run_id = metrics["mlflow_run_id"]

        def by_step(key: str) -> dict:
            return {m.step: m for m in client.get_metric_history(run_id, key)}

        rates = by_step("throughput/images_per_s")
        waits = by_step("throughput/data_wait_share")
        seconds = by_step("time/window_s")
        logged = client.get_run(run_id).data.metrics
        split = {key: value for key, value in logged.items() if key.startswith("startup/")}
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
    return JobMeasurement(
        images / total_s, wait / total_s, startup, plan.total_steps, wall, startup=split
    )


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
