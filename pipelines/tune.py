"""resnet-tune: sweep learning rate × depth (and weight decay, batch) with Ray Tune; every trial is
a full resnet-train run on its own TorchTrainer workers, ASHA stops the hopeless ones early, and
MLflow shows one parent run per sweep with one child run per trial.

Run from a checkout:

    resnet-tune                          # or: python -m pipelines.tune; demo recipe + shards
    resnet-tune --recipe cifar-paper --data data/cifar10 --models resnet20,resnet32,resnet56 \\
        --lr 0.02,0.05,0.1,0.2 --workers 1 --name cifar-depth-lr train.epochs=30
    resnet-tune --recipe cifar-paper --data data/cifar10 --models resnet20,resnet56 \\
        --lr 1e-3:3e-1 --weight-decay 1e-5:1e-3 --search random --num-samples 16 --grace-period 4
    ray job submit --working-dir . -- python -m pipelines.tune --recipe imagenet-fast ...

The base config of every trial is exactly resnet-train's (``--recipe`` for each model, ``--data``,
flags, dotted overrides); the search space replaces ``model.name``, ``optim.lr``,
``optim.weight_decay`` and ``train.global_batch``. ``--lr`` and ``--weight-decay`` take a list
(``0.01,0.1``) or a log-uniform range (``1e-3:1e-1``); ``--models`` and ``--batch`` take lists.
``--search grid`` tries every combination of the lists (a range is sampled once per grid point)
``--num-samples`` times; ``--search random`` draws ``--num-samples`` trials. Every combination
is validated before anything starts.

Early stopping: ASHA (Li et al., "A System for Massively Parallel Hyperparameter Tuning", 2020)
on the validation error, rungs at ``grace_period · reduction_factor^k`` epochs below the last
epoch (a trial that passes the last rung runs to its end). A stopped trial ends FINISHED in
MLflow with the tag ``stopped_early=true`` (its curve is a valid, shorter run); a trial that
failed after ``--max-failures`` retries ends FAILED.

Resume: re-running the same command (same ``--name``) after the driver died restores the sweep
from ``<storage>/<name>/``: finished trials are kept, unfinished and errored ones continue from
their own Train checkpoints (``<storage>/<name>-<trial id>/``) and MLflow runs. At the end the
leaderboard (printed, and CSV + Markdown on the parent run), plots of validation error against
lr per depth and of the best trial's curves per depth, and the best trial's model (logged and
registered) are recorded. Exit status: 0 every trial ended well, 1 a trial failed or the sweep
was interrupted (run it again to resume), 2 bad configuration (nothing started).
"""

from __future__ import annotations

import argparse
import csv
import io
import itertools
import json
import math
import re
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow.entities import DatasetInput
from ray import tune
from ray._common.constants import HEAD_NODE_RESOURCE_NAME
from ray.tune import Callback, ExperimentAnalysis
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import BasicVariantGenerator

from pipelines import storage, tracking
from pipelines.config import (
    RUN_NAME,
    ConfigError,
    JobConfig,
    apply_overrides,
    flatten,
    from_dict,
    to_dict,
    validate,
)
from pipelines.job import checks
from pipelines.job.cli import add_job_arguments, flag_overrides, resolve_config
from pipelines.job.final_model import log_final_model
from pipelines.job.parts import plan_steps
from pipelines.job.runner import Extension
from pipelines.job.session import training_session
from pipelines.job.trainer import build_trainer, run_splits
from pipelines.manifest import Manifest, ManifestError
from resnet_core.checkpoint import CheckpointError

METRIC = "val/error"  # ASHA minimises the validation error after each evaluated epoch
TIME_ATTR = "epoch"  # reported by the training loop, 1-based
MODEL_KEY, LR_KEY, WD_KEY, BATCH_KEY = (
    "model.name",
    "optim.lr",
    "optim.weight_decay",
    "train.global_batch",
)
# Tune trial ids are "<5 hex>_<5 digits>"; a stand-in of the same length checks run-name rules.
TRIAL_ID_EXAMPLE = "00000_00000"


# ---------------------------------------------------------------------------------------------
# Command line → SweepConfig
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LogRange:
    """A log-uniform range ``[low, high]`` (both positive)."""

    low: float
    high: float

    def __str__(self) -> str:
        return f"{self.low:g}:{self.high:g}"


Values = tuple[float, ...] | LogRange


