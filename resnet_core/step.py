"""One training step — the same in the training job and in every benchmark.

A uint8 batch already on the device -> :class:`~resnet_core.transforms.Normalize` -> optional
batch transforms (e.g. MixUp) -> forward and loss under autocast -> backward -> optimizer step.
No host synchronisation happens inside: the loss and logits come back as device tensors, and
whoever reads them (the job's metrics at report time) decides when to wait.

Compiled (``compile_mode``), one ``torch.compile`` graph covers normalisation, the model and the
loss (:meth:`TrainStep.forward`): the uint8 -> float conversion fuses into the first kernels and
the region has static shapes and no host reads, as CUDA graphs (``reduce-overhead``) need.
MixUp/CutMix draw Python random numbers per batch, so with them the batch is normalised and mixed
before the graph. The model object stays eager (checkpoints, EMA and evaluation use it as is).

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

# When the step compiles: "auto" where the device is CUDA (the compile, about a minute for
# ResNet-50, pays back within minutes there; on a CPU it costs tens of seconds per graph for
# little), True/False always/never.
CompileWhen = Literal["auto", True, False]
# torch.compile's modes: "reduce-overhead" adds CUDA graphs (one launch per graph instead of one
# per kernel: what small nets are bound by); "max-autotune" also times kernel choices (minutes
# of compile); "max-autotune-no-cudagraphs" is that without CUDA graphs.
CompileMode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]
COMPILE_MODES: tuple[str, ...] = get_args(CompileMode)
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")


def compile_mode_for(
    when: CompileWhen, mode: CompileMode, device: torch.device
) -> CompileMode | None:
    """The mode the step compiles with on ``device`` (``when``: see CompileWhen); None: eager."""
    if when not in get_args(CompileWhen):
        raise ValueError(f"compile={when!r} is unknown; use true, false or auto")
    on = when is True or (when == "auto" and device.type == "cuda")
    return mode if on else None


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

    ``model`` may be wrapped in DDP. ``normalize`` turns the uint8 batch into the model's input
    (it is not part of ``model``, so its statistics are not trained).
    ``dtype``: autocast dtype (:func:`autocast_dtype`), None for fp32; fp16 scales the loss
    (``torch.amp.GradScaler``, whose state is :attr:`scaler`). ``batch_transforms`` run on the
    normalised batch and its targets before the forward pass (MixUp/CutMix give soft targets).
    ``accumulate``: the batch is split into that many micro-batches, each forward and backward
    on its own (activation memory of one micro-batch), gradients summed, DDP's all-reduce on the
    last one only, then one optimizer step: the step is the same batch's, without the memory.
    ``clip_grad_norm``: the gradients' total norm is clipped to it before the optimizer step.
    ``compile_mode``: ``torch.compile`` :meth:`forward` (normalisation, model, loss) in that
    mode (see the module docstring); None: eager. ``normalize_in_graph=False`` normalises before
    the forward even without batch transforms (the benchmark's row that measures the fusion).
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
        compile_mode: CompileMode | None = None,
        normalize_in_graph: bool = True,
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
        self.normalize_in_graph = normalize_in_graph
        self.compile_mode = compile_mode
        self.forward_fn = self.forward
        if compile_mode is not None:
            if compile_mode not in COMPILE_MODES:
                raise ValueError(f"compile mode {compile_mode!r} is unknown; use {COMPILE_MODES}")
            # Static shapes: one graph per crop size (progressive resizing has 3-4), the
            # fastest kernels, and what CUDA graphs record.
            self.forward_fn = torch.compile(self.forward, mode=compile_mode, dynamic=False)

    def __call__(self, images: Tensor, labels: Tensor) -> StepResult:
        x, targets = self.inputs(images, labels)
        self.optimizer.zero_grad(set_to_none=True)
        losses, logits = [], []
        micro = list(zip(x.chunk(self.accumulate), targets.chunk(self.accumulate), strict=True))
        for i, (x_part, targets_part) in enumerate(micro):
            share = len(x_part) / len(x)  # the batch's mean loss: the parts' weighted sum
            with self.gradient_sync(last=i == len(micro) - 1):
                part_logits, loss = self.forward_fn(x_part, targets_part)
                self.backward(loss * share)
            losses.append(loss.detach().float() * share)
            # A copy: a CUDA graph's outputs are overwritten by its next replay.
            logits.append(part_logits.detach().to(torch.float32, copy=True))
        self.update()
        dominant = targets.argmax(dim=1) if targets.ndim == 2 else labels
        all_logits = logits[0] if len(logits) == 1 else torch.cat(logits)
        return StepResult(sum(losses), all_logits, dominant)

    def inputs(self, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """The forward's input and the loss targets: the uint8 batch as it came (normalised in
        :meth:`forward`), or, with batch transforms, normalised and transformed here."""
        if not self.batch_transforms and self.normalize_in_graph:
            return images, labels
        x, targets = self.normalize(images), labels
        for transform in self.batch_transforms:
            x, targets = transform(x, targets)
        return x, targets

    def forward(self, x: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        """Logits and loss of ``x``: uint8 images (normalised here) or a normalised batch;
        the region ``compile_mode`` compiles."""
        if x.dtype == torch.uint8:
            x = self.normalize(x)
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
    """``model`` when it is wrapped in DDP, else None."""
    return model if isinstance(model, nn.parallel.DistributedDataParallel) else None
