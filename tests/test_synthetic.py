"""The synthetic dataset: deterministic bytes, the documented sizes, and learnable classes."""

import io
import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.nn import functional as F

from pipelines.sources import list_synthetic, read_item
from pipelines.synthetic import (
    PALETTES,
    SHAPES,
    TEXTURES,
    SyntheticSpec,
    class_style,
    render_array,
    render_image,
)


def test_listing_layout():
    listing = list_synthetic(SyntheticSpec(num_classes=12, train_per_class=3, val_per_class=2))
    assert listing.dataset == "synthetic"
    assert len(listing.classes) == len(set(listing.classes)) == len(listing.class_names) == 12
    assert listing.classes[:2] == ["disc-flat-p0", "square-stripes-p1"]
    assert [len(listing.splits[s]) for s in ("train", "val")] == [36, 24]
    keys = [item.key for items in listing.splits.values() for item in items]
    assert len(keys) == len(set(keys))
    assert listing.splits["val"][5].key == "val/triangle-checker-p2/00001.jpg"
    assert listing.splits["val"][5].label == 2
    no_val = list_synthetic(SyntheticSpec(num_classes=2, train_per_class=1, val_per_class=0))
    assert list(no_val.splits) == ["train"]


def test_every_class_is_a_distinct_style():
    styles = [class_style(label) for label in range(len(SHAPES) * len(TEXTURES) * len(PALETTES))]
    assert len(set(styles)) == len(styles)
    assert len({s[0] for s in styles[: len(SHAPES)]}) == len(SHAPES)  # first classes: all shapes


def test_bytes_are_a_function_of_seed_split_class_index():
    item = list_synthetic(SyntheticSpec(train_per_class=5, val_per_class=1)).splits["train"][7]
    again = pickle.loads(pickle.dumps(item))  # as a worker receives it
    assert read_item(again) == read_item(item) == render_image("cifar", 0, "train", 1, 2)
    variants = {
        render_image("cifar", 0, "train", 1, 2),
        render_image("cifar", 1, "train", 1, 2),
        render_image("cifar", 0, "val", 1, 2),
        render_image("cifar", 0, "train", 2, 2),
        render_image("cifar", 0, "train", 1, 3),
    }
    assert len(variants) == 5


@pytest.mark.parametrize("kind", ["cifar", "imagenet"])
def test_sizes(kind):
    for index in range(6):
        image = Image.open(io.BytesIO(render_image(kind, 0, "train", index, index)))
        assert (image.format, image.mode) == ("JPEG", "RGB")
        width, height = image.size
        if kind == "cifar":
            assert (width, height) == (32, 32)
        else:
            assert 160 <= max(width, height) <= 400
            assert 3 / 4 - 0.01 <= width / height <= 4 / 3 + 0.01


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"num_classes": 1}, "num_classes=1"),
        ({"num_classes": 241}, "num_classes=241"),
        ({"train_per_class": 0}, "train_per_class=0"),
        ({"image_kind": "mnist"}, "image_kind='mnist'"),
        ({"seed": -1}, "seed=-1"),
    ],
)
def test_spec_validation(options, message):
    with pytest.raises(ValueError, match=message):
        SyntheticSpec(**options)


def test_classes_are_learnable_but_not_from_colour_alone():
    """A tiny CNN learns the classes in seconds; the nearest class-mean colour stays near chance."""

    def split(name, per_class):
        x = np.stack(
            [render_array("cifar", 0, name, c, i) for c in range(10) for i in range(per_class)]
        )
        return x, np.repeat(np.arange(10), per_class)

    (x_train, y_train), (x_val, y_val) = split("train", 60), split("val", 20)
    mean_colours = np.stack([x_train[y_train == c].mean((0, 1, 2)) for c in range(10)])
    nearest = ((x_val.mean((1, 2))[:, None] - mean_colours[None]) ** 2).sum(-1).argmin(1)
    colour_accuracy = (nearest == y_val).mean()

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # steadier on a shared 2-core machine
    try:
        cnn_accuracy = _train_tiny_cnn(x_train, y_train, x_val, y_val, steps=200)
    finally:
        torch.set_num_threads(threads)
    assert colour_accuracy < 0.25, colour_accuracy  # chance is 0.10
    assert cnn_accuracy > 0.4, cnn_accuracy


def _train_tiny_cnn(x_train, y_train, x_val, y_val, steps: int) -> float:
    """Validation accuracy of a 3-conv network after `steps` Adam steps of 64 images."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveMaxPool2d(1),
        nn.Flatten(),
        nn.Linear(64, 10),
    )
    inputs = torch.tensor(x_train).permute(0, 3, 1, 2).float() / 255 - 0.5
    targets = torch.tensor(y_train)
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(steps):
        batch = torch.randint(0, len(inputs), (64,))
        loss = F.cross_entropy(net(inputs[batch]), targets[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        val_inputs = torch.tensor(x_val).permute(0, 3, 1, 2).float() / 255 - 0.5
        return float((net(val_inputs).argmax(1).numpy() == y_val).mean())