@dataclass(frozen=True)
class SweepConfig:
    """What to sweep and how. ``bases`` holds resnet-train's resolved config for each model
    (recipes may differ by model, e.g. shortcuts); the search space overrides the swept keys.

    lr / weight_decay: None keeps the recipe's value. batches: global batches, None keeps it.
    num_samples: random search: trials; grid search: repeats of the grid.
    grace_period: epochs every trial runs before ASHA may stop it; reduction_factor: ASHA's η.
    max_concurrent: user cap on trials running at once (None: as many as the cluster fits).
    max_failures: Tune retries of a failed trial (each resumes from its Train checkpoint).
    """

    name: str
    bases: Mapping[str, JobConfig]
    lr: Values | None
    weight_decay: Values | None
    batches: tuple[int, ...] | None
    search: str
    num_samples: int
    grace_period: int
    reduction_factor: int
    max_concurrent: int | None
    max_failures: int
    seed: int

    @property
    def models(self) -> tuple[str, ...]:
        return tuple(self.bases)

    @property
    def first(self) -> JobConfig:
        return next(iter(self.bases.values()))

    @property
    def max_epochs(self) -> int:
        return max(c.train.epochs for c in self.bases.values())

    @property
    def storage_root(self) -> str:
        return self.first.run.storage_path

    def params(self) -> dict[str, str]:
        """The sweep's own settings as MLflow params of the parent run."""
        return {
            "sweep.models": ",".join(self.models),
            "sweep.lr": _describe(self.lr),
            "sweep.weight_decay": _describe(self.weight_decay),
            "sweep.batch": ",".join(map(str, self.batches)) if self.batches else "recipe",
            "sweep.search": self.search,
            "sweep.num_samples": str(self.num_samples),
            "sweep.grace_period": str(self.grace_period),
            "sweep.reduction_factor": str(self.reduction_factor),
            "sweep.max_failures": str(self.max_failures),
            "sweep.seed": str(self.seed),
            "sweep.metric": f"{METRIC} (min)",
        }


def _describe(values: Values | None) -> str:
    if values is None:
        return "recipe"
    if isinstance(values, LogRange):
        return f"loguniform({values})"
    return ",".join(f"{v:g}" for v in values)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="resnet-tune",
        description="Sweep lr × depth with Ray Tune (ASHA); one TorchTrainer per trial; MLflow "
        "parent + child runs.",
        epilog="Lists are comma-separated (0.01,0.1); ranges are low:high, sampled log-uniformly "
        "(1e-3:1e-1). Any base config value can be overridden as section.key=value, exactly as "
        "for resnet-train (train.epochs=3 data.decode_cpus=0.5).",
    )
    parser.add_argument("--models", help="models to sweep, e.g. resnet20,resnet32,resnet56")
    parser.add_argument("--lr", help="learning rates: list 0.01,0.1 or range 1e-3:1e-1")
    parser.add_argument("--weight-decay", help="weight decays: list or range")
    parser.add_argument("--batch", help="global batch sizes, e.g. 64,128")
    parser.add_argument("--search", choices=("grid", "random"), default="grid")
    parser.add_argument(
        "--num-samples", type=int, default=1, help="random: trials; grid: repeats of the grid"
    )
    parser.add_argument(
        "--grace-period", type=int, default=1, help="epochs before ASHA may stop a trial"
    )
    parser.add_argument(
        "--reduction-factor", type=int, default=3, help="ASHA keeps 1/η of trials per rung"
    )
    parser.add_argument("--max-concurrent", type=int, help="cap on trials running at once")
    parser.add_argument(
        "--max-failures", type=int, default=2, help="retries of a failed trial (Tune)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random search")
    parser.add_argument("--name", help="sweep name (default tune-<recipe>); re-use it to resume")
    # The base config's flags, exactly resnet-train's (--workers, --epochs, --storage, ...).
    add_job_arguments(parser)
    return parser


def parse_values(text: str, flag: str) -> Values:
    """``"0.01,0.1"`` → ``(0.01, 0.1)``; ``"1e-3:1e-1"`` → ``LogRange(0.001, 0.1)``."""
    bounds = text.split(":")
    try:
        numbers = tuple(float(item) for item in (bounds if len(bounds) == 2 else text.split(",")))
    except ValueError:
        raise ConfigError(
            f"{flag} {text!r} is not a list like 0.01,0.1 or a range like 1e-3:1e-1"
        ) from None
    if len(bounds) != 2:
        return numbers
    low, high = numbers
    if not 0 < low < high:
        raise ConfigError(
            f"{flag} {text}: a range is low:high with 0 < low < high (sampled log-uniformly), "
            "e.g. 1e-3:1e-1"
        )
    return LogRange(low, high)


def parse_names(text: str, flag: str) -> tuple[str, ...]:
    names = tuple(item.strip() for item in text.split(","))
    if any(not name for name in names):
        raise ConfigError(f"{flag} {text!r} has an empty entry; give e.g. resnet20,resnet32")
    if len(set(names)) != len(names):
        raise ConfigError(f"{flag} {text!r} repeats a name; list each once")
    return names


def parse_batches(text: str) -> tuple[int, ...]:
    """``"64,128"`` → ``(64, 128)``."""
    try:
        return tuple(int(item) for item in text.split(","))
    except ValueError:
        raise ConfigError(f"--batch {text!r} is not a list of whole numbers like 64,128") from None


