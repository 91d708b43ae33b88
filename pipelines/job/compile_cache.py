"""torch.compile's caches kept with the run (``train.compile``).

A compiled run's first step compiles the step's graph: tens of seconds for ResNet-50 (much of
the 30-41 s from job start to first step measured on an H200), again in every new process — a
worker group restarted after a failure, a resumed run, a spot replacement on a fresh node.
torch's portable cache artifacts (``torch.compiler.save_cache_artifacts``: Inductor's compiled
graphs, Triton kernels, autotuning results) are written to the run's storage after the first
step of each new crop size, and loaded before the first step of the next process: the recompile
then skips code generation and kernel compilation (measured on CPU for a small net: 13.6 s
instead of 21-27 s). Keyed by the torch version and the device, so a mismatched cache is never
offered; Inductor checks each entry's own key anyway.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

import torch

from pipelines import storage
from pipelines.job.extension import Extension

if TYPE_CHECKING:
    from pipelines.job.runner import TrainLoopRunner

CACHE_FOLDER = "compile-cache"  # in the run's storage folder


def cache_uri(storage_path: str, run_name: str, device: torch.device) -> str:
    """Where this run keeps the compiled artifacts for ``device``'s kind and this torch."""
    kind = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    name = re.sub(r"[^A-Za-z0-9.]+", "-", f"torch-{torch.__version__}-{kind}")
    return storage.join(storage_path, run_name, CACHE_FOLDER, f"{name}.bin")


class CompileCache(Extension):
    """Loads the run's compile cache at setup (every rank), saves it from rank 0 after the first
    step at each crop size not saved yet; ``hit``: whether a cache was loaded."""

    def __init__(self) -> None:
        self.uri = ""
        self.hit = False
        self.saved_sizes: set[int] = set()

    def setup(self, runner: TrainLoopRunner) -> None:
        c = runner.config
        self.uri = cache_uri(c.run.storage_path, c.run_name, runner.device)
        fs, path = storage.resolve(self.uri)
        if storage.exists(fs, path):
            torch.compiler.load_cache_artifacts(storage.read_bytes(fs, path))
            self.hit = True
            runner.say(f"compile cache: loaded {storage.redact(self.uri)}")

    def after_step(self, runner: TrainLoopRunner, result: Any) -> None:
        size = runner.config.data.train_size(runner.epoch)
        if runner.rank != 0 or size in self.saved_sizes:
            return
        self.saved_sizes.add(size)
        artifacts = torch.compiler.save_cache_artifacts()
        if artifacts is not None:
            fs, path = storage.resolve(self.uri)
            storage.write_bytes(fs, path, artifacts[0])

    def on_report(self, runner: TrainLoopRunner, metrics: dict[str, Any]) -> None:
        if "startup/total_s" in metrics:  # the first report of this process
            metrics["startup/compile_cache_hit"] = float(self.hit)
