"""`resnet-bench scaling`: the model's arithmetic, the command's output and errors, and the
2-process CPU validation on a tiny setting (no timing is asserted)."""

from __future__ import annotations

import math
import re

import pytest

from pipelines.bench import main
from pipelines.bench import scaling as sc

MIB = 1 << 20
A100_NODES = sc.Interconnect(
    gpus_per_node=8,
    nvlink_bytes_per_s=200e9,
    nvlink_latency_s=5e-6,
    network_bytes_per_s=50e9,
    network_latency_s=10e-6,
    hierarchical=True,
)


def _predict(gpus: int, **overrides: object) -> sc.Prediction:
    cost = sc.model_cost("resnet50")
    inputs = {
        "batch_per_gpu": 128,
        "gpu_images_per_s": 2500.0,
        "grad_bytes": cost.params * 4,
        "buckets": len(cost.buckets),
        "buffer_bytes": cost.buffers,
        "overlap": cost.overlappable(),
        "link": A100_NODES,
        "decode_per_gpu": 1e9,
        "s3_bytes_per_s": 1e15,
        "image_bytes": 110e3,
    }
    return sc.predict(gpus, **{**inputs, **overrides})


def test_gradient_bytes_are_parameter_counts():
    resnet50 = sc.model_cost("resnet50")
    assert resnet50.params == 25_557_032  # torchvision's ResNet-50: 25.6M parameters
    assert resnet50.params * sc.GRAD_BYTES["fp32"] == pytest.approx(102.2e6, rel=1e-3)
    assert resnet50.params * sc.GRAD_BYTES["bf16"] == resnet50.params * 2
    assert sum(resnet50.buckets) == resnet50.params * 4
    assert sc.model_cost("resnet20").params == pytest.approx(0.27e6, rel=0.01)  # paper Table 6
    assert sc.model_cost("resnet110").params == pytest.approx(1.7e6, rel=0.02)
    # v1.5 moves the stride, not the weights: same gradient, more multiply-adds.
    v15 = sc.model_cost("resnet50", stride_in_3x3=True)
    assert v15.params == resnet50.params
    assert v15.macs > resnet50.macs


def test_ddp_buckets_follow_ddp_assignment():
    # Reverse order; a bucket closes once it reaches its cap; the first cap is the small one.
    assert sc.ddp_buckets([10, 20, 30], first_cap=25, cap=40) == [30, 30]
    assert sc.ddp_buckets([5, 50, 1, 1], first_cap=1, cap=40) == [1, 51, 5]


@pytest.mark.parametrize("name", ["resnet50", "resnet20"])
def test_ddp_buckets_match_torch(name):
    """Our bucket sizes equal the assignment DDP itself computes (its private helper)."""
    import torch.distributed as dist

    from resnet_core.models import create_model

    params = list(reversed(list(create_model(name).parameters())))
    indices, _ = dist._compute_bucket_assignment_by_size(
        params, [dist._DEFAULT_FIRST_BUCKET_BYTES, 25 * MIB], [False] * len(params)
    )
    ddp = tuple(sum(params[i].numel() * 4 for i in bucket) for bucket in indices)
    assert sc.model_cost(name).buckets == ddp


def test_ring_allreduce_formula():
    nbytes, bw = 100e6, 10e9
    assert sc.ring_allreduce_seconds(nbytes, 1, bw, 1e-3) == 0.0
    assert sc.ring_allreduce_seconds(nbytes, 2, bw, 0.0) == pytest.approx(nbytes / bw)
    # Doubling the bandwidth halves the bandwidth term.
    one = sc.ring_allreduce_seconds(nbytes, 8, bw, 0.0)
    assert sc.ring_allreduce_seconds(nbytes, 8, 2 * bw, 0.0) == pytest.approx(one / 2)
    assert one == pytest.approx(2 * 7 / 8 * nbytes / bw)
    # Latency: 2(n-1) steps per collective.
    assert sc.ring_allreduce_seconds(0.0, 8, bw, 1e-5, calls=3) == pytest.approx(14 * 1e-5 * 3)
    # Many ranks: the bandwidth term approaches 2 B / bw, never beyond.
    big = sc.ring_allreduce_seconds(nbytes, 10_000, bw, 0.0)
    assert 1.999 * nbytes / bw < big < 2 * nbytes / bw


def test_allreduce_topologies():
    nbytes = 100e6
    within = sc.allreduce_seconds(nbytes, 8, A100_NODES)
    assert within == sc.ring_allreduce_seconds(nbytes, 8, 200e9, 5e-6)
    hierarchical = sc.allreduce_seconds(nbytes, 256, A100_NODES, calls=5)
    assert hierarchical == pytest.approx(
        sc.ring_allreduce_seconds(nbytes, 8, 200e9, 5e-6, 5)
        + sc.ring_allreduce_seconds(nbytes, 32, 50e9, 10e-6, 5)
    )
    flat_link = sc.Interconnect(8, 200e9, 5e-6, 50e9, 10e-6, hierarchical=False)
    flat = sc.allreduce_seconds(nbytes, 256, flat_link, calls=5)
    assert flat == sc.ring_allreduce_seconds(nbytes, 256, 50e9, 10e-6, 5)
    assert flat > hierarchical  # 510 latency steps per collective instead of 14 + 62


