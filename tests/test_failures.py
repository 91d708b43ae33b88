"""Unreachable services fail fast and clean: every command that needs an MLflow store or a Ray
cluster that does not answer exits 2 within seconds, with one line naming what is unreachable
and the fix, before any Ray starts — and a password in a URI (store, cluster, S3 location)
never reaches the console."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipelines.job.session import free_loopback_port

SENTINEL = "s3cretSENTINEL"
LIMIT_S = 15.0


def _run(args: list[str], cwd: Path, **env: str) -> tuple[subprocess.Popen, float]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}
    process = subprocess.Popen(
        [sys.executable, "-m", *args],
        cwd=cwd,
        env={**base, "RAY_AUTH_MODE": "disabled", "RAY_TMPDIR": str(cwd / "ray"), **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    return process, time.monotonic()


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


def _start(case: str, tmp_path: Path, port: int) -> tuple[subprocess.Popen, float]:
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
    """Two at a time (one per core, so each command's own time is what is measured)."""
    cases = list(CASES)
    runs = {}
    for pair in (cases[i : i + 2] for i in range(0, len(cases), 2)):
        started = {case: _start(case, tmp_path, dead_port) for case in pair}
        for case, (process, start) in started.items():
            out, err = process.communicate(timeout=120)  # a late end is counted against it
            runs[case] = (process, time.monotonic() - start, out, err)
    for case, (process, took, out, err) in runs.items():
        command = CASES[case][0][0].removeprefix("pipelines.").replace("evaluate", "eval")
        assert process.returncode == 2, (case, out, err)
        assert took < LIMIT_S, (case, took)
        lines = err.strip().splitlines()
        assert lines[-1].startswith(f"resnet-{command}: "), (case, err)
        assert CASES[case][1].format(port=dead_port) in lines[-1], (case, err)
        assert SENTINEL not in out + err, case
        assert not list((tmp_path / case / "ray").rglob("session_*")), f"{case}: Ray was started"
