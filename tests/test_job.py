"""The job core end to end on a local Ray: a compiled run (torch.compile's inductor runs on CPU)
whose worker fails once and resumes from its checkpoint, extensions plugged into the runner, the
final model from a compiled net, and resnet-eval on the run's checkpoints."""

from __future__ import annotations

import dataclasses
import gzip
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import ray
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

from pipelines import evaluate, predict, shards, tracking
from pipelines.config import ConfigError, JobConfig, validate
from pipelines.data import read_split_keys
from pipelines.job.checkpoints import CHECKPOINT_NAME
from pipelines.job.checks import check_dataset
from pipelines.job.runner import Extension, TrainLoopRunner
from pipelines.job.startup import PHASES
from pipelines.job.trainer import run_training
from pipelines.recipes import build_recipe
from pipelines.synthetic import SyntheticSpec
from resnet_core.checkpoint import bare_model, load_checkpoint, load_weights, save_weights
from resnet_core.models import create_model
from resnet_core.step import StepResult

pytestmark = pytest.mark.slow

CLASSES, TRAIN_PER_CLASS, VAL_PER_CLASS = 4, 24, 4
BATCH, EPOCHS = 32, 2
STEPS_PER_EPOCH = CLASSES * TRAIN_PER_CLASS // BATCH  # 3
FAIL_AT_STEP = 5  # after the mid-epoch checkpoint at step 4 (epoch 2, one batch in)


# The extensions below travel to the Train workers, which cannot import this test module: send
# them by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


class StepCounter(Extension):
    """Counts the steps it saw, reports the count, keeps it in checkpoints."""

    key = "step_counter"

    def __init__(self) -> None:
        self.before = self.after = 0
        self.trained = ""

    def setup(self, runner: TrainLoopRunner) -> None:
        step = runner.training.step
        self.trained = f"{type(runner.training.model).__name__}, compile {step.compile_mode}"

    def before_step(self, runner: TrainLoopRunner) -> None:
        assert runner.step == self.before  # called before the step is counted
        self.before += 1

    def after_step(self, runner: TrainLoopRunner, result: StepResult) -> None:
        assert result.logits.shape == (BATCH, CLASSES)
        self.after += 1

    def on_report(self, runner: TrainLoopRunner, metrics: dict[str, Any]) -> None:
        metrics["ext/steps_seen"] = self.after

    def state_dict(self) -> dict[str, Any]:
        return {"before": self.before, "after": self.after, "trained": self.trained}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.before, self.after = state["before"], state["after"]


