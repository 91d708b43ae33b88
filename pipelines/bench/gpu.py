"""resnet-bench gpu: ResNet-50 training on one CUDA GPU, the model-bound ceiling against the whole
job fed from JPEG shards, for each decode path, in one run.

    resnet-bench gpu --images /work/shared/data/imagenet-sample
    resnet-bench gpu --images DIR --compile --decode device --decode-cpus 4
    resnet-bench gpu --levers            # the step's speed levers side by side (no shards)

- ``synthetic_ceiling``: a bare loop in this process on one random uint8 (N, 224, 224, 3) batch
  already on the GPU, calling the job's own training step (:func:`pipelines.job.parts.
  build_training`: normalise -> the job's model (``imagenet-fast``: ResNet-50 v1.5, zero-init
  residual BN) -> label-smoothed loss -> SGD step, with the job's bf16 autocast, channels_last,
  fused SGD, and with ``--compile`` the step's compiled forward). No input pipeline: what the
  GPU can do.
- ``e2e_cpu`` / ``e2e_device``: the training job itself (:func:`pipelines.job.trainer.run_training`, one
  GPU worker reserving 2 CPUs, the same model, batch and settings) on shards that resnet-prepare
  writes from ``--images`` (repeated to ``--steps x --batch-size`` training rows), Inception crops
  from full-size JPEGs. ``cpu``: Ray Data tasks decode and crop (``data.decode_device=cpu``);
  ``device``: the tasks only plan the crops and the worker decodes each batch with nvJPEG
  (``data.decode_device=device``), for GPU nodes short of CPU cores. ``--decode-cpus N`` caps the
  decode tasks at N CPUs (default: every free CPU) to play such a node. Figures are the
  job's own throughput windows after ``--warmup`` steps (:func:`pipelines.bench.common.measure_job`).

Prints ``ratio e2e_<path>/synthetic_ceiling`` per path and the issue's targets: end to end >= 0.9x
the ceiling of the same run, and a ceiling >= 3,000 img/s (one H200, ResNet-50, bf16). Where no
CUDA device exists it prints one line and exits 0.

``--levers`` prints instead the ceiling under each speed lever of the step (:data:`LEVERS`:
fused vs foreach SGD, cudnn.benchmark, twice the batch, compile modes, normalisation in or out
of the compiled graph), each as ``ratio <lever>/eager``; ``--levers all`` adds the rows that
cost minutes of compiling (:data:`MORE_LEVERS`), ``--levers a,b`` picks rows.
"""

from __future__ import annotations

import argparse
import functools
import gc
import io
import os
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from pipelines.bench.common import (
    BenchError,
    bench_config,
    find_images,
    image_dataset,
    measure_job,
    ratio_line,
    target_line,
)
from pipelines.config import ConfigError, JobConfig, validate
from pipelines.job.parts import build_training
from pipelines.job.session import local_cpus, ray_session
from pipelines.job.startup import phases as startup_phases
from pipelines.manifest import Manifest, ShardInfo, SplitInfo, read_manifest
from pipelines.recipes import build_recipe
from resnet_core.cpu_transforms import RandomResizedCrop, decode_crop, sample_crop
from resnet_core.models import is_cifar_model
from resnet_core.transforms import decode_jpeg_crops

SKIP_LINE = "resnet-bench gpu: no CUDA device on this machine: skipped"
CEILING = "synthetic_ceiling"
TARGET_RATIO = 0.9  # issue 7: end to end from shards >= 0.9x the ceiling of the same run
TARGET_CEILING = 3000.0  # issue 7: ResNet-50 img/s on one H200 (bf16, channels_last)
# Issue 15, one H200 with its 16 CPUs, ResNet-50 at 224 px, bf16, compiled: end to end (best
# decode path), the device path against the compiled ceiling (with --decode-cpus 4), GPU
# decode + crop of 256 full-size JPEGs alone, and the job's start to its first step.
TARGET_E2E, TARGET_DEVICE_RATIO, TARGET_DECODE, TARGET_STARTUP_S = 8000.0, 0.95, 12000.0, 15.0
RECIPE = "imagenet-fast"  # the modern GPU recipe: Inception crops, bf16, label smoothing
WORKER_CPUS = 2  # the Train worker's reservation, as the ImageNet recipes make it
DECODE_PATHS = {
    "cpu": ("cpu",),
    "device": ("device",),
    "auto": ("auto",),
    "both": ("cpu", "device"),
    "all": ("cpu", "device", "auto"),
}


