"""A real multi-node Ray cluster on this machine, used the way cluster/ deploys one: a head and a
second node started by separate `ray start` processes on 127.0.0.1, token authentication on,
MLflow's URI set on the cluster (the head's environment), jobs sent with `ray job submit
--runtime-env cluster/runtime_env.yaml`, checkpoints in a folder every node sees.

- A job without the cluster's token is refused; with it, a 2-worker run places one Train worker
  on each node.
- Killing the second node mid-run (SIGKILL of all its processes: a spot interruption) and
  starting a replacement node: the run restarts its worker group from the latest checkpoint on
  the head and the new node, and finishes as one MLflow run.
- Secrets planted in the environment of a training job reach no MLflow param, tag, metric name
  or artifact, no checkpoint, no job output and no Ray log.

Every Ray process is stopped by PID (tests/clusters.py); nothing is left in ~/.ray.
"""

from __future__ import annotations

import json
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.clusters import (
    NODE_MARKER,
    RAY_CLI,
    LocalCluster,
    StreamedProcess,
    base_env,
    marked_pids,
    signal_and_wait,
)

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
HOME_RAY = Path.home() / ".ray"

# 4 classes x 32 training images; 2 workers x 16 images per step: 4 steps per epoch.
CLASSES, TRAIN_PER_CLASS, VAL_PER_CLASS, GLOBAL_BATCH = 4, 32, 8, 32
STEPS_PER_EPOCH = CLASSES * TRAIN_PER_CLASS // GLOBAL_BATCH
# Each node has 2 logical CPUs; a Train worker takes 1.5, so two cannot share a node and the
# 0.5 left on each node runs that node's decode tasks.
NODE_CPUS = 2
TRAIN_ARGS = [
    "--recipe", "demo",
    "--workers", "2",
    "--cpus-per-worker", "1.5",
    "data.decode_cpus=0.5",
    f"train.global_batch={GLOBAL_BATCH}",
    "train.log_every_steps=1",
    "train.checkpoint_every_steps=2",
    "scale.max_failures=3",
    "train.export_onnx=false",  # checked where the final model is the subject
]  # fmt: skip


@pytest.fixture(scope="module", autouse=True)
def leaves_home_ray_alone() -> Iterator[None]:
    existed = HOME_RAY.exists()
    yield
    assert HOME_RAY.exists() == existed, "~/.ray was created (an auth token written there?)"


