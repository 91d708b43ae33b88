"""The training toolbox inside one step and its parts, without Ray: gradient accumulation (DDP
syncs once), clipping, the fp16 gradient scaler, MixUp/CutMix with soft targets, the optimizers,
the EMA's decay rule, and the config values that refuse bad input."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.distributed as dist
from timm.optim import Lamb, Lars
from torch import nn

from pipelines.config import ConfigError, apply_overrides, flatten, validate
from pipelines.evaluate import resolve_protocol
from pipelines.job.ema import ema_decay
from pipelines.job.parts import batch_transforms, decode_options, make_optimizer
from pipelines.job.session import free_loopback_port
from pipelines.recipes import build_recipe
from resnet_core.export import OnnxModel, export_onnx
from resnet_core.models import create_model
from resnet_core.optim import build_optimizer
from resnet_core.step import TrainStep, autocast_dtype
from resnet_core.transforms import Normalize

CLASSES = 5


def _linear() -> nn.Module:
    """No BatchNorm: a batch split in micro-batches gives the very same gradients."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, CLASSES))


def _batch(n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8, generator=generator)
    return images, torch.arange(n) % CLASSES


def _step(model: nn.Module, lr: float = 0.5, **options) -> TrainStep:
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    normalize = Normalize(torch.full((3,), 0.5))
    return TrainStep(model, optimizer, nn.CrossEntropyLoss(), normalize, **options)


def _config(*overrides: str):
    return apply_overrides(build_recipe("demo"), list(overrides))


# ---------------------------------------------------------------------------------------------
# Accumulation, clipping, precision
# ---------------------------------------------------------------------------------------------


def test_accumulation_runs_micro_batches_and_takes_the_whole_batchs_step():
    whole, parts = _linear(), _linear()
    sizes = []
    parts.register_forward_hook(lambda module, args, out: sizes.append(len(args[0])))
    images, labels = _batch(8)
    one = _step(whole)(images, labels)
    four = _step(parts, accumulate=4)(images, labels)
    assert sizes == [2, 2, 2, 2]  # four forwards of a quarter batch each
    for a, b in zip(whole.parameters(), parts.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    torch.testing.assert_close(one.loss, four.loss, rtol=0, atol=1e-6)
    assert four.logits.shape == (8, CLASSES)


@pytest.fixture
def process_group():
    """A one-process gloo group, so DDP runs for real."""
    port = free_loopback_port()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_accumulation_all_reduces_gradients_on_the_last_micro_batch_only(process_group):
    model = nn.parallel.DistributedDataParallel(_linear())
    reduced = []

    def count(state, bucket):
        reduced.append(bucket.index())
        future = torch.futures.Future()
        future.set_result(bucket.buffer())
        return future

    model.register_comm_hook(None, count)
    _step(model, accumulate=4)(*_batch(8))
    assert reduced == [0]  # one bucket, reduced once for four backward passes


def test_clipping_bounds_the_gradient_norm_of_the_step():
    model = _linear()
    before = [p.detach().clone() for p in model.parameters()]
    _step(model, lr=1.0, clip_grad_norm=1e-3)(*_batch())
    moved = torch.cat([(p - b).flatten() for p, b in zip(model.parameters(), before, strict=True)])
    assert moved.norm().item() == pytest.approx(1e-3, rel=1e-4)  # plain SGD: lr × clipped grad


def test_fp16_scales_the_loss_and_skips_a_step_whose_gradients_overflow():
    model = _linear()
    step = _step(model, dtype=torch.float16)
    assert step.scaler.is_enabled()
    step(*_batch())  # a normal step moves the weights
    before = [p.detach().clone() for p in model.parameters()]
    scale = step.scaler.get_scale()
    step.criterion = lambda logits, targets: nn.functional.cross_entropy(logits, targets) * 1e38
    step(*_batch())
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
    assert step.scaler.get_scale() == scale / 2
    restored = _step(_linear(), dtype=torch.float16)
    restored.load_state_dict(step.state_dict())
    assert restored.scaler.get_scale() == scale / 2


def test_precision_auto_picks_bf16_where_the_gpu_has_it_else_fp16(monkeypatch):
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert autocast_dtype("auto", cuda) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)  # V100, T4
    assert autocast_dtype("auto", cuda) == torch.float16
    assert autocast_dtype("auto", torch.device("cpu")) is None
    assert autocast_dtype("fp16", torch.device("cpu")) == torch.float16
    assert _step(_linear()).scaler.is_enabled() is False


