"""What a training process builds from a config and a manifest: the model, optimizer, schedule,
loss, input normalisation, the step plan — and the one training step that the Train workers, the
benchmarks' bare loops and the synthetic ceiling all call. Pure PyTorch: no Ray, no MLflow.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from pipelines import data as data_lib
from pipelines.config import JobConfig
from pipelines.manifest import Manifest, load_mean_image
from resnet_core.models import create_model
from resnet_core.optim import LRSchedule, build_sgd, scaled_lr
from resnet_core.step import TrainStep, autocast_dtype
from resnet_core.transforms import IMAGENET_MEAN_RGB, IMAGENET_STD_RGB, Normalize


def model_options(config: JobConfig) -> dict[str, Any]:
    """``create_model`` keyword arguments of ``config.model`` (besides name and classes)."""
    m = config.model
    options: dict[str, Any] = {"zero_init_residual": m.zero_init_residual}
    if m.shortcut is not None:
        options["shortcut"] = m.shortcut
    if m.stride_in_3x3:
        options["stride_in_3x3"] = True
    return options


@dataclass(frozen=True)
class StepPlan:
    """The run's length in optimizer steps, a function of the config and the manifest only.

    steps_per_epoch: steps of every full epoch (same on every rank). total_steps: the run's last
    step (``train.max_steps`` may cut the last epoch short). epochs: epochs that run.
    """

    steps_per_epoch: int
    total_steps: int
    epochs: int

    def steps_in_epoch(self, epoch: int) -> int:
        """Steps of ``epoch`` (0-based): the last one may be cut short by ``max_steps``."""
        return min(self.steps_per_epoch, self.total_steps - epoch * self.steps_per_epoch)


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


def make_schedule(config: JobConfig, plan: StepPlan) -> LRSchedule:
    s, o, t = config.schedule, config.optim, config.train
    per_epoch = plan.steps_per_epoch
    milestones = tuple(s.milestones) + tuple(e * per_epoch for e in s.milestone_epochs)
    return LRSchedule(
        base_lr=scaled_lr(o.lr, t.global_batch, o.reference_batch),
        kind=s.kind,
        total_steps=plan.total_steps,
        milestones=tuple(sorted(milestones)),
        gamma=s.gamma,
        warmup_steps=round(s.warmup_epochs * per_epoch),
        hold_lr=s.hold_lr,
        hold_until_train_error=s.hold_until_train_error,
        plateau_patience=s.plateau_patience,
    )


def normalization(config: JobConfig, manifest: Manifest) -> tuple[Tensor, Tensor | None]:
    """The input mean — (3, S, S) per-pixel image at the training crop size S, or (3,) per
    channel — and the optional (3,) std, [0, 1] units, on the CPU."""
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
        std = torch.tensor(manifest.pixel_std_rgb if d.mean != "imagenet" else IMAGENET_STD_RGB)
    return mean, std


def decode_options(config: JobConfig, *, mode: str, device: torch.device) -> data_lib.DecodeOptions:
    """The reader's options for ``mode`` (training: ``data.augment``; validation:
    ``eval_center``) on a worker whose device is ``device``."""
    d, on_gpu = config.data, device.type == "cuda"
    return data_lib.DecodeOptions(
        mode=mode,
        image_size=d.image_size,
        eval_resize=d.eval_resize,
        num_cpus=d.decode_cpus,
        concurrency=d.decode_concurrency,
        device=device if d.decode_device == "device" else None,
        prefer_nodes=(tuple(d.decode_nodes.split("=", 1)),) if d.decode_nodes else (),
        prefetch_batches=d.prefetch_batches,
        shuffle_buffer=(d.shuffle_buffer or None) if mode in data_lib.TRAIN_MODES else None,
        pin_memory=on_gpu,
    )


@dataclass
class Training:
    """One process's training: ``model`` as trained (wrapped: DDP, ``torch.compile``), its
    optimizer and schedule, the step that trains it and the run's step plan."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    schedule: LRSchedule
    step: TrainStep
    plan: StepPlan

    @property
    def normalize(self) -> Normalize:
        return self.step.normalize


def build_training(
    config: JobConfig,
    manifest: Manifest,
    device: torch.device,
    *,
    distribute: Callable[[nn.Module], nn.Module] | None = None,
) -> Training:
    """Everything one process trains with. ``distribute`` wraps the model for data parallelism
    (``ray.train.torch.prepare_model``: DDP); ``torch.compile`` wraps outside it, as PyTorch
    recommends for DDP. channels_last applies on CUDA only."""
    t, o = config.train, config.optim
    torch.manual_seed(t.seed)
    model = create_model(
        config.model.name, num_classes=manifest.num_classes, **model_options(config)
    )
    if t.sync_bn and distribute is not None:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    channels_last = device.type == "cuda" and t.channels_last
    model = model.to(device, memory_format=torch.channels_last if channels_last else None)
    optimizer = make_optimizer(model, config)
    if distribute is not None:
        model = distribute(model)
    if t.compile:
        model = torch.compile(model)
    mean, std = normalization(config, manifest)
    normalize = Normalize(
        mean, std, lighting_std=config.data.lighting_std, channels_last=channels_last
    ).to(device)
    criterion = nn.CrossEntropyLoss(label_smoothing=o.label_smoothing)
    step = TrainStep(
        model, optimizer, criterion, normalize, dtype=autocast_dtype(t.precision, device)
    )
    plan = plan_steps(config, manifest)
    return Training(model, optimizer, make_schedule(config, plan), step, plan)
