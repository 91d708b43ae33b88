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
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipelines import storage
from resnet_core.checkpoint import (
    METADATA_FILE,
    TENSORS_FILE,
    CheckpointError,
    latest_valid_checkpoint,
    load_checkpoint,
    restore_training_state,
)

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


def newest_first(fs: Any, run_folder: str, *, up_to_step: float = math.inf) -> list[str]:
    """The run folder's checkpoint folder names (``checkpoint-<step>-<attempt>`` holding a
    ``checkpoint.json``), newest first: by step, then by when their ``checkpoint.json`` (written
    last) was written, then by name — the same order on every read, whatever the attempt ids.
    Only those at ``up_to_step`` or before."""
    import pyarrow.fs as pafs

    names = [
        (step, info.base_name)
        for info in fs.get_file_info(pafs.FileSelector(run_folder))
        if info.type == pafs.FileType.Directory
        and (step := checkpoint_step(info.base_name)) is not None
        and step <= up_to_step
    ]
    markers = fs.get_file_info([f"{run_folder}/{name}/{METADATA_FILE}" for _, name in names])
    ranked = [
        (step, marker.mtime_ns or 0, name)
        for (step, name), marker in zip(names, markers, strict=True)
        if marker.type == pafs.FileType.File
    ]
    return [name for *_, name in sorted(ranked, reverse=True)]


def load_newest_intact(fs: Any, run_folder: str, names: list[str]) -> tuple[str, dict[str, Any]]:
    """``(name, state)`` of the first of ``names`` (newest first) that loads; each one that does
    not is skipped with a warning. CheckpointError when none loads: never a silent restart."""

    def load(name: str) -> dict[str, Any]:
        return load_from(fs, f"{run_folder}/{name}")

    try:
        return latest_valid_checkpoint(names, load=load)
    except CheckpointError as e:
        raise CheckpointError(
            f"no usable checkpoint under {storage.redact(run_folder)} ({e}); refusing to "
            "restart from scratch — delete the run folder or pass a new --name"
        ) from None


def load_from(fs: Any, path: str) -> dict[str, Any]:
    """A checkpoint directory on any filesystem (local: read in place; S3: copied first)."""
    import pyarrow.fs as pafs

    if isinstance(fs, pafs.LocalFileSystem):
        return load_checkpoint(path)
    with tempfile.TemporaryDirectory(prefix="resnet-restore-") as tmp:
        for name in (METADATA_FILE, TENSORS_FILE):
            if storage.exists(fs, f"{path}/{name}"):
                Path(tmp, name).write_bytes(storage.read_bytes(fs, f"{path}/{name}"))
        return load_checkpoint(tmp)


def restore_latest(
    checkpoint: Any,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None = None,
) -> dict[str, Any] | None:
    """Load Ray's latest checkpoint, or the newest earlier one that is intact (with a warning).

    ``checkpoint`` is ``ray.train.get_checkpoint()``; its siblings in the run folder at the same
    or an earlier step are the fall-backs, newest first (:func:`newest_first`). Never silently
    restarts from scratch: if checkpoints exist and none loads, it raises CheckpointError.
    Returns the restored fields of :func:`resnet_core.checkpoint.restore_training_state`, or
    None without a checkpoint.
    """
    if checkpoint is None:
        return None
    parent, _, latest = checkpoint.path.rstrip("/").rpartition("/")
    step = checkpoint_step(latest)
    earlier = newest_first(
        checkpoint.filesystem, parent, up_to_step=math.inf if step is None else step
    )
    candidates = [latest] + [name for name in earlier if name != latest]
    _, state = load_newest_intact(checkpoint.filesystem, parent, candidates)
    return restore_training_state(state, model, optimizer, scaler=scaler)