def resolve_sweep(args: argparse.Namespace) -> SweepConfig:
    """The sweep from the command line; ConfigError for a bad space or base config."""
    swept = {
        MODEL_KEY: args.models,
        LR_KEY: args.lr,
        WD_KEY: args.weight_decay,
        BATCH_KEY: args.batch,
    }
    for override in args.overrides:
        key = override.partition("=")[0]
        if swept.get(key) is not None:
            raise ConfigError(
                f"override {override!r} sets a key the search space sweeps; drop one of them"
            )
    name = args.name or f"tune-{args.recipe}"
    if not RUN_NAME.fullmatch(name):
        raise ConfigError(
            f"--name {name!r} must be letters, digits, '.', '_' or '-' (it names folders and runs)"
        )
    models = parse_names(args.models, "--models") if args.models else (None,)
    bases = {}
    for model in models:
        config = resolve_config(args.recipe, model, flag_overrides(args))
        bases[config.model.name] = config
    max_concurrent = 1 if args.max_concurrent is None else args.max_concurrent
    for flag, value, least in (
        ("--num-samples", args.num_samples, 1),
        ("--grace-period", args.grace_period, 1),
        ("--reduction-factor", args.reduction_factor, 2),
        ("--max-failures", args.max_failures, 0),
        ("--max-concurrent", max_concurrent, 1),
    ):
        if value < least:
            raise ConfigError(f"{flag} {value} must be at least {least}")
    sweep = SweepConfig(
        name=name,
        bases=bases,
        lr=parse_values(args.lr, "--lr") if args.lr else None,
        weight_decay=parse_values(args.weight_decay, "--weight-decay")
        if args.weight_decay
        else None,
        batches=parse_batches(args.batch) if args.batch else None,
        search=args.search,
        num_samples=args.num_samples,
        grace_period=args.grace_period,
        reduction_factor=args.reduction_factor,
        max_concurrent=args.max_concurrent,
        max_failures=args.max_failures,
        seed=args.seed,
    )
    shortest = min(c.train.epochs for c in bases.values())
    if sweep.grace_period > shortest:
        raise ConfigError(
            f"--grace-period {sweep.grace_period} exceeds train.epochs={shortest}; ASHA needs "
            "grace period <= epochs"
        )
    return sweep


def trial_config(
    sweep_bases: Mapping[str, JobConfig], params: Mapping[str, Any], run_name: str
) -> JobConfig:
    """The resolved config of one trial: its model's base config with the sampled values."""
    base = sweep_bases[params[MODEL_KEY]]
    overrides = [f"{key}={value}" for key, value in params.items() if key != MODEL_KEY]
    return apply_overrides(base, [*overrides, f"run.name={run_name}"])


def candidate_params(sweep: SweepConfig) -> Iterator[dict[str, Any]]:
    """Every combination the sweep can produce (a range contributes its two ends)."""

    def points(values: Values | None) -> Sequence[float | None]:
        if values is None:
            return (None,)
        return (values.low, values.high) if isinstance(values, LogRange) else values

    batches: Sequence[int | None] = sweep.batches or (None,)
    for model, lr, wd, batch in itertools.product(
        sweep.models, points(sweep.lr), points(sweep.weight_decay), batches
    ):
        params: dict[str, Any] = {MODEL_KEY: model, LR_KEY: lr, WD_KEY: wd, BATCH_KEY: batch}
        yield {key: value for key, value in params.items() if value is not None}


def validate_sweep(sweep: SweepConfig) -> None:
    """resnet-train's validation of every trial config the space can produce."""
    for params in candidate_params(sweep):
        config = trial_config(sweep.bases, params, child_run_name(sweep.name, TRIAL_ID_EXAMPLE))
        try:
            validate(config)
        except ConfigError as e:
            raise ConfigError(f"trial {_shown(params)}: {e}") from None


def check_dataset(sweep: SweepConfig, *, verify_data: bool = False) -> Manifest:
    """resnet-train's dataset checks for every model, and that every batch fits the data."""
    manifest = None
    for config in sweep.bases.values():
        manifest, _ = checks.check_dataset(config, verify_data=verify_data)
        verify_data = False  # the same shards: read once
    for params in candidate_params(sweep):
        config = trial_config(sweep.bases, params, child_run_name(sweep.name, TRIAL_ID_EXAMPLE))
        try:
            plan_steps(config, manifest)
        except ValueError as e:
            raise ConfigError(f"trial {_shown(params)}: {e}") from None
    return manifest


def _shown(params: Mapping[str, Any]) -> str:
    return "{" + ", ".join(f"{key}={value}" for key, value in params.items()) + "}"


def param_space(sweep: SweepConfig) -> dict[str, Any]:
    """Tune's search space over the dotted config keys (the MLflow param names)."""

    def dimension(values: Sequence[Any] | LogRange) -> Any:
        if isinstance(values, LogRange):
            return tune.loguniform(values.low, values.high)
        if sweep.search == "grid":
            return tune.grid_search(list(values))
        return tune.choice(list(values))

    space = {MODEL_KEY: dimension(sweep.models)}
    for key, values in (
        (LR_KEY, sweep.lr),
        (WD_KEY, sweep.weight_decay),
        (BATCH_KEY, sweep.batches),
    ):
        if values is not None:
            space[key] = dimension(values)
    return space


def planned_trials(sweep: SweepConfig) -> int:
    if sweep.search == "random":
        return sweep.num_samples
    sizes = [len(v) for v in (sweep.lr, sweep.weight_decay) if isinstance(v, tuple)]
    return len(sweep.models) * math.prod(sizes) * len(sweep.batches or (0,)) * sweep.num_samples


def asha_rungs(sweep: SweepConfig) -> list[int]:
    """Epochs at which ASHA compares trials (grace_period · η^k below the longest run)."""
    rungs, epoch = [], sweep.grace_period
    while epoch < sweep.max_epochs:
        rungs.append(epoch)
        epoch *= sweep.reduction_factor
    return rungs


