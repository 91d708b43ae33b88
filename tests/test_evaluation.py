"""Tests for resnet_core.evaluation: centre, 10-crop and fully-convolutional multi-scale scoring."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torchvision.transforms.v2 import functional as tvf

from resnet_core.cpu_transforms import decode_resize_shorter
from resnet_core.evaluation import (
    MULTISCALE_SHORTER_SIDES,
    predict_center,
    predict_multiscale,
    predict_ten_crop,
)
from resnet_core.transforms import IMAGENET_MEAN_RGB, to_float_batch

NUM_CLASSES = 5


def tiny_model(seed: int = 0) -> nn.Module:
    """conv -> BN -> ReLU -> global average pool -> fc: accepts any input size, like a ResNet."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 8, kernel_size=3, stride=2, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, NUM_CLASSES),
    )
    # Non-trivial running statistics, so eval mode differs from training mode.
    model[1].running_mean.uniform_(-0.5, 0.5)
    model[1].running_var.uniform_(0.5, 2.0)
    return model.eval()


def random_batch(n: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, height, width, generator=torch.Generator().manual_seed(seed))


def test_predict_center_is_softmax_of_logits():
    model = tiny_model()
    batch = random_batch(4, 32, 40)
    probabilities = predict_center(model, batch)
    assert probabilities.shape == (4, NUM_CLASSES)
    assert probabilities.dtype == torch.float32
    torch.testing.assert_close(probabilities.sum(dim=1), torch.ones(4))
    with torch.no_grad():
        torch.testing.assert_close(probabilities, model(batch).softmax(dim=1))


def test_predict_ten_crop_equals_mean_of_single_crop_predictions():
    model = tiny_model()
    batch = random_batch(3, 40, 48)
    ten = predict_ten_crop(model, batch, 32)
    # Views from torchvision, scored one at a time.
    views = tvf.ten_crop(batch, [32, 32])
    assert len(views) == 10
    singles = torch.stack([predict_center(model, view) for view in views])
    torch.testing.assert_close(ten, singles.mean(dim=0), rtol=0, atol=1e-6)
    torch.testing.assert_close(ten.sum(dim=1), torch.ones(3))
    # Averaging really mixes views: it differs from the centre crop alone.
    assert not torch.allclose(ten, singles[4], atol=1e-4)


def test_gap_then_fc_equals_fully_convolutional_scores_averaged_over_positions():
    model = tiny_model()
    batch = random_batch(2, 45, 61)
    features = model[:3](batch)  # (N, 8, h, w) before global average pooling
    fc = model[5]
    as_conv = nn.Conv2d(8, NUM_CLASSES, kernel_size=1)
    as_conv.weight.data = fc.weight.data.view(NUM_CLASSES, 8, 1, 1)
    as_conv.bias.data = fc.bias.data
    with torch.no_grad():
        score_map = as_conv(features)  # (N, K, h, w): fc applied at every position
        torch.testing.assert_close(score_map.mean(dim=(2, 3)), model(batch), rtol=0, atol=1e-5)


def jpeg(width: int, height: int, seed: int) -> bytes:
    """Noise plus a left-to-right ramp, so a mirrored image scores differently."""
    pixels = np.random.default_rng(seed).integers(0, 64, size=(height, width, 3), dtype=np.uint8)
    pixels[..., seed % 3] += np.linspace(0, 191, width, dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def test_predict_multiscale_on_every_paper_scale_with_non_square_images():
    model = tiny_model()
    images = [jpeg(200, 150, seed) for seed in range(2)]  # 4:3 landscape
    views = []
    for shorter in MULTISCALE_SHORTER_SIDES:
        pixels = np.stack([decode_resize_shorter(data, shorter) for data in images])
        view = to_float_batch(torch.from_numpy(pixels), mean=IMAGENET_MEAN_RGB)
        assert view.shape == (2, 3, shorter, int(shorter * 4 / 3))
        views.append(view)
    probabilities = predict_multiscale(model, views)
    assert probabilities.shape == (2, NUM_CLASSES)
    torch.testing.assert_close(probabilities.sum(dim=1), torch.ones(2))
    expected = torch.stack(
        [predict_center(model, images) for view in views for images in (view, view.flip(-1))]
    ).mean(dim=0)
    torch.testing.assert_close(probabilities, expected, rtol=0, atol=1e-6)
    without_flip = predict_multiscale(model, views, flip=False)
    expected_without_flip = torch.stack([predict_center(model, view) for view in views]).mean(0)
    torch.testing.assert_close(without_flip, expected_without_flip, rtol=0, atol=1e-6)


def test_predict_multiscale_flip_averages_each_view_with_its_mirror():
    # Pools the left and right halves separately, so mirroring changes the scores a lot.
    torch.manual_seed(0)
    model = nn.Sequential(nn.AdaptiveAvgPool2d((1, 2)), nn.Flatten(), nn.Linear(6, NUM_CLASSES))
    model.eval()
    views = [random_batch(2, 24, 32, seed=1) + torch.linspace(-2, 2, 32), random_batch(2, 36, 48)]
    with_flip = predict_multiscale(model, views, flip=True)
    without_flip = predict_multiscale(model, views, flip=False)
    mirrored = predict_multiscale(model, [view.flip(-1) for view in views], flip=False)
    torch.testing.assert_close(with_flip, (without_flip + mirrored) / 2, rtol=0, atol=1e-6)
    assert (with_flip - without_flip).abs().max() > 1e-2


def test_scoring_refuses_training_mode_and_mismatched_views():
    model = tiny_model().train()
    with pytest.raises(ValueError, match=r"model\.eval\(\)"):
        predict_center(model, random_batch(2, 16, 16))
    model.eval()
    with pytest.raises(ValueError, match="same N=2"):
        predict_multiscale(model, [random_batch(2, 16, 16), random_batch(3, 20, 24)])
    with pytest.raises(ValueError, match="no views"):
        predict_multiscale(model, [])
