"""resnet-bench scaling: predicted images/s and scaling efficiency of data-parallel training.

    python -m pipelines.bench scaling                      # ResNet-50 at 1, 8, 64, 256 GPUs
    python -m pipelines.bench scaling --network-gbits 100 --grad-dtype bf16 --gpus 8 32 128
    python -m pipelines.bench scaling --validate           # + the 2-process CPU check (~1 min)

An analytic model, not a measurement: every number in the table follows from the inputs printed
above it. Per step, each GPU computes its batch while DDP broadcasts rank 0's BatchNorm buffers
(before forward) and all-reduces the gradient (one ring all-reduce per DDP bucket). Ring
all-reduce of B bytes over n ranks takes ``2(n-1)/n * B / bus_bandwidth + 2(n-1) * step_latency``;
hierarchically, within each node over NVLink, then across nodes over the network. Part of the
all-reduce runs during backward (DDP launches a bucket's all-reduce as soon as its gradients are
ready); the rest is exposed and adds to the step. The input pipeline caps the rate too: decode
vCPUs per GPU, and S3 bandwidth per node for the encoded images. The binding resource is the one
that gives the fewest images/s per GPU.

``--validate`` checks the compute/communication split on this machine: CIFAR ResNet-20 in two
processes with one torch thread each, gloo on loopback. It measures (a) a training step without
communication, (b) DDP's communication alone (the buffer broadcast and one all-reduce per
gradient bucket), (c) real DDP steps, interleaved in rounds, and prints the prediction a + b
beside c.
"""

from __future__ import annotations

import argparse
import gc
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache, partial
from multiprocessing.queues import SimpleQueue

import torch
from torch import Tensor, nn

from pipelines.bench.common import BenchError, print_machine, ratio_line
from pipelines.job.session import free_loopback_port
from resnet_core.models import create_model, is_cifar_model
from resnet_core.step import TrainStep
from resnet_core.summary import summarize
from resnet_core.transforms import CIFAR10_MEAN_RGB, Normalize

# --- Anchors and defaults (each default is a command-line option) ------------------------------
# NVIDIA DeepLearningExamples, PyTorch ResNet-50 v1.5, "Training performance: NVIDIA DGX A100
# (8x A100 80GB)", mixed precision, batch 256 per GPU (configs.yml): 2,470 img/s on 1 GPU,
# 16,621 img/s on 8 (84% of 8 x 2,470).
ANCHOR_IMAGES_PER_S = 2470.0
ANCHOR_8_GPU_IMAGES_PER_S = 16621.0
ANCHOR_BATCH = 256
# Goyal et al. 2017, "Accurate, Large Minibatch SGD: Training ImageNet in 1 Hour": ~90% scaling
# efficiency from 8 to 256 GPUs; ResNet-50, 32 images per GPU (8k minibatch), Caffe2 on Big Basin
# servers (8 P100 on NVLink each), 50 Gbit/s Ethernet between the 32 servers.
GOYAL_EFFICIENCY_8_TO_256 = 0.90
# `resnet-bench data` on these machines (BENCHMARKS.md): ours_paper with region decoding, 543
# img/s per vCPU (1,097 on max-side-320 shards).
DECODE_IMAGES_PER_S_PER_VCPU = 543.0
# Mean encoded ImageNet JPEG: 110 KB on our 200-image sample (ILSVRC2012 train: 138 GB / 1.28M);
# 36 KB once resnet-prepare re-encodes them to max side 320.
IMAGE_KB = 110.0
# A p4d.24xlarge: 8 A100 on NVSwitch, 96 vCPUs (12 per GPU), 4 x 100 Gbit/s EFA.
GPUS_PER_NODE = 8
VCPUS_PER_GPU = 12
NETWORK_GBITS = 400.0
# nccl-tests all_reduce_perf on 8 A100 SXM4 over NVLink: ~200-230 GB/s bus bandwidth.
NVLINK_GBYTES = 200.0
# Per ring step, from NCCL's tuning model (src/graph/tuning.cc, ring with the Simple protocol:
# ~5.7 us NVLink, 6.6-9.6 us network); EFA sits at the slow end.
NVLINK_LATENCY_US = 5.0
NETWORK_LATENCY_US = 10.0
# dvassallo/s3-benchmark: a p3dn.24xlarge (8 V100, 100 Gbit/s) read 6.3 GB/s (~50 Gbit/s) from S3.
S3_GBITS = 50.0