def scheduler(sweep: SweepConfig) -> ASHAScheduler | None:
    """ASHA with rungs at :func:`asha_rungs`; None (run every trial to its end) without rungs.

    ``max_t`` sits half an epoch below the last epoch and ``stop_last_trials`` is off, so a
    trial that passed the last rung is never stopped at its final report: it finishes by
    itself and Ray Train shuts its workers down cleanly.
    """
    if not asha_rungs(sweep):
        return None
    return ASHAScheduler(
        time_attr=TIME_ATTR,
        max_t=sweep.max_epochs - 0.5,
        grace_period=sweep.grace_period,
        reduction_factor=sweep.reduction_factor,
        stop_last_trials=False,
    )


def describe(sweep: SweepConfig) -> str:
    rungs = asha_rungs(sweep)
    stopping = (
        f"ASHA on {METRIC}, rungs at epochs {rungs}, keeps 1/{sweep.reduction_factor} per rung"
        if rungs
        else "no early stopping (grace period = epochs)"
    )
    return "\n".join(
        [
            f"sweep {sweep.name}: {sweep.search} search, {planned_trials(sweep)} trials",
            f"  models: {', '.join(sweep.models)}",
            f"  optim.lr: {_describe(sweep.lr)}; optim.weight_decay: "
            f"{_describe(sweep.weight_decay)}; train.global_batch: "
            f"{','.join(map(str, sweep.batches)) if sweep.batches else 'recipe'}",
            f"  {stopping}",
            f"  storage: {storage.redact(storage.join(sweep.storage_root, sweep.name))}",
        ]
    )


# ---------------------------------------------------------------------------------------------
# One trial: a Tune function that runs a whole TorchTrainer
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrialSetup:
    """What every trial needs from the driver (plain data: it crosses into the trial actor)."""

    sweep_name: str
    bases: dict[str, dict[str, Any]]  # model name → to_dict(JobConfig)
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    tags: dict[str, str]
    datasets: tuple[DatasetInput, ...] = ()  # the trials' MLflow dataset inputs
    extensions: tuple[Extension, ...] = ()  # features added to every trial's training loop


class EvaluatedEpochReport(TuneReportCallback):
    """Forwards to Tune only the reports that carry the validation error (one per evaluated
    epoch, with its checkpoint path). Step-level reports go to MLflow alone: Tune rejects results
    without the searched metric, and ASHA's time unit is the epoch."""

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any):
        if metrics and METRIC in metrics[0]:
            super().after_report(run_context, metrics, checkpoint)


def child_run_name(sweep_name: str, trial_id: str) -> str:
    """Name of a trial's MLflow child run and of its Train run folder (stable across resumes)."""
    return f"{sweep_name}-{trial_id}"


def run_trial(params: dict[str, Any], setup: TrialSetup) -> None:
    """The Tune trainable: one full resnet-train run for ``params``. Reports reach Tune through
    :class:`EvaluatedEpochReport`; :class:`~pipelines.tracking.MlflowReporter` logs the child run.
    Re-running a trial (retry or resumed sweep) resumes its Train run from its checkpoint."""
    import ray.tune
    from mlflow.tracking import MlflowClient

    trial_id = ray.tune.get_context().get_trial_id()
    bases = {name: from_dict(JobConfig, base) for name, base in setup.bases.items()}
    config = trial_config(bases, params, child_run_name(setup.sweep_name, trial_id))
    client = MlflowClient(tracking_uri=setup.tracking_uri)
    run_id, resumed = tracking.find_or_create_run(
        client,
        setup.experiment_id,
        config.run_name,
        tags={**setup.tags, "model": config.model.name, "tune.trial_id": trial_id},
        parent_run_id=setup.parent_run_id,
    )
    tracking.log_params_once(client, run_id, flatten(config))
    client.log_inputs(run_id, datasets=list(setup.datasets))
    if resumed:
        print(f"trial {trial_id}: continuing MLflow run {run_id}", flush=True)
    trainer = build_trainer(
        config,
        # MLflow first: Tune may stop the trial as soon as it sees the result, and the
        # epoch's metrics must be in the child run by then.
        callbacks=[tracking.MlflowReporter(setup.tracking_uri, run_id), EvaluatedEpochReport()],
        extensions=setup.extensions,
    )
    trainer.fit()


# ---------------------------------------------------------------------------------------------
# Trial outcomes and the child runs' final state
# ---------------------------------------------------------------------------------------------

COMPLETED, STOPPED, FAILED, UNFINISHED = "completed", "stopped_early", "failed", "unfinished"


def trial_outcome(tune_status: str, epochs_run: int, planned: int) -> str:
    """completed, stopped_early (by ASHA), failed or unfinished, from Tune's trial status."""
    if tune_status == "ERROR":
        return FAILED
    if tune_status != "TERMINATED":
        return UNFINISHED
    return COMPLETED if epochs_run >= planned else STOPPED


def close_child_run(client: Any, run_id: str, outcome: str, epochs_run: int) -> None:
    """A failed trial's child ends FAILED; every other ended trial FINISHED, an ASHA-stopped one
    with ``stopped_early=true`` (a shorter but valid run whose curves stay comparable)."""
    if outcome == UNFINISHED:
        return
    tags = {
        "tune.outcome": outcome,
        "tune.epochs_run": str(epochs_run),
        "stopped_early": str(outcome == STOPPED).lower(),
    }
    tracking.set_tags(client, run_id, tags)
    client.set_terminated(run_id, "FAILED" if outcome == FAILED else "FINISHED")


