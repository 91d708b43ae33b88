"""The training step's GPU-speed levers on a CPU: when the step compiles and what its compiled
region holds (normalisation, model and loss in one graph without breaks), that the compiled
step trains as the eager one, that no value is read back to the host inside a step (and, where
CUDA exists, that a step never waits for the device), the optimizer kernels and the config
values that turn them on."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from pipelines.config import ConfigError, apply_overrides, validate
from pipelines.job.parts import build_training
from pipelines.job.runner import EpochMetrics, Window
from pipelines.manifest import Manifest, ShardInfo, SplitInfo
from pipelines.recipes import build_recipe
from resnet_core.models import create_model
from resnet_core.optim import build_optimizer
from resnet_core.step import TrainStep, compile_mode_for
from resnet_core.transforms import Normalize

CLASSES = 5
CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def _batch(n: int = 8, size: int = 8, device: torch.device = CPU):
    generator = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8, generator=generator)
    return images.to(device), (torch.arange(n) % CLASSES).to(device)


def _small_net() -> nn.Module:
    """Convolution, BatchNorm (buffers the step mutates), classifier: the smallest net with
    what ResNets put in a compiled graph."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 6 * 6, CLASSES),
    )


def _manifest(train_rows: int = 512) -> Manifest:
    """A dataset's manifest as build_training reads it (classes, split sizes), without files."""
    split = SplitInfo(train_rows, (ShardInfo("train/shard.parquet", train_rows, 1, "0" * 64),))
    names = tuple(f"c{i}" for i in range(CLASSES))
    return Manifest(
        "/nowhere", "test", names, names, {"train": split, "val": split},
        None, 95, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), None, "0" * 64, {},
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# When the step compiles, and the config values
# ---------------------------------------------------------------------------------------------


def test_auto_compiles_on_cuda_only_and_true_compiles_anywhere():
    assert compile_mode_for("auto", "default", CUDA) == "default"
    assert compile_mode_for("auto", "reduce-overhead", CPU) is None
    assert compile_mode_for(True, "reduce-overhead", CPU) == "reduce-overhead"
    assert compile_mode_for(False, "default", CUDA) is None
    with pytest.raises(ValueError, match="compile='yes' is unknown"):
        compile_mode_for("yes", "default", CPU)


def test_the_recipes_turn_the_levers_on_for_gpus_and_a_cpu_run_stays_eager():
    for name in ("imagenet-paper", "imagenet-fast", "imagenet-tv2"):
        t = build_recipe(name).train
        assert (t.compile, t.compile_mode, t.channels_last) == ("auto", "default", True), name
        assert build_recipe(name).optim.implementation == "auto"
    for name in ("cifar-paper", "cifar-tutorial"):
        assert build_recipe(name).train.compile_mode == "reduce-overhead", name
    assert build_recipe("demo").train.compile is False
    assert build_recipe("finetune").train.compile is False
    cifar = ["model.name=resnet8", "data.mean=per_channel"]  # the manifest's, not a file's
    config = apply_overrides(build_recipe("cifar-paper"), cifar)
    assert config.train.compile == "auto"
    assert build_training(config, _manifest(), CPU).step.compile_mode is None  # auto on a CPU
    off = apply_overrides(config, ["train.compile=false"])
    assert off.train.compile is False