def add_parser(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "gpu", help="ResNet-50 on CUDA: synthetic ceiling vs end to end from shards"
    )
    p.add_argument("--images", help="folder of JPEGs for the end-to-end shards (needed on CUDA)")
    p.add_argument("--batch-size", type=int, default=256, help="images per step (one GPU)")
    p.add_argument("--steps", type=int, default=100, help="steps per run, warm-up included")
    p.add_argument("--warmup", type=int, default=20, help="steps left out of the steady state")
    p.add_argument("--compile", action="store_true", help="torch.compile the step (all runs)")
    p.add_argument(
        "--levers",
        nargs="?",
        const="standard",
        help="instead: the ceiling under each speed lever, side by side (no shards, no Ray); "
        f"'all' adds minutes of max-autotune; or some of: {','.join(LEVER_NAMES)}",
    )
    p.add_argument(
        "--no-channels-last", action="store_true", help="keep NCHW memory (default: NHWC)"
    )
    p.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    p.add_argument(
        "--decode",
        choices=sorted(DECODE_PATHS),
        default="all",
        help="end-to-end decode path(s): Ray Data tasks on CPUs, nvJPEG on the worker's GPU, "
        "or both sharing the batches (auto)",
    )
    p.add_argument(
        "--decode-cpus",
        type=int,
        help="CPUs for the Ray Data decode tasks (default: all), to play a CPU-poor GPU node",
    )
    # Small settings for trying the command (and its tests) quickly; the targets are for the
    # defaults.
    p.add_argument("--model", default="resnet50", help=argparse.SUPPRESS)
    p.add_argument("--image-size", type=int, default=224, help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> None:
    check_args(args)
    if not torch.cuda.is_available():
        print(SKIP_LINE, flush=True)
        return
    if args.levers:
        run_levers(args, torch.device("cuda"))
        return
    if args.images is None:
        raise BenchError("--images is missing: pass a folder of JPEGs for the end-to-end shards")
    run_gpu_bench(args, Path(args.images), torch.device("cuda"))


def check_args(args: argparse.Namespace) -> None:
    """Bad values fail the same way with or without a GPU (BenchError: one line, exit 2)."""
    for name in ("batch_size", "steps", "warmup"):
        if getattr(args, name) < 1:
            raise BenchError(f"--{name.replace('_', '-')} {getattr(args, name)} must be >= 1")
    if args.image_size < 32:
        raise BenchError(f"--image-size {args.image_size} must be >= 32")
    if args.warmup >= args.steps:
        raise BenchError(f"--warmup {args.warmup} must be below --steps {args.steps}")
    if args.decode_cpus is not None and args.decode_cpus < 1:
        raise BenchError(f"--decode-cpus {args.decode_cpus} must be >= 1 (or left out: all)")
    try:
        cifar = is_cifar_model(args.model)
    except ValueError as e:
        raise BenchError(f"--model {args.model!r}: {e}") from None
    if cifar:
        raise BenchError(f"--model {args.model!r} is a CIFAR net; use an ImageNet one (resnet50)")
    if args.levers:
        chosen_levers(args.levers)


# ---------------------------------------------------------------------------------------------
# The synthetic ceiling: plain functions of a device, so they also run (tiny) on a CPU
# ---------------------------------------------------------------------------------------------


def synthetic_batch(
    batch_size: int, image_size: int, num_classes: int, device: torch.device
) -> tuple[Tensor, Tensor]:
    """Random uint8 (N, S, S, 3) images and int64 labels, resident on ``device``."""
    generator = torch.Generator().manual_seed(0)
    shape = (batch_size, image_size, image_size, 3)
    images = torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, num_classes, (batch_size,), generator=generator)
    return images.to(device), labels.to(device)


def measure_ceiling(
    step: Callable[[Tensor, Tensor], object],
    images: Tensor,
    labels: Tensor,
    *,
    steps: int,
    warmup: int,
) -> float:
    """Images/s of the training ``step`` on one resident batch over ``steps - warmup`` timed
    steps; the device is synchronised before and after the timed steps (kernels run
    asynchronously)."""
    for _ in range(warmup):  # cuDNN algorithm choice, allocator growth, torch.compile
        step(images, labels)
    _synchronize(images.device)
    started = time.perf_counter()
    for _ in range(steps - warmup):
        step(images, labels)
    _synchronize(images.device)
    return (steps - warmup) * images.shape[0] / (time.perf_counter() - started)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------
