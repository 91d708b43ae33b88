"""`resnet-bench gpu`: skips cleanly without CUDA; its ceiling loop and job config on a CPU; the
whole command, tiny, where a GPU exists (no timing is asserted)."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines import bench
from pipelines.bench import gpu
from pipelines.config import JobConfig, ModelConfig
from pipelines.job.parts import build_training
from pipelines.manifest import Manifest, ShardInfo, SplitInfo

ROOT = Path(__file__).resolve().parents[1]


def _write_jpegs(folder: Path, count: int) -> None:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        pixels = rng.integers(0, 256, (int(rng.integers(80, 140)), 120, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img_{i:02d}.JPEG", quality=90)


def _e2e_config(**overrides) -> JobConfig:
    options = {
        "model": "resnet18",
        "image_size": 64,
        "batch": 8,
        "steps": 4,
        "warmup": 2,
        "precision": "bf16",
        "channels_last": True,
        "compile": False,
        "decode_device": "device",
        "decode_cpus": 3,
        "storage": "/tmp/runs",
    }
    options.update(overrides)
    return gpu.e2e_config("/tmp/shards", **options)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the skip line is for machines without CUDA")
def test_without_cuda_the_command_prints_one_line_and_succeeds(capsys):
    assert bench.main(["gpu"]) == 0
    assert capsys.readouterr().out == gpu.SKIP_LINE + "\n"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--warmup", "5", "--steps", "5"], "--warmup 5 must be below --steps 5"),
        (["--decode-cpus", "0"], "--decode-cpus 0 must be >= 1"),
        (["--model", "resnet20"], "'resnet20' is a CIFAR net"),
        (["--model", "vgg16"], "--model 'vgg16'"),
        (["--levers", "turbo"], "--levers 'turbo': use standard, all, or some of eager,"),
    ],
)
def test_bad_arguments_exit_2_with_or_without_cuda(capsys, argv, message):
    assert bench.main(["gpu", *argv]) == 2
    assert message in capsys.readouterr().err


def _manifest(classes: int, train_rows: int) -> Manifest:
    """A dataset's manifest as the job reads it (class count, split sizes), without files."""
    split = SplitInfo(train_rows, (ShardInfo("train/shard.parquet", train_rows, 1, "0" * 64),))
    names = tuple(f"c{i}" for i in range(classes))
    return Manifest(
        "/nowhere", "test", names, names, {"train": split, "val": split},
        None, 95, None, None, None, "0" * 64, {},
    )  # fmt: skip


def test_ceiling_loop_runs_the_jobs_training_step_on_the_cpu():
    config = _e2e_config(compile=False)  # bf16: CPU autocast, the same code path as on CUDA
    device = torch.device("cpu")
    training = build_training(config, _manifest(5, 64), device)
    images, labels = gpu.synthetic_batch(2, 64, 5, device)
    assert images.dtype == torch.uint8
    assert images.shape == (2, 64, 64, 3)
    assert training.step.dtype == torch.bfloat16
    model = training.model
    before = [p.detach().clone() for p in model.parameters()]
    rate = gpu.measure_ceiling(training.step, images, labels, steps=2, warmup=1)
    assert rate > 0
    changed = [not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True)]
    assert sum(changed) > len(changed) // 2  # two SGD steps moved the weights


def test_e2e_config_is_the_gpu_recipe_on_one_worker():
    config = _e2e_config()
    assert config.recipe == gpu.RECIPE
    assert config.model == ModelConfig(name="resnet18", stride_in_3x3=True, zero_init_residual=True)
    d, t, sc = config.data, config.train, config.scale
    assert (d.uri, d.augment, d.image_size, d.eval_resize) == ("/tmp/shards", "inception", 64, 73)
    assert (d.decode_device, d.decode_cpus, d.decode_concurrency) == ("device", 1.0, 3)
    assert (t.global_batch, t.max_steps, t.epochs, t.log_every_steps) == (8, 4, 1, 2)
    assert (t.precision, t.channels_last, t.compile) == ("bf16", True, False)
    assert (sc.num_workers, sc.use_gpu, sc.cpus_per_worker) == (1, True, gpu.WORKER_CPUS)
    assert _e2e_config(decode_device="cpu", decode_cpus=None).data.decode_concurrency is None


def test_ceiling_target_line_reads_like_the_ratio_targets():
    assert (
        gpu.ceiling_target_line(3120.4)
        == "target synthetic_ceiling >= 3000 img/s: met (3120 img/s)"
    )
    assert gpu.ceiling_target_line(10.0).endswith("missed (10 img/s)")


