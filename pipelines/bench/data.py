"""resnet-bench data: the CPU input pipeline, ours against torchvision's, per core.

    python -m pipelines.bench data --images /work/shared/data/imagenet-sample --seconds 10

``data`` compares, per CPU core, the CPU side of ImageNet training input pipelines on the same
JPEGs: torchvision's classic ImageFolder pipeline (PIL open -> RandomResizedCrop(224) -> flip ->
ToTensor -> Normalize, float on the CPU) against ours (``resnet_core.cpu_transforms.decode_crop``:
region and draft decoding, one resample, uint8 out; the float part runs on the GPU), the
full-decode ceiling, ours on the same images re-encoded to max side 320 (FFCV-style, in memory,
with resnet-prepare's re-encoder), and both of ours with region decoding off (Pillow decodes the
whole image), so the gain of region decoding shows in the same run. Then it streams prepared
shards end to end through Ray Data (``pipelines.data``) and reports images/s and images/s per
CPU of the local Ray. ``--only per-core`` / ``--only ray`` runs one half.

Per-core figures are images per CPU second of this process (``time.process_time``, one torch
thread), so other load on the machine changes them little; pipelines run interleaved in rounds,
over the same images in the same order. The Ray figure is wall-clock and more sensitive to load;
its per-CPU figure counts the CPU seconds of the driver and of every process of the local Ray
(when this run started it), split into the decode tasks' worker processes, the iterating driver
and Ray's own processes (GCS, raylet, agents, Ray Data's actors). Ray Data's overhead is that
figure against ours_paper on the same shards' images in this process, timed in slices between
the Ray epochs, so both see the same machine load (issue 15's target: >= 0.8x).
"""

from __future__ import annotations

import argparse
import io
import os
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image

from pipelines import data
from pipelines.audit import audit_image
from pipelines.bench.common import (
    BenchError,
    find_images,
    image_dataset,
    print_machine,
    ratio_line,
    target_line,
)
from pipelines.job.session import ray_session
from pipelines.manifest import Manifest, read_manifest
from resnet_core import jpeg
from resnet_core.cpu_transforms import ImageAugment, RandomResizedCrop, ScaleAugment, decode_crop
from resnet_core.transforms import IMAGENET_MEAN_RGB, IMAGENET_STD_RGB

BASELINE = "torchvision_classic"
# The auto-augment policies timed after the Inception crop (torchvision --auto-augment values).
POLICIES = ("ta_wide", "ra", "imagenet", "augmix")
RE_ENCODE_MAX_SIDE = 320  # FFCV-style re-encoding of the (e) pipeline and the small shards
# Targets of the data pipeline (ours vs the classic pipeline, per core).
TARGETS = {"ours_paper": 1.8, "ours_paper_320": 4.0}
# Rows of the temporary shards' training split: an epoch's fixed cost (~0.1 CPU s) then adds
# ~0.02 ms per image, against ~0.1 ms at 1,024 rows (training epochs are far longer).
RAY_ROWS = 4096
# Issue 15: Ray Data end to end gets at least 0.8x the images per CPU second of the same decode
# in one process (at most 25% more CPU per image).
RAY_TARGET = 0.8
REFERENCE_SLICE_S = 0.5  # CPU seconds of the in-process reference after each Ray epoch
REFERENCE_IMAGES = 256  # images of the streamed split the reference decodes
# Titles of the local Ray's worker processes that run tasks: ray::IDLE between tasks, the
# task's name while running one (Ray Data's map tasks: MapBatches(...), Map(...)).
TASK_TITLES = ("ray::IDLE", "ray::Map")


def add_parser(commands: argparse._SubParsersAction) -> None:
    data = commands.add_parser("data", help="CPU input pipeline: ours vs torchvision, per core")
    data.add_argument("--images", required=True, help="folder of JPEGs (searched recursively)")
    data.add_argument(
        "--seconds", type=float, default=10.0, help="CPU seconds per per-core pipeline"
    )
    data.add_argument(
        "--shards",
        action="append",
        help="prepared dataset(s) for the Ray Data run (repeatable); default: prepare temporary "
        f"full-size and max-side-{RE_ENCODE_MAX_SIDE} shards from --images",
    )
    data.add_argument("--split", default="train", help="split of --shards to stream")
    data.add_argument("--batch-size", type=int, default=32, help="Ray Data run batch size")
    data.add_argument("--num-cpus", type=int, help="CPUs of the local Ray (default: all)")
    data.add_argument(
        "--ray-rows",
        type=int,
        default=RAY_ROWS,
        help="rows of the temporary shards (the images repeated), so Ray epochs are timeable",
    )
    data.add_argument(
        "--only",
        choices=("per-core", "ray"),
        help="run only the per-core pipelines or only the Ray Data runs (default: both)",
    )


