"""resnet-train: the main job — Ray Data streams the shards into Ray Train TorchTrainer workers,
the paper's recipes train a ResNet, checkpoints survive failures, MLflow records everything.

Run from a checkout:

    resnet-train                    # the demo: synthetic shards (made on first use), 2 CPU workers
    resnet-train --recipe cifar-paper --model resnet56 --data data/cifar10 --workers 1
    resnet-train --recipe imagenet-fast --data s3://bucket/imagenet --workers 8 --gpu \\
        --storage s3://bucket/runs train.epochs=40
    ray job submit --working-dir . -- python -m pipelines.train --recipe imagenet-paper ...

Dotted overrides (``optim.lr=0.05 train.epochs=3``) change any config value; ``--help`` lists the
flags. The resolved config is printed first. Everything that can be checked without a cluster is
checked before Ray starts: the config values, the checkpoint storage (S3 credentials and bucket),
the dataset's manifest, a GPU request, and that a resumed MLflow run has the same config.

Checkpoints go to ``<storage>/<run name>/`` at every epoch end (and every
``train.checkpoint_every_steps`` steps); the last ``train.keep_checkpoints`` are kept. A failed
worker restarts the worker group from the latest checkpoint (``scale.max_failures`` times).
Re-running with the same run name (``--name``, default ``<recipe>-<model>``) resumes from the
latest checkpoint, to the exact batch, and continues the same MLflow run.

Exit status: 0 done (or already done), 1 training failed, 2 bad configuration or location
(one line on stderr, no cluster resource taken), 130 interrupted (SIGINT/SIGTERM; re-run the same
command to resume).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import signal
import socket
import sys
import tempfile
import time
import uuid
import warnings
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipelines import data as data_lib
from pipelines import storage
from pipelines.config import (
    ConfigError,
    JobConfig,
    apply_overrides,
    flatten,
    from_dict,
    to_dict,
    validate,
)
from pipelines.manifest import Manifest, ManifestError, load_mean_image, read_manifest
from pipelines.recipes import RECIPES, build_recipe
from resnet_core.checkpoint import (
    CheckpointError,
    load_checkpoint,
    restore_training_state,
    save_checkpoint,
    save_weights,
    training_state,
)
from resnet_core.metrics import RunningMean, TopKAccumulator
from resnet_core.models import create_model, is_cifar_model
from resnet_core.optim import LRSchedule, build_sgd, scaled_lr, set_lr
from resnet_core.transforms import IMAGENET_MEAN_RGB, IMAGENET_STD_RGB, to_float_batch

DEMO_DATA = "data/synthetic-cifar"
# The demo's synthetic dataset (created on first use): sized so that `make demo` trains to far
# above chance within about three minutes on two CPU cores.
DEMO_TRAIN_PER_CLASS = 500
DEMO_VAL_PER_CLASS = 100
# Checkpoint folders are "checkpoint-<step, 9 digits>-<attempt>": the step orders them; the
# attempt id (new at every worker-group start) keeps a re-trained step from overwriting a
# folder that Ray's checkpoint bookkeeping still refers to.
CHECKPOINT_PREFIX = "checkpoint-"
CHECKPOINT_NAME = re.compile(r"checkpoint-(\d{9})-[0-9a-f]+")
# Ranks checkpoints (keep the best K): validation top-1, or -1 where no validation ran (mid-epoch).
# A key of its own: Ray stores the scores as JSON (a NaN comes back as None and breaks resume),
# and MLflow must not record -1 as a top-1; the reporter skips "checkpoint/" keys.
CHECKPOINT_SCORE = "checkpoint/score"
EXIT_BAD_CONFIG = 2
EXIT_INTERRUPTED = 130


# ---------------------------------------------------------------------------------------------
# Command line → JobConfig
# ---------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="resnet-train",
        description="Train a ResNet v1 with Ray Train on Parquet shards; record it in MLflow. "
        "Re-run the same command (same --name) to resume from the latest checkpoint. "
        "Exit status: 0 done, 1 training failed, 2 bad configuration (nothing started), "
        "130 interrupted.",
        epilog="Any config value can be overridden as section.key=value, e.g. optim.lr=0.05 "
        "train.epochs=3 data.augment=inception schedule.kind=cosine "
        "train.checkpoint_every_steps=100. Sections: model, data, optim, schedule, train, scale, "
        "run (--print-config shows them all). MLflow store: MLFLOW_TRACKING_URI, else mlflow.db "
        "in the current directory.",
    )
    parser.add_argument("--recipe", default="demo", choices=sorted(RECIPES), help="base recipe")
    parser.add_argument("--model", help="model name (resnet18..152, plain18/34, resnet20 ...)")
    parser.add_argument("--data", help="dataset URI written by resnet-prepare (path or s3://)")
    parser.add_argument("--workers", type=int, help="number of Train workers (scale.num_workers)")
    parser.add_argument("--gpu", action="store_true", help="one GPU per worker (scale.use_gpu)")
    parser.add_argument("--cpus-per-worker", type=float, help="CPUs per Train worker")
    parser.add_argument("--epochs", type=int, help="train.epochs")
    parser.add_argument("--storage", help="checkpoint storage: a path or s3://bucket/prefix")
    parser.add_argument("--name", help="run name (deterministic; re-use it to resume)")
    parser.add_argument("--experiment", help="MLflow experiment name")
    parser.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS or local)")
    parser.add_argument("--print-config", action="store_true", help="print the config and exit")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    return parser


def resolve_config(args: argparse.Namespace) -> JobConfig:
    """Recipe, then flags, then dotted overrides (last wins)."""
    config = build_recipe(args.recipe, args.model)
    flags = {
        "data.uri": args.data,
        "scale.num_workers": args.workers,
        "scale.cpus_per_worker": args.cpus_per_worker,
        "train.epochs": args.epochs,
        "run.storage_path": args.storage,
        "run.name": args.name,
        "run.experiment": args.experiment,
    }
    overrides = [f"{k}={v}" for k, v in flags.items() if v is not None]
    if args.gpu:
        overrides.append("scale.use_gpu=true")
    return apply_overrides(config, [*overrides, *args.overrides])


def _is_model_name(name: str) -> bool:
    try:
        is_cifar_model(name)
    except ValueError:
        return False
    return True


def model_options(config: JobConfig) -> dict[str, Any]:
    m = config.model
    options: dict[str, Any] = {"zero_init_residual": m.zero_init_residual}
    if m.shortcut is not None:
        options["shortcut"] = m.shortcut
    if m.stride_in_3x3:
        options["stride_in_3x3"] = True
    return options


def absolute_locations(config: JobConfig) -> JobConfig:
    """Resolve relative paths on the driver: Train workers run in another working directory."""
    data = replace(config.data, uri=storage.absolute_uri(config.data.uri))
    run = replace(config.run, storage_path=storage.absolute_uri(config.run.storage_path))
    return replace(config, data=data, run=run)


@dataclass(frozen=True)
class StepPlan:
    """The run's length in optimizer steps, a function of the config and the manifest only.

    steps_per_epoch: steps of every full epoch (same on every rank). total_steps: the run's last
    step (``train.max_steps`` may cut the last epoch short). epochs: epochs that run.
    """

    steps_per_epoch: int
    total_steps: int
    epochs: int


def plan_steps(config: JobConfig, manifest: Manifest) -> StepPlan:
    """Steps per epoch and in total; ValueError when the split is too small for the batch."""
    t, world = config.train, config.scale.num_workers
    per_epoch = data_lib.steps_per_epoch(
        manifest, config.data.train_split, world_size=world, batch_size=t.global_batch // world
    )
    total = t.epochs * per_epoch
    if t.max_steps is not None:
        total = min(total, t.max_steps)
    return StepPlan(per_epoch, total, math.ceil(total / per_epoch))


# ---------------------------------------------------------------------------------------------
# The loop on every worker
# ---------------------------------------------------------------------------------------------


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Runs on each Train worker. Every rank reports; rank 0 alone writes checkpoints."""
    import ray.train
    import ray.train.torch

    config: JobConfig = from_dict(JobConfig, loop_config["config"])
    quiet_framework_logs()
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    on_gpu = device.type == "cuda"
    manifest = read_manifest(config.data.uri)
    plan = plan_steps(config, manifest)
    t, o, d = config.train, config.optim, config.data
    # Names this worker group's checkpoints (Ray broadcasts rank 0's name to all ranks).
    attempt = uuid.uuid4().hex[:8]

    torch.manual_seed(t.seed)
    model = create_model(
        config.model.name, num_classes=manifest.num_classes, **model_options(config)
    )
    if t.sync_bn and world > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    channels_last = on_gpu and t.channels_last
    model = model.to(device, memory_format=torch.channels_last if channels_last else None)
    model = ray.train.torch.prepare_model(model)
    if t.compile:
        model = torch.compile(model)
    use_bf16 = on_gpu and t.precision in ("auto", "bf16")

    batch_per_worker = t.global_batch // world
    lr = scaled_lr(o.lr, t.global_batch, o.reference_batch)
    optimizer = make_optimizer(model, config)
    schedule = make_schedule(config, lr, plan.total_steps, plan.steps_per_epoch)
    criterion = nn.CrossEntropyLoss(label_smoothing=o.label_smoothing)
    mean, std = normalization(config, manifest, device)

    start_epoch, step, batches_done, epoch_state = 0, 0, 0, None
    restored = restore_latest(ray.train.get_checkpoint(), model, optimizer)
    if restored is not None:
        start_epoch, step = restored["epoch"], restored["step"]
        batches_done = restored["batches_in_epoch"]
        schedule.load_state_dict(restored["extra"]["schedule"])
        # The running epoch metrics were summed over ranks when saved: rank 0 alone takes them,
        # so the epoch-end all-reduce counts every sample once.
        epoch_state = restored["extra"].get("epoch_metrics") if rank == 0 else None
        if rank == 0:
            if step >= plan.total_steps:
                say(f"run already complete at step {step}: nothing to train")
            else:
                say(
                    f"resumed from step {step} (epoch {start_epoch + 1}, "
                    f"{batches_done} batches into it)"
                )

    for epoch in range(start_epoch, plan.epochs):
        epoch_steps = min(plan.steps_per_epoch, plan.total_steps - epoch * plan.steps_per_epoch)
        train_acc = TopKAccumulator(device=device)
        train_loss = RunningMean(device=device)
        if epoch_state is not None:
            train_acc.load_state_dict(epoch_state["accuracy"])
            train_loss.load_state_dict(epoch_state["loss"])
            epoch_state = None
        batches = data_lib.iter_batches(
            manifest,
            split=d.train_split,
            mode=d.augment,
            world_size=world,
            rank=rank,
            epoch=epoch,
            seed=d.seed,
            batch_size=batch_per_worker,
            image_size=d.image_size,
            skip_batches=batches_done,
            max_batches=epoch_steps,
            decode_num_cpus=d.decode_cpus,
            decode_concurrency=d.decode_concurrency,
            prefetch_batches=d.prefetch_batches,
            local_shuffle_buffer_size=d.shuffle_buffer or None,
            pin_memory=on_gpu,
            decode_device=device if d.decode_device == "device" else None,
        )
        model.train()
        window = _Window(device)
        fetch_start = time.perf_counter()
        for batch_index, (images, labels) in enumerate(batches, start=batches_done):
            window.data_seconds += time.perf_counter() - fetch_start
            set_lr(optimizer, schedule.lr(step))
            images = images.to(device, non_blocking=True)  # no-op if decoded there (decode_device)
            labels = labels.to(device, non_blocking=True)
            x = to_float_batch(
                images, mean=mean, std=std, lighting_std=d.lighting_std, channels_last=channels_last
            )
            autocast = torch.autocast("cuda", dtype=torch.bfloat16) if use_bf16 else nullcontext()
            with autocast:
                logits = model(x)
                loss = criterion(logits, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            train_acc.update(logits.detach().float(), labels)
            train_loss.update(loss.detach().float(), labels.numel())
            window.add(loss.detach().float(), logits.detach().float(), labels)
            # The epoch-end report below covers the last batch of an epoch.
            last_in_epoch = batch_index + 1 == epoch_steps
            log_due = step % t.log_every_steps == 0
            checkpoint_due = bool(t.checkpoint_every_steps) and (
                step % t.checkpoint_every_steps == 0
            )
            if (log_due or checkpoint_due) and not last_in_epoch:
                report = window.report(world, step, epoch, optimizer)
                schedule.observe_train_error(1.0 - report["train/window_top1"])
                if rank == 0:
                    say(format_progress(report, epoch, plan.epochs, batch_index + 1, epoch_steps))
                state = None
                if checkpoint_due:
                    epoch_metrics = _reduced_epoch_state(train_acc, train_loss)
                    if rank == 0:
                        state = training_state(
                            model,
                            optimizer,
                            epoch=epoch,
                            step=step,
                            batches_in_epoch=batch_index + 1,
                            config=to_dict(config),
                            extra={
                                "schedule": schedule.state_dict(),
                                "epoch_metrics": epoch_metrics,
                            },
                        )
                _report(report, state, checkpoint_due=checkpoint_due, step=step, attempt=attempt)
                window = _Window(device)
            fetch_start = time.perf_counter()
        batches_done = 0

        epoch_report = window.report(world, step, epoch, optimizer)
        train_acc.all_reduce()
        train_loss.all_reduce()
        train_summary = train_acc.compute()
        epoch_report.update(
            {
                "epoch": epoch + 1,
                "train/loss": train_loss.compute(),
                "train/top1": train_summary["top1"],
                "train/top5": train_summary["top5"],
                "train/error": 1.0 - train_summary["top1"],
                "train/epoch_samples": int(train_summary["count"]),
            }
        )
        schedule.observe_train_error(1.0 - train_summary["top1"])
        final_epoch = epoch + 1 == plan.epochs
        if (epoch + 1) % t.eval_every_epochs == 0 or final_epoch:
            val_metrics = evaluate(model, manifest, config, rank, world, device, mean, std)
            epoch_report.update(val_metrics)
            schedule.observe_val_error(val_metrics["val/error"])
        if rank == 0:
            say(format_epoch(epoch_report, epoch, plan.epochs))
        state = None
        if rank == 0:
            state = training_state(
                model,
                optimizer,
                epoch=epoch + 1,
                step=step,
                batches_in_epoch=0,
                config=to_dict(config),
                extra={"schedule": schedule.state_dict()},
            )
        _report(epoch_report, state, checkpoint_due=True, step=step, attempt=attempt)


def say(line: str) -> None:
    """One progress line on the driver's console. Ray Train's print patch tees ``print`` into
    its logger as well, which shows every line twice; writing to stdout shows it once."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def quiet_framework_logs() -> None:
    """Keep the console to our progress lines: Ray Data announces every epoch's pipeline and
    Ray Train every report; their warnings still show, and everything stays in Ray's logs."""
    import logging

    import ray.data

    logging.getLogger("ray.data").setLevel(logging.WARNING)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
    ray.data.DataContext.get_current().enable_progress_bars = False
    # Ray 2.60 logs every ray.train.report at INFO through a logger named by its file path,
    # outside "ray.train", so RunConfig's LoggingConfig does not reach it.
    context_module = sys.modules.get("ray.train.v2._internal.execution.context")
    if context_module is not None:
        logging.getLogger(context_module.__file__).setLevel(logging.WARNING)


class _Window:
    """Metrics of the steps since the last report: loss, top-1, throughput, data wait."""

    def __init__(self, device: torch.device) -> None:
        self.started = time.perf_counter()
        self.data_seconds = 0.0
        self.loss = RunningMean(device=device)
        self.accuracy = TopKAccumulator(device=device)

    def add(self, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        self.loss.update(loss, labels.numel())
        self.accuracy.update(logits, labels)

    def report(
        self, world: int, step: int, epoch: int, optimizer: torch.optim.Optimizer
    ) -> dict[str, float]:
        """Window metrics summed over ranks (a collective: every rank calls it)."""
        seconds = max(time.perf_counter() - self.started, 1e-9)
        local_images = int(self.accuracy.count)
        self.loss.all_reduce()
        self.accuracy.all_reduce()
        count = int(self.accuracy.count)
        return {
            "step": step,
            "train/window_loss": self.loss.compute() if count else float("nan"),
            "train/window_top1": self.accuracy.compute()["top1"] if count else float("nan"),
            "lr": optimizer.param_groups[0]["lr"],
            "throughput/images_per_s": count / seconds,
            "throughput/images_per_s_per_worker": local_images / seconds,
            "throughput/data_wait_share": self.data_seconds / seconds,
            "time/window_s": seconds,
        }


def _reduced_epoch_state(acc: TopKAccumulator, loss: RunningMean) -> dict[str, Any]:
    """All ranks' running epoch metrics summed (a collective: every rank calls it)."""
    acc_copy = TopKAccumulator(device=acc.device)
    acc_copy.load_state_dict(acc.state_dict())
    loss_copy = RunningMean(device=loss.device)
    loss_copy.load_state_dict(loss.state_dict())
    return {
        "accuracy": acc_copy.all_reduce().state_dict(),
        "loss": loss_copy.all_reduce().state_dict(),
    }


def _report(
    metrics: dict[str, float],
    state: dict | None,
    *,
    checkpoint_due: bool,
    step: int,
    attempt: str,
) -> None:
    """Every rank reports (a barrier); the rank holding ``state`` (rank 0) writes the checkpoint."""
    import ray.train

    if not checkpoint_due:
        ray.train.report(metrics)
        return
    name = f"{CHECKPOINT_PREFIX}{step:09d}-{attempt}"
    metrics = {**metrics, CHECKPOINT_SCORE: float(metrics.get("val/top1", -1.0))}
    if state is None:
        ray.train.report(metrics, checkpoint=None, checkpoint_dir_name=name)
        return
    with tempfile.TemporaryDirectory(prefix="resnet-ckpt-") as tmp:
        path = save_checkpoint(Path(tmp) / "state", state)
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(str(path)),
            checkpoint_dir_name=name,
        )


def restore_latest(
    checkpoint: Any, model: nn.Module, optimizer: torch.optim.Optimizer
) -> dict[str, Any] | None:
    """Load Ray's latest checkpoint, or the newest earlier one that is intact (with a warning).

    ``checkpoint`` is ``ray.train.get_checkpoint()``; its siblings in the run folder at the same
    or an earlier step are the fall-backs, newest first. Never silently restarts from scratch:
    if checkpoints exist and none loads, it raises CheckpointError.
    """
    if checkpoint is None:
        return None
    import pyarrow.fs as pafs
    from ray.train import Checkpoint

    fs = checkpoint.filesystem
    parent, _, latest_name = checkpoint.path.rstrip("/").rpartition("/")
    latest_match = CHECKPOINT_NAME.fullmatch(latest_name)
    latest_step = int(latest_match.group(1)) if latest_match else math.inf
    infos = fs.get_file_info(pafs.FileSelector(parent))
    earlier = [
        (int(m.group(1)), i.base_name)
        for i in infos
        if (m := CHECKPOINT_NAME.fullmatch(i.base_name))
        and i.base_name != latest_name
        and int(m.group(1)) <= latest_step
    ]
    candidates = [latest_name] + [name for _, name in sorted(earlier, reverse=True)]
    problems = []
    for name in candidates:
        with tempfile.TemporaryDirectory(prefix="resnet-restore-") as tmp:
            try:
                Checkpoint(f"{parent}/{name}", filesystem=fs).to_directory(tmp)
                state = load_checkpoint(tmp)
            except (CheckpointError, OSError) as e:
                warnings.warn(
                    f"checkpoint {parent}/{name} is unusable ({e}); falling back to the previous one",
                    stacklevel=1,
                )
                problems.append(f"{name}: {e}")
                continue
        return restore_training_state(state, model, optimizer)
    raise CheckpointError(
        f"no usable checkpoint under {parent} ({'; '.join(problems)}); refusing to restart from "
        "scratch — delete the run folder or pass a new --name"
    )


def make_optimizer(model: nn.Module, config: JobConfig) -> torch.optim.Optimizer:
    """The job's SGD at its (linearly scaled) base learning rate; the schedule sets it per step."""
    o, t = config.optim, config.train
    return build_sgd(
        model,
        lr=scaled_lr(o.lr, t.global_batch, o.reference_batch),
        momentum=o.momentum,
        weight_decay=o.weight_decay,
        nesterov=o.nesterov,
        decay_norm_and_bias=o.decay_norm_and_bias,
    )


def make_schedule(
    config: JobConfig, lr: float, total_steps: int, steps_per_epoch: int
) -> LRSchedule:
    s = config.schedule
    milestones = tuple(s.milestones) + tuple(e * steps_per_epoch for e in s.milestone_epochs)
    return LRSchedule(
        base_lr=lr,
        kind=s.kind,  # type: ignore[arg-type]
        total_steps=total_steps,
        milestones=tuple(sorted(milestones)),
        gamma=s.gamma,
        warmup_steps=round(s.warmup_epochs * steps_per_epoch),
        hold_lr=s.hold_lr,
        hold_until_train_error=s.hold_until_train_error,
        plateau_patience=s.plateau_patience,
    )


def normalization(
    config: JobConfig, manifest: Manifest, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Mean (per-pixel image, per-channel or ImageNet constants) and optional std, on device."""
    d = config.data
    if d.mean == "per_pixel":
        mean = torch.from_numpy(np.asarray(load_mean_image(manifest), dtype=np.float32))
        if mean.shape[-1] != d.image_size:
            mean = nn.functional.interpolate(
                mean[None], size=(d.image_size, d.image_size), mode="bilinear", align_corners=False
            )[0]
    elif d.mean == "per_channel":
        mean = torch.tensor(manifest.pixel_mean_rgb)
    else:
        mean = torch.tensor(IMAGENET_MEAN_RGB)
    std = None
    if d.normalize_std:
        stats = manifest.pixel_std_rgb if d.mean != "imagenet" else IMAGENET_STD_RGB
        std = torch.tensor(stats, device=device)
    return mean.to(device), std


@torch.no_grad()
def evaluate(
    model: nn.Module,
    manifest: Manifest,
    config: JobConfig,
    rank: int,
    world: int,
    device: torch.device,
    mean: torch.Tensor,
    std: torch.Tensor | None,
) -> dict[str, float]:
    """Centre-crop validation, every image exactly once across ranks, exact top-1/top-5."""
    d = config.data
    model.eval()
    accuracy = TopKAccumulator(device=device)
    loss = RunningMean(device=device)
    criterion = nn.CrossEntropyLoss()
    batches = data_lib.iter_batches(
        manifest,
        split=d.val_split,
        mode="eval_center",
        world_size=world,
        rank=rank,
        epoch=0,
        seed=d.seed,
        batch_size=max(1, config.train.global_batch // world),
        image_size=d.image_size,
        eval_resize=d.eval_resize,
        decode_num_cpus=d.decode_cpus,
        decode_concurrency=d.decode_concurrency,
        prefetch_batches=d.prefetch_batches,
        pin_memory=device.type == "cuda",
        decode_device=device if d.decode_device == "device" else None,
    )
    for images, labels in batches:
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        logits = model(to_float_batch(images, mean=mean, std=std)).float()
        accuracy.update(logits, labels)
        loss.update(criterion(logits, labels), labels.numel())
    accuracy.all_reduce()
    loss.all_reduce()
    summary = accuracy.compute()
    model.train()
    return {
        "val/top1": summary["top1"],
        "val/top5": summary["top5"],
        "val/error": 1.0 - summary["top1"],
        "val/loss": loss.compute(),
        "val/count": int(summary["count"]),
    }


def format_progress(report: dict[str, float], epoch: int, epochs: int, batch: int, of: int) -> str:
    return (
        f"epoch {epoch + 1}/{epochs} batch {batch}/{of} step {report['step']} "
        f"loss {report['train/window_loss']:.3f} top1 {100 * report['train/window_top1']:.1f}% "
        f"lr {report['lr']:.4g} {report['throughput/images_per_s']:.0f} img/s "
        f"data-wait {100 * report['throughput/data_wait_share']:.0f}%"
    )


def format_epoch(report: dict[str, float], epoch: int, epochs: int) -> str:
    text = (
        f"epoch {epoch + 1}/{epochs} done: step {report['step']} train loss "
        f"{report['train/loss']:.3f} top1 {100 * report['train/top1']:.1f}% "
        f"({report['train/epoch_samples']} images)"
    )
    if "val/top1" in report:
        text += (
            f" | val top1 {100 * report['val/top1']:.2f}% top5 {100 * report['val/top5']:.2f}% "
            f"({report['val/count']} images)"
        )
    return text


# ---------------------------------------------------------------------------------------------
# The driver: check everything, connect, fit, log the model
# ---------------------------------------------------------------------------------------------


def check_locations(config: JobConfig) -> None:
    """Checkpoint storage writable and dataset location readable (S3: credentials + bucket)."""
    storage.check_writable(config.run.storage_path)
    if storage.is_s3(config.data.uri):
        storage.check_readable(config.data.uri)


def check_model(config: JobConfig) -> None:
    """Build the model once on the driver (0.01 s for the demo's, 1.5 s for ResNet-152):
    catches option mismatches such as a shortcut on a plain net before any worker tries."""
    try:
        create_model(config.model.name, **model_options(config))
    except ValueError as e:
        raise ConfigError(f"model options do not fit {config.model.name}: {e}") from None


def check_gpu_locally(config: JobConfig, address: str | None) -> None:
    """A GPU request without a cluster to attach to needs CUDA on this machine."""
    attached = address or os.environ.get("RAY_ADDRESS")
    if config.scale.use_gpu and not attached and not torch.cuda.is_available():
        raise ConfigError(
            "scale.use_gpu=true but this machine has no CUDA GPU and no cluster is attached "
            "(--address / RAY_ADDRESS); drop --gpu or submit to a GPU cluster"
        )


def check_dataset(config: JobConfig) -> tuple[Manifest, StepPlan]:
    """The manifest, its splits, and that the recipe fits the dataset."""
    d = config.data
    manifest = read_manifest(d.uri)
    manifest.split(d.train_split)
    if manifest.num_rows(d.val_split) == 0:
        raise ConfigError(f"data.val_split={d.val_split!r} of {d.uri} has no images")
    if d.augment not in data_lib.TRAIN_MODES:
        raise ConfigError(
            f"data.augment={d.augment!r} is not supported by the streaming reader; use one of "
            f"{data_lib.TRAIN_MODES}"
        )
    if d.mean == "per_pixel" and manifest.mean_image_uri is None:
        raise ConfigError(f"data.mean=per_pixel but {d.uri} has no mean image; use per_channel")
    if (d.mean == "per_channel" or (d.normalize_std and d.mean != "imagenet")) and (
        manifest.pixel_mean_rgb is None or manifest.pixel_std_rgb is None
    ):
        raise ConfigError(f"data.mean={d.mean} needs pixel statistics, {d.uri} has none")
    try:
        plan = plan_steps(config, manifest)
    except ValueError as e:
        raise ConfigError(f"train.global_batch={config.train.global_batch}: {e}") from None
    return manifest, plan


def check_resumable(config: JobConfig) -> None:
    """A run of this name in the MLflow store must have been started with the same config."""
    from pipelines import tracking

    uri = tracking.tracking_uri()
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).exists():
        return  # a new embedded store holds no runs; run_training creates it
    from mlflow.tracking import MlflowClient

    tracking.quiet_store_logs()
    client = MlflowClient(tracking_uri=uri)
    try:
        experiment = client.get_experiment_by_name(config.run.experiment)
        run = experiment and tracking.find_run(client, experiment.experiment_id, config.run_name)
    except Exception as e:  # any failure to reach or read the store
        raise ConfigError(
            f"cannot read the MLflow store {tracking.strip_userinfo(uri)} "
            f"({type(e).__name__}: {' '.join(str(e).split())[:200]}); check MLFLOW_TRACKING_URI"
        ) from None
    if run is None:
        return
    conflicts = tracking.param_conflicts(run.data.params, flatten(config))
    if conflicts:
        raise ConfigError(
            f"run {config.run_name!r} (MLflow run {run.info.run_id}) was started with "
            f"{conflicts[0]}; resuming it with another config would mix two runs — pass a new "
            "--name, or the original values"
        )


def ensure_demo_data(config: JobConfig) -> None:
    """The embedded default: create the synthetic shards on first use (Ray must be up)."""
    from pipelines import prepare

    uri = config.data.uri
    print(f"no dataset at {uri}: creating the synthetic demo shards there (one time)", flush=True)
    status = prepare.main(
        [
            "synthetic",
            "--kind", "cifar",
            "--train-per-class", str(DEMO_TRAIN_PER_CLASS),
            "--val-per-class", str(DEMO_VAL_PER_CLASS),
            "--out", uri,
        ]
    )  # fmt: skip
    if status != 0:
        raise ManifestError(f"creating the demo dataset at {uri} failed (exit {status})")


def job_warnings(config: JobConfig) -> list[str]:
    """Under ``ray job submit`` the working directory is a temporary copy of the upload:
    locations that default into it do not survive the job."""
    if "RAY_JOB_CONFIG_JSON_ENV_VAR" not in os.environ:  # set by Ray for a job's entrypoint
        return []
    notes = []
    if not os.environ.get("MLFLOW_TRACKING_URI"):
        notes.append(
            "MLFLOW_TRACKING_URI is not set, so the MLflow store lands in this job's temporary "
            "working directory; set it with --runtime-env-json "
            '\'{"env_vars": {"MLFLOW_TRACKING_URI": "http://..."}}\''
        )
    path = config.run.storage_path
    if not storage.is_s3(path) and Path(path).is_relative_to(Path.cwd()):
        notes.append(
            f"run.storage_path={path} is inside this job's temporary working directory, so its "
            "checkpoints cannot resume a later submission; pass --storage s3://... or a shared "
            "path"
        )
    return notes


def needs_demo_data(config: JobConfig) -> bool:
    """The demo recipe on its default location, not created yet."""
    uri = config.data.uri
    return (
        config.recipe == "demo"
        and uri == storage.absolute_uri(DEMO_DATA)
        and not Path(uri, "manifest.json").exists()
    )


def start_ray(config: JobConfig, address: str | None) -> bool:
    """Attach to a cluster (``--address`` or ``RAY_ADDRESS``), else start a local Ray sized for
    the workers plus decode tasks; then check the cluster can ever host the GPU workers.
    Returns True when this process connected (and must disconnect)."""
    import ray

    if ray.is_initialized():
        return False
    if address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address, log_to_driver=True)
    else:
        sc, d = config.scale, config.data
        needed = sc.num_workers * (sc.cpus_per_worker + d.decode_cpus)
        init_local_ray(num_cpus=max(os.cpu_count() or 1, math.ceil(needed)))
    # ray.init makes SIGTERM a bare sys.exit (and Ray's core worker a crash report): put ours
    # back, so a stopped job (`ray job stop`, kill) ends its MLflow run and exits 130.
    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        check_cluster_gpus(config)
    except ConfigError:
        ray.shutdown()
        raise
    return True


def init_local_ray(num_cpus: int, **options: Any) -> None:
    """A local Ray for Ray Train: ``num_cpus`` logical CPUs, the dashboard on loopback.

    Ray Train's placement-group cleaner reaches the dashboard through the state API, whose
    auto-detection fails when another Ray runs on this machine: its address is named to the
    job's processes. ``options`` go to ``ray.init`` (e.g. ``object_store_memory``).
    """
    import ray

    port = _free_loopback_port()
    ray.init(
        num_cpus=num_cpus,
        dashboard_host="127.0.0.1",
        dashboard_port=port,
        runtime_env={"env_vars": {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"}},
        **options,
    )


def _free_loopback_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def check_cluster_gpus(config: JobConfig) -> None:
    """GPU workers need GPUs now, or in the autoscaler's node types."""
    import ray
    from ray._private import state as ray_state

    sc = config.scale
    if not sc.use_gpu:
        return
    needed = sc.num_workers * sc.gpus_per_worker
    now = ray.cluster_resources().get("GPU", 0)
    # The upper bound an autoscaling cluster can reach (what Ray Train itself checks, via the
    # same private helper); None on a fixed cluster.
    reachable = (ray_state.state.get_max_resources_from_cluster_config() or {}).get("GPU", 0)
    if max(now, reachable) < needed:
        raise ConfigError(
            f"scale.use_gpu=true with {sc.num_workers} workers needs {needed:g} GPUs but the "
            f"cluster has {max(now, reachable):g}; drop --gpu, lower --workers or add GPU nodes"
        )


def cluster_tags(config: JobConfig) -> dict[str, str]:
    """The cluster shape the run used (the last one, for a resumed run)."""
    import ray

    resources = ray.cluster_resources()
    sc = config.scale
    return {
        "cluster.nodes": str(sum(1 for n in ray.nodes() if n.get("Alive"))),
        "cluster.cpus": f"{resources.get('CPU', 0):g}",
        "cluster.gpus": f"{resources.get('GPU', 0):g}",
        "cluster.workers": str(sc.num_workers),
        "cluster.use_gpu": str(sc.use_gpu),
        "cluster.cpus_per_worker": f"{sc.cpus_per_worker:g}",
    }


class TrainingInterrupted(Exception):
    """SIGINT or SIGTERM stopped the run; its checkpoints stay and a re-run resumes it."""


def run_training(config: JobConfig, manifest: Manifest, plan: StepPlan) -> dict[str, Any]:
    """Fit the TorchTrainer under MLflow; returns the final metrics (plus ``mlflow_run_id``).

    The MLflow run ends FINISHED when every step is done, FAILED otherwise (also on interrupt).
    """
    import pyarrow.fs as pafs
    from mlflow.tracking import MlflowClient
    from ray.train import (
        CheckpointConfig,
        FailureConfig,
        LoggingConfig,
        RunConfig,
        ScalingConfig,
    )
    from ray.train.torch import TorchTrainer

    from pipelines import tracking

    uri = tracking.tracking_uri()
    tracking.quiet_store_logs()
    client = MlflowClient(tracking_uri=uri)
    experiment_id = tracking.ensure_experiment(client, config.run.experiment, uri)
    tags = {
        **tracking.environment_tags(),
        **cluster_tags(config),
        "recipe": config.recipe,
        "model": config.model.name,
        "dataset.checksum": manifest.checksum,
        "dataset.uri": storage.redact(config.data.uri),
        "plan.steps_per_epoch": str(plan.steps_per_epoch),
        "plan.total_steps": str(plan.total_steps),
    }
    run_id, resumed = tracking.find_or_create_run(client, experiment_id, config.run_name, tags=tags)
    try:
        if resumed:
            tracking.set_tags(client, run_id, tags)
        tracking.log_params_once(client, run_id, flatten(config))
        print(
            f"MLflow run {run_id} ({'resumed' if resumed else 'new'}) in "
            f"{tracking.strip_userinfo(uri)}",
            flush=True,
        )
        fs, path = storage.resolve(config.run.storage_path)
        local = isinstance(fs, pafs.LocalFileSystem)
        sc = config.scale
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={"config": to_dict(config)},
            scaling_config=ScalingConfig(
                num_workers=sc.num_workers,
                use_gpu=sc.use_gpu,
                resources_per_worker={
                    "CPU": sc.cpus_per_worker,
                    **({"GPU": sc.gpus_per_worker} if sc.use_gpu else {}),
                },
            ),
            run_config=RunConfig(
                name=config.run_name,
                storage_path=config.run.storage_path if local else path,
                storage_filesystem=None if local else fs,
                failure_config=FailureConfig(
                    max_failures=sc.max_failures, controller_failure_limit=3
                ),
                # The best K by validation top-1, plus the latest (Ray never deletes the latest).
                checkpoint_config=CheckpointConfig(
                    num_to_keep=config.train.keep_checkpoints,
                    checkpoint_score_attribute=CHECKPOINT_SCORE,
                    checkpoint_score_order="max",
                ),
                callbacks=[tracking.MlflowReporter(uri, run_id)],
                # Ray Train's INFO lines (one per report) stay in its log files.
                logging_config=LoggingConfig(log_level="WARNING"),
            ),
        )
        result = trainer.fit()
        metrics = dict(result.metrics or {})
        reached = int(metrics.get("step", 0))
        if reached < plan.total_steps:  # Ray Train ends an aborted run without an error
            raise TrainingInterrupted(
                f"training stopped at step {reached} of {plan.total_steps} (aborted)"
            )
        if client.get_run(run_id).data.tags.get(tracking.FINAL_MODEL_TAG) is None:
            log_final_model(uri, run_id, config, manifest, result.checkpoint)
    except TrainingInterrupted:
        client.set_terminated(run_id, "FAILED")
        raise
    except (KeyboardInterrupt, SystemExit):
        # SIGINT: Ray Train aborts the run and exits; SIGTERM: our handler (see main).
        client.set_terminated(run_id, "FAILED")
        # Ray Train turns an interrupt during fit() into its own abort and sys.exit, which
        # loses the signal's name: our SIGTERM handler records it.
        name = _RECEIVED[-1] if _RECEIVED else "SIGINT"
        raise TrainingInterrupted(f"interrupted ({name})") from None
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")
    metrics["mlflow_run_id"] = run_id
    return metrics


def log_final_model(
    uri: str, run_id: str, config: JobConfig, manifest: Manifest, checkpoint: Any
) -> None:
    """The final weights as safetensors + config JSON, and the MLflow model (torch.export
    format, no pickle) with signature and input example, registered under a name."""
    import mlflow
    from mlflow.models import infer_signature
    from mlflow.tracking import MlflowClient

    from pipelines import tracking

    client = MlflowClient(tracking_uri=uri)
    with tempfile.TemporaryDirectory(prefix="resnet-final-") as tmp:
        checkpoint.to_directory(tmp)
        state = load_checkpoint(tmp)
    model = create_model(
        config.model.name, num_classes=manifest.num_classes, **model_options(config)
    )
    model.load_state_dict(state["model"])
    model.eval()
    with tempfile.TemporaryDirectory(prefix="resnet-weights-") as tmp:
        save_weights(
            Path(tmp) / "weights.safetensors", model, metadata={"model": config.model.name}
        )
        Path(tmp, "config.json").write_text(json.dumps(to_dict(config), indent=2))
        Path(tmp, "classes.json").write_text(
            json.dumps(
                {"classes": list(manifest.classes), "class_names": list(manifest.class_names)}
            )
        )
        client.log_artifacts(run_id, tmp, artifact_path="final")
    size = config.data.image_size
    # Batch 2: torch.export would specialise a batch of 1 to a constant (0/1 specialisation).
    # The model takes normalised float images (see to_float_batch) and returns class logits.
    example = np.zeros((2, 3, size, size), dtype=np.float32)
    with torch.no_grad():
        logits = model(torch.from_numpy(example)).numpy()
    registered = config.run.registered_model or f"resnet-ray-{config.model.name}"
    mlflow.set_tracking_uri(uri)
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pytorch.log_model(
            model,
            name="model",
            signature=infer_signature(example, logits),
            input_example=example,
            registered_model_name=registered,
            serialization_format="pt2",
            # The flavor's own requirements (torch): MLflow would otherwise infer them by
            # re-loading the model in a subprocess, about a minute on two cores.
            pip_requirements=mlflow.pytorch.get_default_pip_requirements(),
        )
    client.set_tag(run_id, tracking.FINAL_MODEL_TAG, info.model_uri)


_RECEIVED: list[str] = []  # the signals our handler turned into KeyboardInterrupt


def _raise_interrupt(signum: int, frame: Any) -> None:
    _RECEIVED.append(signal.Signals(signum).name)
    raise KeyboardInterrupt(_RECEIVED[-1])


def _fail(message: object, status: int) -> SystemExit:
    print(f"resnet-train: {message}", file=sys.stderr, flush=True)
    return SystemExit(status)


def main(argv: Sequence[str] | None = None) -> float:
    """Run the job; returns the final validation top-1 (also printed).

    Raises SystemExit: 2 on a bad configuration or location (before any cluster resource is
    taken), 130 when interrupted.
    """
    args = build_parser().parse_args(argv)
    try:
        config = absolute_locations(resolve_config(args))
        validate(config, model_names_ok=_is_model_name)
    except (ConfigError, ValueError) as e:
        raise _fail(e, EXIT_BAD_CONFIG) from None
    print("resolved config:\n" + json.dumps(to_dict(config), indent=2), flush=True)
    if args.print_config:
        return float("nan")
    for line in job_warnings(config):
        print(f"resnet-train: warning: {line}", file=sys.stderr, flush=True)
    import ray

    from pipelines import tracking

    previous_sigterm = signal.signal(signal.SIGTERM, _raise_interrupt)
    started = False
    try:
        check_model(config)
        check_locations(config)
        check_gpu_locally(config, args.address)
        demo_data_missing = needs_demo_data(config)
        dataset = None if demo_data_missing else check_dataset(config)
        check_resumable(config)
        if demo_data_missing:
            started = start_ray(config, args.address)
            ensure_demo_data(config)
            dataset = check_dataset(config)
        manifest, plan = dataset
        started = start_ray(config, args.address) or started
        metrics = run_training(config, manifest, plan)
    except (ConfigError, ManifestError, storage.StorageError) as e:
        raise _fail(e, EXIT_BAD_CONFIG) from None
    except (TrainingInterrupted, KeyboardInterrupt) as e:
        why = str(e) if isinstance(e, TrainingInterrupted) else f"interrupted ({e or 'SIGINT'})"
        raise _fail(
            f"{why}; checkpoints are kept — re-run the same command to resume", EXIT_INTERRUPTED
        ) from None
    finally:
        if started:
            ray.shutdown()
        signal.signal(signal.SIGTERM, previous_sigterm)

    top1 = float(metrics.get("val/top1", float("nan")))
    print(f"final validation top-1: {100 * top1:.2f}% ({metrics.get('val/count', 0)} images)")
    print(f"MLflow run: {metrics['mlflow_run_id']}")
    print(f"open the MLflow UI: {tracking.ui_command(tracking.tracking_uri())}", flush=True)
    return top1


def cli() -> None:
    """Console-script entry point: exit status 0 on success."""
    main()


if __name__ == "__main__":
    cli()
