"""Unreachable services fail fast and clean: every command that needs an MLflow store or a Ray
cluster that does not answer exits 2 within seconds, with one line naming what is unreachable
and the fix, before any Ray starts — and a password in a URI (store, cluster, S3 location)
never reaches the console."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import pytest

from pipelines.job.session import free_loopback_port

SENTINEL = "s3cretSENTINEL"
# "Within seconds" as the test can hold it on a machine that runs other tests beside it: a
# command gives up within a minute of wall time (MLflow's own retries take four, Ray's connect
# retries minutes), having spent less than 15 CPU-seconds (imports and the check: 3-8 here).
WALL_LIMIT_S, CPU_LIMIT_S = 60.0, 15.0


class Finished(NamedTuple):
    returncode: int
    wall_s: float
    cpu_s: float  # the command's own user + system time
    out: str
    err: str


def _run(args: list[str], cwd: Path, **env: str) -> Callable[[], Finished]:
    """Start ``python -m args``; the returned call waits for it (killed past two minutes)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}
    start = time.monotonic()
    with open(cwd / "out.txt", "w") as out, open(cwd / "err.txt", "w") as err:
        process = subprocess.Popen(
            [sys.executable, "-m", *args],
            cwd=cwd,
            env={**base, "RAY_AUTH_MODE": "disabled", "RAY_TMPDIR": str(cwd / "ray"), **env},
            stdout=out,
            stderr=err,
        )

    def finish() -> Finished:
        # os.wait4, not Popen.wait: it also returns the command's CPU time.
        while not (done := os.wait4(process.pid, os.WNOHANG))[0]:
            if time.monotonic() - start > 120:
                process.kill()
            time.sleep(0.05)
        process.returncode = os.waitstatus_to_exitcode(done[1])
        wall, cpu = time.monotonic() - start, done[2].ru_utime + done[2].ru_stime
        texts = ((cwd / name).read_text() for name in ("out.txt", "err.txt"))
        return Finished(process.returncode, wall, cpu, *texts)

    return finish


@pytest.fixture(scope="module")
def dead_port() -> int:
    """A loopback port nothing listens on (connections are refused at once)."""
    return free_loopback_port()


CASES = {
    # command, its arguments, what the line names
    "train-store": (["pipelines.train"], "cannot reach the MLflow store http://127.0.0.1:{port}"),
    "tune-store": (["pipelines.tune"], "cannot reach the MLflow store http://127.0.0.1:{port}"),
    "eval-store": (
        ["pipelines.evaluate", "runs:/0123456789abcdef"],
        "cannot reach the MLflow store http://127.0.0.1:{port}",
    ),
    "predict-store": (
        ["pipelines.predict", "--model", "models:/resnet-ray-resnet8/1", "x.jpg"],
        "cannot reach the MLflow store http://127.0.0.1:{port}",
    ),
    "train-cluster": (
        ["pipelines.train", "--address", "127.0.0.1:{port}"],
        "cannot reach the Ray cluster at 127.0.0.1:{port}",
    ),
    "prepare-cluster": (
        ["pipelines.prepare", "synthetic", "--out", "out", "--address", "127.0.0.1:{port}"],
        "cannot reach the Ray cluster at 127.0.0.1:{port}",
    ),
    # A password in every other kind of location a command takes.
    "train-client-cluster": (
        ["pipelines.train", "--address", "ray://alice:{secret}@127.0.0.1:{port}"],
        "cannot reach the Ray cluster at ray://127.0.0.1:{port}",
    ),
    "train-s3-data": (
        ["pipelines.train", "--data", "s3://alice:{secret}@bucket/data"],
        "credentials in 's3://bucket/data' are not accepted",
    ),
    "tune-s3-storage": (
        ["pipelines.tune", "--storage", "s3://alice:{secret}@bucket/runs"],
        "credentials in 's3://bucket/runs' are not accepted",
    ),
    "eval-s3-run": (
        ["pipelines.evaluate", "s3://alice:{secret}@bucket/runs/demo-resnet8"],
        "credentials in 's3://bucket/runs/demo-resnet8' are not accepted",
    ),
}


def _start(case: str, tmp_path: Path, port: int) -> Callable[[], Finished]:
    """The store cases get a dead server whose URI carries a password; the cluster cases a dead
    GCS address (and a local SQLite store, so the store check passes)."""
    cwd = tmp_path / case
    (cwd / "ray").mkdir(parents=True)
    store = (
        f"http://alice:{SENTINEL}@127.0.0.1:{port}"
        if case.endswith("store")
        else f"sqlite:///{cwd / 'mlflow.db'}"
    )
    args = [a.format(port=port, secret=SENTINEL) for a in CASES[case][0]]
    return _run(args, cwd, MLFLOW_TRACKING_URI=store)


def test_unreachable_services_fail_fast_with_one_line_and_no_password(tmp_path, dead_port):
    """Two at a time (one per core)."""
    cases = list(CASES)
    runs = {}
    for pair in (cases[i : i + 2] for i in range(0, len(cases), 2)):
        started = {case: _start(case, tmp_path, dead_port) for case in pair}
        runs.update((case, finish()) for case, finish in started.items())
    for case, run in runs.items():
        command = CASES[case][0][0].removeprefix("pipelines.").replace("evaluate", "eval")
        assert run.returncode == 2, (case, run.out, run.err)
        assert run.wall_s < WALL_LIMIT_S, (case, run.wall_s)
        assert run.cpu_s < CPU_LIMIT_S, (case, run.cpu_s)
        lines = run.err.strip().splitlines()
        assert lines[-1].startswith(f"resnet-{command}: "), (case, run.err)
        assert CASES[case][1].format(port=dead_port) in lines[-1], (case, run.err)
        assert SENTINEL not in run.out + run.err, case
        assert not list((tmp_path / case / "ray").rglob("session_*")), f"{case}: Ray was started"