class FailOnce(Extension):
    """Kills the first worker group at a step (as a crashed worker would)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def after_step(self, runner: TrainLoopRunner, result: StepResult) -> None:
        if runner.step == FAIL_AT_STEP and not Path(self.marker).exists():
            Path(self.marker).touch()
            raise RuntimeError("injected worker failure")


@pytest.fixture(scope="module")
def dataset(ray_local, tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("data") / "tiny"
    spec = SyntheticSpec(CLASSES, TRAIN_PER_CLASS, VAL_PER_CLASS, "cifar")
    assert shards.write_dataset(shards.prepare_config("synthetic", str(out), synthetic=spec)) == 0
    return str(out)


def _config(dataset: str, storage: Path, **train: Any) -> JobConfig:
    base = build_recipe("demo")
    config = dataclasses.replace(
        base,
        data=dataclasses.replace(base.data, uri=dataset, shuffle_buffer=0),
        train=dataclasses.replace(
            base.train,
            **{
                "global_batch": BATCH,
                "epochs": EPOCHS,
                "log_every_steps": 1,
                "checkpoint_every_steps": 4,
                "export_onnx": False,  # the compiled run's final model checks it
                **train,
            },
        ),
        scale=dataclasses.replace(base.scale, num_workers=1, max_failures=1),
        run=dataclasses.replace(base.run, storage_path=str(storage), name="compiled"),
    )
    validate(config)
    return config


@pytest.fixture(scope="module")
def compiled_run(dataset, mlflow_uri, tmp_path_factory) -> tuple[JobConfig, dict[str, Any]]:
    """The compiled run, its worker failing once after the checkpoint at step 4; steps 2-3
    profiled, system metrics sampled every 0.2 s."""
    storage = tmp_path_factory.mktemp("runs")
    config = _config(
        dataset,
        storage,
        compile=True,
        export_onnx=True,
        profile_steps=(2, 2),
        system_metrics_interval_s=0.2,
    )
    manifest, plan = check_dataset(config)
    marker = str(tmp_path_factory.mktemp("marker") / "failed")
    metrics = run_training(config, manifest, plan, [StepCounter(), FailOnce(marker)])
    assert Path(marker).exists()  # the failure happened
    return config, metrics


def test_a_compiled_run_fails_once_and_resumes_exactly(compiled_run, mlflow_uri):
    config, metrics = compiled_run
    client = MlflowClient(tracking_uri=mlflow_uri)
    run = client.get_run(metrics["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["last_worker_failure"].startswith("rank 0: ")
    samples = client.get_metric_history(run.info.run_id, "train/epoch_samples")
    assert sorted((m.step, m.value) for m in samples) == [
        (STEPS_PER_EPOCH * (e + 1), STEPS_PER_EPOCH * BATCH) for e in range(EPOCHS)
    ]
    # The extension's count came back from the checkpoint: it matches the step at every report,
    # before and after the restart (a fresh count would start again at 0).
    seen = client.get_metric_history(run.info.run_id, "ext/steps_seen")
    assert sorted(m.step for m in seen) == list(range(1, EPOCHS * STEPS_PER_EPOCH + 1))
    assert all(m.value == m.step for m in seen)
    assert math.isfinite(metrics["val/top1"])
    # The restarted worker group loaded the compile cache the first one saved in the run folder.
    hits = client.get_metric_history(run.info.run_id, "startup/compile_cache_hit")
    assert [m.value for m in sorted(hits, key=lambda m: m.step)] == [0.0, 1.0]
    cache = Path(config.run.storage_path, config.run_name, "compile-cache")
    assert [p.suffix for p in cache.iterdir()] == [".bin"]


def test_a_run_logs_its_workers_system_metrics_and_a_profiled_steps_trace(
    compiled_run, mlflow_uri, dataset, tmp_path
):
    _, metrics = compiled_run
    run_id = metrics["mlflow_run_id"]
    client = MlflowClient(tracking_uri=mlflow_uri)
    system = [k for k in client.get_run(run_id).data.metrics if k.startswith("system/")]
    assert "system/worker_0/cpu_utilization_percentage" in system
    assert "system/worker_0/system_memory_usage_megabytes" in system
    assert {k.split("/")[1] for k in system} == {"worker_0"}
    memory = client.get_metric_history(run_id, "system/worker_0/system_memory_usage_megabytes")
    assert memory
    assert all(0 < m.step <= EPOCHS * STEPS_PER_EPOCH and m.value > 0 for m in memory)
    # Rank 0's trace of steps 2-3, from before the failure (the resumed attempt starts at 4).
    trace = Path(client.download_artifacts(run_id, "profile/trace_rank0.json.gz", str(tmp_path)))
    events = json.loads(gzip.decompress(trace.read_bytes()))["traceEvents"]
    names = {e.get("name", "") for e in events}
    assert {n for n in names if n.startswith("ProfilerStep#")} == {
        "ProfilerStep#2",
        "ProfilerStep#3",
    }
    assert any(n.startswith("aten::") for n in names)
    # A window past the run's last step is refused before Ray is asked for anything.
    with pytest.raises(ConfigError, match=r"ends at step 7, after the run's last step \(6\)"):
        check_dataset(_config(dataset, tmp_path, profile_steps=(6, 2)))


def test_checkpoints_of_a_compiled_run_hold_the_bare_nets_keys(compiled_run):
    config, _ = compiled_run
    folders = sorted(Path(config.run.storage_path, config.run_name).glob("checkpoint-*"))
    assert folders
    assert all(CHECKPOINT_NAME.fullmatch(f.name) for f in folders)
    state = load_checkpoint(folders[-1])
    assert not [k for k in state["model"] if k.startswith(("_orig_mod.", "module."))]
    net = create_model("resnet8", num_classes=CLASSES)
    net.load_state_dict(state["model"])  # strict
    # Trained with a compiled step around the plain net, saved as the plain net.
    assert state["extra"]["step_counter"] == {
        "before": 6,
        "after": 6,
        "trained": "CifarResNet, compile default",
    }


def test_the_final_model_of_a_compiled_run_loads_and_resnet_eval_scores_it(
    compiled_run, mlflow_uri, capsys, tmp_path
):
    import mlflow

    config, metrics = compiled_run
    run_id = metrics["mlflow_run_id"]
    client = MlflowClient(tracking_uri=mlflow_uri)
    weights = load_weights(Path(client.download_artifacts(run_id, "final"), "weights.safetensors"))
    create_model("resnet8", num_classes=CLASSES).load_state_dict(weights)
    model_uri = client.get_run(run_id).data.tags[tracking.FINAL_MODEL_TAG]
    mlflow.set_tracking_uri(mlflow_uri)
    images = torch.zeros((2, 32, 32, 3), dtype=torch.uint8).numpy()
    served = mlflow.pyfunc.load_model(model_uri, model_config={"device": "cpu"})
    assert served.predict(images).shape == (2, CLASSES)
    # Its default device, auto (the CPU here), is the run's "device" param (MLflow's copy).
    run = client.get_run(run_id)
    assert run.data.params["device"] == "auto"
    np.testing.assert_array_equal(
        mlflow.pyfunc.load_model(model_uri).predict(images), served.predict(images)
    )
    # The ONNX export, checked at the end of the run, scores images as the PyTorch model does.
    assert run.data.tags["onnx.opset"] == "18"
    assert float(run.data.tags["onnx.max_logit_difference"]) < 1e-4
    onnx_file = client.download_artifacts(run_id, "final/model.onnx")
    image = tmp_path / "image.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(
        image
    )
    assert predict.main(["--model", f"runs:/{run_id}", str(image)]) == 0
    torch_lines = capsys.readouterr().out
    assert predict.main(["--model", f"runs:/{run_id}", "--onnx", onnx_file, str(image)]) == 0
    assert capsys.readouterr().out == torch_lines  # the same top-5, to 0.01%
    # resnet-eval: the run folder (newest checkpoint) and the run's final model.
    folder = str(Path(config.run.storage_path, config.run_name))
    assert evaluate.main([folder, "--modes", "center"]) == 0
    assert evaluate.main([f"runs:/{run_id}", "--modes", "center,tencrop"]) == 0
    out = capsys.readouterr().out
    assert f"{CLASSES * VAL_PER_CLASS} images" in out


# ---------------------------------------------------------------------------------------------
# Exact resume against the gold standard: the same run, uninterrupted
# ---------------------------------------------------------------------------------------------


def _final_state(config: JobConfig, extensions: list[Extension]) -> dict[str, Any]:
    manifest, plan = check_dataset(config)
    metrics = run_training(config, manifest, plan, extensions)
    newest = max(Path(config.run.storage_path, config.run_name).glob("checkpoint-*"))
    return {"metrics": metrics, **load_checkpoint(newest)}


# The toolbox on: every piece of state it adds (EMA weights, mixing RNG draws, micro-batches)
# must come back from the checkpoint for the resumed run to end bit for bit where the other does.
TOOLBOX = {
    "train": {
        "ema": True,
        "ema_steps": 2,
        "accumulate_steps": 2,
        "clip_grad_norm": 1.0,
        "freeze_backbone_epochs": 1,
    },
    "data": {
        "mixup_alpha": 0.2,
        "cutmix_alpha": 1.0,
        "auto_augment": "ta_wide",
        "random_erase": 0.25,
        "repeated_augment": 2,
    },
    "optim": {"label_smoothing": 0.1},
}


class InitProbe(Extension):
    """Writes, at setup, whether the worker's fresh net starts from the init weights."""

    def __init__(self, weights: str, out: str) -> None:
        self.weights, self.out = weights, out

    def setup(self, runner: TrainLoopRunner) -> None:
        expected = load_weights(self.weights)["conv1.weight"]
        net = bare_model(runner.training.model)
        Path(self.out).write_text(str(torch.equal(net.conv1.weight.cpu(), expected)))


