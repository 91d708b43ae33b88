"""Optimizer and learning-rate schedules of the paper's recipes and the modern ones.

The schedule is a small stateful object rather than a ``torch.optim.lr_scheduler`` because two of the
paper's rules depend on measurements, not on the step count:

- ImageNet (§3.4): "the learning rate starts from 0.1 and is divided by 10 when the error plateaus";
- CIFAR ResNet-110 (§4.2): "we use 0.01 to warm up the training until the training error is below
  80% (about 400 iterations), and then go back to 0.1".

Its whole state is a few numbers (``state_dict``), so a resumed run continues the same curve.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, get_args

import torch
from torch import Tensor, nn

ScheduleKind = Literal["multistep", "cosine", "plateau", "constant"]
SCHEDULE_KINDS: tuple[str, ...] = get_args(ScheduleKind)


# sgd: the paper's (momentum, optional Nesterov). adamw: torch's, decoupled decay (Loshchilov &
# Hutter 2019). lars (You et al. 2017) and lamb (You et al. 2020), layer-wise trust ratios for
# very large batches: timm's maintained implementations.
OptimizerName = Literal["sgd", "adamw", "lars", "lamb"]
OPTIMIZERS: tuple[str, ...] = get_args(OptimizerName)

# How torch's SGD/AdamW run their update over the parameters: "fused" in one kernel per group
# (and, under the fp16 gradient scaler, without reading the overflow flag on the host),
# "foreach" in multi-tensor kernels, "for-loop" a few kernels per tensor; "auto": fused on CUDA,
# torch's own choice elsewhere. timm's LARS and LAMB have one implementation: auto only.
Implementation = Literal["auto", "fused", "foreach", "for-loop"]
IMPLEMENTATIONS: tuple[str, ...] = get_args(Implementation)


def build_optimizer(
    model: nn.Module,
    name: OptimizerName = "sgd",
    *,
    lr: float,
    weight_decay: float,
    momentum: float = 0.9,
    nesterov: bool = False,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    decay_norm_and_bias: bool = True,
    head: str | None = None,
    implementation: Implementation = "auto",
) -> torch.optim.Optimizer:
    """The optimizer ``name`` over ``model``'s trainable parameters. ``momentum``/``nesterov``
    apply to sgd and lars, ``betas``/``eps`` to adamw and lamb (lars uses ``eps`` too).

    The paper decays every weight (§3.4: weight decay 1e-4, momentum 0.9);
    ``decay_norm_and_bias=False`` exempts BN parameters and biases from weight decay, as modern
    recipes do (Goyal et al. 2017 keep decay on them; many later recipes drop it). LARS and
    LAMB then skip their trust ratio on those too (timm: adaptation only where decay applies).
    ``head``: the classifier's module name (``fc``); its parameters get groups of their own and
    every other group is marked ``backbone`` (its ``lr_scale`` can freeze it, see set_lr).
    ``implementation``: how sgd/adamw update (see Implementation), for the device the
    parameters are on.
    """
    groups = _parameter_groups(model, decay_norm_and_bias, head)
    if name in ("sgd", "adamw"):
        device = next((p.device for g in groups for p in g["params"]), torch.device("cpu"))
        kernels = kernel_options(implementation, device)
        if name == "sgd":
            return torch.optim.SGD(
                groups,
                lr=lr,
                momentum=momentum,
                weight_decay=weight_decay,
                nesterov=nesterov,
                **kernels,
            )
        return torch.optim.AdamW(
            groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, **kernels
        )
    if implementation != "auto":
        raise ValueError(
            f"optimizer {name!r} has one implementation (timm's); implementation="
            f"{implementation!r} applies to sgd and adamw: use auto"
        )
    from timm.optim import Lamb, Lars  # only runs that pick them pay for importing timm

    if name == "lars":
        return Lars(
            groups, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay, eps=eps
        )
    if name == "lamb":
        return Lamb(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    raise ValueError(f"optimizer {name!r} is unknown; use one of {OPTIMIZERS}")


def kernel_options(implementation: Implementation, device: torch.device) -> dict[str, bool]:
    """torch.optim's ``fused``/``foreach`` arguments for ``implementation`` on ``device``."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation {implementation!r} is unknown; use {IMPLEMENTATIONS}")
    if implementation == "auto":
        return {"fused": True} if device.type == "cuda" else {}
    if implementation == "fused":
        return {"fused": True}
    return {"foreach": implementation == "foreach"}


