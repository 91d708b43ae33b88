"""The training job's configuration: one frozen dataclass tree, dotted overrides, validation.

A recipe (``pipelines.recipes``) returns a :class:`JobConfig`; the command line changes it with
dotted overrides (``optim.lr=0.05 train.epochs=3``); :func:`validate` checks every value that can be
checked without a cluster. The tree crosses the Ray boundary as a plain dict
(:func:`to_dict` / :func:`from_dict`, the only place that converts) and is logged to MLflow
flattened (:func:`flatten`, keys like ``optim.lr``).
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field, fields, is_dataclass, replace
from typing import Any, Literal

AUGMENTS = ("cifar", "cifar_tutorial", "paper", "inception")
DECODE_DEVICES = ("cpu", "device")
RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
MEAN_MODES = ("per_pixel", "per_channel", "imagenet")
PRECISIONS = ("auto", "fp32", "bf16")


@dataclass(frozen=True)
class ModelConfig:
    name: str = "resnet20"
    shortcut: str | None = None  # None: the family's paper default (A for CIFAR, B for ImageNet)
    stride_in_3x3: bool = False  # bottleneck stride on the 3×3 ("v1.5") instead of the first 1×1
    zero_init_residual: bool = False


@dataclass(frozen=True)
class DataConfig:
    uri: str = "data/synthetic-cifar"  # shards written by resnet-prepare (path or s3://)
    train_split: str = "train"
    val_split: str = "val"
    augment: str = "cifar"  # cifar (§4.2), cifar_tutorial, paper (§3.4 scale aug), inception
    image_size: int = 32  # training crop side in pixels
    eval_resize: int = 36  # evaluation: shorter side resized to this, centre crop image_size
    mean: str = "per_pixel"  # per_pixel (paper), per_channel (dataset stats), imagenet (constants)
    normalize_std: bool = False  # divide by the per-channel std (modern recipes); paper: no
    lighting_std: float = 0.0  # AlexNet PCA colour augmentation σ (paper §3.4 uses 0.1)
    decode_cpus: float = 1.0  # CPUs per Ray Data decode task
    decode_concurrency: int | None = None  # decode tasks per worker pipeline; None: Ray decides
    # cpu: Ray Data tasks decode + augment. device: the tasks only read rows and plan crops, each
    # Train worker decodes its JPEG batches on its own device (GPU: nvJPEG), for GPU nodes short
    # of CPU cores; paper/inception augment only.
    decode_device: str = "cpu"
    prefetch_batches: int = 2
    shuffle_buffer: int = 1024  # rows in each worker's local shuffle buffer (after file shuffle)
    seed: int = 0


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 0.1  # at reference_batch images per step (or as given when that is None)
    reference_batch: int | None = None  # linear scaling rule (Goyal et al. 2017) when set
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 1e-4
    decay_norm_and_bias: bool = True  # paper: decay every weight
    label_smoothing: float = 0.0


@dataclass(frozen=True)
class ScheduleConfig:
    kind: str = "multistep"  # multistep, cosine, plateau, constant
    milestones: tuple[int, ...] = ()  # optimizer steps where lr is multiplied by gamma
    milestone_epochs: tuple[int, ...] = ()  # the same in epochs (converted with steps/epoch)
    gamma: float = 0.1
    warmup_epochs: float = 0.0
    hold_lr: float | None = None  # §4.2 ResNet-110: 0.01 until training error < 80%
    hold_until_train_error: float | None = None
    plateau_patience: int = 5


@dataclass(frozen=True)
class TrainConfig:
    global_batch: int = 128  # images per optimizer step over all workers
    epochs: int = 10
    max_steps: int | None = None  # stop after this many optimizer steps (CIFAR: 64k) if sooner
    eval_every_epochs: int = 1
    log_every_steps: int = 20
    checkpoint_every_steps: int | None = None  # plus one at every epoch end
    keep_checkpoints: int = 3
    precision: str = "auto"  # auto: bf16 autocast on GPU, fp32 on CPU
    channels_last: bool = True  # GPU only
    compile: bool = False
    sync_bn: bool = False
    seed: int = 0


@dataclass(frozen=True)
class ScaleConfig:
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0  # used when use_gpu
    max_failures: int = 3  # worker-group restarts from the latest checkpoint


@dataclass(frozen=True)
class RunSettings:
    name: str | None = None  # Train run name; None: derived from recipe and model (deterministic)
    experiment: str = "resnet-ray"
    storage_path: str = "results"  # checkpoints; a local path or s3://bucket/prefix
    registered_model: str | None = None  # MLflow model registry name; None: resnet-ray-<model>


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


class ConfigError(ValueError):
    """A configuration value is wrong; the message names it and says how to fix it."""


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
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or "." not in key:
            raise ConfigError(
                f"override {item!r} is not section.key=value (e.g. optim.lr=0.05 train.epochs=3)"
            )
        section_name, _, name = key.partition(".")
        if section_name not in {f.name for f in fields(JobConfig)} or section_name == "recipe":
            sections = [f.name for f in fields(JobConfig) if f.name != "recipe"]
            raise ConfigError(
                f"override {item!r}: unknown section {section_name!r}; use {sections}"
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


def _parse_value(raw: str, hint: Any, item: str) -> Any:
    args = typing.get_args(hint)
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        if raw.lower() in ("none", "null", "") and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _parse_value(raw, inner[0], item)
    if origin is Literal:
        return raw
    if _is_tuple(hint):
        parts = [p for p in raw.strip("()[] ").split(",") if p.strip()]
        return tuple(_parse_value(p.strip(), args[0], item) for p in parts)
    try:
        if hint is bool:
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
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


def validate(config: JobConfig, *, model_names_ok: typing.Callable[[str], bool]) -> None:
    """Checks every value that needs no cluster; raises ConfigError with the value and the fix.

    ``model_names_ok`` is ``resnet_core``'s name check (passed in to keep this module light).
    """
    m, d, o, s, t, sc = (
        config.model,
        config.data,
        config.optim,
        config.schedule,
        config.train,
        config.scale,
    )
    if not model_names_ok(m.name):
        raise ConfigError(
            f"model.name={m.name!r} is not a ResNet v1 model; use resnet18/34/50/101/152, "
            "plain18/34, or resnet{6n+2}/plain{6n+2} for CIFAR (resnet20, resnet56, resnet110 …)"
        )
    if m.shortcut not in (None, "A", "B", "C"):
        raise ConfigError(f"model.shortcut={m.shortcut!r}; use A, B or C (paper §3.3)")
    checks: list[tuple[bool, str]] = [
        (o.lr > 0, f"optim.lr={o.lr} must be positive"),
        (t.global_batch > 0, f"train.global_batch={t.global_batch} must be positive"),
        (t.epochs > 0, f"train.epochs={t.epochs} must be positive"),
        (t.max_steps is None or t.max_steps > 0, f"train.max_steps={t.max_steps} must be positive"),
        (sc.num_workers >= 1, f"scale.num_workers={sc.num_workers} must be at least 1"),
        (sc.cpus_per_worker > 0, f"scale.cpus_per_worker={sc.cpus_per_worker} must be positive"),
        (sc.max_failures >= 0, f"scale.max_failures={sc.max_failures} must be >= 0"),
        (o.momentum >= 0, f"optim.momentum={o.momentum} must be >= 0"),
        (o.weight_decay >= 0, f"optim.weight_decay={o.weight_decay} must be >= 0"),
        (
            0 <= o.label_smoothing < 1,
            f"optim.label_smoothing={o.label_smoothing} must be in [0, 1)",
        ),
        (d.augment in AUGMENTS, f"data.augment={d.augment!r}; use one of {AUGMENTS}"),
        (d.mean in MEAN_MODES, f"data.mean={d.mean!r}; use one of {MEAN_MODES}"),
        (d.image_size >= 32, f"data.image_size={d.image_size} must be at least 32"),
        (
            d.eval_resize >= d.image_size,
            f"data.eval_resize={d.eval_resize} must be >= data.image_size",
        ),
        (d.lighting_std >= 0, f"data.lighting_std={d.lighting_std} must be >= 0"),
        (t.precision in PRECISIONS, f"train.precision={t.precision!r}; use one of {PRECISIONS}"),
        (
            s.kind in ("multistep", "cosine", "plateau", "constant"),
            f"schedule.kind={s.kind!r}; use multistep, cosine, plateau or constant",
        ),
        (t.keep_checkpoints >= 1, f"train.keep_checkpoints={t.keep_checkpoints} must be >= 1"),
        (
            o.reference_batch is None or o.reference_batch > 0,
            f"optim.reference_batch={o.reference_batch} must be positive",
        ),
        (t.log_every_steps >= 1, f"train.log_every_steps={t.log_every_steps} must be >= 1"),
        (
            t.eval_every_epochs >= 1,
            f"train.eval_every_epochs={t.eval_every_epochs} must be >= 1",
        ),
        (
            t.checkpoint_every_steps is None or t.checkpoint_every_steps >= 1,
            f"train.checkpoint_every_steps={t.checkpoint_every_steps} must be >= 1 or None",
        ),
        (
            t.seed >= 0 and d.seed >= 0,
            f"seeds must be >= 0 (train.seed={t.seed}, data.seed={d.seed})",
        ),
        (d.decode_cpus > 0, f"data.decode_cpus={d.decode_cpus} must be positive"),
        (
            d.decode_device in DECODE_DEVICES,
            f"data.decode_device={d.decode_device!r}; use cpu (Ray Data tasks decode) or device "
            "(each Train worker decodes its JPEG batches on its GPU)",
        ),
        (
            d.decode_device != "device" or d.augment in ("paper", "inception"),
            f"data.decode_device=device decodes JPEG crops on the worker; data.augment="
            f"{d.augment!r} reads 32x32 images whole: use data.decode_device=cpu",
        ),
        (
            d.decode_concurrency is None or d.decode_concurrency >= 1,
            f"data.decode_concurrency={d.decode_concurrency} must be >= 1 or None",
        ),
        (d.prefetch_batches >= 0, f"data.prefetch_batches={d.prefetch_batches} must be >= 0"),
        (d.shuffle_buffer >= 0, f"data.shuffle_buffer={d.shuffle_buffer} must be >= 0 (0: off)"),
        (
            not sc.use_gpu or sc.gpus_per_worker > 0,
            f"scale.gpus_per_worker={sc.gpus_per_worker} must be positive",
        ),
        (s.gamma > 0, f"schedule.gamma={s.gamma} must be positive"),
        (s.warmup_epochs >= 0, f"schedule.warmup_epochs={s.warmup_epochs} must be >= 0"),
        (
            s.plateau_patience >= 1,
            f"schedule.plateau_patience={s.plateau_patience} must be >= 1",
        ),
        (
            (s.hold_lr is None) == (s.hold_until_train_error is None),
            "schedule.hold_lr and schedule.hold_until_train_error go together (paper §4.2 "
            "warm-up); set both or neither",
        ),
        (
            bool(RUN_NAME.fullmatch(config.run_name)),
            f"run name {config.run_name!r} may only use letters, digits, '.', '_' and '-' "
            "(it names a folder and an MLflow run)",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    if t.global_batch % sc.num_workers:
        raise ConfigError(
            f"train.global_batch={t.global_batch} is not divisible by scale.num_workers="
            f"{sc.num_workers}; pick a batch that is a multiple of the worker count"
        )
    if t.precision == "bf16" and not sc.use_gpu:
        raise ConfigError("train.precision=bf16 needs scale.use_gpu=true; use fp32 or auto on CPU")