class ChildRunCloser(Callback):
    """Tune callback on the driver: closes a trial's child run as soon as the trial ends (the
    final leaderboard step closes every child again, so a missed update is harmless)."""

    def __init__(
        self,
        tracking_uri: str,
        experiment_id: str,
        sweep_name: str,
        bases: Mapping[str, JobConfig],
        manifest: Manifest,
    ) -> None:
        self.tracking_uri = tracking_uri
        self.experiment_id = experiment_id
        self.sweep_name = sweep_name
        self.bases = dict(bases)
        self.manifest = manifest

    def _close(self, trial: Any, tune_status: str) -> None:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=self.tracking_uri)
        name = child_run_name(self.sweep_name, trial.trial_id)
        run = tracking.find_run(client, self.experiment_id, name)
        if run is None:
            return
        epochs_run = int((trial.last_result or {}).get(TIME_ATTR, 0))
        planned = plan_steps(trial_config(self.bases, trial.config, name), self.manifest).epochs
        outcome = trial_outcome(tune_status, epochs_run, planned)
        close_child_run(client, run.info.run_id, outcome, epochs_run)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._close(trial, "TERMINATED")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._close(trial, "ERROR")


# ---------------------------------------------------------------------------------------------
# The driver: MLflow parent, resources, the Tuner (new or restored)
# ---------------------------------------------------------------------------------------------


def concurrent_trials(config: JobConfig, cluster: Mapping[str, float], cap: int | None) -> int:
    """Trials that fit at once: each takes workers × (CPUs per worker + decode CPUs), and
    workers × GPUs per worker on GPU. At least one, at most ``cap``."""
    sc, d = config.scale, config.data
    cpus = sc.num_workers * (sc.cpus_per_worker + d.decode_cpus)
    fits = math.floor(cluster.get("CPU", 0.0) / cpus + 1e-9)
    if sc.use_gpu:
        fits = min(
            fits, math.floor(cluster.get("GPU", 0.0) / (sc.num_workers * sc.gpus_per_worker) + 1e-9)
        )
    fits = max(1, fits)
    return min(fits, cap) if cap else fits


def common_params(sweep: SweepConfig) -> dict[str, Any]:
    """Base config values shared by every model's recipe and not swept: the parent's params."""
    flats = [flatten(config) for config in sweep.bases.values()]
    swept = {MODEL_KEY, "run.name"}
    swept |= {LR_KEY} if sweep.lr else set()
    swept |= {WD_KEY} if sweep.weight_decay else set()
    swept |= {BATCH_KEY} if sweep.batches else set()
    return {
        key: value
        for key, value in flats[0].items()
        if key not in swept and all(flat[key] == value for flat in flats[1:])
    }


def open_parent_run(
    client: Any, uri: str, sweep: SweepConfig, manifest: Manifest
) -> tuple[str, str, bool]:
    """``(experiment_id, parent_run_id, resumed)``; the parent is found again by sweep name.
    Resuming a sweep with a different space or base config raises ConfigError (new --name)."""
    experiment_id = tracking.ensure_experiment(client, sweep.first.run.experiment, uri)
    tags = {
        **sweep_tags(sweep, manifest),
        "tune.experiment_path": storage.redact(storage.join(sweep.storage_root, sweep.name)),
    }
    run_id, resumed = tracking.find_or_create_run(client, experiment_id, sweep.name, tags=tags)
    try:
        tracking.log_params_once(client, run_id, {**common_params(sweep), **sweep.params()})
    except ValueError as e:
        raise ConfigError(str(e)) from None
    client.log_inputs(run_id, datasets=sweep_datasets(sweep, manifest))
    return experiment_id, run_id, resumed


def sweep_datasets(sweep: SweepConfig, manifest: Manifest) -> list[DatasetInput]:
    """The dataset inputs of the parent and of every trial: the base config's splits."""
    return tracking.dataset_inputs(manifest, run_splits(sweep.first))


def sweep_tags(sweep: SweepConfig, manifest: Manifest) -> dict[str, str]:
    """Tags of the parent and of every child (each child adds its model and trial id); a run's
    description (the command line) is set when it is created."""
    base = sweep.first
    return {
        **tracking.environment_tags(),
        **tracking.description_tags(),
        "recipe": base.recipe,
        "dataset.checksum": manifest.checksum,
        "dataset.uri": storage.redact(base.data.uri),
        "cluster.workers": str(base.scale.num_workers),
        "cluster.use_gpu": str(base.scale.use_gpu),
        "tune.sweep": sweep.name,
    }


def experiment_location(sweep: SweepConfig) -> tuple[str, Any]:
    """``(path, filesystem)`` of the Tune experiment folder ``<storage>/<name>`` as Ray wants
    them: a local path with no filesystem, or a bucket path with our S3 filesystem."""
    import pyarrow.fs as pafs

    fs, path = storage.resolve(sweep.storage_root)
    if isinstance(fs, pafs.LocalFileSystem):
        return f"{sweep.storage_root.rstrip('/')}/{sweep.name}", None
    return f"{path.rstrip('/')}/{sweep.name}", fs


def trial_statuses(experiment: str, filesystem: Any) -> list[Any]:
    """Tune's ``Trial`` records of a saved experiment (status, config, last result)."""
    return list(ExperimentAnalysis(experiment, storage_filesystem=filesystem).trials)