@pytest.fixture(scope="module")
def mlflow_uri(tmp_path_factory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture(scope="module")
def cluster(mlflow_uri) -> Iterator[LocalCluster]:
    """Head + node n2, 2 CPUs each, token auth, MLFLOW_TRACKING_URI set on the cluster."""
    root = Path(tempfile.mkdtemp(prefix="rrc-", dir="/tmp"))  # short: Unix socket paths
    cluster = LocalCluster(
        root, token=secrets.token_hex(32), env={"MLFLOW_TRACKING_URI": mlflow_uri}
    )
    try:
        cluster.start_head(num_cpus=NODE_CPUS)
        cluster.add_node("n2", num_cpus=NODE_CPUS)
        yield cluster
    finally:
        survivors = cluster.stop()
        assert not survivors, f"cluster processes survived: {survivors}"
        for node in cluster.nodes:
            assert not marked_pids(node.marker)


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> Path:
    """The folder every node sees (on a real cluster: S3 or NFS)."""
    return tmp_path_factory.mktemp("shared")


@pytest.fixture(scope="module")
def tiny_data(cluster, shared) -> Path:
    out = shared / "tiny"
    done = subprocess.run(
        [
            PYTHON, "-m", "pipelines.prepare", "synthetic", "--kind", "cifar",
            "--classes", str(CLASSES),
            "--train-per-class", str(TRAIN_PER_CLASS),
            "--val-per-class", str(VAL_PER_CLASS),
            "--out", str(out),
        ],
        env=cluster.client_env(),
        cwd=shared,
        capture_output=True,
        text=True,
        timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    return out


def submit_command(cluster: LocalCluster, args: list[str]) -> list[str]:
    return [
        RAY_CLI, "job", "submit",
        "--address", cluster.dashboard_url,
        "--working-dir", str(REPO),
        "--runtime-env", str(REPO / "cluster" / "runtime_env.yaml"),
        "--", "python", "-m", "pipelines.train", *args,
    ]  # fmt: skip


def submit_env(cluster: LocalCluster) -> dict[str, str]:
    env = cluster.client_env()
    env.pop("RAY_ADDRESS")  # the CLI talks to the Jobs API given by --address
    return env


def train_worker_nodes(cluster: LocalCluster) -> list[str]:
    """Node names of every Train worker actor the cluster has run (alive or dead)."""

    def listing(kind: str, *filters: str) -> list[dict]:
        argv = [RAY_CLI, "list", kind, "--address", cluster.dashboard_url]
        argv += ["--format", "json", "--detail", "--limit", "1000"]
        for f in filters:
            argv += ["--filter", f]
        done = subprocess.run(
            argv, env=submit_env(cluster), capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done.stdout + done.stderr
        return json.loads(done.stdout)

    names = {n["node_id"]: n["node_name"] for n in listing("nodes")}
    actors = listing("actors", "class_name=RayTrainWorker")
    return sorted(names[a["node_id"]] for a in actors)


def mlflow_run(uri: str, name: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("resnet-ray")
    assert experiment is not None
    runs = client.search_runs(
        [experiment.experiment_id], filter_string=f"tags.`resnet_ray.run_name` = '{name}'"
    )
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return client, runs[0]


def assert_complete(uri: str, name: str, epochs: int) -> None:
    """One FINISHED run, every epoch with all its samples, no step logged twice."""
    client, run = mlflow_run(uri, name)
    assert run.info.status == "FINISHED"
    for key in run.data.metrics:
        steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
        assert len(steps) == len(set(steps)), f"{key} logged twice at a step: {sorted(steps)}"
    epoch_samples = client.get_metric_history(run.info.run_id, "train/epoch_samples")
    assert sorted(m.step for m in epoch_samples) == [
        STEPS_PER_EPOCH * (e + 1) for e in range(epochs)
    ]
    assert {m.value for m in epoch_samples} == {STEPS_PER_EPOCH * GLOBAL_BATCH}
    assert run.data.metrics["val/count"] == CLASSES * VAL_PER_CLASS
    assert run.data.tags["cluster.nodes"] == "2"


# ---------------------------------------------------------------------------------------------
# Token authentication
# ---------------------------------------------------------------------------------------------


def test_a_job_without_the_token_is_refused(cluster, tmp_path):
    env = submit_env(cluster)
    del env["RAY_AUTH_TOKEN"]
    del env["RAY_AUTH_MODE"]
    env["HOME"] = str(tmp_path)  # no ~/.ray/auth_token to fall back on
    refused = subprocess.run(
        [RAY_CLI, "job", "submit", "--address", cluster.dashboard_url, "--", "echo", "ran"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    output = refused.stdout + refused.stderr
    assert refused.returncode != 0, output
    assert re.search(r"Authentication required|Unauthorized|authentication token", output), output
    listed = subprocess.run(
        [RAY_CLI, "job", "list", "--address", cluster.dashboard_url],
        env=submit_env(cluster),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert listed.returncode == 0, listed.stdout + listed.stderr
    assert "echo ran" not in listed.stdout  # nothing was submitted


# ---------------------------------------------------------------------------------------------
# Two nodes
# ---------------------------------------------------------------------------------------------


def test_a_run_places_a_worker_per_node_and_survives_losing_a_node(
    cluster, tiny_data, shared, mlflow_uri
):
    """One run, two facts: the 2-worker group lands one worker on each node; killing a node
    mid-run restarts the group from the latest checkpoint on the head and the replacement."""
    epochs = 2
    args = ["--data", str(tiny_data), "--storage", str(shared / "runs"), "--name", "lost-node"]
    job = StreamedProcess(
        submit_command(cluster, [*args, "--epochs", str(epochs), *TRAIN_ARGS]),
        submit_env(cluster),
        shared,
    )
    # A step into epoch 2: the epoch-1 checkpoint is written (reports are barriers).
    job.wait_for(f"epoch 2/{epochs} batch 1/{STEPS_PER_EPOCH} ", timeout=600)
    assert train_worker_nodes(cluster) == ["head", "n2"]  # the module's first Train run
    (n2,) = [node for node in cluster.nodes if node.name == "n2"]
    n2.kill()  # every process of the node at once, like a reclaimed spot instance
    cluster.add_node("n3", num_cpus=NODE_CPUS)  # the autoscaler's replacement
    assert job.finish(timeout=900) == 0, job.output

    resumed = re.search(r"resumed from step (\d+)", job.output)
    assert resumed, job.output
    assert int(resumed.group(1)) >= STEPS_PER_EPOCH, job.output
    # The first group on head + n2, the restarted one on head + n3.
    assert train_worker_nodes(cluster) == ["head", "head", "n2", "n3"]
    assert_complete(mlflow_uri, "lost-node", epochs=epochs)
    _, run = mlflow_run(mlflow_uri, "lost-node")
    assert "last_worker_failure" in run.data.tags


# ---------------------------------------------------------------------------------------------
# Secrets never logged
# ---------------------------------------------------------------------------------------------


def test_secrets_in_the_environment_reach_no_log_param_or_artifact(tiny_data, s3_server, tmp_path):
    import boto3
    from mlflow.tracking import MlflowClient

    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket="checkpoints")
    sentinels = {
        "AWS_SECRET_ACCESS_KEY": "sentinelAwsSecret" + secrets.token_hex(12),
        "AWS_SESSION_TOKEN": "sentinelAwsSession" + secrets.token_hex(12),
        "MLFLOW_TRACKING_PASSWORD": "sentinelMlflowPassword" + secrets.token_hex(12),
        "MLFLOW_TRACKING_TOKEN": "sentinelMlflowToken" + secrets.token_hex(12),
        "RAY_AUTH_TOKEN": "sentinelRayToken" + secrets.token_hex(24),
    }
    ray_tmp = Path(tempfile.mkdtemp(prefix="rrs-", dir="/tmp"))
    marker = f"secrets-{secrets.token_hex(6)}"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = base_env()
    env.update(sentinels)
    env.update(
        {
            "RAY_AUTH_MODE": "token",
            "RAY_TMPDIR": str(ray_tmp),
            "MLFLOW_TRACKING_URI": uri,
            "MLFLOW_TRACKING_USERNAME": "resnet-ray",
            NODE_MARKER: marker,  # finds the job's local Ray processes, should any survive it
        }
    )
    try:
        done = subprocess.run(
            [
                PYTHON, "-m", "pipelines.train",
                "--data", str(tiny_data), "--storage", "s3://checkpoints/runs",
                "--name", "secrets", "--epochs", "1", "--workers", "2",
                f"train.global_batch={GLOBAL_BATCH}", "train.log_every_steps=1",
            ],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            timeout=900,
        )  # fmt: skip
        assert done.returncode == 0, (done.stdout + done.stderr).decode(errors="replace")
        assert list(ray_tmp.rglob("session_*")), "the job did not start its own Ray here"

        places: dict[str, bytes] = {"stdout": done.stdout, "stderr": done.stderr}
        for path in ray_tmp.rglob("*"):
            if path.is_file() and not path.is_socket():
                places[f"ray:{path.relative_to(ray_tmp)}"] = path.read_bytes()
        for path in tmp_path.rglob("*"):  # the MLflow store and its artifacts
            if path.is_file():
                places[f"store:{path.relative_to(tmp_path)}"] = path.read_bytes()
        s3 = boto3.client("s3", endpoint_url=s3_server)
        for item in s3.list_objects_v2(Bucket="checkpoints").get("Contents", []):
            body = s3.get_object(Bucket="checkpoints", Key=item["Key"])["Body"].read()
            places[f"s3:{item['Key']}"] = body
        client = MlflowClient(tracking_uri=uri)
        (run,) = client.search_runs([client.get_experiment_by_name("resnet-ray").experiment_id])
        places["mlflow:params"] = json.dumps(run.data.params).encode()
        places["mlflow:tags"] = json.dumps(run.data.tags).encode()
        places["mlflow:metric names"] = json.dumps(sorted(run.data.metrics)).encode()
        assert any(k.startswith("s3:") for k in places), "no checkpoint was written to S3"
        assert any(k.startswith("ray:") and "/logs/" in k for k in places), "no Ray logs read"

        leaks = [
            f"{variable} in {where}"
            for where, content in places.items()
            for variable, value in sentinels.items()
            if value.encode() in content
        ]
        assert leaks == []
    finally:
        left = signal_and_wait(lambda: marked_pids(marker), signal.SIGKILL, wait_s=10.0)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert not left, f"the job left Ray processes behind: {left}"