# ---------------------------------------------------------------------------------------------
# resnet-bench data
# ---------------------------------------------------------------------------------------------


def per_core_pipelines(
    paths: Sequence[Path], datas: Sequence[bytes], small_datas: Sequence[bytes], seed: int = 0
) -> dict[str, Callable[[int], object]]:
    """The per-core pipelines, each a function of an image index (same images for all)."""
    from torchvision import transforms
    from torchvision.datasets.folder import pil_loader

    crop = [transforms.RandomResizedCrop(224), transforms.RandomHorizontalFlip()]
    to_input = [transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN_RGB, IMAGENET_STD_RGB)]
    classic = transforms.Compose(crop + to_input)
    rng = np.random.default_rng(seed)
    paper = ScaleAugment()
    inception = RandomResizedCrop()

    def full_decode(data: bytes) -> Image.Image:
        with Image.open(io.BytesIO(data)) as img:
            return img.convert("RGB")

    # The per-image policies after the Inception crop: ours on the uint8 crop, in the decode
    # tasks (resnet_core.cpu_transforms.ImageAugment); torchvision's reference applies TA to the
    # PIL crop before ToTensor (references/classification/presets.py).
    bilinear = transforms.InterpolationMode.BILINEAR
    with_ta = transforms.Compose(
        [*crop, transforms.TrivialAugmentWide(interpolation=bilinear), *to_input]
    )
    policies = {f"ours_inception_{p}": ImageAugment(p) for p in POLICIES}

    def crop_then(augment: ImageAugment) -> Callable[[int], object]:
        return lambda i: augment(decode_crop(datas[i], inception, rng)[None], rng)

    return {
        BASELINE: lambda i: classic(pil_loader(str(paths[i]))),
        "torchvision_ta_wide": lambda i: with_ta(pil_loader(str(paths[i]))),
        **{name: crop_then(augment) for name, augment in policies.items()},
        "ours_paper": lambda i: decode_crop(datas[i], paper, rng),
        "ours_inception": lambda i: decode_crop(datas[i], inception, rng),
        "full_decode": lambda i: full_decode(datas[i]),
        "ours_paper_320": lambda i: decode_crop(small_datas[i], paper, rng),
        # The same crops decoded whole by Pillow (region decoding off): what region decoding adds.
        "pillow_paper": lambda i: decode_crop(datas[i], paper, rng, region=False),
        "pillow_paper_320": lambda i: decode_crop(small_datas[i], paper, rng, region=False),
    }


def measure_per_core(
    pipelines: dict[str, Callable[[int], object]],
    num_images: int,
    seconds: float,
    rounds: int = 5,
) -> dict[str, float]:
    """Images per CPU second of each pipeline. Pipelines take turns in ``rounds`` rounds of
    ``seconds / rounds`` each, so a change of machine load hits them alike; each walks the
    images in order from where its previous turn stopped."""
    images = dict.fromkeys(pipelines, 0)
    cpu_seconds = dict.fromkeys(pipelines, 0.0)
    for fn in pipelines.values():  # warm-up: imports, first-call allocations
        fn(0)
    for _ in range(rounds):
        for name, fn in pipelines.items():
            start = time.process_time()
            while time.process_time() - start < seconds / rounds:
                fn(images[name] % num_images)
                images[name] += 1
            cpu_seconds[name] += time.process_time() - start
    return {name: images[name] / cpu_seconds[name] for name in pipelines}


class ProcessCpu(NamedTuple):
    """One process of a :func:`process_tree_cpu` snapshot: its parent, the part it counts in,
    its own CPU seconds and those of its children it has reaped."""

    parent: int
    part: str
    own: float
    reaped: float