def fit_sweep(
    sweep: SweepConfig, setup: TrialSetup, closer: ChildRunCloser, concurrency: int
) -> tuple[str, Any]:
    """Run (or resume) the Tune experiment; returns its ``(path, filesystem)``."""
    experiment, filesystem = experiment_location(sweep)
    # A trial is a Train *driver*: it computes nothing, so it reserves no CPU and its
    # TorchTrainer gets every worker slot. Trials run on the head node (Ray's advice for Train
    # drivers: a node that is not preempted); the tiny head-node share keeps the bundle non-empty.
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, setup=setup),
        {"CPU": 0, HEAD_NODE_RESOURCE_NAME: 0.001},
    )
    if tune.Tuner.can_restore(experiment, storage_filesystem=filesystem):
        trials = trial_statuses(experiment, filesystem)
        done = sum(t.status == "TERMINATED" for t in trials)
        print(
            f"resuming sweep {sweep.name}: keeping {done} finished trial(s); unfinished ones "
            "continue from their Train checkpoints",
            flush=True,
        )
        tuner = tune.Tuner.restore(
            experiment, trainable, resume_errored=True, storage_filesystem=filesystem
        )
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=param_space(sweep),
            tune_config=tune.TuneConfig(
                metric=METRIC,
                mode="min",
                scheduler=scheduler(sweep),
                # Caps the trials in flight (TuneConfig.max_concurrent_trials does not apply to
                # this search algorithm): a trial beyond what fits would hold its worker slots
                # while the decode tasks that feed every trial wait for CPUs.
                search_alg=BasicVariantGenerator(
                    random_state=sweep.seed, max_concurrent=concurrency
                ),
                num_samples=sweep.num_samples,
            ),
            run_config=tune.RunConfig(
                name=sweep.name,
                storage_path=experiment.rsplit("/", 1)[0],
                storage_filesystem=filesystem,
                failure_config=tune.FailureConfig(max_failures=sweep.max_failures),
                callbacks=[closer],
                verbose=1,
            ),
        )
    tuner.fit()
    return experiment, filesystem


# ---------------------------------------------------------------------------------------------
# Results: leaderboard, plots, best model
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrialRow:
    """One line of the leaderboard. top1 values are fractions; nan when never evaluated."""

    trial_id: str
    run_id: str | None
    config: JobConfig  # the trial's resolved config
    best_top1: float  # best validation top-1 over the evaluated epochs
    final_top1: float  # at the last evaluated epoch: the checkpoint that would be kept
    epochs_run: int
    planned_epochs: int
    outcome: str
    checkpoint_path: str | None

    @property
    def model(self) -> str:
        return self.config.model.name

    @property
    def lr(self) -> float:
        return self.config.optim.lr


def collect_rows(
    trials: Sequence[Any],
    sweep: SweepConfig,
    manifest: Manifest,
    client: Any,
    experiment_id: str,
) -> list[TrialRow]:
    """Leaderboard rows, best final top-1 first; failed and unfinished trials last."""
    rows = []
    for trial in trials:
        name = child_run_name(sweep.name, trial.trial_id)
        config = trial_config(sweep.bases, trial.config, name)
        last = trial.last_result or {}
        epochs_run = int(last.get(TIME_ATTR, 0))
        planned = plan_steps(config, manifest).epochs
        run = tracking.find_run(client, experiment_id, name)
        run_id = run.info.run_id if run else None
        history = client.get_metric_history(run_id, "val/top1") if run_id else []
        rows.append(
            TrialRow(
                trial_id=trial.trial_id,
                run_id=run_id,
                config=config,
                best_top1=max((m.value for m in history), default=math.nan),
                final_top1=float(last.get("val/top1", math.nan)),
                epochs_run=epochs_run,
                planned_epochs=planned,
                outcome=trial_outcome(trial.status, epochs_run, planned),
                checkpoint_path=last.get("checkpoint_path"),
            )
        )

    def rank(row: TrialRow) -> tuple[bool, float]:
        ended = row.outcome in (COMPLETED, STOPPED) and math.isfinite(row.final_top1)
        return (not ended, -row.final_top1 if ended else 0.0)

    return sorted(rows, key=rank)


def best_row(rows: Sequence[TrialRow]) -> TrialRow | None:
    """The model to register: the best completed trial, else the best stopped one."""
    for outcome in (COMPLETED, STOPPED):
        for row in rows:
            if row.outcome == outcome and math.isfinite(row.final_top1) and row.checkpoint_path:
                return row
    return None


LEADERBOARD_COLUMNS = (
    "rank",
    "trial",
    "model",
    "lr",
    "weight_decay",
    "batch",
    "best_val_top1",
    "final_val_top1",
    "epochs",
    "status",
    "mlflow_run_id",
)


def leaderboard_records(rows: Sequence[TrialRow]) -> list[dict[str, str]]:
    def pct(value: float) -> str:
        return f"{100 * value:.2f}%" if math.isfinite(value) else "-"

    return [
        {
            "rank": str(i),
            "trial": row.trial_id,
            "model": row.model,
            "lr": f"{row.lr:.4g}",
            "weight_decay": f"{row.config.optim.weight_decay:.3g}",
            "batch": str(row.config.train.global_batch),
            "best_val_top1": pct(row.best_top1),
            "final_val_top1": pct(row.final_top1),
            "epochs": f"{row.epochs_run}/{row.planned_epochs}",
            "status": row.outcome,
            "mlflow_run_id": row.run_id or "-",
        }
        for i, row in enumerate(rows, start=1)
    ]