GPU_COUNTS = (1, 8, 64, 256)
BATCH_PER_GPU = 128  # imagenet-fast: global batch 1024 on 8 workers
# PyTorch DDP's defaults (torch.nn.parallel.distributed): a 1 MiB first bucket, so the last
# layers' gradients start reducing early, then 25 MiB buckets.
DDP_FIRST_BUCKET_BYTES = 1 << 20
DDP_BUCKET_BYTES = 25 << 20
# Backward costs about twice the forward, so 2/3 of the compute: the window that gradient
# communication can hide in.
BACKWARD_SHARE = 2 / 3
# "network" binds when exposed communication takes more than this share of the step.
NETWORK_BINDS_SHARE = 0.10
GRAD_BYTES = {"fp32": 4, "bf16": 2}
IMAGENET_MODELS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
SUMMARY_MODELS = (*IMAGENET_MODELS, "resnet20", "resnet56", "resnet110")
VALIDATE_MODEL = "resnet20"


def add_parser(commands: argparse._SubParsersAction) -> None:
    scaling = commands.add_parser(
        "scaling", help="scaling model: predicted images/s and efficiency at N GPUs"
    )
    scaling.add_argument("--model", default="resnet50", choices=IMAGENET_MODELS)
    scaling.add_argument(
        "--stride-in-3x3", action="store_true", help="ResNet v1.5 (imagenet-fast) instead of v1"
    )
    scaling.add_argument(
        "--grad-dtype",
        default="fp32",
        choices=tuple(GRAD_BYTES),
        help="gradient element on the wire: fp32 (DDP under bf16 autocast, as resnet-train "
        "runs) or bf16 (with a bf16 compression hook)",
    )
    scaling.add_argument(
        "--gpus", type=int, nargs="+", default=list(GPU_COUNTS), help="GPU counts to predict"
    )
    scaling.add_argument("--batch-per-gpu", type=int, default=BATCH_PER_GPU)
    scaling.add_argument(
        "--gpu-images-per-s",
        type=float,
        help=f"compute-only img/s of one GPU (default: NVIDIA's {ANCHOR_IMAGES_PER_S:g} for "
        "ResNet-50 v1.5 AMP on an A100, scaled to --model by multiply-adds)",
    )
    scaling.add_argument("--gpus-per-node", type=int, default=GPUS_PER_NODE)
    scaling.add_argument(
        "--nvlink-gbytes", type=float, default=NVLINK_GBYTES, help="intra-node bus GB/s"
    )
    scaling.add_argument("--nvlink-latency-us", type=float, default=NVLINK_LATENCY_US)
    scaling.add_argument(
        "--network-gbits", type=float, default=NETWORK_GBITS, help="inter-node Gbit/s per node"
    )
    scaling.add_argument("--network-latency-us", type=float, default=NETWORK_LATENCY_US)
    scaling.add_argument(
        "--topology",
        default="hierarchical",
        choices=("hierarchical", "ring"),
        help="hierarchical: rings in each node, then across nodes; ring: one ring over all GPUs",
    )
    scaling.add_argument(
        "--overlap",
        type=float,
        help="share of the gradient all-reduce that may run during backward (default: all DDP "
        "buckets but the last)",
    )
    scaling.add_argument(
        "--decode-per-vcpu",
        type=float,
        default=DECODE_IMAGES_PER_S_PER_VCPU,
        help="decode + augment img/s per vCPU (resnet-bench data measures it)",
    )
    scaling.add_argument("--vcpus-per-gpu", type=float, default=VCPUS_PER_GPU)
    scaling.add_argument(
        "--image-kb",
        type=float,
        default=IMAGE_KB,
        help="mean encoded image size, KB (36 for max-side-320 shards)",
    )
    scaling.add_argument("--s3-gbits", type=float, default=S3_GBITS, help="S3 read Gbit/s per node")
    scaling.add_argument(
        "--validate", action="store_true", help="also run the 2-process CPU check of the model"
    )
    scaling.add_argument(
        "--validate-batch", type=int, nargs="+", default=[2, 16], help="per-worker batches"
    )
    scaling.add_argument(
        "--validate-steps", type=int, default=8, help="timed steps per phase and round"
    )
    scaling.add_argument("--validate-rounds", type=int, default=5)


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelCost:
    """What one model costs per image and per step.

    params: parameters, the elements DDP all-reduces every step.
    macs: multiply-adds of one forward pass of one image at the model's input size.
    buckets: fp32 bytes of each DDP gradient bucket, in all-reduce order (last layers first).
    buffers: bytes of each buffer dtype (BatchNorm statistics, batch counters), which DDP
        broadcasts from rank 0 before every forward (``broadcast_buffers=True``, the default
        that Ray Train's ``prepare_model`` keeps), one collective per dtype.
    """

    name: str
    params: int
    macs: int
    buckets: tuple[int, ...]
    buffers: tuple[int, ...]

    def overlappable(self) -> float:
        """Share of the gradient whose all-reduce can start before backward ends: every bucket
        but the last, which holds the first layers' gradients and is ready only at the end."""
        return 1.0 - self.buckets[-1] / sum(self.buckets)