# End to end: the training job on shards
# ---------------------------------------------------------------------------------------------


def e2e_config(
    uri: str,
    *,
    model: str,
    image_size: int,
    batch: int,
    steps: int,
    warmup: int,
    precision: str,
    channels_last: bool,
    compile: bool,
    decode_device: str,
    decode_cpus: int | None,
    storage: str,
    use_gpu: bool = True,
) -> JobConfig:
    """The imagenet-fast job on one worker (a GPU one unless ``use_gpu`` is off, as in the CPU
    test) for ``steps`` steps of ``batch`` images, reporting every ``warmup`` steps, decoding
    with ``decode_device``; ``decode_cpus`` caps the decode tasks (one CPU each) at that many
    (None: as many as Ray can run). Validated like resnet-train's config (BenchError if not)."""
    config = bench_config(
        build_recipe(RECIPE, model),
        uri=uri,
        batch=batch,
        steps=steps,
        warmup=warmup,
        threads=WORKER_CPUS,
        storage=storage,
    )
    config = replace(
        config,
        data=replace(
            config.data,
            image_size=image_size,
            eval_resize=round(image_size * 256 / 224),
            decode_device=decode_device,
            decode_cpus=1.0,
            decode_concurrency=decode_cpus,
        ),
        train=replace(
            config.train, precision=precision, channels_last=channels_last, compile=compile
        ),
        scale=replace(config.scale, use_gpu=use_gpu, gpus_per_worker=1.0),
    )
    try:
        validate(config)
    except ConfigError as e:
        raise BenchError(str(e)) from None
    return config


def run_gpu_bench(args: argparse.Namespace, images: Path, device: torch.device) -> dict[str, float]:
    """Run ``resnet-bench gpu`` with the ceiling and the job's worker on ``device`` (CUDA; a CPU
    in the test): print the figures, ratios and targets; return images/s by name."""
    paths = find_images(images)
    channels_last = not args.no_channels_last
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(
        f"resnet-bench gpu: {args.model} on {device_name}, batch "
        f"{args.batch_size}, {args.image_size}px, {args.precision}, "
        f"{'channels_last' if channels_last else 'NCHW'}, compile "
        f"{'on' if args.compile else 'off'}; {args.steps} steps per run ({args.warmup} warm-up); "
        f"{len(paths)} images from {images}; {os.cpu_count()} CPUs",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="resnet-bench-gpu-") as tmp:
        configs = {
            f"e2e_{path}": e2e_config(
                str(Path(tmp, "shards")),
                model=args.model,
                image_size=args.image_size,
                batch=args.batch_size,
                steps=args.steps,
                warmup=args.warmup,
                precision=args.precision,
                channels_last=channels_last,
                compile=args.compile,
                decode_device=path,
                decode_cpus=args.decode_cpus,
                storage=str(Path(tmp, "runs")),
                use_gpu=device.type == "cuda",
            )
            for path in DECODE_PATHS[args.decode]
        }
        first = next(iter(configs.values()))
        started = time.perf_counter()
        with ray_session(
            num_cpus=local_cpus(first.scale.cpus_per_worker + first.data.decode_cpus),
            gpus_needed=1 if device.type == "cuda" else 0,
            gpus_for="resnet-bench gpu",
        ):
            notes = [f"Ray {time.perf_counter() - started:.1f} s"]
            image_dataset(paths, Path(tmp), train_rows=args.steps * args.batch_size)
            rates, startups = measure_all(configs, args, device, notes)
    cpus = args.decode_cpus or max(1, (os.cpu_count() or 1) - WORKER_CPUS)
    rates |= print_decode_rates(paths, args, device, cpus)
    print_targets(rates, startups, list(configs))
    print(f"start-up (outside the ratios): {'; '.join(notes)}", flush=True)
    return rates


