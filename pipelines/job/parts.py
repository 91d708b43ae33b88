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
from resnet_core.cpu_transforms import ImageAugment
from resnet_core.models import create_model
from resnet_core.optim import LRSchedule, build_optimizer, scaled_lr
from resnet_core.pretrained import HEAD_MODULE, apply_init, load_init_weights
from resnet_core.step import BatchTransform, TrainStep, autocast_dtype, compile_mode_for
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
        manifest,
        config.data.train_split,
        world_size=world,
        batch_size=t.global_batch // world,
        repeats=config.data.repeated_augment,
    )
    total = t.epochs * per_epoch
    if t.max_steps is not None:
        total = min(total, t.max_steps)
    return StepPlan(per_epoch, total, math.ceil(total / per_epoch))


def make_optimizer(model: nn.Module, config: JobConfig) -> torch.optim.Optimizer:
    """The job's optimizer at its (linearly scaled) base learning rate; the schedule sets it
    per step."""
    o, t = config.optim, config.train
    return build_optimizer(
        model,
        o.name,
        lr=scaled_lr(o.lr, t.global_batch, o.reference_batch),
        momentum=o.momentum,
        weight_decay=o.weight_decay,
        nesterov=o.nesterov,
        betas=(o.betas[0], o.betas[1]),
        eps=o.eps,
        decay_norm_and_bias=o.decay_norm_and_bias,
        head=HEAD_MODULE if t.freeze_backbone_epochs else None,
        implementation=o.implementation,
    )


def batch_transforms(config: JobConfig, num_classes: int) -> list[BatchTransform]:
    """MixUp and/or CutMix (torchvision.transforms.v2) on the normalised batch, as
    torchvision's reference scripts apply them; none when both alphas are 0."""
    d = config.data
    if d.mixup_alpha <= 0 and d.cutmix_alpha <= 0:
        return []  # without importing torchvision's v2 transforms: ~1 s of every worker's start
    from torchvision.transforms import v2

    mixes, p = [], []
    if d.mixup_alpha > 0:
        mixes.append(v2.MixUp(alpha=d.mixup_alpha, num_classes=num_classes))
        p.append(1 - d.mix_switch_prob)
    if d.cutmix_alpha > 0:
        mixes.append(v2.CutMix(alpha=d.cutmix_alpha, num_classes=num_classes))
        p.append(d.mix_switch_prob)
    if len(mixes) == 2:
        return [v2.RandomChoice(mixes, p=p)]
    return mixes


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
        warmup_start_factor=s.warmup_start_factor,
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


def decode_options(
    config: JobConfig,
    manifest: Manifest,
    *,
    mode: str,
    device: torch.device,
    epoch: int = 0,
    cpu_share: float = 0.0,
) -> data_lib.DecodeOptions:
    """The reader's options for ``mode`` (training: ``data.augment`` at ``epoch``'s crop size,
    see ``DataConfig.train_size``; validation: ``eval_center`` at ``data.eval_crop``) on a worker
    whose device is ``device``; ``cpu_share``: hybrid decode's share of the tasks (training)."""
    d, on_gpu = config.data, device.type == "cuda"
    train = mode in data_lib.TRAIN_MODES
    return data_lib.DecodeOptions(
        mode=mode,
        image_size=d.train_size(epoch) if train else d.eval_crop,
        eval_resize=d.eval_resize,
        num_cpus=d.decode_cpus,
        concurrency=d.decode_concurrency,
        device=device if d.decode_device != "cpu" else None,
        prefer_nodes=(tuple(d.decode_nodes.split("=", 1)),) if d.decode_nodes else (),
        prefetch_batches=d.prefetch_batches,
        shuffle_buffer=(d.shuffle_buffer or None) if train else None,
        pin_memory=on_gpu,
        augment=image_augment(config, manifest) if train else ImageAugment(),
        cpu_share=cpu_share if train and d.decode_device == "auto" else 0.0,
    )


def image_augment(config: JobConfig, manifest: Manifest) -> ImageAugment:
    """The per-image policies of ``config.data``; erased boxes take the input mean's colour
    (torchvision erases normalised images with 0)."""
    d = config.data
    erase_value = (0, 0, 0)
    if d.random_erase:  # the mean (a file with per-pixel means) is read only when erasing
        mean, _ = normalization(config, manifest)
        rgb = mean.reshape(3, -1).mean(dim=1)  # per-pixel mean image: its channel means
        erase_value = tuple(round(255 * float(v)) for v in rgb)
    return ImageAugment(
        policy=d.auto_augment,
        magnitude=d.ra_magnitude,
        severity=d.augmix_severity,
        erase_p=d.random_erase,
        erase_value=erase_value,
    )


@dataclass
class Training:
    """One process's training: ``model`` as trained (in DDP when distributed; never compiled:
    the step compiles its own forward), its optimizer and schedule, the step that trains it and
    the run's step plan."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    schedule: LRSchedule
    step: TrainStep
    plan: StepPlan

    @property
    def normalize(self) -> Normalize:
        return self.step.normalize

    @property
    def scaler(self) -> torch.amp.GradScaler | None:
        """The fp16 gradient scaler (its state goes into checkpoints); None in other precisions."""
        return self.step.scaler if self.step.scaler.is_enabled() else None


def build_training(
    config: JobConfig,
    manifest: Manifest,
    device: torch.device,
    *,
    distribute: Callable[[nn.Module], nn.Module] | None = None,
) -> Training:
    """Everything one process trains with. ``distribute`` wraps the model for data parallelism
    (``ray.train.torch.prepare_model``: DDP); ``train.compile`` compiles the step's normalisation,
    forward and loss around it (resnet_core.step). channels_last applies on CUDA only."""
    t, o = config.train, config.optim
    torch.manual_seed(t.seed)
    model = create_model(
        config.model.name, num_classes=manifest.num_classes, **model_options(config)
    )
    if config.model.init:
        apply_init(model, load_init_weights(config.model.init), reset_head=config.model.reset_head)
    if t.sync_bn and distribute is not None:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    channels_last = device.type == "cuda" and t.channels_last
    if device.type == "cuda":  # a few fixed input shapes: cuDNN's fastest kernels per shape
        torch.backends.cudnn.benchmark = True
    model = model.to(device, memory_format=torch.channels_last if channels_last else None)
    optimizer = make_optimizer(model, config)
    if distribute is not None:
        model = distribute(model)
    mean, std = normalization(config, manifest)
    normalize = Normalize(
        mean, std, lighting_std=config.data.lighting_std, channels_last=channels_last
    ).to(device)
    criterion = nn.CrossEntropyLoss(label_smoothing=o.label_smoothing)
    step = TrainStep(
        model,
        optimizer,
        criterion,
        normalize,
        dtype=autocast_dtype(t.precision, device),
        batch_transforms=batch_transforms(config, manifest.num_classes),
        accumulate=t.accumulate_steps,
        clip_grad_norm=t.clip_grad_norm,
        compile_mode=compile_mode_for(t.compile, t.compile_mode, device),
    )
    plan = plan_steps(config, manifest)
    return Training(model, optimizer, make_schedule(config, plan), step, plan)