def ddp_buckets(
    param_bytes: Sequence[int],
    first_cap: int = DDP_FIRST_BUCKET_BYTES,
    cap: int = DDP_BUCKET_BYTES,
) -> list[int]:
    """Bytes of each DDP bucket for parameters of ``param_bytes`` in registration order. Like
    DDP's assignment: parameters in reverse order (their gradients arrive first), a bucket closes
    once it reaches its cap (1 MiB for the first, then 25 MiB)."""
    buckets, current = [], 0
    for nbytes in reversed(param_bytes):
        current += nbytes
        if current >= (cap if buckets else first_cap):
            buckets.append(current)
            current = 0
    if current:
        buckets.append(current)
    return buckets


@cache
def model_cost(name: str, *, stride_in_3x3: bool = False) -> ModelCost:
    """Parameters, multiply-adds, DDP buckets and buffers of one of our models, built on the
    meta device (shapes only: no memory, no initialisation)."""
    with torch.device("meta"):
        model = create_model(name, stride_in_3x3=stride_in_3x3)
    summary = summarize(model, (3, 32, 32) if is_cifar_model(name) else (3, 224, 224))
    buckets = ddp_buckets([p.numel() * 4 for p in model.parameters()])
    buffers: dict[torch.dtype, int] = {}
    for buffer in model.buffers():
        buffers[buffer.dtype] = (
            buffers.get(buffer.dtype, 0) + buffer.numel() * buffer.element_size()
        )
    return ModelCost(name, summary.params, summary.macs, tuple(buckets), tuple(buffers.values()))


def ring_allreduce_seconds(
    nbytes: float, ranks: int, bus_bytes_per_s: float, step_latency_s: float, calls: int = 1
) -> float:
    """Ring all-reduce (reduce-scatter then all-gather, 2(n-1) steps) of ``nbytes`` split over
    ``calls`` collectives: every rank sends and receives 2(n-1)/n of the bytes at the bus
    bandwidth, and each collective pays the step latency 2(n-1) times. Zero for one rank."""
    if ranks <= 1:
        return 0.0
    steps = 2 * (ranks - 1)
    return steps / ranks * nbytes / bus_bytes_per_s + steps * step_latency_s * calls


@dataclass(frozen=True)
class Interconnect:
    """How GPUs talk. Bus bandwidths in bytes/s as nccl-tests reports them ("busbw"); the network
    figure is per node (its GPUs share the NICs); latencies per ring step, in seconds."""

    gpus_per_node: int
    nvlink_bytes_per_s: float
    nvlink_latency_s: float
    network_bytes_per_s: float
    network_latency_s: float
    hierarchical: bool


