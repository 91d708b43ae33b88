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
``train.checkpoint_every_steps`` steps); the best ``train.keep_checkpoints`` by validation top-1
and the latest are kept. A failed worker restarts the worker group from the latest checkpoint
(``scale.max_failures`` times). Re-running with the same run name (``--name``, default
``<recipe>-<model>``) resumes from the latest checkpoint, to the exact batch, and continues the
same MLflow run. The job itself lives in ``pipelines.job`` (docs/ARCHITECTURE.md).

Exit status: 0 done (or already done), 1 training failed, 2 bad configuration or location
(one line on stderr, no cluster resource taken), 130 interrupted (SIGINT/SIGTERM; re-run the same
command to resume).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from pipelines import storage, tracking
from pipelines.config import ConfigError, JobConfig, to_dict, validate
from pipelines.data import ShardUnreadable
from pipelines.job import checks
from pipelines.job.cli import add_job_arguments, flag_overrides, resolve_config
from pipelines.job.session import training_session
from pipelines.job.trainer import TrainingInterrupted, run_training, sigterm_interrupts
from pipelines.manifest import ManifestError

EXIT_FAILED = 1
EXIT_BAD_CONFIG = 2
EXIT_INTERRUPTED = 130


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
    parser.add_argument("--model", help="model name (resnet18..152, plain18/34, resnet20 ...)")
    parser.add_argument("--name", help="run name (deterministic; re-use it to resume)")
    add_job_arguments(parser)
    return parser


def config_from_args(args: argparse.Namespace) -> JobConfig:
    """Recipe, then flags, then dotted overrides (last wins); not yet validated."""
    return resolve_config(args.recipe, args.model, flag_overrides(args, name="run.name"))


def train(config: JobConfig, address: str | None, *, verify_data: bool = False) -> dict[str, Any]:
    """The checks, then the run on a Ray cluster (attached, or local for the duration);
    returns the final metrics plus ``mlflow_run_id``."""
    checks.check_model(config)
    checks.check_locations(config)
    checks.check_gpu_locally(config, address)
    demo_data_missing = checks.needs_demo_data(config)
    dataset = None
    if not demo_data_missing:
        dataset = checks.check_dataset(config, verify_data=verify_data)
    checks.check_resumable(config)
    with training_session(config, address):
        if dataset is None:
            checks.ensure_demo_data(config)
            dataset = checks.check_dataset(config)
        return run_training(config, *dataset)


def _fail(message: object, status: int) -> SystemExit:
    print(f"resnet-train: {storage.redact(str(message))}", file=sys.stderr, flush=True)
    return SystemExit(status)


def main(argv: Sequence[str] | None = None) -> float:
    """Run the job; returns the final validation top-1 (also printed).

    Raises SystemExit: 2 on a bad configuration or location (before any cluster resource is
    taken), 1 when a shard stopped reading mid-run, 130 when interrupted.
    """
    args = build_parser().parse_args(argv)
    try:
        config = config_from_args(args)
        validate(config)
    except (ConfigError, ValueError) as e:
        raise _fail(e, EXIT_BAD_CONFIG) from None
    print("resolved config:\n" + json.dumps(to_dict(config), indent=2), flush=True)
    if args.print_config:
        return float("nan")
    for line in checks.job_warnings(config):
        print(f"resnet-train: warning: {line}", file=sys.stderr, flush=True)
    with sigterm_interrupts():
        try:
            metrics = train(config, args.address, verify_data=args.verify_data)
        except (ConfigError, ManifestError, storage.StorageError) as e:
            raise _fail(e, EXIT_BAD_CONFIG) from None
        except ShardUnreadable as e:  # mid-run: the run ended at once, checkpoints kept
            raise _fail(e, EXIT_FAILED) from None
        except (TrainingInterrupted, KeyboardInterrupt) as e:
            why = str(e) if isinstance(e, TrainingInterrupted) else f"interrupted ({e or 'SIGINT'})"
            raise _fail(
                f"{why}; checkpoints are kept — re-run the same command to resume",
                EXIT_INTERRUPTED,
            ) from None
    top1 = float(metrics.get("val/top1", float("nan")))
    print(f"final validation top-1: {100 * top1:.2f}% ({metrics.get('val/count', 0)} images)")
    print(f"MLflow run: {metrics['mlflow_run_id']}")
    ui = tracking.ui_command(tracking.tracking_uri(), metrics["mlflow_experiment_id"])
    print(f"open the MLflow UI: {ui}", flush=True)
    return top1


def cli() -> None:
    """Console-script entry point: exit status 0 on success."""
    main()


if __name__ == "__main__":
    cli()
