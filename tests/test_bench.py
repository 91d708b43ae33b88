"""`resnet-bench data` end to end on a few generated JPEGs (no timing is asserted)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines import bench
from pipelines.bench import common as bench_common
from pipelines.bench import data as bench_data
from tests.jpeg_decoder import EXPECTED_DECODER

ROOT = Path(__file__).resolve().parents[1]


def _write_jpegs(folder: Path, count: int) -> None:
    rng = np.random.default_rng(0)
    for i in range(count):
        width, height = int(rng.integers(300, 520)), int(rng.integers(240, 400))
        # Smooth gradients plus noise: compresses like a photo, unlike pure noise.
        y, x = np.mgrid[0:height, 0:width]
        base = np.stack(
            [x * 255 // width, y * 255 // height, (x + y) * 127 // (width + height)], -1
        )
        noise = rng.integers(-20, 20, base.shape)
        pixels = np.clip(base + noise, 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"img_{i:02d}.JPEG", quality=90)


def _bench_data(tmp_path: Path, *flags: str) -> str:
    """``resnet-bench data`` on 6 generated JPEGs with ``flags``; its output."""
    images = tmp_path / "images"
    images.mkdir()
    _write_jpegs(images, 6)
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(ROOT)}
    command = [
        sys.executable, "-m", "pipelines.bench", "data", "--images", str(images),
        "--seconds", "0.3", "--ray-rows", "24", "--batch-size", "4", "--num-cpus", "2", *flags,
    ]  # fmt: skip
    run = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "6 images from" in run.stdout
    assert f"JPEG decoder: {EXPECTED_DECODER}" in run.stdout
    return run.stdout


def test_bench_data_per_core_prints_every_ratio(tmp_path):
    out = _bench_data(tmp_path, "--only", "per-core")
    for name in (
        "ours_paper",
        "ours_inception",
        "full_decode",
        "ours_paper_320",
        "pillow_paper",
        "pillow_paper_320",
    ):
        assert re.search(rf"^ratio {name}/torchvision_classic: \d+\.\d\dx$", out, re.M), out
    assert len(re.findall(r"^target .* (met|missed) \(\d+\.\d\dx\)$", out, re.M)) == 2
    for policy in ("ta_wide", "ra", "imagenet", "augmix"):  # what each policy adds to a crop
        assert re.search(rf"^policy {policy}: \+-?\d+\.\d\d ms per image per core", out, re.M)
    assert re.search(r"^ratio ours_inception_ta_wide/torchvision_ta_wide: \d+\.\d\dx$", out, re.M)
    assert "ray_paper" not in out  # --only per-core: no Ray run


@pytest.mark.slow
def test_bench_data_ray_prints_the_overhead_and_where_the_cpu_goes(tmp_path):
    out = _bench_data(tmp_path, "--only", "ray")
    for name in ("ray_paper", "ray_paper_320"):
        reference = name.replace("ray_", "ours_")
        assert re.search(
            rf"^  {name} +\d+\.\d img/s end to end on 2 CPUs \(\d+ images, Ray Data\)", out, re.M
        )
        split = re.search(
            rf"^  {name} CPU per image: ([\d.]+) ms = decode tasks' processes ([\d.]+) \+ "
            rf"driver ([\d.]+) \+ Ray's own processes ([\d.]+); {reference} in one process",
            out,
            re.M,
        )
        assert split, out
        total, *parts = (float(v) for v in split.groups())
        assert abs(total - sum(parts)) < 0.02  # the parts add up
        assert min(parts[:2]) > 0  # the decode tasks' processes told from the driver
        assert re.search(
            rf"^  {name} fixed cost of an epoch \(start-up, end\): -?\d+ CPU ms", out, re.M
        )
        assert re.search(rf"^ratio {name}_per_cpu/{reference}: \d+\.\d\dx$", out, re.M)
        assert re.search(
            rf"^target {name}_per_cpu/{reference} >= 0\.8x: (met|missed) \(\d+\.\d\dx\)$", out, re.M
        )
    assert "torchvision_classic" not in out  # --only ray: no per-core pipelines


def test_cpu_between_keeps_each_process_in_one_part():
    """The Ray run's CPU split between two snapshots: a worker seen starting (its Python title,
    0.7 s of start-up) that runs tasks by the end counts only its CPU in the window, in
    "tasks" (it once made "ray" negative); a task process that ended in the window (reaped by
    the raylet) counts its CPU in the window in "tasks", not in the raylet's "ray"."""
    cpu = bench_data.ProcessCpu
    driver, raylet, starting, ending = os.getpid(), 10, 11, 12
    before = {
        driver: cpu(1, "driver", 5.0, 0.0),
        raylet: cpu(driver, "ray", 2.0, 1.0),
        starting: cpu(raylet, "ray", 0.7, 0.0),
        ending: cpu(raylet, "tasks", 3.0, 0.0),
    }
    after = {
        driver: cpu(1, "driver", 5.5, 0.0),
        raylet: cpu(driver, "ray", 2.25, 1.0 + 3.0 + 0.5),  # reaped: all of `ending`'s CPU
        starting: cpu(raylet, "tasks", 2.7, 0.0),
        13: cpu(raylet, "ray", 0.25, 0.0),  # started in the window (an actor)
    }
    split = bench_data.cpu_between(before, after)
    assert split == pytest.approx({"tasks": 2.5, "driver": 0.5, "ray": 0.5})
    assert bench_data.cpu_between(before, before) == dict.fromkeys(("tasks", "driver", "ray"), 0)


