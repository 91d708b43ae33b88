"""System metrics and the step profiler without Ray: MLflow's real monitors sampled and averaged
per report, the single MLflow writer logging every rank's system metrics and a worker's file
into a real SQLite store, and a profiled step's Chrome trace. The runs in tests/test_job.py check
them end to end."""

from __future__ import annotations

import dataclasses
import gzip
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from mlflow.tracking import MlflowClient
from torch import nn

from pipelines import tracking
from pipelines.config import JobConfig
from pipelines.job.profiler import StepProfiler
from pipelines.job.system_metrics import (
    SystemMetrics,
    SystemSampler,
    gpu_monitor,
    system_monitors,
)
from pipelines.recipes import build_recipe

CPU = torch.device("cpu")
CPU_KEYS = {
    "cpu_utilization_percentage",
    "system_memory_usage_megabytes",
    "system_memory_usage_percentage",
    "disk_usage_percentage",
    "disk_usage_megabytes",
    "disk_available_megabytes",
    "network_receive_megabytes",
    "network_transmit_megabytes",
}


@dataclass
class Runner:
    """What the extensions read of a TrainLoopRunner (the real one needs a Ray Train worker)."""

    config: JobConfig
    rank: int = 0
    device: torch.device = CPU
    step: int = 0
    lines: list[str] = field(default_factory=list)

    def say(self, line: str) -> None:
        self.lines.append(line)


def _wait_for_sample(sampler: SystemSampler) -> dict[str, float]:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        time.sleep(0.05)
        if taken := sampler.take():
            return taken
    raise AssertionError("the sampler took no sample")


def test_the_sampler_averages_mlflows_monitors_over_each_report_window():
    monitors, why_not = system_monitors(CPU)
    assert why_not == "no GPU on this worker"
    sampler = SystemSampler(monitors, interval_s=3600)  # samples by hand below
    sampler.sample()
    sampler.sample()
    cpu = monitors[0].metrics["system_memory_usage_megabytes"]
    assert len(cpu) == 2
    taken = sampler.take()
    assert set(taken) == CPU_KEYS
    assert taken["system_memory_usage_megabytes"] == round(sum(cpu) / 2, 1)
    assert taken["system_memory_usage_megabytes"] > 0
    assert sampler.take() == {}  # a window without samples adds nothing


def test_the_sampling_thread_samples_until_stopped():
    sampler = SystemSampler(system_monitors(CPU)[0], interval_s=0.05).start()
    assert set(_wait_for_sample(sampler)) == CPU_KEYS
    sampler.stop()
    assert not sampler.running


def test_the_extension_reports_its_ranks_metrics_and_stops_with_the_run():
    runner = Runner(build_recipe("demo"), rank=3)
    extension = SystemMetrics(interval_s=0.05)
    extension.setup(runner)
    assert runner.lines == [
        "system metrics: CPU, memory, disk and network only: no GPU on this worker"
    ]
    _wait_for_sample(extension.sampler)  # the thread runs
    extension.sampler.sample()
    metrics: dict[str, Any] = {"step": 1}
    extension.on_report(runner, metrics)
    assert set(metrics) == {"step"} | {f"system/worker_3/{key}" for key in CPU_KEYS}
    extension.teardown(runner)
    assert not extension.sampler.running


@pytest.mark.gpu
def test_the_gpu_monitor_samples_the_workers_own_gpu():
    device = torch.device("cuda", torch.cuda.device_count() - 1)
    monitor, why_not = gpu_monitor(device)
    assert monitor is not None, why_not
    x = torch.randn(4096, 4096, device=device)
    for _ in range(50):
        x = (x @ x).tanh()
    monitor.collect_metrics()
    torch.cuda.synchronize(device)
    metrics = monitor.aggregate_metrics()
    assert {k for k in metrics if not k.startswith("gpu_0_")} == set()  # one GPU: the worker's
    for key in ("utilization_percentage", "memory_usage_megabytes", "power_usage_watts"):
        assert f"gpu_0_{key}" in metrics
    used = torch.cuda.device_memory_used(device) / 1e6  # NVML's figure through torch's mapping
    assert metrics["gpu_0_memory_usage_megabytes"] == pytest.approx(used, rel=0.2)


def test_the_mlflow_writer_logs_every_ranks_system_metrics_and_files(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    run_id = client.create_run(tracking.ensure_experiment(client, "t", uri)).info.run_id
    trace = tmp_path / "storage" / "trace_rank0.json.gz"
    trace.parent.mkdir()
    trace.write_bytes(gzip.compress(b'{"traceEvents": []}'))
    reports = [
        {
            "step": 5,
            "train/loss": 1.5,
            "system/worker_0/cpu_utilization_percentage": 10.0,
            "artifact/profile/trace_rank0.json.gz": str(trace),
        },
        {"step": 5, "train/loss": 9.0, "system/worker_1/cpu_utilization_percentage": 20.0},
    ]
    reporter = tracking.MlflowReporter(uri, run_id)
    reporter.after_report(None, reports, None)
    reporter.after_report(None, [{"step": 5, "train/loss": 1.5}, reports[1]], None)  # logged
    history = {
        key: [(m.step, m.value) for m in client.get_metric_history(run_id, key)]
        for key in client.get_run(run_id).data.metrics
    }
    assert history == {
        "train/loss": [(5, 1.5)],  # rank 0's, once
        "system/worker_0/cpu_utilization_percentage": [(5, 10.0)],
        "system/worker_1/cpu_utilization_percentage": [(5, 20.0)],
    }
    logged = Path(client.download_artifacts(run_id, "profile/trace_rank0.json.gz"))
    assert logged.read_bytes() == trace.read_bytes()


def test_the_profiler_traces_its_steps_into_the_runs_storage(tmp_path):
    base = build_recipe("demo")
    config = dataclasses.replace(
        base, run=dataclasses.replace(base.run, storage_path=str(tmp_path))
    )
    runner = Runner(config)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.LazyLinear(4))
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    profiler = StepProfiler(first=2, count=2)
    reported = []
    for _ in range(4):
        profiler.before_step(runner)
        loss = net(torch.randn(2, 3, 8, 8)).square().mean()
        loss.backward()
        optimizer.step()
        runner.step += 1
        profiler.after_step(runner, None)
        metrics: dict[str, Any] = {}
        profiler.on_report(runner, metrics)
        reported.append(metrics)
    trace = tmp_path / config.run_name / "profile" / "trace_rank0.json.gz"
    assert reported == [{}, {}, {"artifact/profile/trace_rank0.json.gz": str(trace)}, {}]
    events = json.loads(gzip.decompress(trace.read_bytes()))["traceEvents"]
    names = {e.get("name", "") for e in events}
    assert {n for n in names if n.startswith("ProfilerStep#")} == {
        "ProfilerStep#2",
        "ProfilerStep#3",
    }
    assert "aten::convolution" in names
    assert any(n.startswith("Optimizer.step#SGD") for n in names)
    assert runner.lines == [
        f"profiler: steps 2-3 traced to {trace} (MLflow artifact profile/trace_rank0.json.gz; "
        "open it in https://ui.perfetto.dev)"
    ]