def _parameter_groups(
    model: nn.Module, decay_norm_and_bias: bool, head: str | None
) -> list[dict[str, Any]]:
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    parts: list[tuple[dict[str, Any], list[Tensor]]] = [({}, [p for _, p in named])]
    if head is not None:
        in_head = {n for n, _ in named if n.startswith(f"{head}.")}
        parts = [
            ({"backbone": True}, [p for n, p in named if n not in in_head]),
            ({"backbone": False}, [p for n, p in named if n in in_head]),
        ]
    groups = []
    for marks, params in parts:
        if decay_norm_and_bias:
            groups.append({"params": params, **marks})
        else:
            groups.append({"params": [p for p in params if p.ndim > 1], **marks})
            no_decay = [p for p in params if p.ndim <= 1]
            groups.append({"params": no_decay, "weight_decay": 0.0, **marks})
    return groups


def scaled_lr(lr: float, global_batch: int, reference_batch: int | None) -> float:
    """Linear scaling rule (Goyal et al. 2017 §2.1): lr grows with the global batch.

    ``lr`` is the rate at ``reference_batch`` images per step (256 for ImageNet recipes); ``None``
    means the recipe's lr is used as given.
    """
    if reference_batch is None:
        return lr
    return lr * global_batch / reference_batch


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Write the learning rate into every parameter group, times the group's ``lr_scale``
    (default 1; 0 holds a frozen backbone still)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


@dataclass
class LRSchedule:
    """Learning rate as a function of the global step plus the measurements the paper reacts to.

    Steps are optimizer steps (iterations); ``total_steps`` is the length of the run.
    """

    base_lr: float
    kind: ScheduleKind
    total_steps: int
    milestones: tuple[int, ...] = ()  # multistep: steps at which lr is multiplied by gamma
    gamma: float = 0.1
    warmup_steps: int = 0  # linear warm-up from warmup_start_factor × base_lr (Goyal et al. §2.2)
    warmup_start_factor: float = 0.1
    hold_lr: float | None = None  # §4.2 ResNet-110: this lr until the training error drops below…
    hold_until_train_error: float | None = None  # …this fraction (0.8), then base_lr
    plateau_patience: int = 5  # plateau: evaluations without improvement before dividing by 10
    plateau_threshold: float = 1e-3  # plateau: an improvement smaller than this (absolute) is none
    min_lr: float = 0.0
    # Measured state (persisted in checkpoints).
    plateau_drops: int = 0
    best_val_error: float = math.inf
    evals_since_best: int = 0
    holding: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULE_KINDS:
            raise ValueError(f"schedule kind {self.kind!r} is unknown; use one of {SCHEDULE_KINDS}")
        if self.base_lr <= 0:
            raise ValueError(f"base lr {self.base_lr} must be positive")
        if self.total_steps <= 0:
            raise ValueError(f"total_steps {self.total_steps} must be positive")
        if (self.hold_lr is None) != (self.hold_until_train_error is None):
            raise ValueError("hold_lr and hold_until_train_error go together (paper §4.2 warm-up)")
        if self.hold_lr is not None:
            self.holding = True  # a fresh run starts in the hold; load_state_dict restores it

    def lr(self, step: int) -> float:
        """The learning rate for optimizer step ``step`` (0-based)."""
        if self.holding:
            return float(self.hold_lr)
        if step < self.warmup_steps:
            start = self.base_lr * self.warmup_start_factor
            return start + (self.base_lr - start) * step / self.warmup_steps
        if self.kind == "constant":
            return self.base_lr
        if self.kind == "multistep":
            drops = sum(step >= m for m in self.milestones)
            return max(self.base_lr * self.gamma**drops, self.min_lr)
        if self.kind == "plateau":
            return max(self.base_lr * self.gamma**self.plateau_drops, self.min_lr)
        progress = (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)
        cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return self.min_lr + (self.base_lr - self.min_lr) * cosine

    def observe_train_error(self, train_error: float) -> None:
        """Ends the §4.2 warm-up hold once the training error falls below the threshold."""
        if self.holding and train_error < float(self.hold_until_train_error):
            self.holding = False

    def observe_val_error(self, val_error: float) -> None:
        """Plateau rule (§3.4): divide by 10 after ``plateau_patience`` evaluations without gain."""
        if val_error < self.best_val_error - self.plateau_threshold:
            self.best_val_error = val_error
            self.evals_since_best = 0
            return
        self.evals_since_best += 1
        if self.kind == "plateau" and self.evals_since_best >= self.plateau_patience:
            self.plateau_drops += 1
            self.evals_since_best = 0

    def state_dict(self) -> dict:
        """Everything needed to continue the same curve (plain JSON-able values)."""
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key in ("plateau_drops", "best_val_error", "evals_since_best", "holding"):
            setattr(self, key, state[key])
