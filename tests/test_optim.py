"""resnet_core.optim: every schedule's formula, the paper's measured rules, linear scaling and the
no-decay parameter groups — each checked against numbers worked out by hand."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

from resnet_core.models import create_model
from resnet_core.optim import LRSchedule, build_optimizer, scaled_lr, set_lr

BASE = 0.1


def _schedule(kind: str, **options) -> LRSchedule:
    return LRSchedule(
        base_lr=BASE, kind=kind, total_steps=options.pop("total_steps", 100), **options
    )


def test_multistep_divides_at_each_milestone_and_not_before():
    schedule = _schedule("multistep", milestones=(30, 60), gamma=0.1)
    assert schedule.lr(0) == BASE
    assert schedule.lr(29) == BASE
    assert schedule.lr(30) == pytest.approx(BASE * 0.1)
    assert schedule.lr(59) == pytest.approx(BASE * 0.1)
    assert schedule.lr(60) == pytest.approx(BASE * 0.01)
    assert schedule.lr(99) == pytest.approx(BASE * 0.01)
    floored = _schedule("multistep", milestones=(10, 20), gamma=0.1, min_lr=0.005)
    assert floored.lr(25) == 0.005  # 0.001 would be below the floor


def test_constant_stays_at_the_base_rate():
    schedule = _schedule("constant", milestones=(10,))
    assert {schedule.lr(step) for step in (0, 10, 50, 99)} == {BASE}


def test_linear_warmup_rises_from_a_tenth_to_the_base_rate():
    """Goyal et al. §2.2: linear from warmup_start_factor x base at step 0 to base at the end."""
    schedule = _schedule("constant", warmup_steps=10)
    assert schedule.lr(0) == pytest.approx(0.1 * BASE)
    assert schedule.lr(5) == pytest.approx(0.55 * BASE)
    assert schedule.lr(9) == pytest.approx(0.91 * BASE)
    assert schedule.lr(10) == BASE
    rates = [schedule.lr(step) for step in range(11)]
    steps = {round(b - a, 12) for a, b in itertools.pairwise(rates)}
    assert steps == {round(0.09 * BASE, 12)}  # equal increments: a straight line


def test_cosine_ends_at_min_lr_and_is_half_way_at_the_midpoint():
    schedule = _schedule("cosine", total_steps=100)
    assert schedule.lr(0) == BASE
    assert schedule.lr(50) == pytest.approx(BASE / 2)
    assert schedule.lr(25) == pytest.approx(BASE * (1 + math.cos(math.pi / 4)) / 2)
    assert schedule.lr(100) == pytest.approx(0.0, abs=1e-15)
    assert schedule.lr(150) == pytest.approx(0.0, abs=1e-15)  # past the end: stays at the end
    with_floor = _schedule("cosine", total_steps=100, min_lr=0.01)
    assert with_floor.lr(100) == pytest.approx(0.01)
    assert with_floor.lr(50) == pytest.approx(0.01 + (BASE - 0.01) / 2)


def test_cosine_after_warmup_starts_its_curve_where_the_warmup_ends():
    schedule = _schedule("cosine", total_steps=110, warmup_steps=10)
    assert schedule.lr(10) == BASE
    assert schedule.lr(60) == pytest.approx(BASE / 2)  # half of the 100 post-warm-up steps
    assert schedule.lr(110) == pytest.approx(0.0, abs=1e-15)


def test_plateau_divides_after_patience_evaluations_without_gain():
    """§3.4: divided by 10 when the error plateaus; a gain below the threshold is none."""
    schedule = _schedule("plateau", plateau_patience=3, gamma=0.1, plateau_threshold=1e-3)
    schedule.observe_val_error(0.50)  # first evaluation: the best so far
    for error in (0.50, 0.4995):  # no gain, then a gain smaller than the threshold
        schedule.observe_val_error(error)
        assert schedule.lr(0) == BASE
    schedule.observe_val_error(0.51)  # the third evaluation without gain
    assert schedule.lr(0) == pytest.approx(BASE * 0.1)
    assert schedule.evals_since_best == 0  # patience starts again after a drop
    schedule.observe_val_error(0.30)  # a real gain resets the count ...
    for error in (0.31, 0.32):
        schedule.observe_val_error(error)
    assert schedule.lr(0) == pytest.approx(BASE * 0.1)  # ... so no second drop yet
    schedule.observe_val_error(0.33)
    assert schedule.lr(0) == pytest.approx(BASE * 0.01)
    assert schedule.plateau_drops == 2


def test_only_the_plateau_kind_reacts_to_the_validation_error():
    schedule = _schedule("multistep", milestones=(50,), plateau_patience=1)
    for error in (0.5, 0.6, 0.7, 0.8):
        schedule.observe_val_error(error)
    assert schedule.lr(10) == BASE
    assert schedule.plateau_drops == 0


def test_resnet110_holds_until_the_training_error_is_below_80_percent():
    """§4.2: 0.01 until the training error is below 80%, then back to 0.1, for good."""
    schedule = _schedule("multistep", milestones=(50,), hold_lr=0.01, hold_until_train_error=0.8)
    assert schedule.lr(0) == 0.01
    schedule.observe_train_error(0.85)
    schedule.observe_train_error(0.80)  # not below
    assert schedule.lr(5) == 0.01
    schedule.observe_train_error(0.79)
    assert schedule.lr(5) == BASE
    schedule.observe_train_error(0.95)  # the hold does not come back
    assert schedule.lr(6) == BASE
    assert schedule.lr(50) == pytest.approx(BASE * 0.1)


def test_state_dict_continues_the_same_curve():
    schedule = _schedule("plateau", plateau_patience=1, hold_lr=0.01, hold_until_train_error=0.8)
    schedule.observe_train_error(0.5)
    schedule.observe_val_error(0.4)
    schedule.observe_val_error(0.45)
    resumed = _schedule("plateau", plateau_patience=1, hold_lr=0.01, hold_until_train_error=0.8)
    assert resumed.lr(0) == 0.01  # a fresh schedule holds ...
    resumed.load_state_dict(schedule.state_dict())
    assert resumed.lr(0) == schedule.lr(0) == pytest.approx(BASE * 0.1)  # ... a resumed one not
    assert resumed.best_val_error == 0.4


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"kind": "linear"}, "schedule kind 'linear' is unknown"),
        ({"base_lr": 0.0}, "base lr 0.0 must be positive"),
        ({"total_steps": 0}, "total_steps 0 must be positive"),
        ({"hold_lr": 0.01}, "hold_lr and hold_until_train_error go together"),
    ],
)
def test_bad_schedules_name_the_value(options, message):
    values = {"base_lr": BASE, "kind": "cosine", "total_steps": 10, **options}
    with pytest.raises(ValueError, match=message):
        LRSchedule(**values)


def test_linear_scaling_rule():
    """Goyal et al. §2.1: lr grows with the global batch from the reference batch's lr."""
    assert scaled_lr(0.1, 1024, 256) == pytest.approx(0.4)
    assert scaled_lr(0.1, 64, 256) == pytest.approx(0.025)
    assert scaled_lr(0.1, 1024, None) == 0.1


