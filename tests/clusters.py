"""A real multi-node Ray cluster on this machine, for tests: one `ray start --head` and any number
of `ray start --address` nodes, all on 127.0.0.1, each with its own temp dir and free ports.

Every process a node starts (raylet, GCS, dashboard, agents, workers, job drivers) inherits the
environment variable ``RESNET_RAY_NODE=<cluster id>-<node name>`` from its `ray start`. A node's
processes are found by reading ``/proc/<pid>/environ`` for that exact value, so stopping or
killing a node signals exactly the processes it started — never `ray stop`, never a process
name: other Ray instances on the machine are left alone.

    cluster = LocalCluster(tmp_root, token=secrets.token_hex(32))
    cluster.start_head(num_cpus=2)
    worker = cluster.add_node(num_cpus=2)
    ...  # `ray job submit --address cluster.dashboard_url` with env=cluster.client_env()
    worker.kill()              # SIGKILL: a spot interruption
    cluster.stop()             # SIGTERM then SIGKILL for every node; returns survivors
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

RAY_CLI = str(Path(sys.executable).parent / "ray")
NODE_MARKER = "RESNET_RAY_NODE"
# Every test Ray's object store: small and explicit (the data of the tests is a few MB).
STORE_BYTES = 150_000_000
# Node deaths are noticed by the GCS health check; Ray's defaults take ~30 s to declare a
# SIGKILLed node dead, these take ~3 s (read by Ray from RAY_<config name>, head only).
FAST_FAILURE_DETECTION = {
    "RAY_health_check_initial_delay_ms": "1000",
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_timeout_ms": "1000",
    "RAY_health_check_failure_threshold": "3",
}


def free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports free on 127.0.0.1 right now."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def marked_pids(value: str, variable: str = NODE_MARKER) -> set[int]:
    """PIDs of live processes whose environment holds ``<variable>=<value>`` (by default
    ``RESNET_RAY_NODE``, the variable the nodes of a LocalCluster carry)."""
    needle = f"{variable}={value}".encode()
    pids = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                environ = f.read().split(b"\0")
        except OSError:  # exited meanwhile, or not ours to read
            continue
        if needle in environ:
            pids.add(int(entry))
    return pids


def cmdline(pid: int) -> str:
    """The process title (Ray renames its workers, e.g. ``ray::RayTrainWorker``), or ''."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def crash_report(ray_temp_dir: Path, lines: int = 40) -> str:
    """The last lines of every raylet's and GCS's stderr under a Ray temp dir: where a crashed
    raylet's signal and stack go (its .out log, which Ray's own message quotes, stops before)."""
    parts = []
    for path in sorted({p.resolve() for p in ray_temp_dir.glob("**/logs/*.err")}):  # once
        if path.name.startswith(("raylet", "gcs_server")) and path.stat().st_size:
            tail = path.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"--- {path}\n" + "\n".join(tail))
    return "\n".join(parts)


def signal_and_wait(
    pids_of: Callable[[], set[int]], sig: signal.Signals, wait_s: float
) -> set[int]:
    """Send ``sig`` once to every process ``pids_of()`` returns (including ones that appear
    meanwhile) until none are left or ``wait_s`` passes; returns the survivors."""
    deadline = time.monotonic() + wait_s
    signalled: set[int] = set()
    while pids := pids_of():
        for pid in pids - signalled:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        signalled |= pids
        if time.monotonic() > deadline:
            return pids
        time.sleep(0.2)
    return set()


@dataclass
class Node:
    """One `ray start` and everything it spawned."""

    name: str
    marker: str  # the RESNET_RAY_NODE value its processes carry
    temp_dir: Path

    def pids(self) -> set[int]:
        return marked_pids(self.marker)

    def kill(self) -> None:
        """SIGKILL every process of the node at once, like a spot instance disappearing."""
        left = signal_and_wait(self.pids, signal.SIGKILL, wait_s=10.0)
        assert not left, f"node {self.name}: processes survived SIGKILL: {left}"

    def stop(self, grace_s: float = 10.0) -> dict[int, str]:
        """SIGTERM, then SIGKILL what is left after ``grace_s``; the survivors (pid → title)."""
        signal_and_wait(self.pids, signal.SIGTERM, wait_s=grace_s)
        left = signal_and_wait(self.pids, signal.SIGKILL, wait_s=5.0)
        return {pid: cmdline(pid) for pid in left}