def test_the_job_passes_compile_and_optimizer_settings_to_the_step():
    config = apply_overrides(
        build_recipe("cifar-paper"),
        [
            "model.name=resnet8",
            "data.mean=per_channel",
            "train.compile=true",
            "optim.implementation=fused",
        ],
    )
    validate(config)
    training = build_training(config, _manifest(), CPU)  # builds the step; nothing compiles yet
    assert training.step.compile_mode == "reduce-overhead"
    assert training.step.forward_fn is not training.step.forward  # torch.compile's wrapper
    assert isinstance(training.model, type(create_model("resnet8")))  # the model stays eager
    assert training.optimizer.defaults["fused"] is True


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.compile=maybe"], "train.compile='maybe'; use one of: auto, true, false"),
        (["train.compile_mode=fast"], "train.compile_mode='fast'; use one of: default,"),
        (["optim.implementation=fast"], "optim.implementation='fast'; use one of: auto,"),
        (
            ["optim.name=lars", "optim.implementation=fused"],
            "optim.implementation=fused applies to sgd and adamw",
        ),
        (
            [
                "scale.use_gpu=true",
                "scale.num_workers=2",
                "train.compile=auto",
                "train.compile_mode=reduce-overhead",
            ],
            "train.compile_mode=reduce-overhead records CUDA graphs",
        ),
    ],
)
def test_bad_lever_values_stop_with_one_line(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate(apply_overrides(build_recipe("demo"), overrides))


def test_compile_takes_true_false_and_auto_from_the_command_line():
    for raw, value in (("auto", "auto"), ("true", True), ("off", False)):
        config = apply_overrides(build_recipe("demo"), [f"train.compile={raw}"])
        assert config.train.compile == value
        assert type(config.train.compile) is type(value)
        validate(config)


def test_a_run_started_eager_resumes_compiled(tmp_path, monkeypatch):
    """Compiling and the optimizer's kernels change how fast a step runs, not what it computes:
    a run started before the recipes compiled (train.compile=false) resumes with them on."""
    from mlflow.tracking import MlflowClient

    from pipelines import tracking
    from pipelines.config import flatten
    from pipelines.job.checks import check_resumable

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    before = apply_overrides(build_recipe("cifar-paper"), ["train.compile=false"])
    client = MlflowClient(tracking_uri=uri)
    experiment = tracking.ensure_experiment(client, before.run.experiment, uri)
    run_id, _ = tracking.find_or_create_run(client, experiment, before.run_name)
    tracking.log_params_once(client, run_id, flatten(before))
    check_resumable(build_recipe("cifar-paper"))  # compile auto, reduce-overhead: no error
    check_resumable(apply_overrides(before, ["optim.implementation=fused"]))


# ---------------------------------------------------------------------------------------------
# The compiled region
# ---------------------------------------------------------------------------------------------


def test_the_compiled_region_is_one_graph_from_uint8_images_to_the_loss():
    """What torch.compile sees of the step (dynamo's trace, no code generated): normalisation
    (per-pixel mean, std, PCA lighting), the bf16 autocast forward of a ResNet and the
    label-smoothed loss, one graph, no break (a host read would break it: CUDA graphs need
    none)."""
    model = create_model("resnet8", num_classes=CLASSES)
    normalize = Normalize(torch.rand(3, 16, 16), torch.full((3,), 0.25), lighting_std=0.1)
    step = TrainStep(
        model,
        build_optimizer(model, lr=0.1, weight_decay=0.0),
        nn.CrossEntropyLoss(label_smoothing=0.1),
        normalize,
        dtype=torch.bfloat16,
    )
    images, labels = _batch(4, 16)
    x, targets = step.inputs(images, labels)
    assert x is images  # the uint8 batch goes into the graph as it is
    explained = torch._dynamo.explain(step.forward)(x, targets)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0)
    (graph,) = explained.graphs
    inputs = [n.meta["example_value"] for n in graph.graph.nodes if n.op == "placeholder"]
    assert any(t.dtype == torch.uint8 and t.shape == images.shape for t in inputs)
    called = {getattr(n.target, "__name__", str(n.target)) for n in graph.graph.nodes}
    assert {"conv2d", "cross_entropy"} <= called


def test_with_mixup_the_batch_is_normalised_and_mixed_before_the_graph():
    from torchvision.transforms import v2

    net = _small_net()
    step = TrainStep(
        net,
        torch.optim.SGD(net.parameters(), lr=0.1),
        nn.CrossEntropyLoss(),
        Normalize(torch.full((3,), 0.5)),
        batch_transforms=[v2.MixUp(alpha=0.2, num_classes=CLASSES)],
    )
    x, targets = step.inputs(*_batch())
    assert x.dtype == torch.float32
    assert targets.shape == (8, CLASSES)
    explained = torch._dynamo.explain(step.forward)(x, targets)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0)