def allreduce_seconds(nbytes: float, gpus: int, link: Interconnect, calls: int = 1) -> float:
    """All-reduce of ``nbytes`` over ``gpus`` GPUs in ``calls`` collectives.

    Within one node: a ring over NVLink. Across nodes, hierarchical: reduce-scatter and
    all-gather inside each node over NVLink (together a ring all-reduce's cost), and between them
    each of a node's g GPUs all-reduces its 1/g shard in a ring over the nodes, the g rings
    sharing the node's network: the cost of one ring of all the bytes at the node's bandwidth.
    A flat ring crosses the network on some hops; each of its 2(N-1) steps waits for those.
    """
    g = link.gpus_per_node
    if gpus <= g:
        return ring_allreduce_seconds(
            nbytes, gpus, link.nvlink_bytes_per_s, link.nvlink_latency_s, calls
        )
    if not link.hierarchical:
        return ring_allreduce_seconds(
            nbytes, gpus, link.network_bytes_per_s, link.network_latency_s, calls
        )
    nodes = math.ceil(gpus / g)  # a partial last node counts as a node
    within = ring_allreduce_seconds(
        nbytes, g, link.nvlink_bytes_per_s, link.nvlink_latency_s, calls
    )
    across = ring_allreduce_seconds(
        nbytes, nodes, link.network_bytes_per_s, link.network_latency_s, calls
    )
    return within + across


@dataclass(frozen=True)
class Prediction:
    """One row of the table. Times are seconds per step; rates are images/s."""

    gpus: int
    nodes: int
    compute_s: float
    comm_s: float  # buffer broadcast + gradient all-reduce
    exposed_s: float  # the part of comm_s that adds to the step
    step_s: float
    per_gpu: float
    binds: str

    @property
    def images_per_s(self) -> float:
        return self.gpus * self.per_gpu


def predict(
    gpus: int,
    *,
    batch_per_gpu: int,
    gpu_images_per_s: float,
    grad_bytes: float,
    buckets: int,
    buffer_bytes: Sequence[int],
    overlap: float,
    link: Interconnect,
    decode_per_gpu: float,
    s3_bytes_per_s: float,
    image_bytes: float,
) -> Prediction:
    """Images/s of ``gpus`` GPUs training data-parallel, and the resource that limits them.

    Step = compute + exposed communication: the buffer broadcast (it precedes forward, so none of
    it hides; a ring broadcast costs about half a ring all-reduce of the same bytes) and the
    gradient all-reduce less its hidden part, ``overlap`` of it but at most the backward pass
    (2/3 of compute). Each GPU then runs at the slowest of that step, its decode vCPUs, and its
    share of the node's S3 bandwidth (a node holds min(gpus, gpus_per_node) GPUs).
    """
    compute_s = batch_per_gpu / gpu_images_per_s
    allreduce_s = allreduce_seconds(grad_bytes, gpus, link, buckets)
    broadcast_s = sum(allreduce_seconds(nbytes, gpus, link) / 2 for nbytes in buffer_bytes)
    hidden_s = min(overlap * allreduce_s, BACKWARD_SHARE * compute_s)
    exposed_s = broadcast_s + allreduce_s - hidden_s
    gpu_side = batch_per_gpu / (compute_s + exposed_s)
    s3_per_gpu = s3_bytes_per_s / min(gpus, link.gpus_per_node) / image_bytes
    per_gpu = min(gpu_side, decode_per_gpu, s3_per_gpu)
    if per_gpu < gpu_side:
        binds = "decode" if per_gpu == decode_per_gpu else "S3"
    elif exposed_s > NETWORK_BINDS_SHARE * (compute_s + exposed_s):
        binds = "network"
    else:
        binds = "compute"
    return Prediction(
        gpus=gpus,
        nodes=math.ceil(gpus / link.gpus_per_node),
        compute_s=compute_s,
        comm_s=broadcast_s + allreduce_s,
        exposed_s=exposed_s,
        step_s=batch_per_gpu / per_gpu,
        per_gpu=per_gpu,
        binds=binds,
    )


# ---------------------------------------------------------------------------------------------
# resnet-bench scaling
# ---------------------------------------------------------------------------------------------