# ---------------------------------------------------------------------------------------------
# MixUp / CutMix
# ---------------------------------------------------------------------------------------------


def test_mixup_trains_on_soft_targets_and_measures_accuracy_against_the_dominant_label():
    seen = []

    def criterion(logits, targets):
        seen.append(targets)
        return nn.functional.cross_entropy(logits, targets)

    config = _config("data.mixup_alpha=0.4")
    step = _step(_linear(), batch_transforms=batch_transforms(config, CLASSES))
    step.criterion = criterion
    images, labels = _batch()
    result = step(images, labels)
    (targets,) = seen
    assert targets.shape == (8, CLASSES)
    torch.testing.assert_close(targets.sum(dim=1), torch.ones(8))
    assert torch.equal(result.labels, targets.argmax(dim=1))
    lam = targets[0, labels[0]].item()  # MixUp: one λ for the batch, each row blends two images
    assert 0 < lam < 1
    assert not batch_transforms(_config(), CLASSES)


def test_cutmix_pastes_a_box_and_the_switch_probability_picks_it():
    (mix,) = batch_transforms(_config("data.mixup_alpha=0.2", "data.cutmix_alpha=1.0"), CLASSES)
    always_cutmix = _config(
        "data.mixup_alpha=0.2", "data.cutmix_alpha=1.0", "data.mix_switch_prob=1"
    )
    (cutmix,) = batch_transforms(always_cutmix, CLASSES)
    x = torch.randn(8, 3, 16, 16)
    labels = torch.arange(8) % CLASSES
    for _ in range(5):
        mixed, _ = cutmix(x, labels)
        from_first = mixed == x
        from_second = mixed == x.roll(1, 0)
        assert bool((from_first | from_second).all())  # every pixel copied, none blended
    blended = 0
    for _ in range(20):
        mixed, _ = mix(x, labels)
        blended += not bool(((mixed == x) | (mixed == x.roll(1, 0))).all())
    assert 0 < blended < 20  # both kinds chosen at p = 0.5


# ---------------------------------------------------------------------------------------------
# Optimizers
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "kind"),
    [("sgd", torch.optim.SGD), ("adamw", torch.optim.AdamW), ("lars", Lars), ("lamb", Lamb)],
)
def test_each_optimizer_is_the_library_one_and_trains(name, kind):
    config = _config(f"optim.name={name}", "optim.decay_norm_and_bias=false", "optim.lr=0.01")
    model = _linear()
    optimizer = make_optimizer(model, config)
    assert type(optimizer) is kind
    assert [g["weight_decay"] for g in optimizer.param_groups] == [config.optim.weight_decay, 0.0]
    before = [p.detach().clone() for p in model.parameters()]
    step = TrainStep(model, optimizer, nn.CrossEntropyLoss(), Normalize(torch.full((3,), 0.5)))
    step(*_batch())
    assert all(not torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))


def test_adamw_decay_is_decoupled_from_the_gradient():
    model = nn.Linear(2, 1, bias=False)
    nn.init.constant_(model.weight, 1.0)
    optimizer = build_optimizer(model, "adamw", lr=0.1, weight_decay=0.5)
    model.weight.grad = torch.zeros_like(model.weight)  # no gradient: decay alone moves it
    optimizer.step()
    torch.testing.assert_close(model.weight, torch.full((1, 2), 1 - 0.1 * 0.5))


# ---------------------------------------------------------------------------------------------
# EMA and the config
# ---------------------------------------------------------------------------------------------