@dataclass
class LocalCluster:
    """A head and worker nodes on 127.0.0.1 under ``root`` (keep it short: Ray's Unix socket
    paths live below it and must stay under 108 bytes).

    ``token``: run with ``RAY_AUTH_MODE=token`` and this token (in the environment, never in
    ``~/.ray``); None runs with authentication disabled. ``env``: extra variables for every
    node (e.g. ``MLFLOW_TRACKING_URI`` set "on the cluster").
    """

    root: Path
    token: str | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    cluster_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    nodes: list[Node] = field(default_factory=list)
    gcs_address: str = ""
    dashboard_url: str = ""

    def _node_env(self, marker: str, temp_dir: Path, extra: Mapping[str, str]) -> dict[str, str]:
        env = base_env()
        env.update(self.env)
        env.update(extra)
        env.update({NODE_MARKER: marker, "RAY_TMPDIR": str(temp_dir)})
        env.update(self.auth_env())
        return env

    def auth_env(self) -> dict[str, str]:
        """What a client needs to talk to this cluster."""
        if self.token is None:
            return {"RAY_AUTH_MODE": "disabled"}
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token}

    def client_env(self, **extra: str) -> dict[str, str]:
        """Environment for `ray job submit` / `python -m pipelines.*` clients of this cluster."""
        env = base_env()
        env.update(self.auth_env())
        env["RAY_ADDRESS"] = self.gcs_address
        env.update(extra)
        return env

    def _start(self, name: str, args: list[str], extra_env: Mapping[str, str]) -> Node:
        marker = f"{self.cluster_id}-{name}"
        temp_dir = self.root / name
        temp_dir.mkdir(parents=True)
        node = Node(name=name, marker=marker, temp_dir=temp_dir)
        self.nodes.append(node)  # registered first, so stop() finds a half-started node too
        agent, agent_grpc, runtime_env, metrics, node_manager, object_manager = free_ports(6)
        command = [
            RAY_CLI, "start",
            *args,
            "--node-ip-address=127.0.0.1",
            f"--node-name={name}",
            f"--temp-dir={temp_dir}",
            f"--node-manager-port={node_manager}",
            f"--object-manager-port={object_manager}",
            f"--dashboard-agent-listen-port={agent}",
            f"--dashboard-agent-grpc-port={agent_grpc}",
            f"--runtime-env-agent-port={runtime_env}",
            f"--metrics-export-port={metrics}",
            "--disable-usage-stats",
        ]  # fmt: skip
        done = subprocess.run(
            command,
            env=self._node_env(marker, temp_dir, extra_env),
            capture_output=True,
            text=True,
            timeout=180,
        )
        if done.returncode != 0:
            raise RuntimeError(f"`ray start` for node {name} failed:\n{done.stdout}\n{done.stderr}")
        if not list(temp_dir.glob("session_*")):
            raise RuntimeError(f"node {name} did not use its temp dir {temp_dir}")
        return node

    def start_head(
        self,
        num_cpus: int,
        *,
        resources: str | None = None,
        object_store_bytes: int = STORE_BYTES,
        env: Mapping[str, str] | None = None,
    ) -> Node:
        """`ray start --head` with the dashboard (Jobs API) on 127.0.0.1 only."""
        gcs, dashboard, client = free_ports(3)
        args = [
            "--head",
            f"--port={gcs}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard}",
            f"--ray-client-server-port={client}",
            f"--num-cpus={num_cpus}",
            "--num-gpus=0",
            f"--object-store-memory={object_store_bytes}",
        ]
        if resources:
            args.append(f"--resources={resources}")
        node = self._start("head", args, {**FAST_FAILURE_DETECTION, **(env or {})})
        self.gcs_address = f"127.0.0.1:{gcs}"
        self.dashboard_url = f"http://127.0.0.1:{dashboard}"
        return node

    def add_node(
        self,
        name: str,
        num_cpus: int,
        *,
        num_gpus: int = 0,
        resources: str | None = None,
        labels: str | None = None,
        object_store_bytes: int = STORE_BYTES,
    ) -> Node:
        """`ray start --address <head>`: a worker node joining the running head. ``num_gpus``
        declares logical GPUs (no device behind them); ``labels``: ``key=value,...``."""
        assert self.gcs_address, "start_head() first"
        args = [
            f"--address={self.gcs_address}",
            f"--num-cpus={num_cpus}",
            f"--num-gpus={num_gpus}",
            f"--object-store-memory={object_store_bytes}",
        ]
        if resources:
            args.append(f"--resources={resources}")
        if labels:
            args.append(f"--labels={labels}")
        return self._start(name, args, {})

    def stop(self) -> dict[int, str]:
        """Stop every node (workers first), delete the temp dirs; the survivors (pid → title)."""
        survivors: dict[int, str] = {}
        for node in reversed(self.nodes):
            survivors.update(node.stop())
        shutil.rmtree(self.root, ignore_errors=True)
        return survivors


def base_env(drop: str = NODE_MARKER) -> dict[str, str]:
    """This process's environment without Ray settings (its temp dir kept: where the tests' Rays
    write) or variables starting with ``drop`` (a marker), the venv's tools first, unbuffered."""
    env = {
        k: v for k, v in os.environ.items() if k == "RAY_TMPDIR" or not k.startswith(("RAY_", drop))
    }
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONUNBUFFERED"] = "1"
    return env


class StreamedProcess:
    """A subprocess whose stdout is collected line by line while it runs (stderr merged)."""

    def __init__(self, argv: list[str], env: Mapping[str, str], cwd: Path) -> None:
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self.process = subprocess.Popen(
            argv,
            env=dict(env),
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_for(self, text: str, timeout: float) -> None:
        """Return once a line contains ``text``; AssertionError if the process ends first or
        ``timeout`` seconds pass."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while not any(text in line for line in self.lines):
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(
                        f"no line with {text!r} (exit {self.process.poll()}):\n{self.output}"
                    )
                self._changed.wait(timeout=1.0)

    def finish(self, timeout: float) -> int:
        """The exit status; the process is killed (and AssertionError raised) after ``timeout``."""
        try:
            status = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(f"still running after {timeout} s:\n{self.output}") from None
        self._reader.join(timeout=10)
        return status
