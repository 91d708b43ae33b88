"""System metrics of every Train worker in MLflow, recorded as MLflow's own system-metrics
logging records them: MLflow's monitors (CPU and memory, disk, network, and the worker's GPU:
utilisation, memory, power through NVML) sampled every ``train.system_metrics_interval_s`` in a
daemon thread on each worker, averaged over the samples since the last report (as MLflow's
``SystemMetricsMonitor`` averages them) and added to that rank's report as
``system/worker_<rank>/<MLflow's name>``, the node naming of MLflow's "System metrics" tab. The
single MLflow writer (:class:`pipelines.tracking.MlflowReporter`) logs them from every rank.

CPU, memory, disk and network are the node's (psutil), so workers sharing a node show the same
values; the GPU metrics are the worker's own device.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from mlflow.system_metrics.metrics.gpu_monitor import GPUMonitor

from pipelines.job.extension import Extension
from pipelines.tracking import SYSTEM_PREFIX

if TYPE_CHECKING:
    from mlflow.system_metrics.metrics.base_metrics_monitor import BaseMetricsMonitor

    from pipelines.job.runner import TrainLoopRunner


def worker_prefix(rank: int) -> str:
    """``system/worker_<rank>/``: MLflow's key prefix for the metrics of one node."""
    return f"{SYSTEM_PREFIX}worker_{rank}/"


class WorkerGPUMonitor(GPUMonitor):
    """MLflow's GPU monitor on one CUDA device (its metrics: ``gpu_0_*``). MLflow's samples every
    GPU NVML sees, and NVML ignores CUDA_VISIBLE_DEVICES: on an 8-GPU node each worker would log
    all 8. This one keeps the NVML handle whose UUID is the device's (MIG instances included)."""

    def __init__(self, device: torch.device) -> None:
        super().__init__()  # ImportError without pynvml; nvmlInit; every GPU's handle
        import pynvml

        uuid = str(torch.cuda.get_device_properties(device).uuid)  # NVML's, without its prefix
        for prefix in ("GPU-", "MIG-"):
            try:
                self.gpu_handles = [pynvml.nvmlDeviceGetHandleByUUID(prefix + uuid)]
                self.num_gpus = 1
                return
            except pynvml.NVMLError:
                continue
        raise RuntimeError(f"no NVML device has the UUID {uuid} of {device}")


def gpu_monitor(device: torch.device) -> tuple[BaseMetricsMonitor | None, str]:
    """The GPU monitor of ``device``, or None and why there is none."""
    if device.type != "cuda":
        return None, "no GPU on this worker"
    try:
        return WorkerGPUMonitor(device), ""
    except ImportError:
        return None, "nvidia-ml-py is not installed (pip install nvidia-ml-py)"
    except Exception as e:  # no NVML library, driver mismatch, device not found
        return None, f"NVML is not usable ({type(e).__name__}: {e})"


class SystemSampler:
    """``monitors`` (MLflow's) sampled every ``interval_s`` in a daemon thread; :meth:`take`
    returns their aggregates since the previous call."""

    def __init__(self, monitors: Sequence[BaseMetricsMonitor], interval_s: float) -> None:
        self.monitors = list(monitors)
        self.interval_s = interval_s
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="system-metrics", daemon=True)

    def start(self) -> SystemSampler:
        import psutil

        psutil.cpu_percent()  # the first call only starts psutil's CPU-time baseline
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def sample(self) -> None:
        with self._lock:
            for monitor in self.monitors:
                monitor.collect_metrics()

    def take(self) -> dict[str, float]:
        """The mean of each metric over the samples since the last call (network: the total
        since the start, as MLflow logs it); empty when no sample was taken in between."""
        metrics: dict[str, float] = {}
        with self._lock:
            for monitor in self.monitors:
                metrics.update(monitor.aggregate_metrics())
                monitor.clear_metrics()
        return metrics

    def stop(self) -> None:
        """Ends the thread (within one sample)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    @property
    def running(self) -> bool:
        return self._thread.is_alive()


def system_monitors(device: torch.device) -> tuple[list[BaseMetricsMonitor], str]:
    """MLflow's CPU, disk and network monitors, plus the GPU one for ``device`` when it can
    run; and why there is no GPU monitor ("" when there is)."""
    from mlflow.system_metrics.metrics.cpu_monitor import CPUMonitor
    from mlflow.system_metrics.metrics.disk_monitor import DiskMonitor
    from mlflow.system_metrics.metrics.network_monitor import NetworkMonitor

    monitors: list[BaseMetricsMonitor] = [CPUMonitor(), DiskMonitor(), NetworkMonitor()]
    gpu, why_not = gpu_monitor(device)
    return ([*monitors, gpu] if gpu is not None else monitors), why_not


class SystemMetrics(Extension):
    """Samples the worker's system from setup to the end of the run; every report carries the
    means since the previous one under ``system/worker_<rank>/``."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self.sampler: SystemSampler | None = None  # started on the worker (setup)

    def setup(self, runner: TrainLoopRunner) -> None:
        monitors, why_not = system_monitors(runner.device)
        if why_not:
            runner.say(f"system metrics: CPU, memory, disk and network only: {why_not}")
        self.sampler = SystemSampler(monitors, self.interval_s).start()

    def on_report(self, runner: TrainLoopRunner, metrics: dict[str, Any]) -> None:
        prefix = worker_prefix(runner.rank)
        metrics.update({prefix + key: value for key, value in self.sampler.take().items()})

    def teardown(self, runner: TrainLoopRunner) -> None:
        if self.sampler is not None:
            self.sampler.stop()