def print_targets(
    rates: dict[str, float], startups: dict[str, dict[str, float]], jobs: list[str]
) -> None:
    """The ratios and every target line of the run (issues 7 and 15)."""
    for name in jobs:
        print(ratio_line(name, CEILING, rates[name] / rates[CEILING]))
    for name in jobs:
        print(target_line(name, CEILING, TARGET_RATIO, rates[name] / rates[CEILING]))
    if "e2e_device" in rates:
        ratio = rates["e2e_device"] / rates[CEILING]
        print(target_line("e2e_device", CEILING, TARGET_DEVICE_RATIO, ratio))
    print(ceiling_target_line(rates[CEILING]))
    best = max(jobs, key=lambda name: rates[name])
    print(rate_target_line(f"end to end ({best})", rates[best], TARGET_E2E))
    print(rate_target_line(GPU_DECODE, rates[GPU_DECODE], TARGET_DECODE))
    for name in jobs:
        split = startups[name]
        if split:
            print(f"  start-up {name}: {split['startup/total_s']:.1f} s ({startup_phases(split)})")
            verdict = "met" if split["startup/total_s"] <= TARGET_STARTUP_S else "missed"
            print(
                f"target {name} start to first step <= {TARGET_STARTUP_S:g} s: {verdict} "
                f"({split['startup/total_s']:.1f} s)",
                flush=True,
            )


def rate_target_line(name: str, rate: float, target: float) -> str:
    """``target <name> >= 8000 img/s: met (8120 img/s)``."""
    verdict = "met" if rate >= target else "missed"
    return f"target {name} >= {target:g} img/s: {verdict} ({rate:.0f} img/s)"


def measure_all(
    configs: dict[str, JobConfig], args: argparse.Namespace, device: torch.device, notes: list
) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """The ceiling (compiled or not, as the jobs; compiled, the eager one beside it), then the
    job for each decode path (Ray must be up): images/s by name, and each job's start-up split."""
    first = next(iter(configs.values()))
    manifest = read_manifest(first.data.uri)
    ceilings = {CEILING: first}
    if first.train.compile:
        ceilings[f"{CEILING}_eager"] = replace(first, train=replace(first.train, compile=False))
    rates = {}
    for name, config in ceilings.items():
        rates[name] = ceiling(config, manifest, device, steps=args.steps, warmup=args.warmup)
        kind = "compiled" if config.train.compile else "eager"
        print(
            f"  {name:<26} {rates[name]:8.1f} img/s   one uint8 batch resident on the device, "
            f"no input pipeline ({kind})",
            flush=True,
        )
    decoders = args.decode_cpus or "every free one"
    startups = {}
    for name, config in configs.items():
        job = measure_job(config, warmup_steps=args.warmup)
        rates[name], startups[name] = job.images_per_s, job.startup
        notes.append(f"{name} job start to first step {job.startup_s:.1f} s")
        print(
            f"  {name:<26} {job.images_per_s:8.1f} img/s   waiting for data "
            f"{job.data_wait_share:6.1%} of step time (decode CPUs: {decoders})",
            flush=True,
        )
    return rates, startups


def ceiling(
    config: JobConfig,
    manifest: Manifest,
    device: torch.device,
    *,
    steps: int,
    warmup: int,
    normalize_in_graph: bool = True,
) -> float:
    """The synthetic ceiling of ``config``'s model, batch, precision, layout, compile and
    optimizer settings on ``device`` in this process: the job's own training step on one
    resident batch. Frees the memory it used, compiled graphs included (the Train worker is
    another process; the next lever starts clean)."""
    t, d = config.train, config.data
    training = build_training(config, manifest, device)
    training.step.normalize_in_graph = normalize_in_graph
    images, labels = synthetic_batch(t.global_batch, d.image_size, manifest.num_classes, device)
    try:
        return measure_ceiling(training.step, images, labels, steps=steps, warmup=warmup)
    finally:
        del training, images, labels
        torch._dynamo.reset()  # compiled graphs and CUDA-graph memory pools
        gc.collect()  # the step and its compiled forward hold each other
        if device.type == "cuda":
            torch.cuda.empty_cache()


def ceiling_target_line(rate: float) -> str:
    """``target synthetic_ceiling >= 3000 img/s: met (3120 img/s)``."""
    verdict = "met" if rate >= TARGET_CEILING else "missed"
    return f"target {CEILING} >= {TARGET_CEILING:g} img/s: {verdict} ({rate:.0f} img/s)"


# ---------------------------------------------------------------------------------------------
# Decode alone: nvJPEG, nvJPEG + the batched crop resample, the CPU path over processes
# ---------------------------------------------------------------------------------------------

DEVICE_DECODE, GPU_DECODE, CPU_DECODE = "device_decode", "device_decode_crop", "cpu_decode_crop"