def _lever_args(levers: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    gpu.add_parser(parser.add_subparsers())
    return parser.parse_args(
        [
            "gpu", "--levers", levers, "--batch-size", "2", "--steps", "2", "--warmup", "1",
            "--model", "resnet18", "--image-size", "32", "--precision", "fp32",
        ]
    )  # fmt: skip


def test_levers_print_each_row_and_its_ratio_to_eager(capsys):
    """The eager rows, tiny, on a CPU (the compiled ones run the step tests/test_step_levers.py
    compiles; here their configs are checked below)."""
    rates = gpu.run_levers(_lever_args("eager_batch_x2,eager_fused"), torch.device("cpu"))
    assert list(rates) == ["eager", "eager_fused", "eager_batch_x2"]  # baseline first
    out = capsys.readouterr().out
    assert "resnet18 on CPU, batch 2, 32px, fp32, channels_last" in out
    assert re.search(r"^  eager_batch_x2 +\d+\.\d img/s +\d+\.\d\dx  .*\(batch 4\)$", out, re.M)
    for name in ("eager_fused", "eager_batch_x2"):
        assert re.search(rf"^ratio {name}/eager: \d+\.\d\dx$", out, re.M), out


def test_each_lever_turns_on_what_it_names():
    assert gpu.chosen_levers("standard") == gpu.LEVERS
    assert len(gpu.chosen_levers("all")) == len(gpu.LEVERS) + len(gpu.MORE_LEVERS)
    assert [lever.name for lever in gpu.chosen_levers("max_autotune")] == ["eager", "max_autotune"]
    base = _e2e_config()
    levers = {lever.name: lever for lever in gpu.LEVERS + gpu.MORE_LEVERS}
    settings = {
        name: (c.train.compile, c.train.compile_mode, c.optim.implementation, c.train.global_batch)
        for name, c in ((name, gpu.lever_config(base, lever)) for name, lever in levers.items())
    }
    assert settings["eager"] == (False, "default", "foreach", 8)
    assert settings["eager_fused"] == (False, "default", "fused", 8)
    assert settings["eager_batch_x2"] == (False, "default", "fused", 16)
    assert settings["compiled"] == (True, "default", "fused", 8)
    assert settings["reduce_overhead"] == (True, "reduce-overhead", "fused", 8)
    assert settings["max_autotune"] == (True, "max-autotune-no-cudagraphs", "fused", 8)
    assert not levers["compiled_norm_outside"].normalize_in_graph
    assert levers["eager_cudnn_benchmark"].cudnn_benchmark
    # The compiled levers' step: build_training compiles the forward in the lever's mode.
    config = gpu.lever_config(base, levers["reduce_overhead"])
    step = build_training(config, gpu.synthetic_manifest(5, 64), torch.device("cpu")).step
    assert (step.compile_mode, step.optimizer.defaults["fused"]) == ("reduce-overhead", True)


@pytest.mark.slow
def test_the_whole_bench_runs_tiny_on_a_cpu(tmp_path, capsys, monkeypatch):
    """Everything but CUDA: shards from JPEGs, the ceiling, the training job with hybrid decode
    (the device path's code, and the CPU path's for some batches), each decode alone, the
    start-up split, the lines."""
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # the Ray this run starts
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # measure_job's temporary store
    _write_jpegs(tmp_path / "images", 4)
    parser = argparse.ArgumentParser()
    gpu.add_parser(parser.add_subparsers())
    args = parser.parse_args(
        [
            "gpu", "--images", str(tmp_path / "images"), "--batch-size", "4", "--steps", "3",
            "--warmup", "1", "--model", "resnet18", "--image-size", "64", "--precision", "fp32",
            "--decode-cpus", "1", "--decode", "auto",
        ]
    )  # fmt: skip
    rates = gpu.run_gpu_bench(args, tmp_path / "images", torch.device("cpu"))
    decodes = {"device_decode", "device_decode_crop", "cpu_decode_crop"}
    assert set(rates) == {"synthetic_ceiling", "e2e_auto"} | decodes
    out = capsys.readouterr().out
    assert "resnet18 on CPU, batch 4, 64px, fp32" in out
    _assert_bench_lines(out, paths=("auto",))


def _assert_bench_lines(out: str, paths: tuple[str, ...] = ("cpu", "device", "auto")) -> None:
    for name in ("device_decode", "device_decode_crop", "cpu_decode_crop"):
        assert re.search(rf"^  {name} +\d+\.\d img/s", out, re.M), out
    assert re.search(r"^target device_decode_crop >= 12000 img/s: (met|missed)", out, re.M), out
    assert re.search(r"^target end to end \(e2e_\w+\) >= 8000 img/s: (met|missed)", out, re.M)
    for path in paths:
        assert re.search(rf"^  start-up e2e_{path}: \d+\.\d s \(worker group", out, re.M), out
        assert re.search(rf"^target e2e_{path} start to first step <= 15 s: ", out, re.M), out
    for path in paths:
        assert re.search(rf"^  e2e_{path} +\d+\.\d img/s", out, re.M), out
        assert re.search(rf"^ratio e2e_{path}/synthetic_ceiling: \d+\.\d\dx$", out, re.M), out
        assert re.search(
            rf"^target e2e_{path}/synthetic_ceiling >= 0.9x: (met|missed)", out, re.M
        ), out
    assert re.search(r"^target synthetic_ceiling >= 3000 img/s: (met|missed)", out, re.M), out


@pytest.mark.gpu
@pytest.mark.parametrize("compile", [False, True])
def test_tiny_gpu_bench_prints_both_ratios_and_the_targets(tmp_path, compile):
    _write_jpegs(tmp_path / "images", 6)
    command = [
        sys.executable, "-m", "pipelines.bench", "gpu", "--images", str(tmp_path / "images"),
        "--batch-size", "8", "--steps", "4", "--warmup", "2", "--model", "resnet18",
        "--image-size", "64", "--decode-cpus", "2", *(["--compile"] if compile else []),
    ]  # fmt: skip
    # Its own process, so its own Ray (sized for the machine), whatever this one runs.
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(ROOT)}
    run = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    _assert_bench_lines(run.stdout)


@pytest.mark.gpu
def test_tiny_gpu_levers_print_every_standard_row():
    command = [
        sys.executable, "-m", "pipelines.bench", "gpu", "--levers", "--batch-size", "8",
        "--steps", "5", "--warmup", "3", "--model", "resnet18", "--image-size", "64",
    ]  # fmt: skip
    run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    for lever in gpu.LEVERS[1:]:
        assert re.search(rf"^ratio {lever.name}/eager: \d+\.\d\dx$", run.stdout, re.M), run.stdout