def _check(args: argparse.Namespace) -> None:
    """Every bad value as a BenchError naming it, before any work."""
    for gpus in args.gpus:
        if gpus < 1:
            raise BenchError(f"--gpus {gpus}: GPU counts must be positive integers")
    for batch in args.validate_batch:
        if batch < 1:
            raise BenchError(f"--validate-batch {batch}: batches must be positive integers")
    positive = {
        "--batch-per-gpu": args.batch_per_gpu,
        "--gpus-per-node": args.gpus_per_node,
        "--gpu-images-per-s": args.gpu_images_per_s,
        "--nvlink-gbytes": args.nvlink_gbytes,
        "--network-gbits": args.network_gbits,
        "--decode-per-vcpu": args.decode_per_vcpu,
        "--vcpus-per-gpu": args.vcpus_per_gpu,
        "--image-kb": args.image_kb,
        "--s3-gbits": args.s3_gbits,
        "--validate-steps": args.validate_steps,
        "--validate-rounds": args.validate_rounds,
    }
    for flag, value in positive.items():
        if value is not None and not value > 0:  # `not >` also rejects NaN
            raise BenchError(f"{flag} {value}: must be a positive number")
    for flag, value in {
        "--nvlink-latency-us": args.nvlink_latency_us,
        "--network-latency-us": args.network_latency_us,
    }.items():
        if not value >= 0:
            raise BenchError(f"{flag} {value}: must be zero or a positive number")
    if args.overlap is not None and not 0 <= args.overlap <= 1:
        raise BenchError(f"--overlap {args.overlap}: must be a fraction from 0 to 1")


def print_gradient_table(
    costs: Sequence[ModelCost], grad_dtype: str, gpus: int, link: Interconnect
) -> None:
    """Gradient bytes per step of each model and their all-reduce time at ``gpus`` GPUs."""
    element = GRAD_BYTES[grad_dtype]
    print(
        f"gradient bytes per step ({grad_dtype}: {element} bytes per parameter; DDP buckets of "
        f"{DDP_FIRST_BUCKET_BYTES >> 20} MiB first, then {DDP_BUCKET_BYTES >> 20} MiB)"
    )
    print(
        f"  {'model':<10} {'input':>5} {'params':>8} {'GMACs/img':>9} {'gradient MB':>11} "
        f"{'buckets':>7} {'overlappable':>12} {f'all-reduce ms @{gpus} GPUs':>24}"
    )
    for cost in costs:
        nbytes = cost.params * element
        seconds = allreduce_seconds(nbytes, gpus, link, len(cost.buckets))
        size = "32" if is_cifar_model(cost.name) else "224"
        print(
            f"  {cost.name:<10} {size:>5} {cost.params / 1e6:7.2f}M {cost.macs / 1e9:9.2f} "
            f"{nbytes / 1e6:11.2f} {len(cost.buckets):>7} {cost.overlappable():12.0%} "
            f"{seconds * 1e3:24.2f}"
        )


