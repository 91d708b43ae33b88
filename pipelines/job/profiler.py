"""``train.profile_steps``: a torch.profiler trace of a few training steps in MLflow.

Rank 0 profiles steps ``first .. first + count - 1`` (CPU ops, and CUDA kernels on a GPU; no
shapes: they cost memory and time) and writes a gzipped Chrome trace into the run's Train
storage (``<run.storage_path>/<run name>/profile/trace_rank0.json.gz``), which every node and
the Train controller reach; its next report names the file (``artifact/profile/...``) and the
single MLflow writer copies it into the run (pipelines.tracking.MlflowReporter). Rank 0 alone:
every rank runs the same step under DDP, and a straggler shows in rank 0's trace as time spent
waiting in the gradient all-reduce. Open the trace in https://ui.perfetto.dev or chrome://tracing.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.profiler import ProfilerActivity

from pipelines import storage
from pipelines.job.extension import Extension
from pipelines.tracking import ARTIFACT_PREFIX

if TYPE_CHECKING:
    from pipelines.job.runner import TrainLoopRunner

TRACE_FOLDER = "profile"  # in the run's storage folder and among the MLflow run's artifacts


def trace_name(rank: int) -> str:
    return f"trace_rank{rank}.json.gz"


class StepProfiler(Extension):
    """Profiles steps ``first`` (1-based) to ``first + count - 1`` on rank 0. A run resumed
    past the first step does not profile again (the trace of the first attempt stays)."""

    def __init__(self, first: int, count: int) -> None:
        self.first, self.count = first, count
        self.profiler: torch.profiler.profile | None = None
        self.marker: torch.profiler.record_function | None = None  # the step being traced
        self.trace_uri: str | None = None  # written, not yet reported

    def before_step(self, runner: TrainLoopRunner) -> None:
        if runner.rank == 0 and runner.step + 1 == self.first:
            activities = [ProfilerActivity.CPU]
            if runner.device.type == "cuda":
                activities.append(ProfilerActivity.CUDA)
            self.profiler = torch.profiler.profile(activities=activities, record_shapes=False)
            self.profiler.start()
        if self.profiler is not None:  # the step in the trace, named as torch's schedule names it
            self.marker = torch.profiler.record_function(f"ProfilerStep#{runner.step + 1}")
            self.marker.__enter__()

    def after_step(self, runner: TrainLoopRunner, result: Any) -> None:
        if self.profiler is None:
            return
        self.marker.__exit__(None, None, None)
        if runner.step < self.first + self.count - 1:
            return
        self.profiler.stop()
        uri = storage.join(
            runner.config.run.storage_path,
            runner.config.run_name,
            TRACE_FOLDER,
            trace_name(runner.rank),
        )
        write_trace(self.profiler, uri)
        self.profiler, self.trace_uri = None, uri
        runner.say(
            f"profiler: steps {self.first}-{runner.step} traced to {storage.redact(uri)} (MLflow "
            f"artifact {TRACE_FOLDER}/{trace_name(runner.rank)}; open it in https://ui.perfetto.dev)"
        )

    def on_report(self, runner: TrainLoopRunner, metrics: dict[str, Any]) -> None:
        if self.trace_uri is not None:
            metrics[f"{ARTIFACT_PREFIX}{TRACE_FOLDER}/{trace_name(runner.rank)}"] = self.trace_uri
            self.trace_uri = None

    def teardown(self, runner: TrainLoopRunner) -> None:
        if self.profiler is not None:  # the run ended inside the window (an error)
            self.profiler.stop()
            self.profiler = None


def write_trace(profiler: torch.profiler.profile, uri: str) -> None:
    """The profiler's Chrome trace, gzipped (3 ResNet-20 steps on CPU: 1.15 MB of JSON, 81 KB;
    Perfetto and chrome://tracing open it as it is), at ``uri`` (a path or s3://)."""
    with tempfile.TemporaryDirectory(prefix="resnet-profile-") as tmp:
        local = Path(tmp, "trace.json.gz")
        profiler.export_chrome_trace(str(local))  # gzipped by torch for a .gz name
        fs, path = storage.resolve(uri)
        storage.write_bytes(fs, path, local.read_bytes())