def process_tree_cpu() -> dict[int, ProcessCpu] | None:
    """This process ("driver") and its descendants by pid: the worker processes of a local Ray
    started by this process that run tasks ("tasks"), and the rest of that Ray ("ray": GCS,
    raylet, agents, Ray Data's actors), with their CPU seconds so far (user + system). None
    without Linux's /proc. :func:`cpu_between` turns two snapshots into CPU by part."""
    proc = Path("/proc")
    if not (proc / "self" / "stat").exists():
        return None
    ticks = os.sysconf("SC_CLK_TCK")
    parents, cpu, titles = {}, {}, {}
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            # Fields after the ")" closing the command name: state ppid ... utime stime cutime cstime
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            title = (entry / "cmdline").read_bytes().split(b"\0", 1)[0].decode(errors="replace")
        except OSError:  # the process ended meanwhile
            continue
        pid = int(entry.name)
        parents[pid], titles[pid] = int(fields[1]), title
        cpu[pid] = [int(v) / ticks for v in fields[11:15]]
    tree, frontier = set(), {os.getpid()}
    while frontier:
        tree |= frontier
        frontier = {pid for pid, parent in parents.items() if parent in frontier} - tree
    snapshot = {}
    for pid in tree:
        part = "driver" if pid == os.getpid() else "ray"
        if part == "ray" and titles[pid].startswith(TASK_TITLES):
            part = "tasks"
        utime, stime, cutime, cstime = cpu[pid]
        snapshot[pid] = ProcessCpu(parents[pid], part, utime + stime, cutime + cstime)
    return snapshot


def cpu_between(before: dict[int, ProcessCpu], after: dict[int, ProcessCpu]) -> dict[str, float]:
    """CPU seconds used between two :func:`process_tree_cpu` snapshots, by part. A process keeps
    one part over the window: "tasks" if it was a task process at either end (a Ray worker
    starts under its Python title and takes ``ray::IDLE`` soon after). One that ended in
    between went into its parent's reaped CPU, whole: that goes to the part of the parent's
    ended children when they share one, and their CPU before the window comes off it."""
    parts = dict.fromkeys(("tasks", "driver", "ray"), 0.0)
    ended = {pid: p for pid, p in before.items() if pid not in after}
    for pid, now in after.items():
        then = before.get(pid, ProcessCpu(now.parent, now.part, 0.0, 0.0))
        part = "tasks" if "tasks" in (then.part, now.part) else now.part
        parts[part] += now.own - then.own
        children = {p.part for p in ended.values() if p.parent == pid}
        parts[children.pop() if len(children) == 1 else part] += now.reaped - then.reaped
    for p in ended.values():
        parts[p.part] -= p.own + p.reaped
    return parts


class Reference:
    """ours_paper in this process over ``datas``, timed in slices of its thread's CPU time."""

    def __init__(self, datas: Sequence[bytes]) -> None:
        self.datas, self.sampler, self.rng = datas, ScaleAugment(), np.random.default_rng(0)
        self.images, self.cpu_s = 0, 0.0
        decode_crop(datas[0], self.sampler, self.rng)  # warm-up

    def run(self, seconds: float) -> None:
        start = time.thread_time()
        while time.thread_time() - start < seconds:
            decode_crop(self.datas[self.images % len(self.datas)], self.sampler, self.rng)
            self.images += 1
        self.cpu_s += time.thread_time() - start

    @property
    def rate(self) -> float:
        """Images per CPU second."""
        return self.images / self.cpu_s


@dataclass(frozen=True)
class RayRun:
    """Images streamed through Ray Data in ``wall_s`` seconds of epochs of ``epoch_rows`` rows;
    ``cpu``: the CPU seconds they took by part (:func:`process_tree_cpu`; None without /proc);
    ``reference``: ours_paper's images per CPU second on the same split's images in this
    process, timed between the epochs; ``epoch_cpu_s``: the CPU seconds of an epoch of one
    batch less the decode of its rows at the reference rate, an epoch's fixed cost (start-up,
    end, the first task's set-up)."""

    images: int
    wall_s: float
    epoch_rows: int
    cpu: dict[str, float] | None
    reference: float
    epoch_cpu_s: float | None


def split_images(manifest: Manifest, split: str, count: int) -> list[bytes]:
    """The first ``count`` encoded images of ``split`` (manifest order)."""
    plan = data.plan_epoch(
        manifest, split, train=False, world_size=1, rank=0, epoch=0, seed=0, batch_size=count,
        max_batches=1,
    )  # fmt: skip
    return [d for t in data.read_plan_rows(plan, count) for d in t.column("image").to_pylist()]