def run_scaling(args: argparse.Namespace) -> dict[int, Prediction]:
    """Print the gradient table, the inputs, the predictions and the anchors; return the
    predictions by GPU count (1, 8 and 256 always included, for efficiency and the anchors)."""
    link = _interconnect(args)
    print("resnet-bench scaling: analytic model of data-parallel training (not a measurement)")
    print_gradient_table(
        [model_cost(name) for name in SUMMARY_MODELS], args.grad_dtype, max(args.gpus), link
    )

    cost = model_cost(args.model, stride_in_3x3=args.stride_in_3x3)
    gpu_rate, rate_source = _compute_rate(args, cost)
    overlap, overlap_source = _overlap(args, cost)
    grad_bytes = cost.params * GRAD_BYTES[args.grad_dtype]
    decode_per_gpu = args.vcpus_per_gpu * args.decode_per_vcpu
    image_bytes = args.image_kb * 1e3
    node_gpus = min(max(args.gpus), args.gpus_per_node)
    variant = "v1.5" if args.stride_in_3x3 else "v1"
    print(
        f"\ninputs\n"
        f"  model      {args.model} {variant}: {cost.params / 1e6:.2f}M parameters, "
        f"{cost.macs / 1e9:.2f} GMACs per image; {grad_bytes / 1e6:.1f} MB {args.grad_dtype} "
        f"gradient in {len(cost.buckets)} DDP buckets, {sum(cost.buffers) / 1e3:.0f} KB of "
        f"buffers; batch {args.batch_per_gpu} per GPU\n"
        f"  compute    {gpu_rate:,.0f} img/s per GPU ({rate_source})\n"
        f"  all-reduce {args.topology} ring; {args.gpus_per_node} GPUs per node, NVLink "
        f"{args.nvlink_gbytes:g} GB/s bus, {args.nvlink_latency_us:g} us per step; network "
        f"{args.network_gbits:g} Gbit/s per node, {args.network_latency_us:g} us per step\n"
        f"  overlap    {overlap:.0%} of the all-reduce may run during backward "
        f"({overlap_source}), at most the backward time ({BACKWARD_SHARE:.0%} of compute)\n"
        f"  decode     {args.decode_per_vcpu:g} img/s per vCPU x {args.vcpus_per_gpu:g} vCPUs "
        f"per GPU = {decode_per_gpu:,.0f} img/s per GPU; the compute rate needs "
        f"{gpu_rate / args.decode_per_vcpu:.1f} vCPUs per GPU\n"
        f"  S3         {args.image_kb:g} KB per image, {args.s3_gbits:g} Gbit/s per node; "
        f"{node_gpus} GPUs at the compute rate read "
        f"{node_gpus * gpu_rate * image_bytes * 8 / 1e9:.1f} Gbit/s"
    )

    def at(gpus: int, overlap: float) -> Prediction:
        return predict(
            gpus,
            batch_per_gpu=args.batch_per_gpu,
            gpu_images_per_s=gpu_rate,
            grad_bytes=grad_bytes,
            buckets=len(cost.buckets),
            buffer_bytes=cost.buffers,
            overlap=overlap,
            link=link,
            decode_per_gpu=decode_per_gpu,
            s3_bytes_per_s=args.s3_gbits * 1e9 / 8,
            image_bytes=image_bytes,
        )

    predictions = {gpus: at(gpus, overlap) for gpus in sorted({*args.gpus, 1, 8, 256})}
    _print_predictions(args, predictions, at)
    return predictions


def _interconnect(args: argparse.Namespace) -> Interconnect:
    return Interconnect(
        gpus_per_node=args.gpus_per_node,
        nvlink_bytes_per_s=args.nvlink_gbytes * 1e9,
        nvlink_latency_s=args.nvlink_latency_us * 1e-6,
        network_bytes_per_s=args.network_gbits * 1e9 / 8,
        network_latency_s=args.network_latency_us * 1e-6,
        hierarchical=args.topology == "hierarchical",
    )


def _compute_rate(args: argparse.Namespace, cost: ModelCost) -> tuple[float, str]:
    """Images/s per GPU and where the figure comes from: --gpu-images-per-s, else NVIDIA's
    ResNet-50 v1.5 anchor scaled by the model's MACs."""
    if args.gpu_images_per_s is not None:
        return args.gpu_images_per_s, "--gpu-images-per-s"
    anchor = model_cost("resnet50", stride_in_3x3=True)
    return ANCHOR_IMAGES_PER_S * anchor.macs / cost.macs, (
        f"NVIDIA's {ANCHOR_IMAGES_PER_S:,.0f} img/s for ResNet-50 v1.5, AMP, 1 A100 80GB, "
        f"batch {ANCHOR_BATCH}, x {anchor.macs / 1e9:.2f}/{cost.macs / 1e9:.2f} GMACs"
    )


def _overlap(args: argparse.Namespace, cost: ModelCost) -> tuple[float, str]:
    """The share of the all-reduce that may run during backward, and where it comes from."""
    if args.overlap is not None:
        return args.overlap, "--overlap"
    return cost.overlappable(), (
        f"all DDP buckets but the last, {cost.buckets[-1] / 2**20:.1f} of "
        f"{sum(cost.buckets) / 2**20:.1f} MiB"
    )


