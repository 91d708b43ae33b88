"""Parameter and multiply-add counts of our models, side by side with the paper and torchvision.

Run:  resnet-selfcheck        (or: python -m resnet_core.summary)

Prints the paper's Table 1 (multiply-adds at 224x224) and Table 6 (CIFAR-10 parameters) next to
ours, compares our ImageNet parameter counts with torchvision's, and checks that torchvision's
ResNet-18 weights load into ours and give the same outputs. Exits 1 if any check fails.
"""

from dataclasses import dataclass
from functools import cache

import torch
import torchvision
from torch import Tensor, nn

from resnet_core import jpeg
from resnet_core.models import create_model
from resnet_core.paper import PAPER

__all__ = ["ModelSummary", "interchange_max_abs_diff", "main", "paper_tables", "summarize"]

# Checks: our multiply-adds within 3% of Table 1; torchvision outputs reproduced to 1e-5.
GMACS_TOLERANCE = 0.03
INTERCHANGE_TOLERANCE = 1e-5

_IMAGENET = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "plain18", "plain34")
_CIFAR = ("resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "resnet1202")


@dataclass(frozen=True)
class ModelSummary:
    """Size and cost of one model for one input.

    params: number of parameters (trainable or not; buffers excluded).
    macs: multiply-adds of all Conv2d and Linear layers for ONE image. The paper's "FLOPs"
        (Table 1) are these multiply-adds; BatchNorm, ReLU, pooling and additions are not counted.
    """

    params: int
    macs: int


def summarize(model: nn.Module, input_size: tuple[int, int, int]) -> ModelSummary:
    """Count ``model``'s parameters and its multiply-adds for one (C, H, W) image.

    Multiply-adds come from forward hooks on the actual output shapes of a batch-1 forward pass
    in eval mode under ``torch.no_grad()``; the model's train/eval modes are restored afterwards.
    Works on any device, including ``meta`` (shapes only).
    """
    macs = 0

    def count(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        nonlocal macs
        if isinstance(module, nn.Conv2d):
            kernel_h, kernel_w = module.kernel_size
            per_output = module.in_channels // module.groups * kernel_h * kernel_w
        else:
            per_output = module.in_features
        macs += output.numel() * per_output

    parameter = next(model.parameters())
    image = torch.zeros(1, *input_size, device=parameter.device, dtype=parameter.dtype)
    modes = {module: module.training for module in model.modules()}
    hooks = [
        module.register_forward_hook(count)
        for module in model.modules()
        if isinstance(module, nn.Conv2d | nn.Linear)
    ]
    try:
        model.eval()
        with torch.no_grad():
            model(image)
    finally:
        for hook in hooks:
            hook.remove()
        for module, training in modes.items():
            module.training = training
    params = sum(p.numel() for p in model.parameters())
    return ModelSummary(params=params, macs=macs)


def _randomize_batchnorm(model: nn.Module, generator: torch.Generator) -> None:
    """Random BN affine parameters and running statistics, so that a comparison exercises them."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                size = module.num_features
                module.weight.copy_(0.5 + torch.rand(size, generator=generator))
                module.bias.copy_(0.1 * torch.randn(size, generator=generator))
                module.running_mean.copy_(0.1 * torch.randn(size, generator=generator))
                module.running_var.copy_(0.5 + torch.rand(size, generator=generator))


def interchange_max_abs_diff(
    name: str, input_size: tuple[int, int, int] = (3, 64, 64), seed: int = 0
) -> float:
    """Load torchvision's ``name`` (random weights, random BN statistics) strictly into ours.

    Ours is built with ``stride_in_3x3=True`` (torchvision ships v1.5). Returns the max absolute
    difference of the two models' logits on one random image in eval mode. Never downloads.
    """
    generator = torch.Generator().manual_seed(seed)
    theirs = getattr(torchvision.models, name)(weights=None)
    _randomize_batchnorm(theirs, generator)
    ours = create_model(name, stride_in_3x3=True)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    image = torch.randn(1, *input_size, generator=generator)
    theirs.eval()
    ours.eval()
    with torch.no_grad():
        return (ours(image) - theirs(image)).abs().max().item()


def _paper_values(table: int, metric: str) -> dict[str, float]:
    return {row.model: row.value for row in PAPER if row.table == table and row.metric == metric}


def _decimals(value: float) -> int:
    """Decimal places the paper prints for ``value`` (0.27 -> 2, 1.7 -> 1)."""
    text = repr(value)
    return len(text) - text.index(".") - 1


@cache  # counts depend only on the code: paper_tables() and main() share one computation
def _paper_comparison() -> tuple[str, tuple[str, ...]]:
    """The rendered tables and one line per failed check."""
    lines: list[str] = []
    failures: list[str] = []

    paper_gmacs = _paper_values(1, "gmacs")
    lines.append("Table 1 (ImageNet, 224x224): multiply-adds, v1 defaults (shortcut B, stride 1x1)")
    lines.append(
        f"{'model':<11}{'params (M)':>12}{'ours GMACs':>12}{'paper GMACs':>13}{'ratio':>8}  check"
    )
    imagenet_params = {}
    for name in _IMAGENET:
        # Counting needs shapes, not numbers: the meta device skips the 224x224 arithmetic.
        with torch.device("meta"):
            model = create_model(name)
        summary = summarize(model, (3, 224, 224))
        imagenet_params[name] = summary.params
        ours = summary.macs / 1e9
        ratio = ours / paper_gmacs[name]
        ok = abs(ratio - 1) <= GMACS_TOLERANCE
        if not ok:
            failures.append(f"{name}: {ours:.2f} GMACs vs the paper's {paper_gmacs[name]}")
        lines.append(
            f"{name:<11}{summary.params / 1e6:>12.2f}{ours:>12.2f}{paper_gmacs[name]:>13}"
            f"{ratio:>8.3f}  {'ok' if ok else 'FAIL'}"
        )

    paper_params = _paper_values(6, "params_m")
    lines.append("")
    lines.append("Table 6 (CIFAR-10, 32x32, shortcut A): parameters")
    lines.append(f"{'model':<11}{'ours (M)':>12}{'paper (M)':>11}  check")
    for name in _CIFAR:
        ours = sum(p.numel() for p in create_model(name).parameters()) / 1e6
        paper = paper_params[name]
        ok = round(ours, _decimals(paper)) == paper
        if not ok:
            failures.append(f"{name}: {ours:.3f}M parameters vs the paper's {paper}M")
        lines.append(f"{name:<11}{ours:>12.4f}{paper:>11}  {'ok' if ok else 'FAIL'}")

    lines.append("")
    lines.append("Parameters vs torchvision.models (shortcut B)")
    for name in _IMAGENET:
        if not name.startswith("resnet"):
            continue
        ours = imagenet_params[name]
        with torch.device("meta"):
            reference = getattr(torchvision.models, name)(weights=None)
        theirs = sum(p.numel() for p in reference.parameters())
        ok = ours == theirs
        if not ok:
            failures.append(f"{name}: {ours:,} parameters vs torchvision's {theirs:,}")
        lines.append(
            f"{name:<11} ours {ours:>11,}  torchvision {theirs:>11,}  {'equal' if ok else 'FAIL'}"
        )
    return "\n".join(lines), tuple(failures)


def paper_tables() -> str:
    """Our counts next to the paper's Table 1 and Table 6 and torchvision's, as aligned text."""
    return _paper_comparison()[0]


def main() -> int:
    """Print the comparison tables and the torchvision interchange check; 0 if all checks pass."""
    text, table_failures = _paper_comparison()
    failures = list(table_failures)
    print(text)
    diff = interchange_max_abs_diff("resnet18")
    ok = diff <= INTERCHANGE_TOLERANCE
    if not ok:
        failures.append(f"resnet18: outputs differ from torchvision's by {diff:.2e}")
    print()
    print(
        "torchvision resnet18 weights -> ours (stride_in_3x3=True), eval, random input: "
        f"max abs diff {diff:.2e} ({'ok' if ok else 'FAIL'}, tolerance {INTERCHANGE_TOLERANCE:.0e})"
    )
    print(f"JPEG decoder: {jpeg.status()}")
    print()
    for failure in failures:
        print(f"FAIL {failure}")
    print(f"{'all checks passed' if not failures else f'{len(failures)} check(s) failed'}")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