def leaderboard_markdown(records: Sequence[Mapping[str, str]]) -> str:
    lines = [
        "| " + " | ".join(LEADERBOARD_COLUMNS) + " |",
        "|" + "|".join("---" for _ in LEADERBOARD_COLUMNS) + "|",
    ]
    lines += ["| " + " | ".join(r[c] for c in LEADERBOARD_COLUMNS) + " |" for r in records]
    return "\n".join(lines) + "\n"


def leaderboard_csv(records: Sequence[Mapping[str, str]]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=LEADERBOARD_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(records)
    return out.getvalue()


def plot_error_vs_lr(rows: Sequence[TrialRow], path: Path) -> None:
    """Best validation error against lr (log axis), one line per depth; hollow markers are
    trials ASHA stopped early."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.4, 4.4), layout="constrained")
    axes = figure.add_subplot()
    for model in sorted({r.model for r in rows}, key=_depth):
        points = sorted(
            (r for r in rows if r.model == model and math.isfinite(r.best_top1)),
            key=lambda r: r.lr,
        )
        if not points:
            continue
        (line,) = axes.plot(
            [r.lr for r in points], [1 - r.best_top1 for r in points], "-", label=model
        )
        for r in points:
            filled = r.outcome == COMPLETED
            axes.plot(
                r.lr,
                1 - r.best_top1,
                "o",
                color=line.get_color(),
                markerfacecolor=line.get_color() if filled else "none",
            )
    axes.set_xscale("log")
    axes.set_xlabel("learning rate (optim.lr)")
    axes.set_ylabel("best validation error")
    axes.set_title("validation error vs learning rate (hollow: stopped early)")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(title="model")
    figure.savefig(path, dpi=120)


def plot_best_curves(
    curves: Mapping[str, tuple[str, Mapping[str, Sequence[tuple[int, float]]]]], path: Path
) -> None:
    """Training loss and validation error against the optimizer step for the best trial of
    each depth. ``curves``: model → (label, metric → [(step, value)])."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 4.2), layout="constrained")
    loss_axes, error_axes = figure.subplots(1, 2)
    for model in sorted(curves, key=_depth):
        label, series = curves[model]
        for axes, key in ((loss_axes, "train/window_loss"), (error_axes, "val/error")):
            points = sorted(series.get(key, ()))
            if points:
                axes.plot(
                    *zip(*points, strict=True),
                    "-o" if key == "val/error" else "-",
                    label=label,
                    markersize=3,
                )
    loss_axes.set_title("training loss (window mean)")
    error_axes.set_title("validation error")
    for axes in (loss_axes, error_axes):
        axes.set_xlabel("optimizer step")
        axes.grid(True, alpha=0.3)
        axes.legend(fontsize="small")
    figure.savefig(path, dpi=120)


def _depth(model: str) -> tuple[int, str]:
    digits = re.sub(r"\D", "", model)
    return (int(digits) if digits else 0, model)


def metric_series(
    client: Any, run_id: str, keys: Sequence[str]
) -> dict[str, list[tuple[int, float]]]:
    return {
        key: [(m.step, m.value) for m in client.get_metric_history(run_id, key)] for key in keys
    }


def record_results(
    client: Any,
    uri: str,
    sweep: SweepConfig,
    manifest: Manifest,
    parent_run_id: str,
    rows: Sequence[TrialRow],
    filesystem: Any,
) -> TrialRow | None:
    """Close every child, log the leaderboard and plots to the parent, and log and register the
    best trial's model (once the sweep is complete). Returns the best row, or None."""
    for row in rows:
        if row.run_id:
            close_child_run(client, row.run_id, row.outcome, row.epochs_run)
    records = leaderboard_records(rows)
    print("\n" + leaderboard_markdown(records), flush=True)
    with tempfile.TemporaryDirectory(prefix="resnet-tune-") as tmp:
        board = Path(tmp, "leaderboard")
        board.mkdir()
        (board / "leaderboard.md").write_text(leaderboard_markdown(records))
        (board / "leaderboard.csv").write_text(leaderboard_csv(records))
        client.log_artifacts(parent_run_id, str(board), artifact_path="leaderboard")
        plots = Path(tmp, "plots")
        plots.mkdir()
        plot_error_vs_lr(rows, plots / "val_error_vs_lr.png")
        curves = {}
        for model in sorted({r.model for r in rows}):
            best_of_depth = best_row([r for r in rows if r.model == model])
            if best_of_depth is not None and best_of_depth.run_id:
                label = f"{model} lr={best_of_depth.lr:.3g} ({best_of_depth.trial_id})"
                series = metric_series(
                    client, best_of_depth.run_id, ("train/window_loss", "val/error")
                )
                curves[model] = (label, series)
        if curves:
            plot_best_curves(curves, plots / "best_curves_per_depth.png")
        client.log_artifacts(parent_run_id, str(plots), artifact_path="plots")
    best = best_row(rows)
    if best is None or best.run_id is None or any(r.outcome == UNFINISHED for r in rows):
        return None  # an interrupted sweep registers nothing: its best may still change
    if tracking.FINAL_MODEL_TAG not in client.get_run(best.run_id).data.tags:
        from ray.train import Checkpoint

        checkpoint = Checkpoint(best.checkpoint_path, filesystem=filesystem)
        log_final_model(uri, best.run_id, best.config, manifest, checkpoint)
    tags = {
        "best.trial_id": best.trial_id,
        "best.run_id": best.run_id,
        "best.model_uri": client.get_run(best.run_id).data.tags[tracking.FINAL_MODEL_TAG],
    }
    tracking.set_tags(client, parent_run_id, tags)
    client.log_metric(parent_run_id, "best/val_top1", best.final_top1)
    return best


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------


def run_sweep(sweep: SweepConfig, manifest: Manifest, extensions: Sequence[Extension] = ()) -> int:
    """Everything after the checks (Ray must be up); returns the exit status. ``extensions``:
    features added to every trial's training loop (:class:`pipelines.job.runner.Extension`)."""
    import ray
    from mlflow.tracking import MlflowClient

    uri = tracking.tracking_uri()
    tracking.quiet_store_logs()
    client = MlflowClient(tracking_uri=uri)
    experiment_id, parent_run_id, resumed = open_parent_run(client, uri, sweep, manifest)
    print(
        f"MLflow parent run {parent_run_id} ({'resumed' if resumed else 'new'}) in "
        f"{storage.redact(uri)}",
        flush=True,
    )
    try:
        concurrency = concurrent_trials(sweep.first, ray.cluster_resources(), sweep.max_concurrent)
        print(f"{concurrency} trials at a time on this cluster", flush=True)
        client.set_tag(parent_run_id, "tune.concurrent_trials", str(concurrency))
        setup = TrialSetup(
            sweep_name=sweep.name,
            bases={name: to_dict(config) for name, config in sweep.bases.items()},
            tracking_uri=uri,
            experiment_id=experiment_id,
            parent_run_id=parent_run_id,
            tags=sweep_tags(sweep, manifest),
            datasets=tuple(sweep_datasets(sweep, manifest)),
            extensions=tuple(extensions),
        )
        closer = ChildRunCloser(uri, experiment_id, sweep.name, sweep.bases, manifest)
        experiment, filesystem = fit_sweep(sweep, setup, closer, concurrency)
        trials = trial_statuses(experiment, filesystem)
        rows = collect_rows(trials, sweep, manifest, client, experiment_id)
        best = record_results(client, uri, sweep, manifest, parent_run_id, rows, filesystem)
    except Exception:
        client.set_terminated(parent_run_id, "FAILED")
        raise
    return close_sweep(client, uri, experiment_id, parent_run_id, rows, best)


def close_sweep(
    client: Any,
    uri: str,
    experiment_id: str,
    parent_run_id: str,
    rows: Sequence[TrialRow],
    best: TrialRow | None,
) -> int:
    """End the parent run (KILLED when trials are unfinished) and print the outcome; the exit
    status."""
    unfinished = [r.trial_id for r in rows if r.outcome == UNFINISHED]
    failed = [r.trial_id for r in rows if r.outcome == FAILED]
    if unfinished:
        client.set_terminated(parent_run_id, "KILLED")
        print(f"sweep interrupted ({len(unfinished)} trials unfinished): re-run it to resume")
        return 1
    client.set_terminated(parent_run_id, "FINISHED")
    if best is not None:
        print(
            f"best: trial {best.trial_id} ({best.model}, lr {best.lr:.4g}) final validation top-1 "
            f"{100 * best.final_top1:.2f}%; model logged to MLflow run {best.run_id}"
        )
    if failed:
        print(f"{len(failed)} trials failed: {', '.join(failed)} (see their MLflow runs)")
    print(f"open the MLflow UI: {tracking.ui_command(uri, experiment_id)}")
    return 1 if failed or best is None else 0


def launch(
    sweep: SweepConfig,
    address: str | None,
    *,
    verify_data: bool = False,
    extensions: Sequence[Extension] = (),
) -> int:
    """The checks, then the sweep on a Ray cluster (attached, or local for the duration)."""
    first = sweep.first
    for config in sweep.bases.values():
        checks.check_model(config)
    checks.check_locations(first)
    checks.check_gpu_locally(first, address)
    checks.check_store()
    demo_data_missing = checks.needs_demo_data(first)
    manifest = None if demo_data_missing else check_dataset(sweep, verify_data=verify_data)
    with training_session(first, address):  # sized for one trial
        if manifest is None:
            checks.ensure_demo_data(first)
            manifest = check_dataset(sweep)
        return run_sweep(sweep, manifest, extensions)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the sweep; returns the exit status (0 all trials ended well, 1 a trial failed or the
    sweep was interrupted, 2 bad configuration, nothing started)."""
    args = build_parser().parse_args(argv)
    try:
        sweep = resolve_sweep(args)
        validate_sweep(sweep)
    except (ConfigError, ValueError) as e:
        print(f"resnet-tune: {storage.redact(str(e))}", file=sys.stderr)
        return 2
    print(describe(sweep), flush=True)
    print("base config:\n" + json.dumps(to_dict(sweep.first), indent=2), flush=True)
    if args.print_config:
        return 0
    try:
        return launch(sweep, args.address, verify_data=args.verify_data)
    except (ConfigError, ManifestError, storage.StorageError, CheckpointError) as e:
        print(f"resnet-tune: {storage.redact(str(e))}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