def _print_predictions(
    args: argparse.Namespace,
    predictions: dict[int, Prediction],
    at: Callable[[int, float], Prediction],
) -> None:
    """The table of predictions for --gpus (``at``: the prediction at a GPU count and
    overlap), then the anchors beside this model."""
    single = predictions[1].per_gpu
    print(
        f"\n  {'GPUs':>5} {'nodes':>5} {'compute ms':>10} {'comm ms':>8} {'exposed ms':>10} "
        f"{'step ms':>8} {'img/s':>10} {'img/s/GPU':>9} {'efficiency':>10} "
        f"{'no overlap':>10}  binds"
    )
    for gpus in args.gpus:
        p = predictions[gpus]
        serial = at(gpus, 0.0)  # the lower bound: every byte exposed
        print(
            f"  {p.gpus:>5} {p.nodes:>5} {p.compute_s * 1e3:10.1f} {p.comm_s * 1e3:8.2f} "
            f"{p.exposed_s * 1e3:10.2f} {p.step_s * 1e3:8.1f} {p.images_per_s:10,.0f} "
            f"{p.per_gpu:9,.0f} {p.per_gpu / single:10.1%} {serial.per_gpu / single:10.1%}  "
            f"{p.binds}"
        )
    model_8_to_256 = predictions[256].per_gpu / predictions[8].per_gpu
    nvidia_8 = ANCHOR_8_GPU_IMAGES_PER_S / (8 * ANCHOR_IMAGES_PER_S)
    print(
        f"\nefficiency: img/s per GPU over 1 GPU's {single:,.0f}; the global batch grows with N "
        f"({args.batch_per_gpu} per GPU)\n"
        f"anchor Goyal et al. 2017: ~{GOYAL_EFFICIENCY_8_TO_256:.0%} scaling efficiency from 8 to "
        f"256 GPUs (ResNet-50, 32 per GPU, 8k minibatch; Big Basin: 8 P100 on NVLink per server, "
        f"50 Gbit/s Ethernet); this model with these inputs: {model_8_to_256:.1%}\n"
        f"anchor NVIDIA DGX A100: 8 GPUs at {ANCHOR_8_GPU_IMAGES_PER_S:,.0f} img/s, {nvidia_8:.0%} "
        f"of 8 x {ANCHOR_IMAGES_PER_S:,.0f}; this model with these inputs: "
        f"{predictions[8].per_gpu / single:.1%} at 8"
    )
    print(ratio_line("model_8_to_256", "goyal_2017", model_8_to_256 / GOYAL_EFFICIENCY_8_TO_256))


# ---------------------------------------------------------------------------------------------
# --validate: 2 processes on this machine, gloo on loopback
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Validation:
    """Medians over the timed steps of one per-worker batch, in seconds.

    compute_s: (a) a training step without communication; per step the slower rank's time.
    comm_s: (b) DDP's communication alone: buffer broadcast, then one all-reduce per bucket.
    ddp_s: (c) a DistributedDataParallel training step, communication included.
    """

    batch: int
    compute_s: float
    comm_s: float
    ddp_s: float

    @property
    def predicted_s(self) -> float:
        # Nothing hidden: each process has one core, so its compute and its gloo transfers
        # take turns on it.
        return self.compute_s + self.comm_s