def print_decode_rates(
    paths: list[Path], args: argparse.Namespace, device: torch.device, cpus: int
) -> dict[str, float]:
    """Each decode alone, side by side, on the run's images (:func:`decode_rates`)."""
    datas = [data for data in map(Path.read_bytes, paths) if data[:2] == b"\xff\xd8"]  # JPEG
    if not datas:
        raise BenchError(f"no JPEG among the {len(paths)} images: the decode rows need JPEGs")
    rates = decode_rates(
        datas, batch_size=args.batch_size, image_size=args.image_size, device=device, cpus=cpus
    )
    what = {
        DEVICE_DECODE: "batched decode_jpeg alone (nvJPEG on CUDA)",
        GPU_DECODE: "decode + every crop's resample, as the device path",
        CPU_DECODE: f"the CPU path's decode_crop in {cpus} processes",
    }
    for name, rate in rates.items():
        print(f"  {name:<26} {rate:8.1f} img/s   {what[name]}", flush=True)
    return rates


def decode_rates(
    datas: list[bytes], *, batch_size: int, image_size: int, device: torch.device, cpus: int
) -> dict[str, float]:
    """Images/s of each decode on its own, over batches of ``batch_size`` of ``datas`` (cycled),
    Inception crops planned from the headers as the job's tasks plan them:
    ``device_decode`` (batched ``decode_jpeg`` alone), ``device_decode_crop``
    (:func:`resnet_core.transforms.decode_jpeg_crops`: the job's device path) and
    ``cpu_decode_crop`` (the CPU path's ``decode_crop`` in ``cpus`` processes)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    batch = [datas[i % len(datas)] for i in range(batch_size)]
    tensors = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in batch]
    rng, sampler = np.random.default_rng(0), RandomResizedCrop(image_size)
    planned = [sample_crop(sampler, rng, *Image.open(io.BytesIO(d)).size) for d in batch]
    boxes, flips = np.array([b for b, _ in planned]), np.array([f for _, f in planned])
    rates = {
        DEVICE_DECODE: _rate(
            lambda: decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device), batch_size, device
        ),
        GPU_DECODE: _rate(
            lambda: decode_jpeg_crops(tensors, boxes, flips, image_size, device=device),
            batch_size,
            device,
        ),
    }
    with ProcessPoolExecutor(cpus) as pool:
        work = functools.partial(_cpu_crops, image_size=image_size)
        chunks = [batch[i::cpus] for i in range(cpus)]
        rates[CPU_DECODE] = _rate(lambda: list(pool.map(work, chunks)), batch_size, None)
    return rates


def _cpu_crops(datas: list[bytes], *, image_size: int) -> int:
    rng, sampler = np.random.default_rng(0), RandomResizedCrop(image_size)
    for data in datas:
        decode_crop(data, sampler, rng)
    return len(datas)


def _rate(work: Callable[[], object], images: int, device: torch.device | None) -> float:
    """Images/s of ``work`` (``images`` per call): one warm-up call, then calls for >= 2 s."""
    work()
    if device is not None:
        _synchronize(device)
    calls, started = 0, time.perf_counter()
    while calls < 3 or time.perf_counter() - started < 2.0:
        work()
        calls += 1
    if device is not None:
        _synchronize(device)
    return calls * images / (time.perf_counter() - started)


# ---------------------------------------------------------------------------------------------
# The levers: the ceiling under each speed setting of the step, side by side
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Lever:
    """One ``--levers`` row: the ceiling with these settings; model, precision and layout are
    the run's (``--model``, ``--precision``, ``--no-channels-last``)."""

    name: str
    what: str
    compile_mode: str | None = None  # train.compile_mode; None: eager
    optimizer: str = "fused"  # optim.implementation
    normalize_in_graph: bool = True  # False: normalised eagerly before the compiled graph
    batch_factor: int = 1  # the batch is --batch-size times this
    cudnn_benchmark: bool = False


BASELINE_LEVER = "eager"
LEVER_CLASSES = 1000  # ImageNet's classifier
LEVERS = (
    Lever(BASELINE_LEVER, "eager, foreach SGD (torch's default on CUDA)", optimizer="foreach"),
    Lever("eager_fused", "eager, fused SGD"),
    Lever("eager_cudnn_benchmark", "eager, fused SGD, cudnn.benchmark", cudnn_benchmark=True),
    Lever("eager_batch_x2", "eager, fused SGD, twice the batch", batch_factor=2),
    Lever("compiled", "compile default: normalise + model + loss in one graph", "default"),
    Lever(
        "compiled_norm_outside",
        "compile default, normalised eagerly before the graph",
        "default",
        normalize_in_graph=False,
    ),
    Lever("reduce_overhead", "compile reduce-overhead: CUDA graphs", "reduce-overhead"),
)
MORE_LEVERS = (  # minutes of compiling each
    Lever("compiled_foreach", "compile default, foreach SGD", "default", optimizer="foreach"),
    Lever("compiled_batch_x2", "compile default, twice the batch", "default", batch_factor=2),
    Lever("max_autotune", "compile max-autotune-no-cudagraphs", "max-autotune-no-cudagraphs"),
)
LEVER_NAMES = tuple(lever.name for lever in LEVERS + MORE_LEVERS)


