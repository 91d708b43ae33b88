"""The one way a command attaches to or starts Ray, and what keeps Ray's console output to ours.

``with ray_session(address, num_cpus=..., gpus_needed=...)`` attaches to ``address`` (or
``RAY_ADDRESS``), else starts a local Ray, checks the cluster can ever host the GPUs asked for,
and disconnects (a local Ray: shuts it down) on the way out. Inside an existing connection (a
test's Ray, a Tune trial) it only checks.

A local Ray always runs its dashboard, on loopback, and names its address to every process of
the job (``RAY_API_SERVER_ADDRESS``): Ray Train's placement-group cleaner asks the state API
behind it whether the Train controller is alive, and without it repeats a warning every second
(and, with several Ray instances on one machine, cannot pick the right one). Its workers
first run :func:`pipelines.quiet_local_worker`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import socket
import sys
from collections.abc import Iterator

from pipelines import storage
from pipelines.config import ConfigError, JobConfig


def free_loopback_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def local_cpus(needed: float) -> int:
    """Logical CPUs for a local Ray: this machine's, or more when the job asks for more (Ray
    then time-shares; tests and demos on 2 cores run 2 workers plus their decode tasks)."""
    return max(os.cpu_count() or 1, math.ceil(needed))


@contextlib.contextmanager
def ray_session(
    address: str | None = None,
    *,
    num_cpus: int | None = None,
    object_store_memory: int | None = None,
    gpus_needed: float = 0.0,
    gpus_for: str = "the job",
    dashboard: bool = True,
) -> Iterator[bool]:
    """Connect to Ray for the duration; yields True when this call connected.

    ``num_cpus`` / ``object_store_memory``: a local Ray's size (default: this machine).
    ``dashboard=False``: a local Ray without it, for work that runs no Train job and counts
    CPU seconds (``resnet-bench data``).
    ``gpus_needed``: ConfigError (and nothing left running) when the cluster, even scaled up by
    its autoscaler, has fewer; ``gpus_for`` names what needs them in that message.
    """
    import ray

    if ray.is_initialized():
        check_cluster_gpus(gpus_needed, gpus_for)
        yield False
        return
    previous_sigterm = signal.getsignal(signal.SIGTERM)
    if address or os.environ.get("RAY_ADDRESS"):
        check_reachable(address or os.environ["RAY_ADDRESS"])
        ray.init(address=address)
    else:
        port = free_loopback_port()
        ray.init(
            num_cpus=num_cpus or local_cpus(0),
            object_store_memory=object_store_memory,
            include_dashboard=dashboard,
            dashboard_host="127.0.0.1",
            dashboard_port=port,
            runtime_env={
                "env_vars": {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"},
                "worker_process_setup_hook": "pipelines.quiet_local_worker",
            },
        )
    # ray.init makes SIGTERM a bare sys.exit; a command that handles SIGTERM itself (to end its
    # MLflow run and exit 130) gets its handler back.
    if callable(previous_sigterm):
        signal.signal(signal.SIGTERM, previous_sigterm)
    quiet_ray_logs()
    try:
        check_cluster_gpus(gpus_needed, gpus_for)
        yield True
    finally:
        ray.shutdown()


def training_session(
    config: JobConfig, address: str | None
) -> contextlib.AbstractContextManager[bool]:
    """:func:`ray_session` for a training run of ``config``: a local Ray fits every worker's
    CPUs and its decode tasks; the cluster must be able to host the workers' GPUs."""
    sc, d = config.scale, config.data
    return ray_session(
        address,
        num_cpus=local_cpus(sc.num_workers * (sc.cpus_per_worker + d.decode_cpus)),
        gpus_needed=sc.num_workers * sc.gpus_per_worker if sc.use_gpu else 0,
        gpus_for=f"scale.use_gpu=true with {sc.num_workers} workers",
    )


# A GCS that does not answer makes ray.init retry for minutes ("Failed to get cluster ID").
CONNECT_TIMEOUT_S = 5


def check_reachable(address: str) -> None:
    """A ``host:port`` or ``ray://host:port`` cluster address answers a TCP connection within
    seconds; ConfigError naming it (any password removed) otherwise. Other forms (``auto``, a
    dashboard URL) are Ray's to resolve."""
    hostport = address.removeprefix("ray://").rpartition("@")[2]  # no user:password@
    host, sep, port = hostport.rpartition(":")
    if not sep or "/" in hostport or not port.isdigit():
        return
    try:
        with socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S):
            pass
    except OSError as e:
        raise ConfigError(
            f"cannot reach the Ray cluster at {storage.redact(address)} "
            f"({e.strerror or type(e).__name__}); check --address / RAY_ADDRESS (the head "
            "node's GCS, host:port, e.g. 10.0.0.5:6379, or ray://host:10001 for Ray Client) "
            "and that the cluster is up"
        ) from None


def check_cluster_gpus(needed: float, what: str) -> None:
    """``needed`` GPUs exist now, or in the autoscaler's node types; ConfigError otherwise."""
    if needed <= 0:
        return
    import ray
    from ray._private import state as ray_state

    now = ray.cluster_resources().get("GPU", 0)
    # The upper bound an autoscaling cluster can reach (what Ray Train itself checks, via the
    # same private helper); None on a fixed cluster.
    reachable = (ray_state.state.get_max_resources_from_cluster_config() or {}).get("GPU", 0)
    if max(now, reachable) < needed:
        raise ConfigError(
            f"{what} needs {needed:g} GPUs but the cluster has {max(now, reachable):g}; drop "
            "--gpu, lower --workers or add GPU nodes"
        )


def quiet_ray_logs() -> None:
    """Keep the console to our lines, in the driver and in Train workers: Ray Data announces
    every epoch's pipeline and Ray Train every report at INFO; their warnings still show, and
    everything stays in Ray's log files. (Noise forwarded from other Ray processes is dropped by
    the driver: ``pipelines/__init__.py``.)"""
    import ray.data

    logging.getLogger("ray.data").setLevel(logging.WARNING)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
    ray.data.DataContext.get_current().enable_progress_bars = False
    # Ray 2.60 logs every ray.train.report at INFO through a logger named by its file path,
    # outside "ray.train", so RunConfig's LoggingConfig does not reach it.
    context_module = sys.modules.get("ray.train.v2._internal.execution.context")
    if context_module is not None:
        logging.getLogger(context_module.__file__).setLevel(logging.WARNING)
