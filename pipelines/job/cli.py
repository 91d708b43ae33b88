"""The command-line flags resnet-train and resnet-tune share, and how they become a JobConfig:
recipe, then flags, then dotted overrides (last wins), locations made absolute on the driver.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from pipelines import storage
from pipelines.config import JobConfig, apply_overrides
from pipelines.recipes import RECIPES, build_recipe
from resnet_core.pretrained import TORCHVISION

# Flag (argparse dest) -> the config key it sets.
FLAG_KEYS = {
    "data": "data.uri",
    "workers": "scale.num_workers",
    "cpus_per_worker": "scale.cpus_per_worker",
    "epochs": "train.epochs",
    "storage": "run.storage_path",
    "experiment": "run.experiment",
    "init": "model.init",
}


def add_job_arguments(parser: argparse.ArgumentParser) -> None:
    """The recipe, data, scale and location flags, ``--print-config`` and the overrides."""
    parser.add_argument("--recipe", default="demo", choices=sorted(RECIPES), help="base recipe")
    parser.add_argument("--data", help="dataset URI written by resnet-prepare (path or s3://)")
    parser.add_argument("--workers", type=int, help="Train workers (scale.num_workers)")
    parser.add_argument("--gpu", action="store_true", help="one GPU per worker (scale.use_gpu)")
    parser.add_argument("--cpus-per-worker", type=float, help="CPUs per Train worker")
    parser.add_argument("--epochs", type=int, help="train.epochs")
    parser.add_argument("--storage", help="checkpoint storage: a path or s3://bucket/prefix")
    parser.add_argument("--experiment", help="MLflow experiment name")
    parser.add_argument(
        "--init",
        help="initial weights (fine-tuning): a .safetensors/.pt state dict, or torchvision:"
        "<weights>, e.g. torchvision:ResNet50_Weights.IMAGENET1K_V2 (model.init)",
    )
    parser.add_argument(
        "--reset-head",
        action="store_true",
        help="with --init: a new classifier for this dataset's classes (model.reset_head)",
    )
    parser.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS or local)")
    parser.add_argument(
        "--verify-data",
        action="store_true",
        help="before starting, check every shard's sha256 against the manifest (reads the whole "
        "dataset; shard sizes are always checked)",
    )
    parser.add_argument("--print-config", action="store_true", help="print the config and exit")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")


def flag_overrides(args: argparse.Namespace, **more_flags: str) -> list[str]:
    """The shared flags (and ``more_flags``: dest -> config key) as dotted overrides, followed
    by the command line's own overrides."""
    given = [
        f"{key}={getattr(args, dest)}"
        for dest, key in {**FLAG_KEYS, **more_flags}.items()
        if getattr(args, dest) is not None
    ]
    if args.gpu:
        given.append("scale.use_gpu=true")
    if args.reset_head:
        given.append("model.reset_head=true")
    return [*given, *args.overrides]


def resolve_config(recipe: str, model: str | None, overrides: Sequence[str]) -> JobConfig:
    """The recipe (for ``model``, or its default model) with the overrides applied, local paths
    made absolute (Train workers run in another working directory). ConfigError on a bad
    override; validation is :func:`pipelines.config.validate`'s."""
    config = apply_overrides(build_recipe(recipe, model), list(overrides))
    data = replace(config.data, uri=storage.absolute_uri(config.data.uri))
    run = replace(config.run, storage_path=storage.absolute_uri(config.run.storage_path))
    model = config.model
    if model.init and not model.init.startswith(TORCHVISION):
        model = replace(model, init=str(Path(model.init).expanduser().resolve()))
    return replace(config, model=model, data=data, run=run)
