"""Checkpoint folders of a training run: their names, their ranking, and restoring from them.

A run folder ``<storage>/<run name>/`` holds ``checkpoint-<step, 9 digits>-<attempt>/``
folders (``state.safetensors`` + ``checkpoint.json``, :mod:`resnet_core.checkpoint`). The step
orders them; the attempt id (new at every worker-group start) keeps a re-trained step from
overwriting a folder that Ray's checkpoint bookkeeping still refers to. Ray keeps the best
``train.keep_checkpoints`` by :data:`CHECKPOINT_SCORE` plus the latest.
"""

from __future__ import annotations

import math
import re
import tempfile
import warnings
from typing import Any

import torch
from torch import nn

from resnet_core.checkpoint import CheckpointError, load_checkpoint, restore_training_state

CHECKPOINT_PREFIX = "checkpoint-"
CHECKPOINT_NAME = re.compile(r"checkpoint-(\d{9})-[0-9a-f]+")
# Ranks checkpoints (keep the best K): validation top-1, or -1 where no validation ran (mid-epoch).
# A key of its own: Ray stores the scores as JSON (a NaN comes back as None and breaks resume),
# and MLflow must not record -1 as a top-1; the reporter skips "checkpoint/" keys.
CHECKPOINT_SCORE = "checkpoint/score"


def checkpoint_name(step: int, attempt: str) -> str:
    return f"{CHECKPOINT_PREFIX}{step:09d}-{attempt}"


def checkpoint_step(name: str) -> int | None:
    """The step of a checkpoint folder name, or None for other names."""
    match = CHECKPOINT_NAME.fullmatch(name)
    return int(match.group(1)) if match else None


def restore_latest(
    checkpoint: Any, model: nn.Module, optimizer: torch.optim.Optimizer
) -> dict[str, Any] | None:
    """Load Ray's latest checkpoint, or the newest earlier one that is intact (with a warning).

    ``checkpoint`` is ``ray.train.get_checkpoint()``; its siblings in the run folder at the same
    or an earlier step are the fall-backs, newest first. Never silently restarts from scratch:
    if checkpoints exist and none loads, it raises CheckpointError. Returns the restored
    fields of :func:`resnet_core.checkpoint.restore_training_state`, or None without a
    checkpoint.
    """
    if checkpoint is None:
        return None
    import pyarrow.fs as pafs
    from ray.train import Checkpoint

    fs = checkpoint.filesystem
    parent, _, latest_name = checkpoint.path.rstrip("/").rpartition("/")
    latest_step = checkpoint_step(latest_name)
    latest_step = math.inf if latest_step is None else latest_step
    infos = fs.get_file_info(pafs.FileSelector(parent))
    earlier = [
        (step, i.base_name)
        for i in infos
        if (step := checkpoint_step(i.base_name)) is not None
        and i.base_name != latest_name
        and step <= latest_step
    ]
    candidates = [latest_name] + [name for _, name in sorted(earlier, reverse=True)]
    problems = []
    for name in candidates:
        with tempfile.TemporaryDirectory(prefix="resnet-restore-") as tmp:
            try:
                Checkpoint(f"{parent}/{name}", filesystem=fs).to_directory(tmp)
                state = load_checkpoint(tmp)
            except (CheckpointError, OSError) as e:
                warnings.warn(
                    f"checkpoint {parent}/{name} is unusable ({e}); falling back to the previous one",
                    stacklevel=1,
                )
                problems.append(f"{name}: {e}")
                continue
        return restore_training_state(state, model, optimizer)
    raise CheckpointError(
        f"no usable checkpoint under {parent} ({'; '.join(problems)}); refusing to restart from "
        "scratch — delete the run folder or pass a new --name"
    )
