"""resnet-prepare: turn labelled images into Parquet shards + manifest.json, in parallel on Ray.

Run from a checkout (``--out`` is a local folder or ``s3://bucket/prefix``):

    python -m pipelines.prepare synthetic --kind cifar --out data/synthetic-cifar
    python -m pipelines.prepare cifar10 --src ~/data/cifar-10-python.tar.gz --out data/cifar10
    python -m pipelines.prepare imagenet --src /data/ILSVRC2012 --out s3://my-bucket/imagenet
    python -m pipelines.prepare folder --src ~/photos --out data/photos --max-side 320

On a cluster: ``ray job submit --working-dir . -- python -m pipelines.prepare imagenet ...``, or
set ``RAY_ADDRESS`` / pass ``--address``. Every node must read ``--src`` at the same path, and a
local ``--out`` must be a shared folder; S3 works from anywhere. Credentials come from the
standard AWS environment or an IAM role, never from the command line.

What it does: list the source; give every split a deterministic shard plan (a seeded shuffle so
classes mix, then consecutive chunks of ``--shard-rows``); write the missing shards in parallel
with Ray Data, each task reading, auditing (repairing CMYK/grayscale/PNG/... into RGB JPEG,
skipping empty/truncated/undecodable files) and writing one shard atomically plus a progress
marker; then aggregate the audit report and the training split's pixel statistics from all
markers, write ``mean_image.npy`` and finally ``manifest.json``. Re-running the same command
resumes: finished shards are kept (shards that skipped images are redone, so fixed files count).

Exit status: 0 done; 1 more skipped images than ``--max-skipped`` allows (they are listed; shards
stay, manifest.json is not written) or a failed shard write; 2 a bad argument, source or output
location (one line on stderr, nothing written).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from pipelines import storage
from pipelines.config import ConfigError
from pipelines.job.session import check_reachable
from pipelines.shards import (
    PIL_MAX_PIXELS,
    PrepareConfig,
    PrepareError,
    check_locations,
    describe_config,
    list_source,
    prepare,
    prepare_config,
    skip_budget,
)
from pipelines.sources import SourceError
from pipelines.synthetic import SyntheticSpec

# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="resnet-prepare",
        description="Convert labelled images into Parquet shards + manifest.json (Ray Data).",
    )
    commands = parser.add_subparsers(dest="dataset", required=True, metavar="DATASET")
    imagenet = commands.add_parser("imagenet", help="ILSVRC2012 (folders, Kaggle layout or tars)")
    imagenet.add_argument(
        "--src", required=True, help="ILSVRC2012 root, or the folder with the original tars"
    )
    imagenet.add_argument(
        "--val-labels", help="devkit (.tar.gz or folder) or LOC_val_solution.csv, if not in --src"
    )
    cifar = commands.add_parser("cifar10", help="CIFAR-10 python version")
    cifar.add_argument("--src", required=True, help="cifar-10-python.tar.gz or its folder")
    cifar.add_argument(
        "--val-size",
        type=int,
        default=0,
        help="0: val = test batch; 5000: hold out 5k training images (paper §4.2), test kept",
    )
    folder = commands.add_parser("folder", help="any class-per-subfolder tree (ImageFolder)")
    folder.add_argument("--src", required=True, help="root with one subfolder per class")
    synthetic = commands.add_parser("synthetic", help="generated images, no download")
    synthetic.add_argument("--classes", type=int, default=SyntheticSpec.num_classes)
    synthetic.add_argument("--train-per-class", type=int, default=SyntheticSpec.train_per_class)
    synthetic.add_argument("--val-per-class", type=int, default=SyntheticSpec.val_per_class)
    synthetic.add_argument(
        "--kind",
        choices=("cifar", "imagenet"),
        default=SyntheticSpec.image_kind,
        help="cifar: 32x32; imagenet: 160-400 px, varied aspect",
    )
    for sub in (imagenet, cifar, folder, synthetic):
        _add_common_options(sub)
    return parser


def _add_common_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="output folder or s3://bucket/prefix")
    parser.add_argument("--seed", type=int, default=0, help="shard-plan shuffle seed")
    parser.add_argument("--shard-rows", type=int, help="rows per shard (default by image size)")
    parser.add_argument("--row-group-rows", type=int, help="rows per Parquet row group")
    parser.add_argument("--max-side", type=int, help="re-encode so the longer side is at most this")
    parser.add_argument("--quality", type=int, default=95, help="JPEG quality of re-encodes")
    parser.add_argument(
        "--max-pixels",
        type=int,
        default=PIL_MAX_PIXELS,
        help="images with more pixels are skipped as decompression bombs",
    )
    parser.add_argument(
        "--max-skipped",
        default="0.001",
        help="skip budget: a count (10) or a fraction of all images (0.001); above it, exit 1",
    )
    parser.add_argument("--mean-size", type=int, help="side of the per-pixel mean image")
    parser.add_argument("--s3-endpoint", help="S3-compatible endpoint URL (else AWS_ENDPOINT_URL)")
    parser.add_argument(
        "--address", help="Ray cluster to attach to (default: RAY_ADDRESS or local)"
    )
    parser.add_argument(
        "--num-cpus", type=int, help="CPUs of the local Ray started when no cluster"
    )


def config_from_args(args: argparse.Namespace) -> PrepareConfig:
    """Validate the parsed command line into a PrepareConfig; PrepareError on a bad value."""
    synthetic = None
    if args.dataset == "synthetic":
        try:
            synthetic = SyntheticSpec(
                num_classes=args.classes,
                train_per_class=args.train_per_class,
                val_per_class=args.val_per_class,
                image_kind=args.kind,
                seed=args.seed,
            )
        except ValueError as e:
            raise PrepareError(f"synthetic: {e}") from None
    config = prepare_config(
        args.dataset,
        args.out,
        src=getattr(args, "src", None),
        val_labels=getattr(args, "val_labels", None),
        synthetic=synthetic,
        shard_rows=args.shard_rows,
        row_group_rows=args.row_group_rows,
        mean_size=args.mean_size,
        val_size=getattr(args, "val_size", 0),
        seed=args.seed,
        max_side=args.max_side,
        quality=args.quality,
        max_pixels=args.max_pixels,
        max_skipped=args.max_skipped,
        s3_endpoint=args.s3_endpoint,
        address=args.address,
        num_cpus=args.num_cpus,
    )
    for flag in ("shard_rows", "row_group_rows", "max_pixels", "mean_size"):
        _require(getattr(config, flag) >= 1, flag, args)
    _require(config.max_side is None or config.max_side >= 1, "max_side", args)
    _require(1 <= config.quality <= 100, "quality", args)
    _require(config.val_size >= 0, "val_size", args)
    _require(config.num_cpus is None or config.num_cpus >= 1, "num_cpus", args)
    if config.num_cpus is not None and config.address:
        raise PrepareError("--num-cpus sizes a local Ray; drop it when attaching with --address")
    skip_budget(config.max_skipped, 0)
    if config.src and not storage.is_s3(config.out) and Path(config.out).is_relative_to(config.src):
        raise PrepareError(f"--out {config.out} lies inside --src {config.src} — write elsewhere")
    return config


def _require(ok: bool, flag: str, args: argparse.Namespace) -> None:
    if not ok:
        option = "--" + flag.replace("_", "-")
        raise PrepareError(f"{option} {getattr(args, flag)} is out of range — see --help")


def main(argv: Sequence[str] | None = None) -> int:
    """Run resnet-prepare; the exit status (0 done, 1 over the skip budget or failed, 2 bad input)."""
    args = _parser().parse_args(argv)
    try:
        config = config_from_args(args)
        check_locations(config)
        listing = list_source(config)
        if address := config.address or os.environ.get("RAY_ADDRESS"):
            check_reachable(address)
    except (PrepareError, SourceError, storage.StorageError, ConfigError) as e:
        print(f"resnet-prepare: {storage.redact(str(e))}", file=sys.stderr)
        return 2
    print(describe_config(config), flush=True)
    return prepare(config, listing)


if __name__ == "__main__":
    sys.exit(main())