def measure_ray(uri: str, split: str, *, batch_size: int, seconds: float) -> RayRun:
    """End-to-end throughput of the paper augmentation streamed from shards through Ray Data
    (``pipelines.data.iter_batches``, one worker), over whole epochs after a warm-up epoch, each
    followed by a slice of the in-process reference (:class:`Reference`); then three epochs of
    one batch for an epoch's fixed cost."""
    manifest = read_manifest(uri)
    options = data.DecodeOptions(mode="paper", image_size=224)  # the training job's defaults
    print(
        f"  decode tasks: {data.task_chunks(options)} chunks "
        f"of {options.task_rows} rows each (pipelines.data.chunks_per_task)",
        flush=True,
    )

    def epoch(number: int, cpu: Counter, max_batches: int | None = None) -> int:
        """Stream an epoch; add its CPU seconds by part to ``cpu``; return its images."""
        before = process_tree_cpu()
        batches = data.iter_batches(
            manifest,
            options,
            split=split,
            world_size=1,
            rank=0,
            epoch=number,
            seed=0,
            batch_size=batch_size,
            max_batches=max_batches,
        )
        images = sum(len(labels) for _, labels in batches)
        after = process_tree_cpu()
        if before is not None and after is not None:
            cpu.update(cpu_between(before, after))
        return images

    reference = Reference(split_images(manifest, split, REFERENCE_IMAGES))
    epoch(0, Counter())  # warm-up: Ray worker processes, imports
    images, number, wall, cpu = 0, 1, 0.0, Counter()
    while images == 0 or wall < seconds:
        start = time.perf_counter()
        images += epoch(number, cpu)
        wall += time.perf_counter() - start
        reference.run(REFERENCE_SLICE_S)
        number += 1
    short = Counter()
    short_images = sum(epoch(number + i, short, max_batches=1) for i in range(3))
    epoch_cpu = (sum(short.values()) - short_images / reference.rate) / 3 if short else None
    epoch_rows = images // (number - 1)
    return RayRun(images, wall, epoch_rows, dict(cpu) or None, reference.rate, epoch_cpu)


def run_data_bench(
    images: Path,
    *,
    seconds: float,
    shards: Sequence[str] | None,
    split: str,
    batch_size: int,
    num_cpus: int | None,
    min_rows: int = RAY_ROWS,
    only: str | None = None,
) -> dict[str, float]:
    """Run ``resnet-bench data``, print its table and ratio lines; return images/s per name.
    ``only``: "per-core" or "ray" runs that half alone."""
    paths = find_images(images)
    torch.set_num_threads(1)
    audited = [audit_image(p.read_bytes()) for p in paths]
    small = [audit_image(p.read_bytes(), max_side=RE_ENCODE_MAX_SIDE) for p in paths]
    usable = [i for i, (a, s) in enumerate(zip(audited, small, strict=True)) if a.data and s.data]
    if not usable:
        raise BenchError(f"none of the {len(paths)} files under {images} is a usable image")
    paths = [paths[i] for i in usable]
    sizes = [(audited[i].width, audited[i].height) for i in usable]
    print(
        f"resnet-bench data: {len(paths)} images from {images} "
        f"(median {int(np.median([w for w, _ in sizes]))}x{int(np.median([h for _, h in sizes]))}"
        f"{f', {len(audited) - len(usable)} unusable skipped' if len(usable) < len(audited) else ''})"
        f"; {seconds:g} CPU s per pipeline, 1 thread",
        flush=True,
    )
    print_machine()
    print(f"JPEG decoder: {jpeg.status()}", flush=True)
    rates: dict[str, float] = {}
    if only != "ray":
        pipelines = per_core_pipelines(
            paths, [audited[i].data for i in usable], [small[i].data for i in usable]
        )
        rates = measure_per_core(pipelines, len(paths), seconds)
        for name, rate in rates.items():
            print(f"  {name:<22} {rate:8.1f} img/s per core", flush=True)
        for name in rates:
            if name != BASELINE:
                _print_ratio(name, rates[name] / rates[BASELINE])
        print_policy_costs(rates)
    overheads = {}
    if only != "per-core":
        with ray_session(num_cpus=num_cpus, dashboard=False) as started:
            overheads = ray_rates(
                rates, paths, shards, split, batch_size, seconds, min_rows, started
            )
    for name, target in TARGETS.items() if rates.get(BASELINE) else ():
        print(target_line(name, BASELINE, target, rates[name] / rates[BASELINE]))
    for (name, reference), ratio in overheads.items():
        print(target_line(name, reference, RAY_TARGET, ratio))
    return rates


