"""Resuming on another number of workers: which rows of the running epoch are trained.

A training epoch is planned for the world size it starts on (pipelines.data.EpochPlan). A run
resumed on the same world size replays that plan and skips the batches done, bit for bit. A run
resumed mid-epoch on another world size cannot: the rows each old rank had trained depend on its
own stream (task order, shuffle buffer). So every rank marks the split-wide ids of the rows it
trains (``Batch.rows``), and each mid-epoch checkpoint holds their union (one bit per row of the
split: 160 KB for ImageNet). The resumed run shares the planned rows not yet trained out over
its new ranks (pipelines.data.plan_remainder): every row of the epoch is trained exactly once.
The global batch is part of the config (``train.global_batch``), so it is kept and so are the
steps per epoch (``global_batch // world_size`` rows per rank); the next epoch is planned for
the new world size.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.distributed as dist

EPOCH_ROWS_KEY = "epoch_rows"  # in mid-epoch checkpoints


class EpochRows:
    """The running epoch's trained rows, and the world size its plan was made for.

    ``done``: this rank's own marks (after a restore, rank 0 also holds the checkpoint's, so the
    sum over ranks counts each row once); ``restored``: the checkpoint's record, on every rank,
    for planning the rest of the epoch. ``replanned``: the epoch has been planned anew since it
    started (a resume on another world size); a later resume must replan too.
    """

    def __init__(self, num_rows: int, planned_world: int, device: torch.device) -> None:
        self.done = np.zeros(num_rows, dtype=bool)
        self.restored: np.ndarray | None = None
        self.planned_world = planned_world
        self.replanned = False
        self.device = device

    def mark(self, rows: np.ndarray) -> None:
        self.done[rows] = True

    def replays(self, world: int) -> bool:
        """Whether the epoch's own plan, with the batches done skipped, continues it on
        ``world`` ranks (else :func:`pipelines.data.plan_remainder` must)."""
        return not self.replanned and world == self.planned_world

    def reduced_state(self) -> dict[str, Any]:
        """The union of every rank's marks, packed one bit per row (a collective). The ranks'
        rows are disjoint, so summing the packed bytes is their bitwise or."""
        packed = torch.from_numpy(np.packbits(self.done)).to(self.device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(packed, op=dist.ReduceOp.SUM)
        return {
            "planned_world": self.planned_world,
            "replanned": self.replanned,
            "done": packed.cpu().numpy(),
        }

    def restore(self, state: dict[str, Any] | None, *, saved_world: int, rank: int) -> None:
        """Take a mid-epoch checkpoint's record (``state``; None from a version without it:
        the epoch was then planned for ``saved_world``, the world size that wrote it)."""
        if state is None:
            self.planned_world = saved_world
            return
        self.planned_world, self.replanned = state["planned_world"], state["replanned"]
        self.restored = np.unpackbits(state["done"], count=len(self.done)).astype(bool)
        if rank == 0:
            self.done |= self.restored