def test_bench_data_rejects_a_folder_without_images(tmp_path, capsys):
    assert bench.main(["data", "--images", str(tmp_path), "--seconds", "1"]) == 2
    assert f"no images under {tmp_path}" in capsys.readouterr().err


def test_per_core_measurement_counts_every_pipeline(tmp_path):
    _write_jpegs(tmp_path, 2)
    paths = bench_common.find_images(tmp_path)
    datas = [p.read_bytes() for p in paths]
    pipelines = bench_data.per_core_pipelines(paths, datas, datas)
    rates = bench_data.measure_per_core(pipelines, len(paths), seconds=0.2, rounds=2)
    assert set(rates) == {
        "torchvision_classic",
        "ours_paper",
        "ours_inception",
        "full_decode",
        "ours_paper_320",
        "pillow_paper",
        "pillow_paper_320",
        "torchvision_ta_wide",
        "ours_inception_ta_wide",
        "ours_inception_ra",
        "ours_inception_imagenet",
        "ours_inception_augmix",
    }
    assert all(rate > 0 for rate in rates.values())
    out = pipelines["ours_paper"](0)
    assert out.shape == (224, 224, 3)
    assert out.dtype == np.uint8
    assert tuple(pipelines["torchvision_classic"](1).shape) == (3, 224, 224)


def _bench(args: list[str], timeout: int = 600) -> str:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(ROOT)}
    env.pop("MLFLOW_TRACKING_URI", None)  # the bench makes its own temporary store
    run = subprocess.run(
        [sys.executable, "-m", "pipelines.bench", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return run.stdout


@pytest.mark.slow
def test_bench_train_compares_the_ray_job_with_a_bare_loop():
    out = _bench(["train", "--steps", "6", "--warmup", "2", "--batch-size", "16", "--threads", "1"])
    assert "resnet20, batch 16, augmentation 'cifar', 6 steps (2 warm-up), 1 torch threads" in out
    for label in ("bare \\(1\\)", "ray", "bare \\(2\\)"):
        assert re.search(rf"^  {label} +\d+\.\d img/s ", out, re.M), out
    assert re.search(r"^ratio ray/bare: \d+\.\d\dx$", out, re.M), out
    assert re.search(r"^target ray/bare >= 0.9x: (met|missed) \(\d+\.\d\dx\)$", out, re.M), out
    startup = re.search(r"^start-up \(outside the ratio\): Ray (\d+\.\d) s; job start", out, re.M)
    assert startup, out
    assert float(startup.group(1)) > 0, out


@pytest.mark.slow
def test_bench_memory_streams_epochs_and_reports_the_store(tmp_path):
    _write_jpegs(tmp_path, 6)
    out = _bench(
        [
            "memory", "--images", str(tmp_path), "--store-mb", "80", "--epoch-factor", "0.3",
            "--epochs", "3", "--batch-size", "16", "--num-cpus", "2",
        ]
    )  # fmt: skip
    epochs = re.findall(
        r"^  epoch (\d): +\d+\.\d img/s, trainer RSS +(\d+\.\d) MiB "
        r"\(its own (\d+\.\d), object store's (\d+\.\d)\)",
        out,
        re.M,
    )
    assert [e for e, *_ in epochs] == ["1", "2", "3"], out
    for _, rss, own, store in epochs:
        assert float(own) > 100, out  # a Train worker holds torch
        assert 0 < float(store) <= 80, out  # it has read crops from the 80 MiB store
        assert abs(float(own) + float(store) - float(rss)) < 0.2, out
    store = re.search(r"^  object store: peak (\d+\.\d) MiB of (\d+) MiB", out, re.M)
    assert store, out
    assert float(store.group(1)) > 0, out
    assert store.group(2) == "80", out
    assert re.search(r"^ratio epoch_bytes/object_store: \d+\.\d\dx$", out, re.M), out
    assert re.search(r"^target no spilling: (met|missed) \(\d+ B spilled\)$", out, re.M), out
    assert re.search(r"^target trainer RSS growth epoch 2 -> 3 < 5%: (met|missed)", out, re.M)
    assert "target batches never float32 on the CPU: met" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train", "--steps", "5", "--warmup", "5"], "--warmup 5 must be below --steps 5"),
        (["train", "--threads", "0"], "--threads 0 must be >= 1"),
        (["memory", "--images", ".", "--store-mb", "10"], "--store-mb 10 is below Ray's minimum"),
        (["memory", "--images", ".", "--epochs", "2"], "--epochs 2: use >= 3"),
    ],
)
def test_bench_rejects_bad_values_in_one_line(args, message, capsys):
    assert bench.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("resnet-bench: ")
    assert err.count("\n") == 1
    assert message in err
