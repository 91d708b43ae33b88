"""Fine-tuning's initial weights: local state dicts (safetensors, torch files, wrapped or not),
torchvision's weights through its own API and cache (offline: the error says where the file
goes), a new head for another number of classes, and the checks before a run starts."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torchvision

from pipelines.config import ConfigError, apply_overrides, validate
from pipelines.job import checks
from pipelines.job.cli import resolve_config
from pipelines.job.freeze import FreezeBackbone
from pipelines.job.parts import make_optimizer
from pipelines.recipes import build_recipe
from resnet_core.checkpoint import save_weights
from resnet_core.models import create_model
from resnet_core.optim import set_lr
from resnet_core.pretrained import InitWeightsError, apply_init, load_init_weights
from resnet_core.step import TrainStep
from resnet_core.transforms import Normalize

TV_RESNET18 = "ResNet18_Weights.IMAGENET1K_V1"


def _net(classes: int = 10, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_model("resnet8", num_classes=classes)


def _equal(a: dict, b: dict, keys) -> bool:
    return all(torch.equal(a[k], b[k]) for k in keys)


def test_local_state_dicts_load_in_every_common_layout(tmp_path):
    state = _net().state_dict()
    save_weights(tmp_path / "w.safetensors", state)
    torch.save(state, tmp_path / "plain.pt")
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "ddp.pth")
    for name in ("w.safetensors", "plain.pt", "ddp.pth"):
        loaded = load_init_weights(str(tmp_path / name))
        assert loaded.keys() == state.keys()
        assert _equal(loaded, state, state)


def test_a_file_with_pickled_code_or_no_tensors_is_refused(tmp_path):
    torch.save({"net": Path("x")}, tmp_path / "code.pt")  # a pickled object, not a tensor
    with pytest.raises(InitWeightsError, match="do not load as a state dict"):
        load_init_weights(str(tmp_path / "code.pt"))
    with pytest.raises(InitWeightsError, match=r"no such file; pass a \.safetensors or \.pt"):
        load_init_weights(str(tmp_path / "missing.pt"))


def test_the_head_is_reset_for_another_number_of_classes_and_only_with_reset_head():
    pretrained = _net(classes=10, seed=1).state_dict()
    model = _net(classes=4, seed=2)
    fresh_head = model.fc.weight.detach().clone()
    with pytest.raises(InitWeightsError, match=r"fc.weight \(10, 64\) vs \(4, 64\).*--reset-head"):
        apply_init(model, pretrained, reset_head=False)
    apply_init(model, pretrained, reset_head=True)
    state = model.state_dict()
    assert _equal(state, pretrained, [k for k in state if not k.startswith("fc.")])
    assert torch.equal(model.fc.weight, fresh_head)
    with pytest.raises(InitWeightsError, match="pick the model these weights were trained for"):
        apply_init(create_model("resnet20", num_classes=4), pretrained, reset_head=True)


def test_torchvision_weights_come_through_torchvisions_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    weights = torchvision.models.get_weight(TV_RESNET18)
    cached = tmp_path / "hub" / "checkpoints" / Path(weights.url).name
    cached.parent.mkdir(parents=True)
    state = torchvision.models.resnet18().state_dict()  # stands in for the published file
    torch.save(state, cached)
    loaded = load_init_weights(f"torchvision:{TV_RESNET18}")
    assert _equal(loaded, state, state)
    model = create_model("resnet18", num_classes=3)
    apply_init(model, loaded, reset_head=True)  # torchvision's keys are ours
    assert torch.equal(model.conv1.weight, state["conv1.weight"])


def test_offline_torchvision_weights_say_where_the_file_goes(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setenv("https_proxy", "http://127.0.0.1:9")  # no network: nothing answers
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    cached = tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    with pytest.raises(InitWeightsError) as error:
        load_init_weights(f"torchvision:{TV_RESNET18}")
    assert f"put that file at {cached}" in str(error.value)
    with pytest.raises(InitWeightsError, match="are unknown; use an enum value"):
        load_init_weights("torchvision:ResNet50_Weights.BEST")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.reset_head=true"], "model.reset_head=true needs initial weights: pass --init"),
        (["train.freeze_backbone_epochs=2"], "train.freeze_backbone_epochs freezes pretrained"),
        (
            ["model.name=resnet50", "model.init=torchvision:ResNet50_Weights.IMAGENET1K_V2"],
            "torchvision's resnet50 weights are v1.5 (stride on the 3x3 conv): set",
        ),
    ],
)
def test_bad_init_settings_are_one_line_errors(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate(apply_overrides(build_recipe("demo"), overrides))


def test_finetune_recipe_starts_from_torchvision_resnet50_v2():
    config = build_recipe("finetune")
    m, d = config.model, config.data
    assert (m.name, m.init, m.reset_head, m.stride_in_3x3) == (
        "resnet50",
        "torchvision:ResNet50_Weights.IMAGENET1K_V2",
        True,
        True,
    )
    assert (d.mean, d.normalize_std, d.image_size, d.eval_resize) == ("imagenet", True, 224, 232)
    validate(config)


def test_a_local_init_path_is_made_absolute_for_the_workers(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = resolve_config("demo", None, ["model.init=weights/w.safetensors"])
    assert config.model.init == str(tmp_path / "weights" / "w.safetensors")
    tv = resolve_config("demo", None, [f"model.init=torchvision:{TV_RESNET18}"])
    assert tv.model.init == f"torchvision:{TV_RESNET18}"


def test_the_pre_start_check_loads_the_weights_into_the_model_for_the_datasets_classes(tmp_path):
    config = build_recipe("demo")
    save_weights(tmp_path / "w.safetensors", _net(classes=7).state_dict())
    manifest = type("Manifest", (), {"num_classes": 4})()  # check_init reads the class count
    bad = dataclasses.replace(config.model, init=str(tmp_path / "w.safetensors"))
    with pytest.raises(ConfigError, match=r"model\.init: init weights do not fit the model"):
        checks.check_init(dataclasses.replace(config, model=bad), manifest)
    good = dataclasses.replace(bad, reset_head=True)
    checks.check_init(dataclasses.replace(config, model=good), manifest)


def test_a_frozen_backbone_keeps_weights_and_statistics_while_the_head_learns():
    """Epoch 1 frozen: only fc moves (BatchNorm statistics too stay); epoch 2: all of it."""
    config = apply_overrides(
        build_recipe("demo"),
        ["model.init=w.safetensors", "model.reset_head=true", "train.freeze_backbone_epochs=1"],
    )
    validate(config)
    model = _net(classes=4)
    optimizer = make_optimizer(model, config)
    assert [g["backbone"] for g in optimizer.param_groups] == [True, False]
    step = TrainStep(model, optimizer, torch.nn.CrossEntropyLoss(), Normalize(torch.zeros(3)))
    runner = SimpleNamespace(  # what FreezeBackbone reads of the runner
        epoch=0, config=config, training=SimpleNamespace(optimizer=optimizer, model=model)
    )
    images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    labels = torch.arange(8) % 4

    def train_step(epoch: int) -> tuple[dict, dict]:
        runner.epoch = epoch
        before = {k: v.clone() for k, v in model.state_dict().items()}
        model.train()
        FreezeBackbone().before_step(runner)
        set_lr(optimizer, 0.1)  # what the schedule does next
        step(images, labels)
        return before, model.state_dict()

    before, after = train_step(0)
    moved = {k for k in after if not torch.equal(before[k], after[k])}
    assert moved == {"fc.weight", "fc.bias"}
    before, after = train_step(1)
    moved = {k for k in after if not torch.equal(before[k], after[k])}
    assert {"conv1.weight", "bn1.running_mean", "fc.weight"} <= moved
