"""Hybrid decode (``data.decode_device=auto``): the Ray Data tasks decode a share of each epoch's
map batches on CPUs, the Train worker's GPU decodes the rest, for nodes where neither alone
keeps up with training.

Which map batch goes where is drawn from its keys (``DecodeOptions.decodes_on_cpu``), and the
crops are the same either way, so an epoch is a pure function of its share. The share starts
at ``data.hybrid_cpu_share`` and is rebalanced once per epoch, at its last batch (when the next
epoch's pipeline is built): the worker measured how long it waited for the tasks' next batch
(CPU side behind) and for the device's decode (GPU side behind), and the share moves towards
the side that kept the other waiting. It lives in checkpoints, so a resumed epoch decodes
exactly as it did before the stop.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import torch

from pipelines.job.extension import Extension

if TYPE_CHECKING:
    from pipelines.data import DecodeWaits
    from pipelines.job.runner import TrainLoopRunner

# Share moved per unit of net wait (seconds waited / seconds of the epoch), at most MAX_MOVE
# per epoch; waits under DEADBAND of the epoch leave it as it is (both sides keep up).
GAIN, MAX_MOVE, DEADBAND = 1.0, 0.25, 0.01


class HybridDecode(Extension):
    """The CPU tasks' share of the map batches (``share``), rebalanced every epoch."""

    key = "hybrid_decode"

    def __init__(self, share: float) -> None:
        self.share = share
        self.epoch_started = time.perf_counter()

    def before_step(self, runner: TrainLoopRunner) -> None:
        if runner.batches_done == 0:
            self.epoch_started = time.perf_counter()

    def rebalance(self, waits: DecodeWaits, device: torch.device) -> float:
        """The share for the next epoch from this epoch's waits, summed over ranks (a
        collective on ``device``: every rank calls it at the same step)."""
        seconds = max(time.perf_counter() - self.epoch_started, 1e-9)
        net_wait = waits.decode_s - waits.stream_s
        totals = torch.tensor([net_wait, seconds], dtype=torch.float64, device=device)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(totals)
        net = float(totals[0] / totals[1])  # > 0: the device's decode kept the step waiting
        if abs(net) >= DEADBAND:
            move = max(-MAX_MOVE, min(MAX_MOVE, GAIN * net))
            self.share = max(0.0, min(1.0, self.share + move))
        return self.share

    def on_report(self, runner: TrainLoopRunner, metrics: dict[str, Any]) -> None:
        metrics["data/hybrid_cpu_share"] = self.share

    def state_dict(self) -> dict[str, Any]:
        return {"share": self.share}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.share = float(state["share"])
