"""The training job's configuration: one frozen dataclass tree, dotted overrides, validation.

A recipe (``pipelines.recipes``) returns a :class:`JobConfig`; the command line changes it with
dotted overrides (``optim.lr=0.05 train.epochs=3``); :func:`validate` checks every value that can be
checked without a cluster. The tree crosses the Ray boundary as a plain dict
(:func:`to_dict` / :func:`from_dict`, the only place that converts) and is logged to MLflow
flattened (:func:`flatten`, keys like ``optim.lr``).

Validation has three layers: the closed sets are ``Literal`` types (most defined in
``resnet_core`` beside the code that implements them) and are checked from the type hints alone;
each section checks its own numbers (``check``); :func:`validate` adds the rules that span
sections.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field, fields, is_dataclass, replace
from typing import Any, Literal

from resnet_core.cpu_transforms import AugmentMode, AutoAugmentPolicy
from resnet_core.models import Shortcut, has_bottlenecks, is_cifar_model
from resnet_core.optim import Implementation, OptimizerName, ScheduleKind
from resnet_core.step import CUDA_GRAPH_MODES, CompileMode, CompileWhen, Precision

RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
# Ray node labels (Kubernetes' syntax): an optional DNS prefix, a name, a value.
LABEL = re.compile(
    r"([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"
)
LABEL_VALUE = re.compile(r"([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?")
# per_pixel: the paper's mean image (§3.4); per_channel: the dataset's channel means;
# imagenet: torchvision's ImageNet constants.
MeanMode = Literal["per_pixel", "per_channel", "imagenet"]
# cpu: Ray Data tasks decode and augment. device: the tasks only read rows and plan crops, each
# Train worker decodes its JPEG batches on its own device (GPU: nvJPEG), for GPU nodes short of
# CPU cores; paper/inception augment only.
DecodeDevice = Literal["cpu", "device", "auto"]


class ConfigError(ValueError):
    """A configuration value is wrong; the message names it and says how to fix it."""


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


@dataclass(frozen=True)
class ModelConfig:
    name: str = "resnet20"
    shortcut: Shortcut | None = None  # None: the family's paper default (A CIFAR, B ImageNet)
    stride_in_3x3: bool = False  # bottleneck stride on the 3×3 ("v1.5") instead of the first 1×1
    zero_init_residual: bool = False
    # Fine-tuning: initial weights (a .safetensors / .pt state dict, or torchvision:<weights>,
    # e.g. torchvision:ResNet50_Weights.IMAGENET1K_V2); reset_head keeps a fresh classifier.
    init: str | None = None
    reset_head: bool = False

    def check(self) -> None:
        try:
            is_cifar_model(self.name)
        except ValueError:
            raise ConfigError(
                f"model.name={self.name!r} is not a ResNet v1 model; use resnet18/34/50/101/152, "
                "plain18/34, or resnet{6n+2}/plain{6n+2} for CIFAR (resnet20, resnet56, ...)"
            ) from None
        _require(
            not self.reset_head or bool(self.init),
            "model.reset_head=true needs initial weights: pass --init (model.init)",
        )
        _require(
            not (self.init or "").startswith("torchvision:")
            or not has_bottlenecks(self.name)
            or self.stride_in_3x3,
            f"torchvision's {self.name} weights are v1.5 (stride on the 3x3 conv): set "
            "model.stride_in_3x3=true",
        )


@dataclass(frozen=True)
class DataConfig:
    uri: str = "data/synthetic-cifar"  # shards written by resnet-prepare (path or s3://)
    train_split: str = "train"
    val_split: str = "val"
    augment: AugmentMode = "cifar"
    image_size: int = 32  # training crop side in pixels
    eval_resize: int = 36  # evaluation: shorter side resized to this, then the centre crop
    # The evaluation crop side (FixRes: train at 176, evaluate at 224); None: image_size.
    eval_image_size: int | None = None
    # Progressive resizing (FFCV's ResNet-50 configs): training crops grow linearly from
    # min_image_size at epoch ramp_start_epoch to image_size at ramp_end_epoch (epochs counted
    # from 0), in steps of size_step pixels; None: image_size throughout.
    min_image_size: int | None = None
    ramp_start_epoch: int = 0
    ramp_end_epoch: int = 0
    size_step: int = 32
    mean: MeanMode = "per_pixel"
    normalize_std: bool = False  # divide by the per-channel std (modern recipes); paper: no
    lighting_std: float = 0.0  # AlexNet PCA colour augmentation σ (paper §3.4 uses 0.1)
    decode_cpus: float = 1.0  # CPUs per Ray Data decode task
    decode_concurrency: int | None = None  # decode tasks per worker pipeline; None: Ray decides
    # cpu: Ray Data tasks decode; device: the Train worker's GPU decodes (the tasks plan the
    # crops); auto: both, the tasks a share of the map batches (hybrid_cpu_share at the start,
    # rebalanced every epoch from who kept the other waiting).
    decode_device: DecodeDevice = "cpu"
    hybrid_cpu_share: float = 0.5
    # Decode tasks go to nodes with this label first (the cluster configs' CPU-only decode
    # nodes), then anywhere with a free CPU; none: anywhere.
    decode_nodes: str | None = "resnet-ray/role=decode"
    prefetch_batches: int = 2
    shuffle_buffer: int = 1024  # rows in each worker's local shuffle buffer (after file shuffle)
    seed: int = 0
    # MixUp / CutMix on the device, per batch (torchvision.transforms.v2); 0: off. With both on,
    # each batch gets one of them, CutMix with probability mix_switch_prob.
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    mix_switch_prob: float = 0.5
    # Per-image policies on the training crops, in the decode tasks (torchvision's
    # --auto-augment, --ra-magnitude, --augmix-severity, --random-erase).
    auto_augment: AutoAugmentPolicy | None = None
    ra_magnitude: int = 9
    augmix_severity: int = 3
    random_erase: float = 0.0  # probability per image
    # Repeated augmentation (torchvision's --ra-sampler --ra-reps): each epoch trains 1/k of
    # the rows k times, on k different workers, each copy augmented on its own; 1: off.
    repeated_augment: int = 1

    def _check_ramp(self) -> None:
        _require(
            32 <= self.min_image_size <= self.image_size,
            f"data.min_image_size={self.min_image_size} must be in [32, data.image_size="
            f"{self.image_size}]",
        )
        _require(
            0 <= self.ramp_start_epoch < self.ramp_end_epoch,
            f"data.ramp_start_epoch={self.ramp_start_epoch} must be >= 0 and before "
            f"data.ramp_end_epoch={self.ramp_end_epoch}",
        )
        _require(self.size_step >= 1, f"data.size_step={self.size_step} must be >= 1")
        _require(
            self.augment in ("paper", "inception"),
            f"data.min_image_size resizes crops; data.augment={self.augment!r} reads images "
            "whole: use paper or inception",
        )

    def train_size(self, epoch: int) -> int:
        """The training crop side in ``epoch`` (0-based): image_size, or on the ramp of
        progressive resizing (rounded down to size_step, as FFCV rounds)."""
        if self.min_image_size is None or epoch >= self.ramp_end_epoch:
            return self.image_size
        if epoch <= self.ramp_start_epoch:
            return self.min_image_size
        share = (epoch - self.ramp_start_epoch) / (self.ramp_end_epoch - self.ramp_start_epoch)
        size = self.min_image_size + share * (self.image_size - self.min_image_size)
        return max(self.min_image_size, int(size) // self.size_step * self.size_step)

    @property
    def eval_crop(self) -> int:
        """The side of evaluation crops (validation, resnet-eval, the served model's example)."""
        return self.eval_image_size or self.image_size

    def check(self) -> None:
        _require(self.image_size >= 32, f"data.image_size={self.image_size} must be at least 32")
        _require(
            self.eval_image_size is None or self.eval_image_size >= 32,
            f"data.eval_image_size={self.eval_image_size} must be at least 32, or none for "
            "data.image_size",
        )
        if self.min_image_size is not None:
            self._check_ramp()
        _require(
            self.eval_resize >= self.eval_crop,
            f"data.eval_resize={self.eval_resize} must be >= the evaluation crop "
            f"({self.eval_crop}: data.eval_image_size, else data.image_size)",
        )
        _require(self.lighting_std >= 0, f"data.lighting_std={self.lighting_std} must be >= 0")
        _require(self.decode_cpus > 0, f"data.decode_cpus={self.decode_cpus} must be positive")
        _require(
            self.decode_concurrency is None or self.decode_concurrency >= 1,
            f"data.decode_concurrency={self.decode_concurrency} must be >= 1 or None",
        )
        _require(
            self.decode_device == "cpu" or self.augment in ("paper", "inception"),
            f"data.decode_device={self.decode_device} decodes JPEG crops on the worker; "
            f"data.augment={self.augment!r} reads 32x32 images whole: use data.decode_device=cpu",
        )
        _require(
            0 <= self.hybrid_cpu_share <= 1,
            f"data.hybrid_cpu_share={self.hybrid_cpu_share} must be in [0, 1] (the share of map "
            "batches the CPU tasks decode under data.decode_device=auto)",
        )
        if self.decode_nodes is not None:
            key, sep, value = self.decode_nodes.partition("=")
            _require(
                bool(sep and LABEL.fullmatch(key) and LABEL_VALUE.fullmatch(value)),
                f"data.decode_nodes={self.decode_nodes!r} is not a node label key=value (e.g. "
                "resnet-ray/role=decode); or none to decode anywhere",
            )
        _require(
            self.prefetch_batches >= 0,
            f"data.prefetch_batches={self.prefetch_batches} must be >= 0",
        )
        _require(
            self.shuffle_buffer >= 0,
            f"data.shuffle_buffer={self.shuffle_buffer} must be >= 0 (0: off)",
        )
        _require(self.seed >= 0, f"data.seed={self.seed} must be >= 0")
        self._check_augment()

    def _check_augment(self) -> None:
        """The batch mixes and the per-image policies."""
        for name in ("mixup_alpha", "cutmix_alpha"):
            value = getattr(self, name)
            _require(value >= 0, f"data.{name}={value} must be >= 0 (0: off)")
        _require(
            0 <= self.mix_switch_prob <= 1,
            f"data.mix_switch_prob={self.mix_switch_prob} must be in [0, 1]",
        )
        _require(
            0 <= self.ra_magnitude <= 30,
            f"data.ra_magnitude={self.ra_magnitude} must be in [0, 30] (RandAugment's bins)",
        )
        _require(
            1 <= self.augmix_severity <= 10,
            f"data.augmix_severity={self.augmix_severity} must be in [1, 10]",
        )
        _require(
            0 <= self.random_erase <= 1, f"data.random_erase={self.random_erase} must be in [0, 1]"
        )
        _require(
            self.repeated_augment >= 1,
            f"data.repeated_augment={self.repeated_augment} must be >= 1 (1: off)",
        )
        _require(
            self.decode_device == "cpu" or (self.auto_augment is None and not self.random_erase),
            "data.auto_augment and data.random_erase run in the decode tasks: use "
            "data.decode_device=cpu",
        )


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 0.1  # at reference_batch images per step (or as given when that is None)
    reference_batch: int | None = None  # linear scaling rule (Goyal et al. 2017) when set
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 1e-4
    decay_norm_and_bias: bool = True  # paper: decay every weight
    label_smoothing: float = 0.0
    name: OptimizerName = "sgd"
    betas: tuple[float, ...] = (0.9, 0.999)  # adamw, lamb
    eps: float = 1e-8  # adamw, lamb, lars
    implementation: Implementation = "auto"  # sgd/adamw kernels; auto: fused on CUDA

    def check(self) -> None:
        _require(self.lr > 0, f"optim.lr={self.lr} must be positive")
        _require(
            len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
            f"optim.betas={self.betas} must be two values in [0, 1), e.g. optim.betas=0.9,0.999",
        )
        _require(self.eps > 0, f"optim.eps={self.eps} must be positive")
        _require(
            self.implementation == "auto" or self.name in ("sgd", "adamw"),
            f"optim.implementation={self.implementation} applies to sgd and adamw; timm's "
            f"{self.name} has one: use optim.implementation=auto",
        )
        _require(
            not self.nesterov or self.name in ("sgd", "lars"),
            f"optim.nesterov=true applies to sgd and lars, not optim.name={self.name}",
        )
        _require(
            self.reference_batch is None or self.reference_batch > 0,
            f"optim.reference_batch={self.reference_batch} must be positive",
        )
        _require(self.momentum >= 0, f"optim.momentum={self.momentum} must be >= 0")
        _require(self.weight_decay >= 0, f"optim.weight_decay={self.weight_decay} must be >= 0")
        _require(
            0 <= self.label_smoothing < 1,
            f"optim.label_smoothing={self.label_smoothing} must be in [0, 1)",
        )


@dataclass(frozen=True)
class ScheduleConfig:
    kind: ScheduleKind = "multistep"
    milestones: tuple[int, ...] = ()  # optimizer steps where lr is multiplied by gamma
    milestone_epochs: tuple[int, ...] = ()  # the same in epochs (converted with steps/epoch)
    gamma: float = 0.1
    warmup_epochs: float = 0.0
    warmup_start_factor: float = 0.1  # the warm-up starts at this fraction of the rate
    hold_lr: float | None = None  # §4.2 ResNet-110: 0.01 until training error < 80%
    hold_until_train_error: float | None = None
    plateau_patience: int = 5

    def check(self) -> None:
        _require(self.gamma > 0, f"schedule.gamma={self.gamma} must be positive")
        _require(
            self.warmup_epochs >= 0, f"schedule.warmup_epochs={self.warmup_epochs} must be >= 0"
        )
        _require(
            0 < self.warmup_start_factor <= 1,
            f"schedule.warmup_start_factor={self.warmup_start_factor} must be in (0, 1]",
        )
        _require(
            self.plateau_patience >= 1,
            f"schedule.plateau_patience={self.plateau_patience} must be >= 1",
        )
        _require(
            (self.hold_lr is None) == (self.hold_until_train_error is None),
            "schedule.hold_lr and schedule.hold_until_train_error go together (paper §4.2 "
            "warm-up); set both or neither",
        )


@dataclass(frozen=True)
class TrainConfig:
    global_batch: int = 128  # images per optimizer step over all workers
    epochs: int = 10
    max_steps: int | None = None  # stop after this many optimizer steps (CIFAR: 64k) if sooner
    eval_every_epochs: int = 1
    log_every_steps: int = 20
    checkpoint_every_steps: int | None = None  # plus one at every epoch end
    keep_checkpoints: int = 3  # the best K by validation top-1, plus the latest
    precision: Precision = "auto"
    channels_last: bool = True  # GPU only
    # torch.compile the step's normalisation + forward + loss: true, false, or auto (on CUDA
    # workers only); compile_mode is torch.compile's (reduce-overhead: CUDA graphs).
    compile: CompileWhen = False
    compile_mode: CompileMode = "default"
    sync_bn: bool = False  # SyncBatchNorm across GPU workers (NCCL)
    seed: int = 0
    accumulate_steps: int = 1  # micro-batches per optimizer step (same step, less memory)
    clip_grad_norm: float | None = None  # max total gradient norm; None: no clipping
    # An exponential moving average of the weights (torchvision's --model-ema): updated every
    # ema_steps steps, validated beside the raw weights, the final model when on.
    ema: bool = False
    ema_steps: int = 32
    ema_decay: float = 0.99998  # per image seen, as torchvision's (adjusted to batch and steps)
    freeze_backbone_epochs: int = 0  # fine-tuning: only the classifier learns for these epochs
    export_onnx: bool = True  # the final model also as final/model.onnx (checked, ~5 s)
    # Every worker's CPU, memory, disk, network and GPU in MLflow (system/worker_<rank>/...,
    # MLflow's own monitors), sampled every system_metrics_interval_s, averaged per report.
    system_metrics: bool = True
    system_metrics_interval_s: float = 10.0
    # A torch.profiler trace of rank 0 over steps (first, count), e.g. 20,5: steps 20-24
    # (1-based), logged as the MLflow artifact profile/trace_rank0.json.gz; (): off.
    profile_steps: tuple[int, ...] = ()

    def check(self) -> None:
        for name in ("global_batch", "epochs", "max_steps"):
            value = getattr(self, name)
            _require(value is None or value > 0, f"train.{name}={value} must be positive")
        for name in ("log_every_steps", "eval_every_epochs", "keep_checkpoints"):
            value = getattr(self, name)
            _require(value >= 1, f"train.{name}={value} must be >= 1")
        _require(
            self.checkpoint_every_steps is None or self.checkpoint_every_steps >= 1,
            f"train.checkpoint_every_steps={self.checkpoint_every_steps} must be >= 1 or None",
        )
        _require(self.seed >= 0, f"train.seed={self.seed} must be >= 0")
        for name in ("accumulate_steps", "ema_steps"):
            value = getattr(self, name)
            _require(value >= 1, f"train.{name}={value} must be >= 1")
        _require(
            self.clip_grad_norm is None or self.clip_grad_norm > 0,
            f"train.clip_grad_norm={self.clip_grad_norm} must be positive, or none for no clipping",
        )
        _require(0 < self.ema_decay < 1, f"train.ema_decay={self.ema_decay} must be in (0, 1)")
        _require(
            self.freeze_backbone_epochs >= 0,
            f"train.freeze_backbone_epochs={self.freeze_backbone_epochs} must be >= 0",
        )
        _require(
            self.system_metrics_interval_s > 0,
            f"train.system_metrics_interval_s={self.system_metrics_interval_s} must be positive",
        )
        self._check_profile_steps()

    def _check_profile_steps(self) -> None:
        if not self.profile_steps:
            return
        _require(
            len(self.profile_steps) == 2 and min(self.profile_steps) >= 1,
            f"train.profile_steps={self.profile_steps} must be two positive numbers, the first "
            "step and the number of steps (e.g. train.profile_steps=20,5), or empty for off",
        )
        last = sum(self.profile_steps) - 1
        _require(
            self.max_steps is None or last <= self.max_steps,
            f"train.profile_steps={self.profile_steps} ends at step {last}, after train.max_steps="
            f"{self.max_steps}; profile earlier steps",
        )


@dataclass(frozen=True)
class ScaleConfig:
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0  # used when use_gpu
    max_failures: int = 3  # worker-group restarts from the latest checkpoint

    def check(self) -> None:
        _require(self.num_workers >= 1, f"scale.num_workers={self.num_workers} must be at least 1")
        _require(
            self.cpus_per_worker > 0,
            f"scale.cpus_per_worker={self.cpus_per_worker} must be positive",
        )
        _require(
            not self.use_gpu or self.gpus_per_worker > 0,
            f"scale.gpus_per_worker={self.gpus_per_worker} must be positive",
        )
        _require(self.max_failures >= 0, f"scale.max_failures={self.max_failures} must be >= 0")


@dataclass(frozen=True)
class RunSettings:
    name: str | None = None  # Train run name; None: derived from recipe and model (deterministic)
    experiment: str = "resnet-ray"
    storage_path: str = "results"  # checkpoints; a local path or s3://bucket/prefix
    registered_model: str | None = None  # MLflow model registry name; None: resnet-ray-<model>

    def check(self) -> None:
        """MLflow's own rules for the names it stores, so a bad one fails now, not after the
        run has trained (the run name is checked in validate(): its default depends on recipe
        and model)."""
        from mlflow.exceptions import MlflowException
        from mlflow.utils.validation import _validate_model_name

        check_experiment_name(self.experiment, "run.experiment")
        if self.registered_model is not None:
            try:
                _validate_model_name(self.registered_model)
            except MlflowException as e:
                raise ConfigError(
                    f"run.registered_model={self.registered_model!r} is not a valid MLflow model "
                    f"name ({e.message}); use e.g. team-resnet50"
                ) from None


def check_experiment_name(name: str, what: str) -> None:
    """MLflow's rule for experiment names (``what`` names the setting in the message)."""
    from mlflow.exceptions import MlflowException
    from mlflow.utils.validation import _validate_experiment_name

    try:
        _validate_experiment_name(name)
    except MlflowException as e:
        raise ConfigError(
            f"{what}={name!r} is not a valid MLflow experiment name ({e.message}); pass a "
            "non-empty name (--experiment)"
        ) from None


@dataclass(frozen=True)
class JobConfig:
    recipe: str = "demo"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    scale: ScaleConfig = field(default_factory=ScaleConfig)
    run: RunSettings = field(default_factory=RunSettings)

    @property
    def run_name(self) -> str:
        """Deterministic, so a re-submitted job resumes the same Train run and MLflow run."""
        return self.run.name or f"{self.recipe}-{self.model.name}"

    def sections(self) -> dict[str, Any]:
        """``{"model": ModelConfig(...), ...}``: every section by its name."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return {name: value for name, value in values.items() if is_dataclass(value)}


def validate(config: JobConfig) -> None:
    """Checks every value that needs no cluster; raises ConfigError with the value and the fix."""
    for name, section in config.sections().items():
        _check_choices(name, section)
        section.check()
    t, sc = config.train, config.scale
    _require(
        bool(RUN_NAME.fullmatch(config.run_name)),
        f"run name {config.run_name!r} may only use letters, digits, '.', '_' and '-' (it names "
        "a folder and an MLflow run)",
    )
    _require(
        t.global_batch % sc.num_workers == 0,
        f"train.global_batch={t.global_batch} is not divisible by scale.num_workers="
        f"{sc.num_workers}; pick a batch that is a multiple of the worker count",
    )
    _require(
        t.precision not in ("bf16", "fp16") or sc.use_gpu,
        f"train.precision={t.precision} needs scale.use_gpu=true; use fp32 or auto on CPU",
    )
    _require(
        not t.freeze_backbone_epochs or bool(config.model.init),
        "train.freeze_backbone_epochs freezes pretrained weights: pass --init (model.init)",
    )
    per_worker = t.global_batch // sc.num_workers
    _require(
        per_worker % t.accumulate_steps == 0,
        f"train.accumulate_steps={t.accumulate_steps} does not divide the batch of each worker "
        f"({per_worker} = train.global_batch / scale.num_workers); pick a divisor of {per_worker}",
    )
    ddp_on_gpus = sc.use_gpu and sc.num_workers > 1 and t.compile is not False
    _require(
        t.compile_mode not in CUDA_GRAPH_MODES or not ddp_on_gpus,
        f"train.compile_mode={t.compile_mode} records CUDA graphs, which run BatchNorm nets "
        f"several times slower under DDP (pytorch#139207); with scale.num_workers="
        f"{sc.num_workers} use train.compile_mode=default",
    )
    _require(
        not t.sync_bn or sc.use_gpu,
        "train.sync_bn=true needs scale.use_gpu=true (SyncBatchNorm runs on CUDA with NCCL, not "
        "on CPU workers); drop train.sync_bn",
    )


def choices(hint: Any) -> tuple[Any, ...] | None:
    """The allowed values of a ``Literal`` (or optional ``Literal``) type hint, else None."""
    if typing.get_origin(hint) is Literal:
        return typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        inner = [choices(arg) for arg in typing.get_args(hint) if arg is not type(None)]
        if len(inner) == 1 and inner[0] is not None:
            return (*inner[0], None)
    return None


def _shown(choice: Any) -> str:
    """A choice as the command line spells it (none, true, auto)."""
    if choice is None:
        return "none"
    return str(choice).lower() if isinstance(choice, bool) else str(choice)


def _check_choices(name: str, section: Any) -> None:
    for key, hint in typing.get_type_hints(type(section)).items():
        allowed = choices(hint)
        value = getattr(section, key)
        if allowed is not None and value not in allowed:
            shown = ", ".join(_shown(a) for a in allowed)
            raise ConfigError(f"{name}.{key}={value!r}; use one of: {shown}")


def to_dict(config: Any) -> dict[str, Any]:
    """Plain nested dict (tuples kept as lists), for Ray, JSON and checkpoints."""
    return dataclasses.asdict(config)


def from_dict(cls: type, data: dict[str, Any]) -> Any:
    """Rebuild a dataclass tree from :func:`to_dict` output; unknown keys are an error."""
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"unknown config keys for {cls.__name__}: {unknown}")
    values = {}
    for name, value in data.items():
        hint = hints[name]
        if is_dataclass(hint):
            values[name] = from_dict(hint, value)
        elif _is_tuple(hint) and value is not None:
            values[name] = tuple(value)
        else:
            values[name] = value
    return cls(**values)


# What a resumed run may change: how wide and where it runs, not what it computes (the global
# batch is train.global_batch; pipelines.job.elastic shares an interrupted epoch's rows out anew),
# and how fast its step runs (compiling, optimizer kernels: the same arithmetic, rounded apart).
# MLflow keeps the first values as params; the cluster.* tags say what the last attempt used.
RESUME_MAY_CHANGE = frozenset(
    {"scale.num_workers", "scale.cpus_per_worker", "scale.gpus_per_worker", "scale.max_failures"}
    | {"train.compile", "train.compile_mode", "optim.implementation"}
)


def flatten(config: Any, prefix: str = "") -> dict[str, Any]:
    """``{"optim.lr": 0.1, ...}``: the MLflow param names, the same for single runs and sweeps."""
    flat: dict[str, Any] = {}
    for f in fields(config):
        value = getattr(config, f.name)
        key = f"{prefix}{f.name}"
        if is_dataclass(value):
            flat.update(flatten(value, key + "."))
        else:
            flat[key] = value
    return flat


def apply_overrides(config: JobConfig, overrides: list[str]) -> JobConfig:
    """Apply ``section.key=value`` strings, parsing each value with the field's type."""
    sections = config.sections()
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or "." not in key:
            raise ConfigError(
                f"override {item!r} is not section.key=value (e.g. optim.lr=0.05 train.epochs=3)"
            )
        section_name, _, name = key.partition(".")
        if section_name not in sections:
            raise ConfigError(
                f"override {item!r}: unknown section {section_name!r}; use {list(sections)}"
            )
        section = getattr(config, section_name)
        hints = typing.get_type_hints(type(section))
        if name not in hints:
            names = sorted(hints)
            raise ConfigError(
                f"override {item!r}: {section_name} has no key {name!r}; keys: {names}"
            )
        value = _parse_value(raw, hints[name], item)
        config = replace(config, **{section_name: replace(section, **{name: value})})
    return config


def _is_tuple(hint: Any) -> bool:
    return typing.get_origin(hint) is tuple


BOOL_WORDS = {"1": True, "true": True, "yes": True, "on": True}
BOOL_WORDS |= {"0": False, "false": False, "no": False, "off": False}


def _parse_value(raw: str, hint: Any, item: str) -> Any:
    args = typing.get_args(hint)
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        if raw.lower() in ("none", "null", "") and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _parse_value(raw, inner[0], item)
    if origin is Literal:
        if bool in {type(a) for a in args} and raw.lower() in BOOL_WORDS:  # train.compile
            return BOOL_WORDS[raw.lower()]
        return raw  # membership is checked by validate(), with the allowed values
    if _is_tuple(hint):
        parts = [p for p in raw.strip("()[] ").split(",") if p.strip()]
        return tuple(_parse_value(p.strip(), args[0], item) for p in parts)
    try:
        if hint is bool:
            if raw.lower() not in BOOL_WORDS:
                raise ValueError(raw)
            return BOOL_WORDS[raw.lower()]
        if hint is int:
            return int(raw)
        if hint is float:
            value = float(raw)
            if not math.isfinite(value):
                raise ValueError(raw)
            return value
    except ValueError:
        raise ConfigError(f"override {item!r}: {raw!r} is not a valid {hint.__name__}") from None
    return raw