def ray_rates(
    rates: dict[str, float],
    paths: Sequence[Path],
    shards: Sequence[str] | None,
    split: str,
    batch_size: int,
    seconds: float,
    min_rows: int,
    started: bool,
) -> dict[tuple[str, str], float]:
    """Add the Ray Data runs' rates to ``rates`` (Ray must be up; ``started``: by this run) and
    print them; returns each run's per-CPU rate against its in-process reference, by
    ``(name, reference name)``."""
    import ray

    cpus = ray.cluster_resources().get("CPU", 1.0)
    with tempfile.TemporaryDirectory(prefix="resnet-bench-") as tmp:
        if shards:
            runs = {f"ray_{Path(uri).name}": uri for uri in shards}
        else:
            runs = {
                "ray_paper": image_dataset(paths, Path(tmp), train_rows=min_rows),
                "ray_paper_320": image_dataset(
                    paths, Path(tmp), train_rows=min_rows, max_side=RE_ENCODE_MAX_SIDE
                ),
            }
        overheads = {}
        for name, uri in runs.items():
            run = measure_ray(uri, split, batch_size=batch_size, seconds=seconds)
            # Per CPU: images per CPU second of the driver and every local Ray process when
            # this run started Ray (robust to other load), else wall rate / cluster CPUs.
            counted = started and run.cpu is not None
            rate = run.images / run.wall_s
            per_cpu = run.images / sum(run.cpu.values()) if counted else rate / cpus
            how = "per CPU second, all Ray processes" if counted else "per CPU"
            rates[name], rates[f"{name}_per_cpu"] = rate, per_cpu
            reference = name.replace("ray_", "ours_", 1)
            print(
                f"  {name:<22} {rate:8.1f} img/s end to end on {cpus:g} CPUs "
                f"({run.images} images, Ray Data); {per_cpu:.1f} img/s {how}",
                flush=True,
            )
            if counted:
                print_cpu_split(name, run, reference)
            if rates.get(BASELINE):
                _print_ratio(f"{name}_per_cpu", per_cpu / rates[BASELINE])
            overheads[(f"{name}_per_cpu", reference)] = per_cpu / run.reference
            print(ratio_line(f"{name}_per_cpu", reference, per_cpu / run.reference), flush=True)
    return overheads


def print_cpu_split(name: str, run: RayRun, reference: str) -> None:
    """Where a Ray run's CPU went, in milliseconds per image, beside its in-process reference."""
    ms = {part: 1000 * seconds / run.images for part, seconds in run.cpu.items()}
    print(
        f"  {name} CPU per image: {sum(ms.values()):.2f} ms = decode tasks' processes "
        f"{ms['tasks']:.2f} + driver {ms['driver']:.2f} + Ray's own processes {ms['ray']:.2f}; "
        f"{reference} in one process, between the epochs: {1000 / run.reference:.2f} ms",
        flush=True,
    )
    if run.epoch_cpu_s is not None:
        print(
            f"  {name} fixed cost of an epoch (start-up, end): {1000 * run.epoch_cpu_s:.0f} CPU "
            f"ms, {1000 * run.epoch_cpu_s / run.epoch_rows:.2f} ms per image at "
            f"{run.epoch_rows} rows per epoch",
            flush=True,
        )


def print_policy_costs(rates: dict[str, float]) -> None:
    """What each per-image policy adds to an Inception crop, in CPU milliseconds per image, and
    ours with TrivialAugment against torchvision's reference preset with it."""
    crop_ms = 1000 / rates["ours_inception"]
    for policy in POLICIES:
        added = 1000 / rates[f"ours_inception_{policy}"] - crop_ms
        print(
            f"policy {policy}: +{added:.2f} ms per image per core "
            f"({100 * added / crop_ms:.0f}% of the crop's {crop_ms:.2f} ms)",
            flush=True,
        )
    ratio = rates["ours_inception_ta_wide"] / rates["torchvision_ta_wide"]
    print(ratio_line("ours_inception_ta_wide", "torchvision_ta_wide", ratio), flush=True)


def _print_ratio(name: str, ratio: float) -> None:
    print(ratio_line(name, BASELINE, ratio), flush=True)


def run(args: argparse.Namespace) -> None:
    if args.seconds <= 0 or args.batch_size < 1 or args.ray_rows < 1:
        raise BenchError(
            f"--seconds {args.seconds}, --batch-size {args.batch_size} and --ray-rows "
            f"{args.ray_rows} must be positive"
        )
    run_data_bench(
        Path(args.images),
        seconds=args.seconds,
        shards=args.shards,
        split=args.split,
        batch_size=args.batch_size,
        num_cpus=args.num_cpus,
        min_rows=args.ray_rows,
        only=args.only,
    )