def test_ema_decay_follows_torchvisions_adjustment():
    # torchvision's ResNet-50 V2 recipe: 8 GPUs x 128, EMA every 32 steps, decay 0.99998, 600
    # epochs: alpha = (1 - 0.99998) * 1024 * 32 / 600.
    config = _config(
        "train.global_batch=1024", "train.ema_steps=32", "train.ema_decay=0.99998",
        "train.epochs=600",
    )  # fmt: skip
    assert ema_decay(config) == pytest.approx(1 - 0.00002 * 1024 * 32 / 600)
    fast = dataclasses.replace(config, train=dataclasses.replace(config.train, ema_decay=0.9))
    assert ema_decay(fast) == 0.0  # alpha capped at 1: the average is the latest weights


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.accumulate_steps=0"], "train.accumulate_steps=0 must be >= 1"),
        (
            ["train.global_batch=128", "scale.num_workers=2", "train.accumulate_steps=3"],
            "train.accumulate_steps=3 does not divide the batch of each worker (64",
        ),
        (["train.clip_grad_norm=0"], "train.clip_grad_norm=0.0 must be positive"),
        (["train.ema_decay=1"], "train.ema_decay=1.0 must be in (0, 1)"),
        (["train.ema_steps=0"], "train.ema_steps=0 must be >= 1"),
        (["train.precision=fp16"], "train.precision=fp16 needs scale.use_gpu=true"),
        (["data.mixup_alpha=-1"], "data.mixup_alpha=-1.0 must be >= 0"),
        (["data.mix_switch_prob=2"], "data.mix_switch_prob=2.0 must be in [0, 1]"),
        (["optim.name=adam"], "optim.name='adam'; use one of: sgd, adamw, lars, lamb"),
        (["optim.betas=0.9"], "optim.betas=(0.9,) must be two values in [0, 1)"),
        (["optim.eps=0"], "optim.eps=0.0 must be positive"),
        (["data.auto_augment=rand"], "data.auto_augment='rand'; use one of: ra, ta_wide,"),
        (["data.ra_magnitude=31"], "data.ra_magnitude=31 must be in [0, 30]"),
        (["data.augmix_severity=0"], "data.augmix_severity=0 must be in [1, 10]"),
        (["data.random_erase=1.5"], "data.random_erase=1.5 must be in [0, 1]"),
        (
            ["data.augment=paper", "data.decode_device=device", "data.random_erase=0.1"],
            "data.auto_augment and data.random_erase run in the decode tasks",
        ),
        (["data.eval_image_size=40"], "data.eval_resize=32 must be >= the evaluation crop (40"),
        (["data.min_image_size=48"], "data.min_image_size=48 must be in [32, data.image_size=32]"),
        (
            ["data.min_image_size=32", "data.ramp_end_epoch=2"],
            "data.min_image_size resizes crops; data.augment='cifar' reads images whole",
        ),
        (["data.min_image_size=32"], "data.ramp_start_epoch=0 must be >= 0 and before"),
        (["data.repeated_augment=0"], "data.repeated_augment=0 must be >= 1 (1: off)"),
        (["optim.name=adamw", "optim.nesterov=true"], "optim.nesterov=true applies to sgd"),
    ],
)
def test_bad_toolbox_values_are_one_line_errors(overrides, message):
    with pytest.raises(ConfigError) as error:
        validate(_config(*overrides))
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_fixres_evaluates_at_its_own_crop_size():
    """Train on 32 px crops, validate (and resnet-eval, and serve) at 40 after resizing to 46."""
    config = _config("data.eval_image_size=40", "data.eval_resize=46")
    validate(config)
    manifest = SimpleNamespace(pixel_mean_rgb=(0.5, 0.5, 0.5))  # read for erasing colours only
    config = dataclasses.replace(config, data=dataclasses.replace(config.data, mean="per_channel"))
    cpu = torch.device("cpu")
    train = decode_options(config, manifest, mode=config.data.augment, device=cpu)
    val = decode_options(config, manifest, mode="eval_center", device=cpu)
    assert (train.image_size, val.image_size, val.eval_resize) == (32, 40, 46)
    args = SimpleNamespace(eval_resize=None, scales=None)
    assert resolve_protocol(args, config).image_size == 40


def test_the_onnx_export_gives_pytorchs_logits_for_any_batch_and_layout(tmp_path):
    served = nn.Sequential(Normalize(torch.rand(3, 32, 32), torch.full((3,), 0.25)), _net32())
    served.eval()
    example = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    assert export_onnx(served, example, tmp_path / "model.onnx") < 1e-4
    onnx = OnnxModel(tmp_path / "model.onnx")
    images = torch.randint(0, 256, (5, 32, 32, 3), dtype=torch.uint8)
    with torch.no_grad():
        expected = served(images)
    torch.testing.assert_close(onnx(images), expected, rtol=0, atol=1e-4)
    torch.testing.assert_close(onnx(images.permute(0, 3, 1, 2)), expected, rtol=0, atol=1e-4)


def _net32() -> nn.Module:
    torch.manual_seed(0)
    return create_model("resnet8", num_classes=CLASSES)


