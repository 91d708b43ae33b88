"""The loop on every Train worker: :class:`TrainLoopRunner`, and the extension points features
plug into (:class:`Extension`).

    runner.run():  restore()  ->  for each epoch: train_epoch() -> end_epoch()
    train_epoch(): for each batch: train_step() [-> report() every log/checkpoint interval]
    end_epoch():   epoch metrics -> evaluate() when due -> report(checkpoint) at the epoch end

Every rank runs the same calls (reports and metric reductions are collectives); rank 0 alone
prints and writes checkpoints. A run stopped anywhere resumes at the exact batch: the checkpoint
holds the weights, optimizer, RNG states, position, the running epoch metrics and trained rows,
and every extension's state, and the reader reproduces the epoch's batch sequence
(pipelines.data). Resumed mid-epoch on another number of workers, the epoch's untrained rows are
shared out anew (pipelines.job.elastic).

An :class:`Extension` is called before and after every step (``runner.batch`` is the step's
:class:`pipelines.data.Batch`: keys, row ids), on every report (it may add metrics, and sees
validation results), and keeps its own state in checkpoints under its ``key``; ``teardown``
ends what it started when the run ends. On by config: system metrics on every rank
(pipelines.job.system_metrics) and the step profiler (pipelines.job.profiler).
The learning-rate schedule is one: it sets each step's rate and reacts to the training and
validation errors (paper §3.4 plateau, §4.2 ResNet-110 warm-up).
"""

from __future__ import annotations

import math
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipelines import data as data_lib
from pipelines.config import JobConfig, from_dict, to_dict
from pipelines.job.checkpoints import CHECKPOINT_SCORE, checkpoint_name, restore_latest
from pipelines.job.compile_cache import CompileCache
from pipelines.job.elastic import EPOCH_ROWS_KEY, EpochRows
from pipelines.job.ema import EmaExtension
from pipelines.job.extension import Extension
from pipelines.job.freeze import FreezeBackbone
from pipelines.job.hybrid import HybridDecode
from pipelines.job.parts import Training, build_training, decode_options, plan_steps
from pipelines.job.profiler import StepProfiler
from pipelines.job.session import quiet_ray_logs
from pipelines.job.startup import Startup
from pipelines.job.system_metrics import SystemMetrics
from pipelines.manifest import read_manifest
from resnet_core.checkpoint import CheckpointError, save_checkpoint, training_state
from resnet_core.metrics import RunningMean, TopKAccumulator
from resnet_core.optim import LRSchedule, set_lr
from resnet_core.step import StepResult

EPOCH_METRICS_KEY = "epoch_metrics"  # the running epoch metrics in mid-epoch checkpoints


