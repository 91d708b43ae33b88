"""resnet-bench: benchmarks that print ratios measured side by side in one run.

One command per question (``resnet-bench COMMAND --help``)::

    resnet-bench data     # decode + augment per core: ours vs torchvision's classic pipeline
    resnet-bench train    # Ray pipeline (shards -> Ray Data -> TorchTrainer) vs a bare loop
    resnet-bench memory   # an epoch several times the object store: peak use, spilling, RSS
    resnet-bench gpu      # ResNet-50 on CUDA: synthetic ceiling vs end to end from shards
    resnet-bench scaling  # the scaling model: predicted images/s and efficiency at N GPUs

Each module of this package holds one command: ``add_parser(commands)`` and ``run(args)``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from pipelines import storage
from pipelines.bench.common import BenchError

COMMANDS = ("data", "train", "memory", "gpu", "scaling")


def _modules() -> dict:
    return {name: importlib.import_module(f"pipelines.bench.{name}") for name in COMMANDS}


def main(argv: Sequence[str] | None = None) -> int:
    """Run a benchmark; exit status 0, or 2 for a bad argument (one line on stderr)."""
    parser = argparse.ArgumentParser(
        prog="resnet-bench", description="Benchmarks that print side-by-side ratios."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    modules = _modules()
    for module in modules.values():
        module.add_parser(commands)
    args = parser.parse_args(argv)
    try:
        modules[args.command].run(args)
    except BenchError as e:
        print(f"resnet-bench: {storage.redact(str(e))}", file=sys.stderr)
        return 2
    return 0
