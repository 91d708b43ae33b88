"""Test-time scoring protocols of the paper (He et al., CVPR 2016, §3.4).

* Single centre crop: :func:`predict_center` on a 224x224 crop of the image resized to 256.
* 10-crop testing (Krizhevsky et al. 2012): :func:`predict_ten_crop`, softmax averaged over the
  four corner crops, the centre crop and their horizontal flips.
* Fully-convolutional multi-scale testing (following VGG / OverFeat): :func:`predict_multiscale`
  on whole images with the shorter side at each of :data:`MULTISCALE_SHORTER_SIDES`.

All functions take float NCHW batches that are already normalised (see
``resnet_core.transforms.to_float_batch``), a model in eval mode whose ``forward`` returns
(N, num_classes) logits, and return (N, num_classes) float32 class probabilities (rows sum to 1).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from resnet_core.transforms import ten_crop

# Shorter sides of the whole-image views used for the paper's multi-scale results (§3.4).
MULTISCALE_SHORTER_SIDES = (224, 256, 384, 480, 640)


def _check_eval_mode(model: nn.Module) -> None:
    if model.training:
        raise ValueError(
            "model is in training mode (BatchNorm would use batch statistics); call model.eval()"
        )


def _probabilities(model: nn.Module, batch: Tensor) -> Tensor:
    # Softmax in float32 even when the model runs under autocast.
    return model(batch).float().softmax(dim=1)


@torch.inference_mode()
def predict_center(model: nn.Module, batch: Tensor) -> Tensor:
    """Class probabilities (N, K) for a float (N, C, H, W) batch of single views."""
    _check_eval_mode(model)
    return _probabilities(model, batch)


@torch.inference_mode()
def predict_ten_crop(model: nn.Module, batch: Tensor, size: int) -> Tensor:
    """10-crop testing: mean of the softmax over the ten ``size`` x ``size`` views of each image
    (order of ``resnet_core.transforms.ten_crop``). ``batch``: float (N, C, H, W), typically
    images resized to shorter side 256 for size 224. The model sees N * 10 crops in one forward.
    """
    _check_eval_mode(model)
    crops = ten_crop(batch, size)  # (N, 10, C, size, size)
    n, views = crops.shape[:2]
    probabilities = _probabilities(model, crops.flatten(0, 1))
    return probabilities.view(n, views, -1).mean(dim=1)


@torch.inference_mode()
def predict_multiscale(model: nn.Module, views: Sequence[Tensor], flip: bool = True) -> Tensor:
    """Fully-convolutional multi-scale testing: mean of the softmax over scales (and flips).

    ``views``: one float (N, C, H_s, W_s) tensor per scale, the same N images each time resized
    whole to one shorter side (e.g. :data:`MULTISCALE_SHORTER_SIDES`); H_s and W_s may differ
    per scale and need not be equal (non-square images). With ``flip`` each view is also scored
    horizontally mirrored, so the result averages ``len(views) * 2`` softmax outputs.

    The model runs on the whole image. The paper's fully-convolutional form applies the fc layer
    as a 1x1 convolution at every position of the final feature map and averages the class scores
    over positions; since global average pooling and the fc layer are both linear, averaging
    after the fc equals the fc of the average, i.e. exactly what the model's own GAP -> fc does
    at any input size. Softmax follows that average, once per view.
    """
    _check_eval_mode(model)
    if len(views) == 0:
        raise ValueError("predict_multiscale got no views; pass one batch per test scale")
    n = views[0].shape[0]
    total: Tensor | None = None
    count = 0
    for view in views:
        if view.ndim != 4 or view.shape[0] != n:
            raise ValueError(
                f"every view must be (N, C, H, W) with the same N={n}, got {tuple(view.shape)}"
            )
        mirrored = (view, view.flip(-1)) if flip else (view,)
        for images in mirrored:
            probabilities = _probabilities(model, images)
            total = probabilities if total is None else total + probabilities
            count += 1
    assert total is not None
    return total / count