def _one_step_with_zero_gradients(decay_norm_and_bias: bool) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    model = create_model("resnet8")
    before = create_model("resnet8")
    before.load_state_dict(model.state_dict())
    optimizer = build_optimizer(
        model, lr=0.5, momentum=0.9, weight_decay=0.1, decay_norm_and_bias=decay_norm_and_bias
    )
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    return model, before


def test_no_decay_on_batch_norm_and_biases_when_asked():
    """With zero gradients a step is pure weight decay: w <- w (1 - lr wd) on decayed weights."""
    model, before = _one_step_with_zero_gradients(decay_norm_and_bias=False)
    shrink = 1 - 0.5 * 0.1
    assert torch.allclose(model.conv1.weight, before.conv1.weight * shrink)
    assert torch.allclose(model.fc.weight, before.fc.weight * shrink)
    assert torch.equal(model.bn1.weight, before.bn1.weight)
    assert torch.equal(model.fc.bias, before.fc.bias)
    decayed, _ = _one_step_with_zero_gradients(decay_norm_and_bias=True)
    assert torch.allclose(decayed.bn1.weight, before.bn1.weight * shrink)  # the paper decays all
    assert torch.allclose(decayed.fc.bias, before.fc.bias * shrink)


def test_no_decay_groups_cover_every_parameter_once():
    model = create_model("resnet8")
    optimizer = build_optimizer(
        model, lr=0.1, momentum=0.9, weight_decay=1e-4, decay_norm_and_bias=False
    )
    decay, no_decay = optimizer.param_groups
    assert no_decay["weight_decay"] == 0.0
    assert decay["weight_decay"] == 1e-4
    assert all(p.ndim > 1 for p in decay["params"])
    assert all(p.ndim <= 1 for p in no_decay["params"])
    ids = [id(p) for g in optimizer.param_groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())