def test_a_run_interrupted_mid_epoch_ends_with_the_uninterrupted_runs_weights(
    dataset, mlflow_uri, tmp_path
):
    """Fine-tuned from init weights (a new head, the backbone frozen in epoch 1), with EMA,
    MixUp/CutMix, TrivialAugment, RandomErasing, repeated augmentation, accumulation and
    clipping on: killed after step 5 (the checkpoint at step 4 is one batch into epoch 2),
    restarted, finished: every weight and buffer, and every EMA weight, equals the uninterrupted
    run's, bit for bit (CPU). The EMA is validated beside the raw weights, and the final model
    is the EMA's."""
    init = save_weights(tmp_path / "init.safetensors", create_model("resnet8", num_classes=10))
    base = _config(dataset, tmp_path / "gold")
    gold = dataclasses.replace(
        base,
        model=dataclasses.replace(base.model, init=str(init), reset_head=True),
        run=dataclasses.replace(base.run, name="gold"),
        **{name: dataclasses.replace(getattr(base, name), **v) for name, v in TOOLBOX.items()},
    )
    validate(gold)
    resumed = dataclasses.replace(gold, run=dataclasses.replace(gold.run, name="resumed"))
    expected = _final_state(gold, [InitProbe(str(init), str(tmp_path / "probe"))])
    assert (tmp_path / "probe").read_text() == "True"  # fine-tuned from the init weights
    got = _final_state(resumed, [FailOnce(str(tmp_path / "failed"))])
    assert (tmp_path / "failed").exists()
    for weights in (lambda s: s["model"], lambda s: s["extra"]["ema"]["weights"]):
        assert weights(expected).keys() == weights(got).keys()
        different = [
            k for k in weights(expected) if not torch.equal(weights(expected)[k], weights(got)[k])
        ]
        assert different == []
    ema, raw = got["extra"]["ema"]["weights"], got["model"]
    assert not torch.equal(ema["fc.weight"], raw["fc.weight"])
    client = MlflowClient(tracking_uri=mlflow_uri)
    run_id = got["metrics"]["mlflow_run_id"]
    assert sorted(m.step for m in client.get_metric_history(run_id, "val_ema/top1")) == [3, 6]
    final = load_weights(Path(client.download_artifacts(run_id, "final"), "weights.safetensors"))
    assert all(torch.equal(final[k], ema[k]) for k in ema)
    run = client.get_run(run_id)
    assert (run.data.params["train.ema"], run.data.params["train.accumulate_steps"]) == (
        "True",
        "2",
    )
    assert "onnx.opset" not in run.data.tags  # train.export_onnx=false


