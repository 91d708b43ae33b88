"""resnet-bench gpu: ResNet-50 training on one CUDA GPU, the model-bound ceiling against the whole
job fed from JPEG shards, for each decode path, in one run.

    resnet-bench gpu --images /work/shared/data/imagenet-sample
    resnet-bench gpu --images DIR --compile --decode device --decode-cpus 4

- ``synthetic_ceiling``: a bare loop in this process on one random uint8 (N, 224, 224, 3) batch
  already on the GPU: ``to_float_batch`` -> the job's model (``imagenet-fast``: ResNet-50 v1.5,
  zero-init residual BN) -> label-smoothed loss -> SGD step, with the job's bf16 autocast,
  channels_last and optional ``torch.compile``. No input pipeline: what the GPU can do.
- ``e2e_cpu`` / ``e2e_device``: the training job itself (:func:`pipelines.train.run_training`, one
  GPU worker reserving 2 CPUs, the same model, batch and settings) on shards that resnet-prepare
  writes from ``--images`` (repeated to ``--steps x --batch-size`` training rows), Inception crops
  from full-size JPEGs. ``cpu``: Ray Data tasks decode and crop (``data.decode_device=cpu``);
  ``device``: the tasks only plan the crops and the worker decodes each batch with nvJPEG
  (``data.decode_device=device``), for GPU nodes short of CPU cores. ``--decode-cpus N`` caps the
  decode tasks at N CPUs (default: every free CPU) to play such a node. Figures are the
  job's own throughput windows after ``--warmup`` steps (:func:`pipelines.bench.train.measure_job`).

Prints ``ratio e2e_<path>/synthetic_ceiling`` per path and the issue's targets: end to end >= 0.9x
the ceiling of the same run, and a ceiling >= 3,000 img/s (one H200, ResNet-50, bf16). Where no
CUDA device exists it prints one line and exits 0.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch import Tensor, nn

from pipelines.bench.common import BenchError, ratio_line, target_line
from pipelines.config import JobConfig
from resnet_core.models import create_model, is_cifar_model
from resnet_core.transforms import IMAGENET_MEAN_RGB, IMAGENET_STD_RGB, to_float_batch

SKIP_LINE = "resnet-bench gpu: no CUDA device on this machine: skipped"
CEILING = "synthetic_ceiling"
TARGET_RATIO = 0.9  # issue 7: end to end from shards >= 0.9x the ceiling of the same run
TARGET_CEILING = 3000.0  # issue 7: ResNet-50 img/s on one H200 (bf16, channels_last)
RECIPE = "imagenet-fast"  # the modern GPU recipe: Inception crops, bf16, label smoothing
WORKER_CPUS = 2  # the Train worker's reservation, as the ImageNet recipes make it
DECODE_PATHS = {"cpu": ("cpu",), "device": ("device",), "both": ("cpu", "device")}


def add_parser(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "gpu", help="ResNet-50 on CUDA: synthetic ceiling vs end to end from shards"
    )
    p.add_argument("--images", help="folder of JPEGs for the end-to-end shards (needed on CUDA)")
    p.add_argument("--batch-size", type=int, default=256, help="images per step (one GPU)")
    p.add_argument("--steps", type=int, default=100, help="steps per run, warm-up included")
    p.add_argument("--warmup", type=int, default=20, help="steps left out of the steady state")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (all runs)")
    p.add_argument(
        "--no-channels-last", action="store_true", help="keep NCHW memory (default: NHWC)"
    )
    p.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    p.add_argument(
        "--decode",
        choices=sorted(DECODE_PATHS),
        default="both",
        help="end-to-end decode path(s): Ray Data tasks on CPUs, nvJPEG on the worker's GPU",
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


# ---------------------------------------------------------------------------------------------
# The synthetic ceiling: plain functions of a device, so they also run (tiny) on a CPU
# ---------------------------------------------------------------------------------------------


def build_training(
    config: JobConfig, num_classes: int, device: torch.device, *, channels_last: bool
) -> tuple[nn.Module, torch.optim.Optimizer, nn.Module]:
    """The job's model, SGD optimizer and loss for one worker, as ``train_loop_per_worker``
    builds them (``torch.compile`` when ``config.train.compile``)."""
    from pipelines.train import make_optimizer, model_options

    t, o = config.train, config.optim
    torch.manual_seed(t.seed)
    model = create_model(config.model.name, num_classes=num_classes, **model_options(config))
    model = model.to(device, memory_format=torch.channels_last if channels_last else None)
    optimizer = make_optimizer(model, config)
    if t.compile:
        model = torch.compile(model)
    return model, optimizer, nn.CrossEntropyLoss(label_smoothing=o.label_smoothing)


def synthetic_batch(
    batch_size: int, image_size: int, num_classes: int, device: torch.device
) -> tuple[Tensor, Tensor]:
    """Random uint8 (N, S, S, 3) images and int64 labels, resident on ``device``."""
    generator = torch.Generator().manual_seed(0)
    shape = (batch_size, image_size, image_size, 3)
    images = torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, num_classes, (batch_size,), generator=generator)
    return images.to(device), labels.to(device)


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    criterion: nn.Module,
    images: Tensor,
    labels: Tensor,
    *,
    channels_last: bool,
    bf16: bool,
) -> Tensor:
    """One step of the job's loop on a uint8 batch already on the device: normalise (ImageNet
    statistics, as imagenet-fast) -> forward under bf16 autocast -> loss -> backward -> SGD."""
    x = to_float_batch(
        images, mean=IMAGENET_MEAN_RGB, std=IMAGENET_STD_RGB, channels_last=channels_last
    )
    autocast = (
        torch.autocast(images.device.type, dtype=torch.bfloat16)
        if bf16
        else contextlib.nullcontext()
    )
    with autocast:
        loss = criterion(model(x), labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


def measure_ceiling(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    criterion: nn.Module,
    images: Tensor,
    labels: Tensor,
    *,
    steps: int,
    warmup: int,
    channels_last: bool,
    bf16: bool,
) -> float:
    """Images/s of ``train_step`` on one resident batch over ``steps - warmup`` timed steps;
    the device is synchronised before and after the timed steps (kernels run asynchronously)."""
    step = (model, optimizer, criterion, images, labels)
    for _ in range(warmup):  # cuDNN algorithm choice, allocator growth, torch.compile
        train_step(*step, channels_last=channels_last, bf16=bf16)
    _synchronize(images.device)
    started = time.perf_counter()
    for _ in range(steps - warmup):
        train_step(*step, channels_last=channels_last, bf16=bf16)
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
    from pipelines.bench.train import bench_config
    from pipelines.config import ConfigError, validate
    from pipelines.recipes import build_recipe

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
        validate(config, model_names_ok=lambda name: name == model)  # checked by check_args
    except ConfigError as e:
        raise BenchError(str(e)) from None
    return config


def prepare_shards(image_paths: list[Path], *, src: Path, out: Path, train_rows: int) -> None:
    """Write a dataset to ``out`` with resnet-prepare (its output hidden; Ray must be up) from a
    tree of links made in ``src``, one class per source image: split "train" holds the images
    repeated to at least ``train_rows`` rows, "val" each image once (the job evaluates at its
    end)."""
    from pipelines import prepare

    for split, copies in (("train", -(-train_rows // len(image_paths))), ("val", 1)):
        for i, path in enumerate(image_paths):
            folder = src / split / f"c{i:05d}"
            folder.mkdir(parents=True)
            for copy in range(copies):
                (folder / f"{copy:05d}{path.suffix.lower()}").symlink_to(path.resolve())
    log = io.StringIO()
    with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        status = prepare.main(
            ["folder", "--src", str(src), "--out", str(out), "--max-skipped", "0.5"]
        )
    if status != 0:
        raise BenchError(f"resnet-prepare failed on {src} (exit {status}):\n{log.getvalue()}")


def run_gpu_bench(args: argparse.Namespace, images: Path, device: torch.device) -> dict[str, float]:
    """Run ``resnet-bench gpu`` with the ceiling and the job's worker on ``device`` (CUDA; a CPU
    in the test): print the figures, ratios and targets; return images/s by name."""
    import ray

    from pipelines import train
    from pipelines.bench.data import find_images
    from pipelines.bench.train import measure_job
    from pipelines.manifest import read_manifest

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
        shards = Path(tmp, "shards")
        configs = {
            f"e2e_{path}": e2e_config(
                str(shards),
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
        connected = train.start_ray(first, address=None)
        notes = [f"Ray {time.perf_counter() - started:.1f} s"]
        try:
            train_rows = args.steps * args.batch_size
            prepare_shards(paths, src=Path(tmp, "src"), out=shards, train_rows=train_rows)
            rates = {
                CEILING: ceiling(
                    first,
                    device,
                    num_classes=read_manifest(str(shards)).num_classes,
                    steps=args.steps,
                    warmup=args.warmup,
                )
            }
            print(
                f"  {CEILING:<18} {rates[CEILING]:8.1f} img/s   one uint8 batch resident on the "
                "device, no input pipeline",
                flush=True,
            )
            decoders = args.decode_cpus or "every free one"
            for name, config in configs.items():
                job = measure_job(config, warmup_steps=args.warmup)
                rates[name] = job.images_per_s
                notes.append(f"{name} job start to first step {job.startup_s:.1f} s")
                print(
                    f"  {name:<18} {job.images_per_s:8.1f} img/s   waiting for data "
                    f"{job.data_wait_share:6.1%} of step time (decode CPUs: {decoders})",
                    flush=True,
                )
        finally:
            if connected:
                ray.shutdown()
    for name in configs:
        print(ratio_line(name, CEILING, rates[name] / rates[CEILING]))
    for name in configs:
        print(target_line(name, CEILING, TARGET_RATIO, rates[name] / rates[CEILING]))
    print(ceiling_target_line(rates[CEILING]))
    print(f"start-up (outside the ratios): {'; '.join(notes)}", flush=True)
    return rates


def ceiling(
    config: JobConfig, device: torch.device, *, num_classes: int, steps: int, warmup: int
) -> float:
    """The synthetic ceiling of ``config``'s model, batch, precision, layout and compile setting
    on ``device`` in this process; frees the GPU memory it used (the Train worker is another
    process)."""
    t, d = config.train, config.data
    model, optimizer, criterion = build_training(
        config, num_classes, device, channels_last=t.channels_last
    )
    images, labels = synthetic_batch(t.global_batch, d.image_size, num_classes, device)
    try:
        return measure_ceiling(
            model,
            optimizer,
            criterion,
            images,
            labels,
            steps=steps,
            warmup=warmup,
            channels_last=t.channels_last,
            bf16=t.precision == "bf16",
        )
    finally:
        del model, optimizer, criterion, images, labels
        if device.type == "cuda":
            torch.cuda.empty_cache()


def ceiling_target_line(rate: float) -> str:
    """``target synthetic_ceiling >= 3000 img/s: met (3120 img/s)``."""
    verdict = "met" if rate >= TARGET_CEILING else "missed"
    return f"target {CEILING} >= {TARGET_CEILING:g} img/s: {verdict} ({rate:.0f} img/s)"
