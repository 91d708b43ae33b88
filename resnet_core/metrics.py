"""Exact classification metrics across data-parallel workers.

Accuracy over a sharded evaluation set is (correct on all workers) / (samples on all workers).
Workers hold shards of different sizes, so the mean of per-worker accuracies is biased toward the
small shards. The accumulators here keep int64 counts on each worker and sum them with one
`torch.distributed.all_reduce` (gloo or NCCL); the ratio is taken only after the sum.

    acc = TopKAccumulator(ks=(1, 5), device=device)
    for images, labels in batches:
        acc.update(model(images), labels)
    metrics = acc.all_reduce().compute()  # {"top1": 0.76, "top5": 0.93, "count": 50000}
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["RunningMean", "TopKAccumulator", "topk_correct"]


def _validate_ks(ks: Sequence[int]) -> tuple[int, ...]:
    ks = tuple(ks)
    if not ks or any(not isinstance(k, int) or k < 1 for k in ks) or len(set(ks)) != len(ks):
        raise ValueError(f"ks must be distinct positive ints, got {ks!r} — use e.g. ks=(1, 5)")
    return ks


def _topk_hits(logits: Tensor, targets: Tensor, max_k: int) -> Tensor:
    """(batch, min(max_k, classes)) bool: column j is True where the target is ranked j-th.

    Ranks come from `Tensor.topk`, as in torchvision's reference `accuracy`; ties between equal
    logits are broken by topk.
    """
    if logits.ndim != 2:
        raise ValueError(f"logits must have shape (batch, classes), got {tuple(logits.shape)}")
    if targets.shape != logits.shape[:1]:
        raise ValueError(
            f"targets must have shape ({logits.shape[0]},) to match logits "
            f"{tuple(logits.shape)}, got {tuple(targets.shape)}"
        )
    predictions = logits.detach().topk(min(max_k, logits.shape[1]), dim=1).indices
    return predictions == targets.to(predictions.device).unsqueeze(1)


def _count_hits(hits: Tensor, ks: tuple[int, ...]) -> Tensor:
    # Each row has at most one True (topk indices are distinct), so a prefix sum counts samples.
    return torch.stack([hits[:, :k].sum() for k in ks]).to(torch.int64)


def topk_correct(logits: Tensor, targets: Tensor, ks: Sequence[int] = (1, 5)) -> Tensor:
    """Number of samples whose target is among the k highest logits, for each k in `ks`.

    logits: (batch, classes); targets: (batch,) class indices. A k above the number of classes
    counts as the number of classes (every sample is correct). Returns int64 of shape (len(ks),)
    on the logits' device.
    """
    ks = _validate_ks(ks)
    return _count_hits(_topk_hits(logits, targets, max(ks)), ks)


class TopKAccumulator:
    """Top-k correct counts and the sample count of one worker, summable across workers.

    ks: the k of each top-k accuracy. num_classes: when given, also counts top-1 hits per class
    for `per_class_accuracy`. device: where the counts live; the all_reduce backend must accept it
    (CPU for gloo, the worker's GPU for NCCL), and keeping counts on the GPU avoids a host sync per
    batch: `update` reads nothing on the host (the training step's metrics rely on it), except
    with num_classes, whose `bincount` reads the largest label (evaluation only).

    Mid-epoch resume across workers: checkpoint a reduced copy on the writing rank
    (``copy.deepcopy(acc).all_reduce().state_dict()``); after resume, load it on that rank only
    and start the others empty. The final all_reduce then sums each sample exactly once.
    """

    def __init__(
        self,
        ks: Sequence[int] = (1, 5),
        num_classes: int | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        self.ks = _validate_ks(ks)
        if num_classes is not None and num_classes < 1:
            raise ValueError(f"num_classes must be a positive int or None, got {num_classes}")
        self.num_classes = num_classes
        self.device = torch.device(device)
        self.correct = torch.zeros(len(self.ks), dtype=torch.int64, device=self.device)
        self.count = torch.zeros((), dtype=torch.int64, device=self.device)
        per_class = num_classes or 0  # empty when per-class counts are not kept
        self.class_correct = torch.zeros(per_class, dtype=torch.int64, device=self.device)
        self.class_count = torch.zeros(per_class, dtype=torch.int64, device=self.device)
        self.reduced = False

    def update(self, logits: Tensor, targets: Tensor) -> None:
        """Adds one batch: logits (batch, classes), targets (batch,) class indices."""
        if self.reduced:
            raise RuntimeError(
                "update() after all_reduce(): the counts are already summed over workers — "
                "start a new TopKAccumulator for the next epoch"
            )
        hits = _topk_hits(logits, targets, max(self.ks))
        self.correct += _count_hits(hits, self.ks).to(self.device)
        self.count += targets.shape[0]
        if self.num_classes is None:
            return
        if logits.shape[1] != self.num_classes:
            raise ValueError(
                f"logits have {logits.shape[1]} classes but this accumulator counts "
                f"{self.num_classes} — pass num_classes={logits.shape[1]}"
            )
        targets = targets.to(self.device)
        class_count = torch.bincount(targets, minlength=self.num_classes)
        if class_count.numel() != self.num_classes:
            raise ValueError(
                f"targets must lie in [0, {self.num_classes}), got {int(targets.max())} — check "
                "the label mapping"
            )
        self.class_count += class_count
        self.class_correct += torch.bincount(
            targets[hits[:, 0].to(self.device)], minlength=self.num_classes
        )

    def all_reduce(self) -> TopKAccumulator:
        """Sums the counts over all workers in place (a no-op without torch.distributed); returns self.

        Every worker must call it, once, after its last update.
        """
        if self.reduced:
            raise RuntimeError("all_reduce() called twice: the counts are already summed")
        if dist.is_available() and dist.is_initialized():
            packed = torch.cat(
                [self.correct, self.count.reshape(1), self.class_correct, self.class_count]
            )
            dist.all_reduce(packed, op=dist.ReduceOp.SUM)
            sizes = [len(self.ks), 1, self.class_correct.numel(), self.class_count.numel()]
            correct, count, class_correct, class_count = packed.split(sizes)
            self.correct, self.count = correct, count.reshape(())
            self.class_correct, self.class_count = class_correct, class_count
        self.reduced = True
        return self

    def compute(self) -> dict[str, float | int]:
        """{"top1": fraction, "top5": fraction, ..., "count": samples} from the current counts."""
        count = int(self.count)
        if count == 0:
            raise ValueError("no samples accumulated — call update() before compute()")
        result: dict[str, float | int] = {
            f"top{k}": correct / count
            for k, correct in zip(self.ks, self.correct.tolist(), strict=True)
        }
        result["count"] = count
        return result

    def per_class_accuracy(self) -> Tensor:
        """Top-1 accuracy of each class (float64, on CPU); nan for classes with no samples."""
        if self.num_classes is None:
            raise ValueError("per-class accuracy needs TopKAccumulator(num_classes=...)")
        return self.class_correct.cpu().double() / self.class_count.cpu().double()

    def state_dict(self) -> dict[str, Any]:
        """The counts as CPU tensors plus the settings they belong to (storable by save_checkpoint)."""
        return {
            "ks": list(self.ks),
            "num_classes": self.num_classes,
            "correct": self.correct.cpu(),
            "count": self.count.cpu(),
            "class_correct": self.class_correct.cpu(),
            "class_count": self.class_count.cpu(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Takes the counts of `state_dict()` as this worker's own; ks and num_classes must match."""
        if tuple(state["ks"]) != self.ks or state["num_classes"] != self.num_classes:
            raise ValueError(
                f"accumulator state has ks={tuple(state['ks'])}, num_classes="
                f"{state['num_classes']}; this one has ks={self.ks}, num_classes="
                f"{self.num_classes} — build it with the saved settings"
            )
        for name in ("correct", "count", "class_correct", "class_count"):
            setattr(self, name, state[name].to(self.device, torch.int64, copy=True))
        self.reduced = False


class RunningMean:
    """Sample-weighted mean of a per-batch mean (e.g. the loss), summable across workers.

    Keeps the float64 sum of value * samples and the int64 sample count on `device`, so updating
    with a GPU loss tensor does not synchronise with the host.
    """

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.total = torch.zeros((), dtype=torch.float64, device=self.device)
        self.count = torch.zeros((), dtype=torch.int64, device=self.device)
        self.reduced = False

    def update(self, value: Tensor | float, n: int = 1) -> None:
        """Adds a batch whose mean is `value` over `n` samples."""
        if self.reduced:
            raise RuntimeError(
                "update() after all_reduce(): start a new RunningMean for the next epoch"
            )
        if isinstance(value, Tensor):
            if value.numel() != 1:
                raise ValueError(f"value must be a scalar, got shape {tuple(value.shape)}")
            value = value.detach().reshape(())
        self.total += torch.as_tensor(value, dtype=torch.float64, device=self.device) * n
        self.count += n

    def all_reduce(self) -> RunningMean:
        """Sums total and count over all workers in place (a no-op without torch.distributed)."""
        if self.reduced:
            raise RuntimeError("all_reduce() called twice: the sums are already global")
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.total, op=dist.ReduceOp.SUM)
            dist.all_reduce(self.count, op=dist.ReduceOp.SUM)
        self.reduced = True
        return self

    def compute(self) -> float:
        """The mean over all samples added (on every worker, after all_reduce)."""
        count = int(self.count)
        if count == 0:
            raise ValueError("no samples accumulated — call update() before compute()")
        return float(self.total) / count

    def state_dict(self) -> dict[str, Any]:
        """The sum and count as CPU tensors (storable by save_checkpoint)."""
        return {"total": self.total.cpu(), "count": self.count.cpu()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Takes the sum and count of `state_dict()` as this worker's own (see TopKAccumulator)."""
        self.total = state["total"].to(self.device, torch.float64, copy=True)
        self.count = state["count"].to(self.device, torch.int64, copy=True)
        self.reduced = False