# ---------------------------------------------------------------------------------------------
# Resuming on another number of workers
# ---------------------------------------------------------------------------------------------

ELASTIC_BATCH = 12  # global: 6 per worker on 2, 4 on 3, 12 on 1; 8 steps per epoch


class KeyRecorder(Extension):
    """Writes the keys of every batch each rank trains, ``<step> <key,...>``, in one file per
    rank and run attempt (``segment``: the attempts' order)."""

    def __init__(self, folder: str, segment: int) -> None:
        self.folder, self.segment = folder, segment

    def before_step(self, runner: TrainLoopRunner) -> None:
        with Path(self.folder, f"{self.segment}-{runner.rank}.txt").open("a") as f:
            f.write(f"{runner.step + 1} {','.join(runner.batch.keys)}\n")


class FailAt(Extension):
    """Ends the run at a step (every rank raises; the run has no restarts left)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def after_step(self, runner: TrainLoopRunner, result: StepResult) -> None:
        if runner.step == self.step:
            raise RuntimeError(f"stopped at step {self.step}")


def _trained_keys(folder: Path) -> dict[int, list[str]]:
    """The keys each step trained over the run (all ranks), from the last attempt at that step:
    steps after the checkpoint an attempt resumed from were trained again."""
    steps: dict[int, list[str]] = {}
    for segment in sorted({int(path.stem.split("-")[0]) for path in folder.glob("*.txt")}):
        by_step: dict[int, list[str]] = {}
        for path in folder.glob(f"{segment}-*.txt"):
            for line in path.read_text().splitlines():
                step, keys = line.split(" ")
                by_step.setdefault(int(step), []).extend(keys.split(","))
        steps.update(by_step)
    return steps


def test_a_run_resumes_mid_epoch_on_fewer_and_more_workers_training_each_row_once(
    dataset, mlflow_uri, tmp_path
):
    """2 workers stop after step 3 (checkpoint at 2), resume on 3 and stop after step 5
    (checkpoint at 4), finish on 1: every step trains 12 images, epoch 1 trains each of the
    split's 96 rows once, epoch 2 as well; one MLflow run, continued."""
    keys_folder = tmp_path / "keys"
    keys_folder.mkdir()
    config = _config(
        dataset, tmp_path / "runs", global_batch=ELASTIC_BATCH, checkpoint_every_steps=2
    )
    config = dataclasses.replace(
        config,
        data=dataclasses.replace(config.data, shuffle_buffer=8, decode_cpus=0.25),
        run=dataclasses.replace(config.run, name="elastic"),
    )
    manifest, plan = check_dataset(config)
    for segment, (workers, stop_at) in enumerate(((2, 3), (3, 5), (1, None))):
        scale = dataclasses.replace(
            config.scale, num_workers=workers, cpus_per_worker=0.25, max_failures=0
        )
        attempt = dataclasses.replace(config, scale=scale)
        extensions = [KeyRecorder(str(keys_folder), segment)]
        extensions += [FailAt(stop_at)] if stop_at else []
        if stop_at:
            with pytest.raises(Exception, match=f"stopped at step {stop_at}"):
                run_training(attempt, manifest, plan, extensions)
        else:
            metrics = run_training(attempt, manifest, plan, extensions)

    steps = _trained_keys(keys_folder)
    assert sorted(steps) == list(range(1, 17))
    assert all(len(keys) == ELASTIC_BATCH for keys in steps.values())
    split = sorted(read_split_keys(manifest, "train"))
    for epoch in range(EPOCHS):
        trained = [k for step in range(8 * epoch + 1, 8 * epoch + 9) for k in steps[step]]
        assert sorted(trained) == split  # each row once, none repeated
    client = MlflowClient(tracking_uri=mlflow_uri)
    run = client.get_run(metrics["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["scale.num_workers"] == "2"  # the first value
    assert run.data.tags["cluster.workers"] == "1"  # the last
    samples = client.get_metric_history(run.info.run_id, "train/epoch_samples")
    assert sorted((m.step, m.value) for m in samples) == [(8, 96), (16, 96)]


# ---------------------------------------------------------------------------------------------
# Progressive resizing: the crop size of each epoch reaches the loop
# ---------------------------------------------------------------------------------------------


class CropSizes(Extension):
    """Writes ``<epoch> <crop side>`` for every step trained."""

    def __init__(self, out: str) -> None:
        self.out = out

    def before_step(self, runner: TrainLoopRunner) -> None:
        with Path(self.out).open("a") as f:
            f.write(f"{runner.epoch} {runner.batch.images.shape[1]}\n")


def test_progressive_resizing_trains_each_epoch_at_its_crop_size(ray_local, mlflow_uri, tmp_path):
    """ImageNet-like images, Inception crops growing from 32 px (epoch 1) to 64 px (epoch 2);
    validation stays at 64. Decoded the hybrid way (data.decode_device=auto: the tasks decode
    half of the map batches, the worker's device the rest), its share logged; the start-up
    split logged; system metrics off."""
    out = tmp_path / "photos"
    spec = SyntheticSpec(CLASSES, 8, 2, "imagenet")
    assert shards.write_dataset(shards.prepare_config("synthetic", str(out), synthetic=spec)) == 0
    base = _config(str(out), tmp_path / "runs", global_batch=8, checkpoint_every_steps=None)
    config = dataclasses.replace(
        base,
        data=dataclasses.replace(
            base.data,
            augment="inception",
            mean="per_channel",
            image_size=64,
            eval_resize=72,
            min_image_size=32,
            ramp_end_epoch=1,
            decode_device="auto",
        ),
        train=dataclasses.replace(base.train, system_metrics=False),
        run=dataclasses.replace(base.run, name="progressive"),
    )
    validate(config)
    manifest, plan = check_dataset(config)
    sizes = tmp_path / "sizes.txt"
    metrics = run_training(config, manifest, plan, [CropSizes(str(sizes))])
    assert sorted(set(sizes.read_text().splitlines())) == ["0 32", "1 64"]
    client = MlflowClient(tracking_uri=mlflow_uri)
    logged = client.get_metric_history(metrics["mlflow_run_id"], "train/image_size")
    assert sorted({(m.step, m.value) for m in logged})[-1] == (8, 64)
    assert sorted({m.value for m in logged}) == [32, 64]
    assert metrics["val/count"] == CLASSES * 2
    shares = client.get_metric_history(metrics["mlflow_run_id"], "data/hybrid_cpu_share")
    assert shares
    assert all(0 <= m.value <= 1 for m in shares)
    # Where the start-up went, once, with the first report; no system metrics when switched off.
    logged = client.get_run(metrics["mlflow_run_id"]).data.metrics
    assert not [key for key in logged if key.startswith("system/")]
    phases = [logged[f"startup/{phase}_s"] for phase in PHASES]
    assert all(seconds >= 0 for seconds in phases)
    assert logged["startup/worker_group_s"] > 0  # Ray Train starts its workers
    assert sum(phases) == pytest.approx(logged["startup/total_s"], abs=0.01)


def test_a_local_rays_workers_drop_train_autoscaler_warnings_and_keep_its_errors(ray_local):
    """A local Ray (no autoscaler) runs ``pipelines.quiet_local_worker`` in its workers: the
    controller's timed-out requests for resources (a warning with a traceback, on a loaded
    machine) stay off the console, its errors do not, after Ray Train's logging set-up (which
    resets the levels of the loggers below ``ray.train``) as before it."""

    @ray.remote(num_cpus=0)
    def passed_on() -> list[tuple[str, list[str]]]:
        import logging
        import logging.config

        from pipelines import TRAIN_AUTOSCALER_LOGGER

        seen: list[str] = []
        handler = logging.Handler()
        handler.emit = lambda record: seen.append(record.levelname)
        logging.getLogger("ray.train").addHandler(handler)
        logger = logging.getLogger(TRAIN_AUTOSCALER_LOGGER)
        logger.warning("timed out")
        logger.error("failed")
        before = list(seen)
        seen.clear()
        # What Ray Train's LoggingManager does in its controller and workers.
        logging.config.dictConfig(
            {"version": 1, "disable_existing_loggers": False, "loggers": {"ray.train": {}}}
        )
        logging.getLogger("ray.train").addHandler(handler)
        logger.warning("timed out")
        logger.error("failed")
        return [("before", before), ("after", seen)]

    assert ray.get(passed_on.remote()) == [("before", ["ERROR"]), ("after", ["ERROR"])]