def test_set_lr_writes_every_group():
    optimizer = build_optimizer(
        create_model("resnet8"), lr=0.1, momentum=0.9, weight_decay=0, decay_norm_and_bias=False
    )
    set_lr(optimizer, 0.02)
    assert [g["lr"] for g in optimizer.param_groups] == [0.02, 0.02]


# ---------------------------------------------------------------------------------------------
# How the update runs over the parameters (optim.implementation)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["sgd", "adamw"])
@pytest.mark.parametrize(
    ("implementation", "fused", "foreach"),
    [
        ("fused", True, None),
        ("foreach", None, True),
        ("for-loop", None, False),
        ("auto", None, None),
    ],
)
def test_the_implementation_reaches_torchs_optimizer(name, implementation, fused, foreach):
    model = create_model("resnet8", num_classes=10)
    optimizer = build_optimizer(
        model, name, lr=0.1, weight_decay=1e-4, implementation=implementation
    )
    # auto on a CPU: torch's own choice (neither asked for); fused is what auto picks on CUDA.
    assert (optimizer.defaults["fused"], optimizer.defaults["foreach"]) == (fused, foreach)


def test_auto_is_fused_on_cuda_and_torchs_default_elsewhere():
    from resnet_core.optim import kernel_options

    assert kernel_options("auto", torch.device("cuda")) == {"fused": True}
    assert kernel_options("auto", torch.device("cpu")) == {}
    assert kernel_options("for-loop", torch.device("cuda")) == {"foreach": False}
    with pytest.raises(ValueError, match="implementation 'fast' is unknown"):
        kernel_options("fast", torch.device("cpu"))


@pytest.mark.parametrize(
    ("name", "options"),
    [("sgd", {"momentum": 0.9, "nesterov": True}), ("adamw", {"betas": (0.9, 0.99)})],
)
def test_fused_foreach_and_for_loop_take_the_same_steps(name, options):
    """The kernels differ, the arithmetic does not: three steps of a BatchNorm net's parameters
    (weights decayed, norms and biases not) end at the same weights within float rounding (a
    step moves a weight by up to the learning rate, 5e-2; the tolerance is 1e-5). The gradients
    are the same seeded tensors for every implementation: a multithreaded backward may sum in
    another order under load, and Adam magnifies that rounding where a gradient is near 0."""
    weights = {}
    for implementation in ("for-loop", "foreach", "fused"):
        torch.manual_seed(0)
        model = create_model("resnet8", num_classes=10)
        start = model.conv1.weight.detach().clone()
        optimizer = build_optimizer(
            model, name, lr=0.05, weight_decay=1e-3, decay_norm_and_bias=False,
            implementation=implementation, **options,
        )  # fmt: skip
        grads = torch.Generator().manual_seed(1)
        for _ in range(3):
            for p in model.parameters():
                p.grad = torch.randn(p.shape, generator=grads) * 0.1
            optimizer.step()
        weights[implementation] = [p.detach().clone() for p in model.parameters()]
    assert (weights["for-loop"][0] - start).abs().max() > 1e-3  # the steps moved the weights
    for implementation in ("foreach", "fused"):
        for a, b in zip(weights["for-loop"], weights[implementation], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["lars", "lamb"])
def test_lars_and_lamb_have_one_implementation(name):
    model = create_model("resnet8", num_classes=10)
    assert build_optimizer(model, name, lr=0.1, weight_decay=0.0, implementation="auto")
    with pytest.raises(ValueError, match=f"optimizer '{name}' has one implementation"):
        build_optimizer(model, name, lr=0.1, weight_decay=0.0, implementation="fused")


@pytest.mark.gpu
def test_auto_runs_fused_on_a_cuda_model():
    model = create_model("resnet8", num_classes=10).cuda()
    optimizer = build_optimizer(model, "sgd", lr=0.1, weight_decay=1e-4)
    assert optimizer.defaults["fused"] is True