def test_prediction_limits():
    single = _predict(1)
    assert single.comm_s == 0.0
    assert single.exposed_s == 0.0
    assert single.per_gpu == pytest.approx(2500.0)
    for gpus in (2, 8, 64, 256, 1024):
        p = _predict(gpus)
        assert 0.0 < p.exposed_s <= p.comm_s
        assert p.per_gpu <= single.per_gpu  # efficiency <= 1
        assert p.step_s == pytest.approx(p.compute_s + p.exposed_s)
    assert _predict(256).per_gpu < _predict(8).per_gpu
    # No overlap exposes everything; full overlap hides all of the all-reduce up to backward.
    assert _predict(64, overlap=0.0).exposed_s == pytest.approx(_predict(64).comm_s)
    slow_network = _predict(256, link=sc.Interconnect(8, 200e9, 0.0, 1e8, 0.0, True))
    assert slow_network.binds == "network"
    assert slow_network.exposed_s == pytest.approx(
        slow_network.comm_s - sc.BACKWARD_SHARE * slow_network.compute_s
    )
    assert _predict(8).binds == "compute"


def test_input_pipeline_binds():
    decode = _predict(8, decode_per_gpu=1000.0)
    assert decode.binds == "decode"
    assert decode.per_gpu == 1000.0
    # 8 GPUs share a node's S3 bandwidth: 8 Gbit/s = 1 GB/s over 110 KB images.
    s3 = _predict(64, s3_bytes_per_s=1e9)
    assert s3.binds == "S3"
    assert s3.per_gpu == pytest.approx(1e9 / 8 / 110e3)
    assert s3.step_s == pytest.approx(128 / s3.per_gpu)
    # One GPU alone on a node gets all of it.
    assert _predict(1, s3_bytes_per_s=1e8).per_gpu == pytest.approx(1e8 / 110e3)


def test_command_prints_table_and_anchor(capsys):
    assert main(["scaling", "--gpus", "1", "8", "64", "256"]) == 0
    out = capsys.readouterr().out
    for name in sc.SUMMARY_MODELS:
        assert re.search(rf"^  {name} +(224|32) +\d+\.\d\dM", out, re.M), name
    assert re.search(r"^  resnet50 +224 +25\.56M +3\.86 +102\.23 +5 ", out, re.M)
    rows = {}
    for match in re.finditer(
        r"^ +(\d+) +\d+ +[\d.]+ +[\d.]+ +[\d.]+ +[\d.]+ +[\d,]+ +[\d,]+ +([\d.]+)% +([\d.]+)% +"
        r"(compute|network|decode|S3)$",
        out,
        re.M,
    ):
        rows[int(match[1])] = (float(match[2]), float(match[3]))
    assert sorted(rows) == [1, 8, 64, 256]
    assert rows[1] == (100.0, 100.0)
    for efficiency, no_overlap in rows.values():
        assert no_overlap <= efficiency <= 100.0
    assert "anchor Goyal et al. 2017: ~90% scaling efficiency from 8 to 256 GPUs" in out
    ratio = re.search(r"^ratio model_8_to_256/goyal_2017: (\d+\.\d\d)x$", out, re.M)
    assert ratio, out
    # The printed ratio is the table's own 256-vs-8 efficiency over 90%.
    expected = rows[256][0] / rows[8][0] / 0.90
    assert float(ratio[1]) == pytest.approx(expected, abs=0.011)


def test_command_default_rate_is_nvidia_anchor(capsys):
    # ResNet-50 v1.5 is the anchor's own model: the MAC scaling must leave 2,470 img/s.
    assert main(["scaling", "--stride-in-3x3", "--gpus", "1"]) == 0
    assert "  compute    2,470 img/s per GPU" in capsys.readouterr().out
    assert main(["scaling", "--model", "resnet101", "--gpus", "1"]) == 0
    rate = re.search(r"^  compute +([\d,]+) img/s", capsys.readouterr().out, re.M)
    assert rate
    assert 1000 < int(rate[1].replace(",", "")) < 2470  # about half ResNet-50's


def test_bf16_halves_gradient_bytes(capsys):
    assert main(["scaling", "--gpus", "256", "--grad-dtype", "bf16"]) == 0
    assert re.search(r"^  resnet50 +224 +25\.56M +3\.86 +51\.11 ", capsys.readouterr().out, re.M)


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["--gpus", "0"], "--gpus 0"),
        (["--gpus", "8", "-4"], "--gpus -4"),
        (["--network-gbits", "-100"], "--network-gbits -100"),
        (["--nvlink-gbytes", "0"], "--nvlink-gbytes 0"),
        (["--network-latency-us", "-1"], "--network-latency-us -1"),
        (["--overlap", "1.5"], "--overlap 1.5"),
        (["--batch-per-gpu", "0"], "--batch-per-gpu 0"),
        (["--validate-batch", "0"], "--validate-batch 0"),
    ],
)
def test_bad_values_exit_2_with_one_line(capsys, argv, named):
    assert main(["scaling", *argv]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # rejected before any work
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith(f"resnet-bench: {named}"), lines[0]


@pytest.mark.slow  # ~7 s on an idle 2-core machine, 40+ s on a busy one
def test_validation_runs_two_processes(capsys):
    argv = ["scaling", "--gpus", "8", "--validate", "--validate-batch", "2"]
    assert main([*argv, "--validate-steps", "2", "--validate-rounds", "1"]) == 0
    out = capsys.readouterr().out
    assert "2 processes x 1 torch thread, gloo on loopback" in out
    row = re.search(r"^ +2 +([\d.]+) +([\d.]+) +([\d.]+) +([\d.]+) +[\d.]+%$", out, re.M)
    assert row, out
    compute, comm, predicted, measured = (float(v) for v in row.groups())
    assert min(compute, comm, measured) > 0
    assert predicted == pytest.approx(compute + comm, abs=0.011)
    ratio = re.search(r"^ratio measured_ddp_batch2/predicted: (\d+\.\d\d)x$", out, re.M)
    assert ratio
    assert math.isclose(float(ratio[1]), measured / predicted, abs_tol=0.011)