def test_the_compiled_step_trains_as_the_eager_one():
    """One real compile (inductor on the CPU; reduce-overhead's CUDA graphs apply on CUDA only):
    two accumulated steps of a BatchNorm net, same weights and running statistics as eager."""
    images, labels = _batch()
    nets, results = [], []
    for mode in (None, "reduce-overhead"):
        net = _small_net()
        step = TrainStep(
            net,
            torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, fused=True),
            nn.CrossEntropyLoss(label_smoothing=0.1),
            Normalize(torch.full((3,), 0.5), torch.full((3,), 0.25)),
            accumulate=2,
            compile_mode=mode,
        )
        results.append([step(images, labels) for _ in range(2)])
        nets.append(net)
    eager, compiled = nets
    for name, value in eager.state_dict().items():
        torch.testing.assert_close(compiled.state_dict()[name], value, rtol=1e-5, atol=1e-6)
    assert int(compiled[1].num_batches_tracked) == 4  # BatchNorm's buffers moved in the graph
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(b.loss, a.loss, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(b.logits, a.logits, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# No host synchronisation inside a step
# ---------------------------------------------------------------------------------------------


class HostReads(TorchDispatchMode):
    """Every tensor value a step reads into Python: ``item()``, ``bool()``, ``int()``,
    ``float()`` and ``if tensor`` all run ``aten._local_scalar_dense``, which on a GPU waits
    for the device. (Copies to the CPU are invisible on a CPU: the gpu test below covers
    them.)"""

    def __init__(self) -> None:
        super().__init__()
        self.reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.reads += 1
        return func(*args, **(kwargs or {}))


def _step_and_metrics(dtype, implementation, device=CPU, **options):
    """A resnet8 step and the runner's per-step metric updates (window and epoch)."""
    torch.manual_seed(0)
    model = create_model("resnet8", num_classes=CLASSES).to(device)
    optimizer = build_optimizer(model, lr=0.1, weight_decay=1e-4, implementation=implementation)
    normalize = Normalize(torch.full((3,), 0.5), channels_last=device.type == "cuda").to(device)
    step = TrainStep(model, optimizer, nn.CrossEntropyLoss(), normalize, dtype=dtype, **options)
    window, epoch = Window(device), EpochMetrics(device)

    def train(images, labels):
        result = step(images, labels)
        window.add(result)
        epoch.add(result)
        return result

    return train


@pytest.mark.parametrize(
    ("dtype", "implementation", "options"),
    [
        (None, "foreach", {}),
        (torch.float16, "fused", {"accumulate": 2, "clip_grad_norm": 1.0}),
    ],
    ids=["fp32-foreach", "fp16-fused-accumulated-clipped"],
)
def test_a_step_and_its_metrics_read_no_value_on_the_host(dtype, implementation, options):
    train = _step_and_metrics(dtype, implementation, **options)
    images, labels = _batch(8, 32)
    train(images, labels)  # the first step creates the optimizer's state
    with HostReads() as mode:
        results = [train(images, labels) for _ in range(3)]
    assert mode.reads == 0
    for result in results:  # what the step leaves behind stays on the device
        assert all(t.device == images.device for t in (result.loss, result.logits, result.labels))


def test_the_host_read_detector_sees_the_fp16_scalers_read_of_a_for_loop_optimizer():
    """The control: torch's GradScaler reads its overflow flag on the host before the step of
    an optimizer that cannot take it on the device (fused ones can): one read per step."""
    train = _step_and_metrics(torch.float16, "for-loop")
    images, labels = _batch(8, 32)
    train(images, labels)
    with HostReads() as mode:
        train(images, labels)
    assert mode.reads >= 1


@pytest.mark.gpu
@pytest.mark.parametrize("compile_mode", [None, "reduce-overhead"])
def test_a_cuda_step_never_waits_for_the_device(compile_mode):
    """torch's sync debug mode raises on any synchronising call (a read, a blocking copy)
    inside three steps with their metric updates, after the warm-up (compile, CUDA graph
    recording, cuDNN's first calls)."""
    train = _step_and_metrics(torch.bfloat16, "auto", CUDA, compile_mode=compile_mode)
    images, labels = _batch(32, 32, CUDA)
    for _ in range(4):
        train(images, labels)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            train(images, labels)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