def chosen_levers(spec: str) -> tuple[Lever, ...]:
    """``standard``, ``all`` or a comma list of names; the baseline always runs first."""
    if spec == "standard":
        return LEVERS
    if spec == "all":
        return LEVERS + MORE_LEVERS
    names = [name.strip() for name in spec.split(",") if name.strip()]
    unknown = [name for name in names if name not in LEVER_NAMES]
    if unknown or not names:
        raise BenchError(
            f"--levers {spec!r}: use standard, all, or some of {', '.join(LEVER_NAMES)}"
        )
    picked = {BASELINE_LEVER, *names}
    return tuple(lever for lever in LEVERS + MORE_LEVERS if lever.name in picked)


def lever_config(base: JobConfig, lever: Lever) -> JobConfig:
    """``base`` (the ceiling's config) with ``lever``'s compile, optimizer and batch."""
    t = base.train
    return replace(
        base,
        optim=replace(base.optim, implementation=lever.optimizer),
        train=replace(
            t,
            global_batch=t.global_batch * lever.batch_factor,
            compile=lever.compile_mode is not None,
            compile_mode=lever.compile_mode or "default",
        ),
    )


def synthetic_manifest(num_classes: int, train_rows: int) -> Manifest:
    """A manifest with no files behind it: the classes and split size the step needs."""
    split = SplitInfo(train_rows, (ShardInfo("train/none.parquet", train_rows, 1, "0" * 64),))
    names = tuple(f"class{i}" for i in range(num_classes))
    splits = {"train": split, "val": split}
    return Manifest("synthetic", "synthetic", names, names, splits, None, 95, None, None, None,
                    "0" * 64, {})  # fmt: skip


def measure_levers(
    base: JobConfig, levers: tuple[Lever, ...], device: torch.device, *, steps: int, warmup: int
) -> dict[str, float]:
    """Images/s of the ceiling under each lever, one after the other in this process."""
    manifest = synthetic_manifest(LEVER_CLASSES, base.train.global_batch * steps * 2)
    rates = {}
    for lever in levers:
        config = lever_config(base, lever)
        previous = torch.backends.cudnn.benchmark
        torch.backends.cudnn.benchmark = lever.cudnn_benchmark
        try:
            rates[lever.name] = ceiling(
                config, manifest, device, steps=steps, warmup=warmup,
                normalize_in_graph=lever.normalize_in_graph,
            )  # fmt: skip
        finally:
            torch.backends.cudnn.benchmark = previous
        ratio = rates[lever.name] / rates[BASELINE_LEVER]
        print(
            f"  {lever.name:<22} {rates[lever.name]:8.1f} img/s {ratio:5.2f}x  {lever.what} "
            f"(batch {config.train.global_batch})",
            flush=True,
        )
    return rates


def run_levers(args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    """``resnet-bench gpu --levers``: the lever rows and their ratios to eager, on ``device``
    (CUDA; a CPU in the test); returns images/s by lever."""
    levers = chosen_levers(args.levers)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    base = e2e_config(
        "synthetic", model=args.model, image_size=args.image_size, batch=args.batch_size,
        steps=args.steps, warmup=args.warmup, precision=args.precision,
        channels_last=not args.no_channels_last, compile=False, decode_device="cpu",
        decode_cpus=None, storage="unused", use_gpu=device.type == "cuda",
    )  # fmt: skip
    print(
        f"resnet-bench gpu --levers: {args.model} on {device_name}, batch {args.batch_size}, "
        f"{args.image_size}px, {args.precision}, "
        f"{'NCHW' if args.no_channels_last else 'channels_last'}; {args.steps} steps per row "
        f"({args.warmup} warm-up; compiling is in the warm-up)",
        flush=True,
    )
    rates = measure_levers(base, levers, device, steps=args.steps, warmup=args.warmup)
    for lever in levers[1:]:
        print(ratio_line(lever.name, BASELINE_LEVER, rates[lever.name] / rates[BASELINE_LEVER]))
    return rates
