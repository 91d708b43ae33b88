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
from typing import Any, Literal, get_args

import torch
from torch import Tensor, nn

from resnet_core.transforms import Normalize

# auto: on CUDA bf16 autocast where the GPU has bf16 (Ampere and later), else fp16 with a
# gradient scaler (V100, T4); fp32 elsewhere. bf16/fp16: that autocast on any device (CPU
# autocast runs the same code path, slowly). fp32: no autocast.
Precision = Literal["auto", "fp32", "bf16", "fp16"]
PRECISIONS: tuple[str, ...] = get_args(Precision)

BatchTransform = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]


def autocast_dtype(precision: Precision, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``precision`` on ``device``; None runs in fp32."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is unknown; use one of {PRECISIONS}")
    if precision == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]


@dataclass(frozen=True)
class StepResult:
    """What one step leaves behind, on the device: the loss (float32 scalar), the logits
    (float32, N x classes) and the labels accuracy is measured against (with mixed targets,
    each image's dominant label)."""

    loss: Tensor
    logits: Tensor
    labels: Tensor


class TrainStep:
    """``step(images, labels)`` trains on one batch; see the module docstring.

    ``model`` may be wrapped (DDP, ``torch.compile``). ``normalize`` turns the uint8 batch into
    the model's input (it is not part of ``model``, so its statistics are not trained).
    ``dtype``: autocast dtype (:func:`autocast_dtype`), None for fp32; fp16 scales the loss
    (``torch.amp.GradScaler``, whose state is :attr:`scaler`). ``batch_transforms`` run on the
    normalised batch and its targets before the forward pass (MixUp/CutMix give soft targets).
    ``accumulate``: the batch is split into that many micro-batches, each forward and backward
    on its own (activation memory of one micro-batch), gradients summed, DDP's all-reduce on the
    last one only, then one optimizer step: the step is the same batch's, without the memory.
    ``clip_grad_norm``: the gradients' total norm is clipped to it before the optimizer step.
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
        accumulate: int = 1,
        clip_grad_norm: float | None = None,
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        self.criterion = criterion
        self.normalize = normalize
        self.dtype = dtype
        self.batch_transforms = list(batch_transforms)
        self.accumulate = accumulate
        self.clip_grad_norm = clip_grad_norm
        device = next(model.parameters()).device.type
        self.scaler = torch.amp.GradScaler(device, enabled=dtype == torch.float16)

    def __call__(self, images: Tensor, labels: Tensor) -> StepResult:
        x, targets = self.inputs(images, labels)
        self.optimizer.zero_grad(set_to_none=True)
        losses, logits = [], []
        micro = list(zip(x.chunk(self.accumulate), targets.chunk(self.accumulate), strict=True))
        for i, (x_part, targets_part) in enumerate(micro):
            share = len(x_part) / len(
                x
            )  # the batch's mean loss: the parts' weighted sum (x1.0 exact)
            with self.gradient_sync(last=i == len(micro) - 1):
                part_logits, loss = self.forward(x_part, targets_part)
                self.backward(loss * share)
            losses.append(loss.detach().float() * share)
            logits.append(part_logits.detach().float())
        self.update()
        dominant = targets.argmax(dim=1) if targets.ndim == 2 else labels
        return StepResult(sum(losses), torch.cat(logits), dominant)

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
        self.scaler.scale(loss).backward()

    def update(self) -> None:
        if self.clip_grad_norm is not None:
            self.scaler.unscale_(self.optimizer)  # clip the true gradients, not scaled ones
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            nn.utils.clip_grad_norm_(params, self.clip_grad_norm)
        self.scaler.step(self.optimizer)  # skips the step when fp16 gradients overflowed
        self.scaler.update()

    def gradient_sync(self, *, last: bool) -> contextlib.AbstractContextManager:
        """DDP all-reduces the gradients on the last micro-batch only."""
        ddp = _ddp(self.model)
        if last or ddp is None:
            return contextlib.nullcontext()
        return ddp.no_sync()

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.dtype)

    def state_dict(self) -> dict[str, Any]:
        """The step's own state: the gradient scaler's (empty unless fp16)."""
        return {"scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])


def _ddp(model: nn.Module) -> nn.parallel.DistributedDataParallel | None:
    """The DDP wrapper of ``model`` (also under ``torch.compile``'s wrapper), if any."""
    inner = getattr(model, "_orig_mod", model)
    return inner if isinstance(inner, nn.parallel.DistributedDataParallel) else None