def test_progressive_resizing_ramps_crop_sizes_as_ffcv_does():
    # FFCV's ResNet-50 (16 epochs): 160 px until epoch 11, 192 from epoch 13, steps of 32.
    config = _config(
        "data.augment=inception", "data.image_size=192", "data.eval_resize=224",
        "data.min_image_size=160", "data.ramp_start_epoch=11", "data.ramp_end_epoch=13",
        "data.mean=per_channel",
    )  # fmt: skip
    validate(config)
    sizes = [config.data.train_size(epoch) for epoch in range(16)]
    assert sizes == [160] * 12 + [160, 192, 192, 192]  # 176 at epoch 12 rounds down to 160
    finer = dataclasses.replace(config, data=dataclasses.replace(config.data, size_step=16))
    assert [finer.data.train_size(e) for e in (11, 12, 13)] == [160, 176, 192]
    manifest = SimpleNamespace(pixel_mean_rgb=(0.5, 0.5, 0.5))
    cpu = torch.device("cpu")
    assert decode_options(finer, manifest, mode="inception", device=cpu, epoch=12).image_size == 176
    assert (
        decode_options(finer, manifest, mode="eval_center", device=cpu, epoch=0).image_size == 192
    )


def test_imagenet_tv2_is_torchvisions_resnet50_v2_recipe_flag_for_flag():
    config = build_recipe("imagenet-tv2")
    validate(config)
    flat = flatten(config)
    torchvision_flags = {  # train.py flag: (our key, value)
        "--model resnet50": ("model.name", "resnet50"),
        "--batch-size 128 x 8 GPUs": ("train.global_batch", 1024),
        "--lr 0.5": ("optim.lr", 0.5),
        "--lr-scheduler cosineannealinglr": ("schedule.kind", "cosine"),
        "--lr-warmup-epochs 5": ("schedule.warmup_epochs", 5),
        "--lr-warmup-decay 0.01 (default)": ("schedule.warmup_start_factor", 0.01),
        "--auto-augment ta_wide": ("data.auto_augment", "ta_wide"),
        "--epochs 600": ("train.epochs", 600),
        "--random-erase 0.1": ("data.random_erase", 0.1),
        "--weight-decay 0.00002": ("optim.weight_decay", 2e-5),
        "--norm-weight-decay 0.0": ("optim.decay_norm_and_bias", False),
        "--label-smoothing 0.1": ("optim.label_smoothing", 0.1),
        "--mixup-alpha 0.2": ("data.mixup_alpha", 0.2),
        "--cutmix-alpha 1.0": ("data.cutmix_alpha", 1.0),
        "--train-crop-size 176": ("data.image_size", 176),
        "--val-crop-size 224 (default)": ("data.eval_image_size", 224),
        "--val-resize-size 232": ("data.eval_resize", 232),
        "--model-ema": ("train.ema", True),
        "--model-ema-steps 32 (default)": ("train.ema_steps", 32),
        "--model-ema-decay 0.99998 (default)": ("train.ema_decay", 0.99998),
        "--ra-sampler --ra-reps 4": ("data.repeated_augment", 4),
        "--momentum 0.9 (default)": ("optim.momentum", 0.9),
        "no --amp": ("train.precision", "fp32"),
        "v1.5 bottlenecks (torchvision's ResNet-50)": ("model.stride_in_3x3", True),
        "RandomResizedCrop + flip": ("data.augment", "inception"),
        "ImageNet mean and std": ("data.mean", "imagenet"),
    }
    assert {flag: flat[key] for flag, (key, _) in torchvision_flags.items()} == {
        flag: value for flag, (_, value) in torchvision_flags.items()
    }
    assert flat["data.normalize_std"] is True
    assert flat["optim.name"] == "sgd"


def test_the_per_image_policies_and_the_optimizers_settings_come_from_the_config():
    config = _config(
        "data.auto_augment=ra", "data.ra_magnitude=12", "data.augmix_severity=5",
        "data.random_erase=0.3", "data.mean=imagenet", "optim.name=adamw",
        "optim.betas=0.8,0.99", "optim.eps=1e-6",
    )  # fmt: skip
    manifest = SimpleNamespace()  # the ImageNet constants need nothing from it
    augment = decode_options(config, manifest, mode="cifar", device=torch.device("cpu")).augment
    assert (augment.policy, augment.magnitude, augment.severity, augment.erase_p) == (
        "ra", 12, 5, 0.3,
    )  # fmt: skip
    assert augment.erase_value == (124, 116, 104)  # ImageNet's mean colour, 0..255
    optimizer = make_optimizer(_linear(), config)
    assert (optimizer.defaults["betas"], optimizer.defaults["eps"]) == ((0.8, 0.99), 1e-6)
