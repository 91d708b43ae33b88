"""One training step — the same in the training job and in every benchmark.

A uint8 batch already on the device -> :class:`~resnet_core.transforms.Normalize` -> optional
batch transforms (e.g. MixUp) -> forward and loss under autocast -> backward -> optimizer step.
No host synchronisation happens inside: the loss and logits come back as device tensors, and
whoever reads them (the job's metrics at report time) decides when to wait.

Each phase is a method, so a feature that changes one phase (a gradient scaler in ``backward``
and ``update``, accumulation in ``update``) changes that method and nothing around it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch import Tensor, nn

from resnet_core.transforms import Normalize

# auto: bf16 autocast on CUDA, fp32 elsewhere. bf16: bf16 autocast on any device (CPU autocast
# runs the same code path, slowly). fp32: no autocast.
Precision = Literal["auto", "fp32", "bf16"]
PRECISIONS: tuple[str, ...] = get_args(Precision)

BatchTransform = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]


def autocast_dtype(precision: Precision, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``precision`` on ``device``; None runs in fp32."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is unknown; use one of {PRECISIONS}")
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


@dataclass(frozen=True)
class StepResult:
    """What one step leaves behind, on the device: the loss (float32 scalar), the logits
    (float32, N x classes) and the labels accuracy is measured against."""

    loss: Tensor
    logits: Tensor
    labels: Tensor


class TrainStep:
    """``step(images, labels)`` trains on one batch; see the module docstring.

    ``model`` may be wrapped (DDP, ``torch.compile``). ``normalize`` turns the uint8 batch into
    the model's input (it is not part of ``model``, so its statistics are not trained).
    ``dtype``: autocast dtype (:func:`autocast_dtype`), None for fp32. ``batch_transforms`` run
    on the normalised batch and its targets before the forward pass.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        criterion: nn.Module,
        normalize: Normalize,
        *,
        dtype: torch.dtype | None = None,
        batch_transforms: Sequence[BatchTransform] = (),
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        self.criterion = criterion
        self.normalize = normalize
        self.dtype = dtype
        self.batch_transforms = list(batch_transforms)

    def __call__(self, images: Tensor, labels: Tensor) -> StepResult:
        x, targets = self.inputs(images, labels)
        logits, loss = self.forward(x, targets)
        self.backward(loss)
        self.update()
        return StepResult(loss.detach().float(), logits.detach().float(), labels)

    def inputs(self, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """Normalised float input and the loss targets."""
        x, targets = self.normalize(images), labels
        for transform in self.batch_transforms:
            x, targets = transform(x, targets)
        return x, targets

    def forward(self, x: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        with self.autocast(x.device):
            logits = self.model(x)
            loss = self.criterion(logits, targets)
        return logits, loss

    def backward(self, loss: Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()

    def update(self) -> None:
        self.optimizer.step()

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.dtype)