def _train_step(model: nn.Module) -> TrainStep:
    """The job's training step (normalise, forward, loss, backward, SGD) on ``model``."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    return TrainStep(model, optimizer, nn.CrossEntropyLoss(), Normalize(CIFAR10_MEAN_RGB))


def _ddp_communication(buffers: Sequence[Tensor], buckets: Sequence[Tensor]) -> None:
    """What DDP sends in one step: rank 0's buffers (one broadcast per dtype), then one
    all-reduce per gradient bucket."""
    import torch.distributed as dist

    for tensor in buffers:
        dist.broadcast(tensor, src=0)
    for tensor in buckets:
        dist.all_reduce(tensor)


def _time_phases(rank: int, batch: int, *, steps: int, rounds: int) -> Validation:
    """Phases (a), (b), (c) for one batch size take turns in ``rounds`` rounds, so a change of
    machine load hits them alike; a barrier starts every timed step on both ranks."""
    import torch.distributed as dist

    torch.manual_seed(0)
    plain = create_model(VALIDATE_MODEL)
    ddp = nn.parallel.DistributedDataParallel(create_model(VALIDATE_MODEL))
    generator = torch.Generator().manual_seed(rank)
    images = torch.randint(0, 256, (batch, 32, 32, 3), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, 10, (batch,), generator=generator)
    cost = model_cost(VALIDATE_MODEL)
    buffers = [torch.zeros(nbytes, dtype=torch.uint8) for nbytes in cost.buffers]
    buckets = [torch.zeros(nbytes // 4) for nbytes in cost.buckets]
    phases = {
        "compute": partial(_train_step(plain), images, labels),
        "comm": partial(_ddp_communication, buffers, buckets),
        "ddp": partial(_train_step(ddp), images, labels),
    }
    times: dict[str, list[float]] = {name: [] for name in phases}
    for fn in phases.values():  # warm-up: allocations, DDP's bucket rebuild after step 1
        fn()
        fn()
    for _ in range(rounds):
        for name, fn in phases.items():
            for _ in range(steps):
                dist.barrier()
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    # A DDP step waits for the slower rank: compare it with the slower rank's compute.
    compute = torch.tensor(times["compute"], dtype=torch.float64)
    both = [torch.empty_like(compute) for _ in range(2)]
    dist.all_gather(both, compute)
    return Validation(
        batch=batch,
        compute_s=statistics.median(torch.maximum(*both).tolist()),
        comm_s=statistics.median(times["comm"]),
        ddp_s=statistics.median(times["ddp"]),
    )


def _validate_worker(
    rank: int, port: int, batches: list[int], steps: int, rounds: int, results: SimpleQueue
) -> None:
    """One of the two processes, one torch thread each; rank 0 sends the results."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        for batch in batches:
            validation = _time_phases(rank, batch, steps=steps, rounds=rounds)
            if rank == 0:
                results.put(validation)
        # Tear down in order: both ranks done with the group, and DDP's reducer (held in
        # reference cycles) freed while the group lives, not at interpreter exit, where a
        # gloo thread once aborted rank 0 ("terminate called without an active exception").
        dist.barrier()
        gc.collect()
    finally:
        dist.destroy_process_group()


def measure_validation(batches: Sequence[int], *, steps: int, rounds: int) -> list[Validation]:
    """Run the two processes (torch.multiprocessing, spawn) and collect rank 0's results.

    Plain torch.distributed rather than a Ray Train run: the same DDP over gloo that TorchTrainer
    sets up on CPU workers, without Ray's ~10 s start-up and its processes on these 2 cores."""
    import torch.multiprocessing as mp

    results = mp.get_context("spawn").SimpleQueue()
    mp.start_processes(
        _validate_worker,
        args=(free_loopback_port(), list(batches), steps, rounds, results),
        nprocs=2,
        join=True,
        start_method="spawn",
    )
    return [results.get() for _ in batches]


def run_validation(batches: Sequence[int], *, steps: int, rounds: int) -> list[Validation]:
    """Print predicted (a + b) against measured (c) DDP step times, and their ratios."""
    cost = model_cost(VALIDATE_MODEL)
    print(
        f"\nvalidation: CIFAR {VALIDATE_MODEL} ({cost.params / 1e6:.2f}M parameters, "
        f"{cost.params * 4 / 1e6:.2f} MB fp32 gradient in {len(cost.buckets)} DDP buckets), "
        f"2 processes x 1 torch thread, gloo on loopback, {rounds} rounds x {steps} steps per "
        f"phase, medians",
        flush=True,
    )
    print_machine()
    start = time.perf_counter()
    results = measure_validation(batches, steps=steps, rounds=rounds)
    print(
        f"  {'batch/worker':>12} {'(a) compute ms':>14} {'(b) comm ms':>11} "
        f"{'predicted a+b ms':>16} {'(c) DDP step ms':>15} {'comm share of c':>15}"
    )
    for v in results:
        print(
            f"  {v.batch:>12} {v.compute_s * 1e3:14.2f} {v.comm_s * 1e3:11.2f} "
            f"{v.predicted_s * 1e3:16.2f} {v.ddp_s * 1e3:15.2f} {v.comm_s / v.ddp_s:15.1%}"
        )
    for v in results:
        print(ratio_line(f"measured_ddp_batch{v.batch}", "predicted", v.ddp_s / v.predicted_s))
    print(f"validation took {time.perf_counter() - start:.0f} s")
    return results


def run(args: argparse.Namespace) -> None:
    _check(args)
    run_scaling(args)
    if args.validate:
        run_validation(args.validate_batch, steps=args.validate_steps, rounds=args.validate_rounds)