class ScheduleExtension(Extension):
    """The learning-rate schedule as an extension: the rate of every step, and the errors the
    paper's rules react to (training error for the §4.2 hold, validation error for §3.4)."""

    key = "schedule"

    def __init__(self, schedule: LRSchedule) -> None:
        self.schedule = schedule

    def before_step(self, runner: TrainLoopRunner) -> None:
        set_lr(runner.training.optimizer, self.schedule.lr(runner.step))

    def on_report(self, runner: TrainLoopRunner, metrics: dict[str, Any]) -> None:
        train_top1 = metrics.get("train/top1", metrics.get("train/window_top1", math.nan))
        self.schedule.observe_train_error(1.0 - train_top1)
        if "val/error" in metrics:
            self.schedule.observe_val_error(metrics["val/error"])

    def state_dict(self) -> dict[str, Any]:
        return self.schedule.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.schedule.load_state_dict(state)


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train's entry point on each worker: ``{"config": to_dict(JobConfig), "extensions":
    [Extension, ...]}`` (see :func:`pipelines.job.trainer.build_trainer`)."""
    quiet_ray_logs()
    config: JobConfig = from_dict(JobConfig, loop_config["config"])
    extensions = loop_config.get("extensions", ())
    runner = TrainLoopRunner(config, extensions, submitted_at=loop_config.get("submitted_at"))
    try:
        runner.run()
    finally:
        runner.close()


class TrainLoopRunner:
    """One Train worker's training run; state on the object (see the module docstring)."""

    def __init__(
        self,
        config: JobConfig,
        extensions: Sequence[Extension] = (),
        *,
        submitted_at: float | None = None,
    ) -> None:
        import ray.train
        import ray.train.torch

        self.startup = Startup(submitted_at)
        context = ray.train.get_context()
        self.config = config
        self.rank, self.world = context.get_world_rank(), context.get_world_size()
        self.device = ray.train.torch.get_device()
        self.manifest = read_manifest(config.data.uri)
        hybrid = config.data.decode_device == "auto"
        self.hybrid = HybridDecode(config.data.hybrid_cpu_share) if hybrid else None
        self.upcoming: data_lib.Prefetched | None = None  # the next epoch's, once started
        if ray.train.get_checkpoint() is None:  # a fresh run: its data starts with the build
            steps = plan_steps(config, self.manifest).steps_in_epoch(0)
            self.upcoming = data_lib.Prefetched(self.planned_batches(0, steps, skip=0))
        self.training: Training = build_training(
            config, self.manifest, self.device, distribute=ray.train.torch.prepare_model
        )
        self.plan = self.training.plan
        self.extensions = self.all_extensions(extensions)
        self.epoch = self.step = self.batches_done = 0
        self.epoch_metrics = EpochMetrics(self.device)
        self.rows = self.new_epoch_rows()
        self.batch: data_lib.Batch | None = None  # the batch being trained
        self.window = Window(self.device)
        self.attempt = uuid.uuid4().hex[:8]  # names this worker group's checkpoints
        for extension in self.extensions:
            extension.setup(self)
        self.startup.mark("build")

    def all_extensions(self, extensions: Sequence[Extension]) -> list[Extension]:
        """The features the config turns on, in calling order, around the caller's."""
        t = self.config.train
        freeze = [FreezeBackbone()] if t.freeze_backbone_epochs else []  # before the schedule
        schedule = ScheduleExtension(self.training.schedule)
        ema = [EmaExtension()] if t.ema else []
        system = [SystemMetrics(t.system_metrics_interval_s)] if t.system_metrics else []
        hybrid = [self.hybrid] if self.hybrid is not None else []
        compiled = self.training.step.compile_mode is not None
        cache = [CompileCache()] if compiled else []
        # The profiler last: its window spans the other extensions' work in each step.
        profile = [StepProfiler(*t.profile_steps)] if t.profile_steps else []
        return [*freeze, schedule, *ema, *system, *hybrid, *cache, *extensions, *profile]

    def run(self) -> None:
        self.restore()
        self.startup.mark("restore")
        while self.epoch < self.plan.epochs:
            self.train_epoch()
            self.end_epoch()
            self.epoch += 1

    def close(self) -> None:
        """The end of the run (also after an error): extensions stop what they started."""
        if self.upcoming is not None:
            self.upcoming.close()
        for extension in self.extensions:
            extension.teardown(self)

    def restore(self) -> None:
        """Continue from Ray's latest checkpoint (or the newest intact one), if any."""
        import ray.train

        t = self.training
        restored = restore_latest(ray.train.get_checkpoint(), t.model, t.optimizer, t.scaler)
        if restored is None:
            return
        self.epoch, self.step = restored["epoch"], restored["step"]
        self.batches_done = restored["batches_in_epoch"]
        extra = restored["extra"] or {}
        for extension in self.extensions:
            if extension.key is None:
                continue
            if extension.key not in extra:
                raise CheckpointError(
                    f"the checkpoint holds no {extension.key!r} state for {type(extension).__name__}"
                    " (written by a run without that feature); pass a new --name"
                )
            extension.load_state_dict(extra[extension.key])
        # The running epoch metrics were summed over ranks when saved: rank 0 alone takes them,
        # so the epoch-end all-reduce counts every sample once.
        if self.rank == 0 and extra.get(EPOCH_METRICS_KEY):
            self.epoch_metrics.load_state_dict(extra[EPOCH_METRICS_KEY])
        if self.batches_done:
            saved_world = restored["config"]["scale"]["num_workers"]
            self.rows.restore(extra.get(EPOCH_ROWS_KEY), saved_world=saved_world, rank=self.rank)
        if self.step >= self.plan.total_steps:
            self.say(f"run already complete at step {self.step}: nothing to train")
        else:
            self.say(
                f"resumed from step {self.step} (epoch {self.epoch + 1}, {self.batches_done} "
                "batches into it)"
            )

    def train_epoch(self) -> None:
        """The epoch's remaining batches, with a report every log or checkpoint interval; once
        they are all fetched, the next epoch's pipeline starts (:meth:`prefetch_next_epoch`)."""
        t, steps = self.config.train, self.plan.steps_in_epoch(self.epoch)
        batches, self.upcoming = self.upcoming or self.epoch_batches(steps), None
        self.training.model.train()
        self.window = Window(self.device)
        fetch_started = time.perf_counter()
        for self.batch in batches.batches():
            self.window.data_seconds += time.perf_counter() - fetch_started
            self.startup.mark("first_batch")
            if self.batches_done + 1 == steps:
                self.prefetch_next_epoch(batches.waits)
            self.train_step(self.batch.images, self.batch.labels)
            self.startup.mark("first_step", self.device)
            self.rows.mark(self.batch.rows)
            self.batches_done += 1
            log_due = self.step % t.log_every_steps == 0
            checkpoint_due = bool(t.checkpoint_every_steps) and (
                self.step % t.checkpoint_every_steps == 0
            )
            # The epoch-end report covers the epoch's last batch.
            if (log_due or checkpoint_due) and self.batches_done < steps:
                self.report(self.window_metrics(), checkpoint=checkpoint_due)
                self.window = Window(self.device)
            fetch_started = time.perf_counter()

    def prefetch_next_epoch(self, waits: data_lib.DecodeWaits) -> None:
        """Start the next epoch's batches in a helper thread (:class:`pipelines.data.Prefetched`)
        while this epoch's last step, validation and checkpoint run. A fresh epoch replays every
        rank's plan whatever happened in this one; hybrid decode rebalances first (``waits``:
        this epoch's)."""
        epoch = self.epoch + 1
        if epoch < self.plan.epochs and self.step + 1 < self.plan.total_steps:
            if self.hybrid is not None:
                self.hybrid.rebalance(waits, self.device)
            steps = self.plan.steps_in_epoch(epoch)
            self.upcoming = data_lib.Prefetched(self.planned_batches(epoch, steps, skip=0))

    def epoch_batches(self, steps: int) -> data_lib.EpochBatches:
        """This rank's batches of the epoch after those done: its own plan replayed, or, when
        the epoch is resumed on another number of workers, its share of the untrained rows."""
        c = self.config
        if self.batches_done == 0 or self.rows.replays(self.world):
            return self.planned_batches(self.epoch, steps, skip=self.batches_done)
        if c.data.repeated_augment > 1:  # its rows are trained several times: no remainder
            raise CheckpointError(
                f"the checkpoint at step {self.step} is {self.batches_done} batches into an "
                f"epoch with data.repeated_augment={c.data.repeated_augment}, which resumes on "
                f"the workers it was planned for: --workers {self.rows.planned_world}"
            )
        if self.rows.restored is None:
            raise CheckpointError(
                f"the checkpoint at step {self.step} is {self.batches_done} batches into an "
                f"epoch and records no trained rows (an older version wrote it): resume it on "
                f"{self.rows.planned_world} workers (--workers {self.rows.planned_world})"
            )
        plan = data_lib.plan_remainder(
            self.manifest,
            done=self.rows.restored,
            planned_world=self.rows.planned_world,
            global_batch=c.train.global_batch,
            steps=steps,
            batches_done=self.batches_done,
            **self.plan_where(self.epoch),
        )
        self.say(
            f"epoch {self.epoch + 1} continues on {self.world} workers (planned for "
            f"{self.rows.planned_world}): its {plan.num_rows * self.world} untrained rows, "
            f"{plan.steps} batches of {plan.batch_size} per worker"
        )
        self.rows.replanned = True
        return data_lib.EpochBatches(plan, self.train_options(self.epoch))

    def planned_batches(self, epoch: int, steps: int, *, skip: int) -> data_lib.EpochBatches:
        """This rank's planned batches of ``epoch``, after the first ``skip``."""
        c = self.config
        return data_lib.iter_batches(
            self.manifest,
            self.train_options(epoch),
            batch_size=c.train.global_batch // self.world,
            skip_batches=skip,
            max_batches=steps,
            repeats=c.data.repeated_augment,
            **self.plan_where(epoch),
        )

    def plan_where(self, epoch: int) -> dict[str, Any]:
        """Which part of which epoch this rank trains (the arguments of every epoch plan)."""
        where = {"split": self.config.data.train_split, "world_size": self.world}
        return where | {"rank": self.rank, "epoch": epoch, "seed": self.config.data.seed}

    def train_options(self, epoch: int) -> data_lib.DecodeOptions:
        c = self.config
        return decode_options(
            c, self.manifest, mode=c.data.augment, device=self.device, epoch=epoch
        )

    def new_epoch_rows(self) -> EpochRows:
        num_rows = self.manifest.split(self.config.data.train_split).num_rows
        return EpochRows(num_rows, self.world, self.device)

    def train_step(self, images: torch.Tensor, labels: torch.Tensor) -> StepResult:
        """One optimizer step on a uint8 batch (moved to the device here, when not there)."""
        for extension in self.extensions:
            extension.before_step(self)
        images = images.to(self.device, non_blocking=True)
        labels = labels.to(self.device, non_blocking=True)
        result = self.training.step(images, labels)
        self.step += 1
        self.epoch_metrics.add(result)
        self.window.add(result)
        for extension in self.extensions:
            extension.after_step(self, result)
        return result

    def end_epoch(self) -> None:
        """The epoch's metrics, validation when due, and the epoch-end report and checkpoint."""
        metrics = {**self.window_metrics(), **self.epoch_metrics.reduce(self.epoch)}
        final = self.epoch + 1 == self.plan.epochs
        if (self.epoch + 1) % self.config.train.eval_every_epochs == 0 or final:
            metrics.update(self.evaluate())
        self.batches_done = 0
        self.epoch_metrics = EpochMetrics(self.device)
        self.rows = self.new_epoch_rows()
        self.report(metrics, checkpoint=True, epoch_end=True)

    def window_metrics(self) -> dict[str, Any]:
        """The metrics of the window since the last report (a collective), with the crop size
        trained at (progressive resizing changes it between epochs)."""
        lr = max(g["lr"] for g in self.training.optimizer.param_groups)  # a frozen group has 0
        metrics = self.window.reduce(self.step, lr)
        if not self.startup.reported and (startup := self.startup.metrics()):
            self.startup.reported = True
            self.say(self.startup.line(startup))
            metrics |= startup
        return {**metrics, "train/image_size": self.config.data.train_size(self.epoch)}

    def report(self, metrics: dict[str, Any], *, checkpoint: bool, epoch_end: bool = False) -> None:
        """Every rank reports (a barrier); rank 0 prints, and writes the checkpoint when one is
        due. A mid-epoch checkpoint carries the running epoch metrics and the rows trained so
        far (collectives)."""
        for extension in self.extensions:
            extension.on_report(self, metrics)
        if self.rank == 0:
            self.say(self.format_line(metrics, epoch_end=epoch_end))
        if not checkpoint:
            self._send(metrics)
            return
        mid_epoch = None
        if not epoch_end:
            mid_epoch = {
                EPOCH_METRICS_KEY: self.epoch_metrics.reduced_state(),
                EPOCH_ROWS_KEY: self.rows.reduced_state(),
            }
        state = self.checkpoint_state(mid_epoch) if self.rank == 0 else None
        score = float(metrics.get("val/top1", -1.0))
        self._send({**metrics, CHECKPOINT_SCORE: score}, checkpoint=True, state=state)

    def checkpoint_state(self, mid_epoch: dict[str, Any] | None) -> dict[str, Any]:
        """The training state at this point: mid-epoch (with the epoch's running state,
        ``mid_epoch``) or at the epoch end (None: the next epoch starts fresh)."""
        extra = {e.key: e.state_dict() for e in self.extensions if e.key is not None}
        epoch, batches = self.epoch, self.batches_done
        if mid_epoch is None:
            epoch, batches = epoch + 1, 0
        else:
            extra.update(mid_epoch)
        return training_state(
            self.training.model,
            self.training.optimizer,
            scaler=self.training.scaler,
            epoch=epoch,
            step=self.step,
            batches_in_epoch=batches,
            config=to_dict(self.config),
            extra=extra,
        )

    def _send(
        self, metrics: dict[str, Any], *, checkpoint: bool = False, state: dict | None = None
    ) -> None:
        """``ray.train.report``; with ``checkpoint``, the rank holding ``state`` writes it."""
        import ray.train

        if not checkpoint:
            ray.train.report(metrics)
            return
        name = checkpoint_name(self.step, self.attempt)
        if state is None:
            ray.train.report(metrics, checkpoint=None, checkpoint_dir_name=name)
            return
        with tempfile.TemporaryDirectory(prefix="resnet-ckpt-") as tmp:
            path = save_checkpoint(Path(tmp) / "state", state)
            checkpoint = ray.train.Checkpoint.from_directory(str(path))
            ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name)

    @torch.no_grad()
    def evaluate(self, model: nn.Module | None = None) -> dict[str, Any]:
        """Centre-crop validation of ``model`` (default: the one trained), every image exactly
        once across ranks, exact top-1/top-5 (collectives)."""
        model = model or self.training.model
        d, normalize = self.config.data, self.training.normalize
        accuracy, loss = TopKAccumulator(device=self.device), RunningMean(device=self.device)
        criterion = nn.CrossEntropyLoss()
        batches = data_lib.iter_batches(
            self.manifest,
            decode_options(self.config, self.manifest, mode="eval_center", device=self.device),
            split=d.val_split,
            world_size=self.world,
            rank=self.rank,
            epoch=0,
            seed=d.seed,
            batch_size=max(1, self.config.train.global_batch // self.world),
        )
        model.eval()
        normalize.eval()
        for images, labels in batches:
            labels = labels.to(self.device, non_blocking=True)
            with self.training.step.autocast(self.device):  # the training precision
                logits = model(normalize(images.to(self.device, non_blocking=True))).float()
            accuracy.update(logits, labels)
            loss.update(criterion(logits, labels), labels.numel())
        model.train()
        normalize.train()
        summary = accuracy.all_reduce().compute()
        return {
            "val/top1": summary["top1"],
            "val/top5": summary["top5"],
            "val/error": 1.0 - summary["top1"],
            "val/loss": loss.all_reduce().compute(),
            "val/count": int(summary["count"]),
        }

    def format_line(self, metrics: dict[str, Any], *, epoch_end: bool) -> str:
        """The progress line (mid-epoch) or the epoch line."""
        where = f"epoch {self.epoch + 1}/{self.plan.epochs}"
        if not epoch_end:
            return (
                f"{where} batch {self.batches_done}/{self.plan.steps_in_epoch(self.epoch)} step "
                f"{metrics['step']} loss {metrics['train/window_loss']:.3f} top1 "
                f"{100 * metrics['train/window_top1']:.1f}% lr {metrics['lr']:.4g} "
                f"{metrics['throughput/images_per_s']:.0f} img/s data-wait "
                f"{100 * metrics['throughput/data_wait_share']:.0f}%"
            )
        text = (
            f"{where} done: step {metrics['step']} train loss {metrics['train/loss']:.3f} top1 "
            f"{100 * metrics['train/top1']:.1f}% ({metrics['train/epoch_samples']} images)"
        )
        if "val/top1" in metrics:
            text += (
                f" | val top1 {100 * metrics['val/top1']:.2f}% top5 "
                f"{100 * metrics['val/top5']:.2f}% ({metrics['val/count']} images)"
            )
        return text

    def say(self, line: str) -> None:
        """One line on the driver's console (rank 0). Ray Train's print patch tees ``print``
        into its logger as well, which shows every line twice; writing to stdout shows it once."""
        if self.rank == 0:
            sys.stdout.write(line + "\n")
            sys.stdout.flush()


class Window:
    """Metrics of the steps since the last report: loss, top-1, throughput, data wait. They
    accumulate on the device; only :meth:`reduce`, at report time, waits for it."""

    def __init__(self, device: torch.device) -> None:
        self.started = time.perf_counter()
        self.data_seconds = 0.0
        self.loss = RunningMean(device=device)
        self.accuracy = TopKAccumulator(device=device)

    def add(self, result: StepResult) -> None:
        self.loss.update(result.loss, result.labels.numel())
        self.accuracy.update(result.logits, result.labels)

    def reduce(self, step: int, lr: float) -> dict[str, Any]:
        """The window's metrics summed over ranks (a collective: every rank calls it)."""
        seconds = max(time.perf_counter() - self.started, 1e-9)
        local_images = int(self.accuracy.count)
        self.loss.all_reduce()
        self.accuracy.all_reduce()
        count = int(self.accuracy.count)
        return {
            "step": step,
            "train/window_loss": self.loss.compute() if count else math.nan,
            "train/window_top1": self.accuracy.compute()["top1"] if count else math.nan,
            "lr": lr,
            "throughput/images_per_s": count / seconds,
            "throughput/images_per_s_per_worker": local_images / seconds,
            "throughput/data_wait_share": self.data_seconds / seconds,
            "time/window_s": seconds,
        }


class EpochMetrics:
    """The epoch's running training loss and accuracy (on the device)."""

    def __init__(self, device: torch.device) -> None:
        self.loss = RunningMean(device=device)
        self.accuracy = TopKAccumulator(device=device)

    def add(self, result: StepResult) -> None:
        self.loss.update(result.loss, result.labels.numel())
        self.accuracy.update(result.logits, result.labels)

    def reduce(self, epoch: int) -> dict[str, Any]:
        """The epoch's metrics over all ranks (a collective)."""
        summary = self.accuracy.all_reduce().compute()
        return {
            "epoch": epoch + 1,
            "train/loss": self.loss.all_reduce().compute(),
            "train/top1": summary["top1"],
            "train/top5": summary["top5"],
            "train/error": 1.0 - summary["top1"],
            "train/epoch_samples": int(summary["count"]),
        }

    def reduced_state(self) -> dict[str, Any]:
        """All ranks' running metrics summed, for a mid-epoch checkpoint (a collective); this
        rank's own counts stay as they are."""
        copy = EpochMetrics(self.loss.device)
        copy.load_state_dict(self.state_dict())
        return {
            "accuracy": copy.accuracy.all_reduce().state_dict(),
            "loss": copy.loss.all_reduce().state_dict(),
        }

    def state_dict(self) -> dict[str, Any]:
        return {"accuracy": self.accuracy.state_dict(), "loss": self.loss.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.accuracy.load_state_dict(state["accuracy"])
        self.loss.load_state_dict(state["loss"])
