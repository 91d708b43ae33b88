"""The numbers He et al. report in "Deep Residual Learning for Image Recognition" (CVPR 2016).

One table, ``PAPER``: each row is one value with the paper table it comes from. Model names are
ours (``create_model`` names); ``shortcut`` is the paper's §3.3 option for that row where the paper
states it (None for plain nets and for rows where the option does not apply).

Metrics and units:
    gmacs             10^9 multiply-adds per 224x224 image (the paper's "FLOPs", Table 1)
    top1_err_10crop   ImageNet val top-1 error, %, 10-crop testing (Tables 2 and 3)
    top5_err_10crop   ImageNet val top-5 error, %, 10-crop testing (Table 3)
    top1_err_multiscale, top5_err_multiscale
                      ImageNet val error, %, single model, fully convolutional at multiple
                      scales (Table 4)
    params_m          parameters, millions (Table 6)
    test_error        CIFAR-10 test error, % (Table 6)
    test_error_mean   CIFAR-10 test error, %, mean of 5 runs (Table 6, ResNet-110 only)
"""

from dataclasses import dataclass

__all__ = ["PAPER", "PaperValue"]


@dataclass(frozen=True)
class PaperValue:
    """One reported value: ``value`` in the unit of ``metric`` (see the module docstring)."""

    table: int
    model: str
    metric: str
    value: float
    shortcut: str | None = None
    note: str = ""


_V = PaperValue
_PLAIN_FLOPS = "plain counterpart: same layers without shortcuts (§3.3 gives 3.6e9 for plain-34)"
_TABLE2 = "§4.1: the ResNets use option A, no extra parameters over the plain nets"

PAPER: tuple[PaperValue, ...] = (
    # Table 1: architectures for ImageNet, "FLOPs" = multiply-adds at 224x224.
    _V(1, "resnet18", "gmacs", 1.8),
    _V(1, "resnet34", "gmacs", 3.6),
    _V(1, "resnet50", "gmacs", 3.8),
    _V(1, "resnet101", "gmacs", 7.6),
    _V(1, "resnet152", "gmacs", 11.3),
    _V(1, "plain18", "gmacs", 1.8, note=_PLAIN_FLOPS),
    _V(1, "plain34", "gmacs", 3.6, note=_PLAIN_FLOPS),
    # Table 2: top-1 error, 10-crop testing, ImageNet val.
    _V(2, "plain18", "top1_err_10crop", 27.94),
    _V(2, "plain34", "top1_err_10crop", 28.54),
    _V(2, "resnet18", "top1_err_10crop", 27.88, "A", _TABLE2),
    _V(2, "resnet34", "top1_err_10crop", 25.03, "A", _TABLE2),
    # Table 3: error rates, 10-crop testing, ImageNet val.
    _V(3, "plain34", "top1_err_10crop", 28.54),
    _V(3, "plain34", "top5_err_10crop", 10.02),
    _V(3, "resnet34", "top1_err_10crop", 25.03, "A"),
    _V(3, "resnet34", "top5_err_10crop", 7.76, "A"),
    _V(3, "resnet34", "top1_err_10crop", 24.52, "B"),
    _V(3, "resnet34", "top5_err_10crop", 7.46, "B"),
    _V(3, "resnet34", "top1_err_10crop", 24.19, "C"),
    _V(3, "resnet34", "top5_err_10crop", 7.40, "C"),
    _V(3, "resnet50", "top1_err_10crop", 22.85, "B"),
    _V(3, "resnet50", "top5_err_10crop", 6.71, "B"),
    _V(3, "resnet101", "top1_err_10crop", 21.75, "B"),
    _V(3, "resnet101", "top5_err_10crop", 6.05, "B"),
    _V(3, "resnet152", "top1_err_10crop", 21.43, "B"),
    _V(3, "resnet152", "top5_err_10crop", 5.71, "B"),
    # Table 4: single-model error rates, fully convolutional multi-scale testing, ImageNet val.
    _V(4, "resnet34", "top1_err_multiscale", 21.84, "B"),
    _V(4, "resnet34", "top5_err_multiscale", 5.71, "B"),
    _V(4, "resnet34", "top1_err_multiscale", 21.53, "C"),
    _V(4, "resnet34", "top5_err_multiscale", 5.60, "C"),
    _V(4, "resnet50", "top1_err_multiscale", 20.74, "B"),
    _V(4, "resnet50", "top5_err_multiscale", 5.25, "B"),
    _V(4, "resnet101", "top1_err_multiscale", 19.87, "B"),
    _V(4, "resnet101", "top5_err_multiscale", 4.60, "B"),
    _V(4, "resnet152", "top1_err_multiscale", 19.38, "B"),
    _V(4, "resnet152", "top5_err_multiscale", 4.49, "B"),
    # Table 6: CIFAR-10 parameters and test error (§4.2: option A shortcuts throughout).
    _V(6, "resnet20", "params_m", 0.27, "A"),
    _V(6, "resnet32", "params_m", 0.46, "A"),
    _V(6, "resnet44", "params_m", 0.66, "A"),
    _V(6, "resnet56", "params_m", 0.85, "A"),
    _V(6, "resnet110", "params_m", 1.7, "A"),
    _V(6, "resnet1202", "params_m", 19.4, "A"),
    _V(6, "resnet20", "test_error", 8.75, "A"),
    _V(6, "resnet32", "test_error", 7.51, "A"),
    _V(6, "resnet44", "test_error", 7.17, "A"),
    _V(6, "resnet56", "test_error", 6.97, "A"),
    _V(6, "resnet110", "test_error", 6.43, "A", "best of 5 runs"),
    _V(6, "resnet110", "test_error_mean", 6.61, "A", "5 runs, std 0.16"),
    _V(6, "resnet1202", "test_error", 7.93, "A", "overfits: worse than resnet110 (§4.2)"),
)
