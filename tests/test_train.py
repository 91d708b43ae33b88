"""resnet-train end to end, as users run it: `python -m pipelines.train` subprocesses against a
local Ray it starts itself, and against a `ray start --head` cluster with token authentication
on this machine; a real MLflow store (SQLite in tmp) and a real S3 endpoint on loopback (moto).

Every Ray process a test starts carries a unique RESNET_RAY_TEST=<marker> environment variable,
so leftovers are found (and the cluster is stopped) by reading /proc/<pid>/environ, never by
process name: other Ray instances on this machine are left alone.
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.clusters import STORE_BYTES, cmdline, crash_report, free_ports
from tests.drivers import PYTHON, Driver, base_env, marked, stop_marked
from tests.jpeg_decoder import EXPECTED_DECODER

REPO = Path(__file__).resolve().parents[1]
RAY_CLI = str(Path(PYTHON).parent / "ray")
HOME_RAY = Path.home() / ".ray"

# The tiny dataset the cluster runs train on: 10 classes, 640 training and 200 validation images.
CLASSES, TRAIN_PER_CLASS, VAL_PER_CLASS = 10, 64, 20
GLOBAL_BATCH, EPOCHS = 64, 3
STEPS_PER_EPOCH = CLASSES * TRAIN_PER_CLASS // GLOBAL_BATCH  # 2 workers x 32 images, 10 steps
# A short run with checkpoints every 4 steps (and at each epoch end) and progress every 2.
RUN_ARGS = [
    "--recipe", "demo",
    "--epochs", str(EPOCHS),
    f"train.global_batch={GLOBAL_BATCH}",
    "train.log_every_steps=2",
    "train.checkpoint_every_steps=4",
    "train.keep_checkpoints=2",
    "scale.max_failures=2",
    "train.export_onnx=false",  # the demo run's test checks the ONNX export
]  # fmt: skip

pytestmark = pytest.mark.slow


# ---------------------------------------------------------------------------------------------
# Processes
# ---------------------------------------------------------------------------------------------


def _train(args: list[str], env: dict[str, str], cwd: Path, timeout: float = 420) -> Driver:
    driver = Driver(args, env, cwd)
    driver.finish(timeout)
    return driver


# ---------------------------------------------------------------------------------------------
# Fixtures: the store, a token-authenticated cluster, the tiny dataset
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def leaves_home_ray_alone() -> Iterator[None]:
    existed = HOME_RAY.exists()
    yield
    assert HOME_RAY.exists() == existed, "~/.ray was created (an auth token written there?)"


@pytest.fixture(scope="module")
def mlflow_uri(tmp_path_factory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@dataclass
class Cluster:
    address: str  # GCS host:port, for RAY_ADDRESS
    dashboard: str  # http://127.0.0.1:port, for `ray job submit` and the state API
    token: str
    temp_dir: Path
    marker: str

    def client_env(self, marker: str, **extra: str) -> dict[str, str]:
        return base_env(
            marker,
            RAY_ADDRESS=self.address,
            RAY_AUTH_MODE="token",
            RAY_AUTH_TOKEN=self.token,
            **extra,
        )


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    """`ray start --head` with token auth (token in the environment, not ~/.ray), 4 logical
    CPUs, no GPU, dashboard on 127.0.0.1, its own temp dir and free ports; stopped afterwards by
    signalling exactly its processes."""
    # A short root: Ray's Unix sockets live under it and their paths must stay < 108 bytes.
    temp_dir = Path(tempfile.mkdtemp(prefix="rr-", dir="/tmp"))
    marker = f"cluster-{uuid.uuid4().hex}"
    token = secrets.token_hex(32)
    env = base_env(marker, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, RAY_TMPDIR=str(temp_dir))
    try:
        # Ray gives its raylet 30 s to register; on an overloaded machine that can pass, so a
        # failed start is cleaned up and tried once more.
        for attempt in (1, 2):
            gcs, dashboard, client, agent, agent_grpc, runtime_env, metrics = free_ports(7)
            started = subprocess.run(
                [
                    RAY_CLI, "start", "--head",
                    f"--port={gcs}",
                    "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
                    f"--ray-client-server-port={client}",
                    f"--dashboard-agent-listen-port={agent}",
                    f"--dashboard-agent-grpc-port={agent_grpc}",
                    f"--runtime-env-agent-port={runtime_env}",
                    f"--metrics-export-port={metrics}",
                    "--num-cpus=4", "--num-gpus=0", f"--object-store-memory={STORE_BYTES}",
                    f"--temp-dir={temp_dir / 'ray'}",
                    "--disable-usage-stats",
                ],
                env=env,
                capture_output=True,
                text=True,
                timeout=180,
            )  # fmt: skip
            if started.returncode == 0:
                break
            stop_marked(marker)
            assert attempt == 1, started.stdout + started.stderr
        address = (temp_dir / "ray" / "ray_current_cluster").read_text().strip()
        yield Cluster(address, f"http://127.0.0.1:{dashboard}", token, temp_dir, marker)
    finally:
        stop_marked(marker)
        left = {pid: cmdline(pid) for pid in marked(marker)}
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not left, f"cluster processes survived: {left}"


def _prepare(cluster: Cluster, out: Path, train_per_class: int, val_per_class: int) -> Path:
    """Synthetic 32x32 shards of CLASSES classes, written by resnet-prepare on the cluster."""
    done = subprocess.run(
        [
            PYTHON, "-m", "pipelines.prepare", "synthetic", "--kind", "cifar",
            "--classes", str(CLASSES),
            "--train-per-class", str(train_per_class),
            "--val-per-class", str(val_per_class),
            "--out", str(out),
        ],
        env=cluster.client_env(f"prepare-{uuid.uuid4().hex}"),
        cwd=out.parent,
        capture_output=True,
        text=True,
        timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr + crash_report(cluster.temp_dir)
    return out


@pytest.fixture(scope="module")
def tiny_data(cluster, tmp_path_factory) -> Path:
    """640 training and 200 validation images: runs of 10 steps per epoch."""
    return _prepare(
        cluster, tmp_path_factory.mktemp("data") / "tiny", TRAIN_PER_CLASS, VAL_PER_CLASS
    )


@pytest.fixture(scope="module")
def learn_data(cluster, tmp_path_factory) -> Path:
    """2000 training and 500 validation images: enough for the demo recipe to learn in 5 epochs."""
    return _prepare(cluster, tmp_path_factory.mktemp("data") / "learn", 200, 50)


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _runs_named(uri: str, name: str) -> list:
    client = _client(uri)
    experiment = client.get_experiment_by_name("resnet-ray")
    assert experiment is not None
    return client.search_runs(
        [experiment.experiment_id], filter_string=f"tags.`resnet_ray.run_name` = '{name}'"
    )


def _histories(uri: str, run_id: str) -> dict[str, list]:
    client = _client(uri)
    keys = client.get_run(run_id).data.metrics
    return {key: client.get_metric_history(run_id, key) for key in keys}


def _assert_exact_run(uri: str, name: str) -> tuple[str, dict[str, list]]:
    """One FINISHED run of that name, every epoch with exactly its samples, no step twice."""
    runs = _runs_named(uri, name)
    assert len(runs) == 1, [r.info.run_id for r in runs]
    run = runs[0]
    assert run.info.status == "FINISHED"
    histories = _histories(uri, run.info.run_id)
    for key, history in histories.items():
        steps = [m.step for m in history]
        assert len(steps) == len(set(steps)), f"{key} logged twice at a step: {sorted(steps)}"
    epochs = sorted(histories["train/epoch_samples"], key=lambda m: m.step)
    assert [m.step for m in epochs] == [STEPS_PER_EPOCH * (e + 1) for e in range(EPOCHS)]
    assert {m.value for m in epochs} == {STEPS_PER_EPOCH * GLOBAL_BATCH}
    assert {m.value for m in histories["val/count"]} == {CLASSES * VAL_PER_CLASS}
    assert max(m.step for m in histories["train/loss"]) == EPOCHS * STEPS_PER_EPOCH
    return run.info.run_id, histories


# ---------------------------------------------------------------------------------------------
# Bad configurations: one line on stderr, exit 2, no Ray started
# ---------------------------------------------------------------------------------------------


def _expect_bad_config(driver: Driver, message: str) -> None:
    """Exit status 2 and one line of ours on stderr, the last, holding ``message``."""
    driver.finish(timeout=240)
    lines = driver.stderr.strip().splitlines()
    assert driver.process.returncode == 2, driver.output + driver.stderr
    # Attaching to a cluster, Ray's INFO lines may come before ours.
    ours = [line for line in lines if line.startswith("resnet-train: ")]
    assert ours == lines[-1:], driver.stderr
    assert message in ours[0]


BAD_CONFIGS = {
    "unknown-model": (["--model", "resnet19"], "model.name='resnet19' is not a ResNet v1 model"),
    "zero-lr": (["optim.lr=0"], "optim.lr=0.0 must be positive"),
    "negative-lr": (["optim.lr=-1e-3"], "optim.lr=-0.001 must be positive"),
    "zero-batch": (["train.global_batch=0"], "train.global_batch=0 must be positive"),
    "indivisible-batch": (
        ["train.global_batch=63"],
        "train.global_batch=63 is not divisible by scale.num_workers=2",
    ),
    "no-manifest": (["--data", "{tmp}/empty"], "no manifest.json at {tmp}/empty"),
    "gpu-without-cuda": (["--gpu"], "scale.use_gpu=true but this machine has no CUDA GPU"),
    "sync-bn-on-cpu": (["train.sync_bn=true"], "train.sync_bn=true needs scale.use_gpu=true"),
    "unknown-precision": (["train.precision=fp8"], "train.precision='fp8'; use one of: auto,"),
    "registered-model-name": (["run.registered_model=team/resnet"], "run.registered_model="),
    "empty-experiment": (["--experiment", ""], "run.experiment='' is not a valid MLflow"),
}
# What a training run's console must not show: Ray's and torch's internal noise (dropped through
# Ray's log settings), the worker prefix, MLflow's model-logging chatter, any traceback.
CONSOLE_NOISE = (
    r"Failed to query Ray Train Controller actor state",
    r"PreemptionWatcher",
    r"\[c10d\]",
    r"RayTrainWorker pid=",
    r"TrainController pid=",
    r"Got error",
    r"input example",
    r"Traceback",
    r"INFO streaming_executor",
    r"logging_progress",
    r"Reporting training result",
    r"mlflow\.(store|pyfunc)",
)


@dataclass
class BadRun:
    driver: Driver
    cwd: Path
    ray_tmp: Path
    marker: str


@pytest.fixture(scope="module")
def bad_runs(tmp_path_factory) -> Iterator[dict[str, BadRun]]:
    """Every bad-configuration command, all started at once: each only imports and checks."""
    import torch

    runs = {}
    for case, (args, _) in BAD_CONFIGS.items():
        if "--gpu" in args and torch.cuda.is_available():
            continue  # it would train; the test skips
        cwd = tmp_path_factory.mktemp(case)
        (cwd / "empty").mkdir()
        ray_tmp = Path(tempfile.mkdtemp(prefix="rr-", dir="/tmp"))
        marker = f"bad-{uuid.uuid4().hex}"
        env = base_env(
            marker,
            RAY_AUTH_MODE="disabled",
            RAY_TMPDIR=str(ray_tmp),
            MLFLOW_TRACKING_URI=f"sqlite:///{cwd / 'mlflow.db'}",
        )
        driver = Driver([a.format(tmp=cwd) for a in args], env, cwd)
        runs[case] = BadRun(driver, cwd, ray_tmp, marker)
    yield runs
    for run in runs.values():
        run.driver.finish(timeout=240)
        shutil.rmtree(run.ray_tmp, ignore_errors=True)


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_bad_configuration_exits_2_before_ray_starts(case, bad_runs):
    if case not in bad_runs:
        pytest.skip("this machine has a GPU")
    run = bad_runs[case]
    _expect_bad_config(run.driver, BAD_CONFIGS[case][1].format(tmp=run.cwd))
    assert not list(run.ray_tmp.rglob("session_*")), "Ray was started"
    assert not marked(run.marker)
    assert not (run.cwd / "results").exists()  # no checkpoint folder either


def test_s3_locations_are_checked_before_ray_starts(s3_server, tmp_path):
    import boto3

    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket="shards")
    marker = f"s3-{uuid.uuid4().hex}"
    ray_tmp = Path(tempfile.mkdtemp(prefix="rr-", dir="/tmp"))
    env = base_env(marker, RAY_AUTH_MODE="disabled", RAY_TMPDIR=str(ray_tmp))
    no_credentials = {
        k: v for k, v in env.items() if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
    }
    cases = [  # (arguments, environment, message), run side by side
        (["--storage", "s3://no-such-bucket/runs"], env, "bucket 'no-such-bucket' does not exist"),
        (["--data", "s3://shards/cifar"], env, "no manifest.json at s3://shards/cifar"),
        (["--data", "s3://shards/cifar"], no_credentials, "no AWS credentials found"),
    ]
    try:
        drivers = [Driver(args, case_env, tmp_path) for args, case_env, _ in cases]
        for driver, (_, _, message) in zip(drivers, cases, strict=True):
            _expect_bad_config(driver, message)
        assert not list(ray_tmp.rglob("session_*")), "Ray was started"
        assert not marked(marker)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_damaged_shards_are_found_before_ray_starts(tiny_data, tmp_path):
    """Shard sizes are always checked against the manifest; --verify-data adds sha256."""
    cut, altered = tmp_path / "cut", tmp_path / "altered"
    for copy in (cut, altered):
        shutil.copytree(tiny_data, copy)
    shard = sorted((tiny_data / "train").glob("*.parquet"))[0].relative_to(tiny_data)
    data = (tiny_data / shard).read_bytes()
    (cut / shard).write_bytes(data[: len(data) // 2])
    (altered / shard).write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # same size
    marker = f"damaged-{uuid.uuid4().hex}"
    ray_tmp = Path(tempfile.mkdtemp(prefix="rr-", dir="/tmp"))
    env = base_env(
        marker,
        RAY_AUTH_MODE="disabled",
        RAY_TMPDIR=str(ray_tmp),
        MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}",
    )
    cases = [
        (["--data", str(cut)], f"shard {shard} of {cut} is {len(data) // 2} bytes"),
        (["--data", str(altered), "--verify-data"], f"shard {shard} of {altered} has other bytes"),
    ]
    try:
        drivers = [Driver(args, env, tmp_path) for args, _ in cases]
        for driver, (_, message) in zip(drivers, cases, strict=True):
            _expect_bad_config(driver, message)
        assert not list(ray_tmp.rglob("session_*")), "Ray was started"
        assert not marked(marker)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_a_shard_that_stops_parsing_mid_run_ends_the_run_at_once(
    cluster, tiny_data, mlflow_uri, tmp_path
):
    """A shard changed in place (same size, so the pre-start check passes; its footer no longer
    parses) ends the run when a decode task reads it: exit 1, one line naming the shard and the
    fix, no worker-group restart (scale.max_failures=2), the MLflow run FAILED with the reason."""
    broken = tmp_path / "broken"
    shutil.copytree(tiny_data, broken)
    shard = sorted((broken / "train").glob("*.parquet"))[0]
    data = shard.read_bytes()
    shard.write_bytes(data[:-4] + b"XXXX")  # Parquet's closing magic bytes
    env = cluster.client_env(f"shard-{uuid.uuid4().hex}", MLFLOW_TRACKING_URI=mlflow_uri)
    args = ["--data", str(broken), "--storage", str(tmp_path / "runs"), "--name", "broken"]
    driver = _train([*args, *RUN_ARGS], env, tmp_path, timeout=240)
    assert driver.process.returncode == 1, driver.output + driver.stderr
    last = driver.stderr.strip().splitlines()[-1]
    assert last.startswith(f"resnet-train: shard {shard} does not parse"), driver.stderr
    assert f"re-run resnet-prepare with --out {broken} " in last
    (run,) = _runs_named(mlflow_uri, "broken")
    assert run.info.status == "FAILED"
    assert run.data.tags["worker_failures"] == "1"  # the worker group was not restarted
    assert run.data.tags["failure"].startswith(f"shard {shard} does not parse")


def test_gpu_request_on_a_cluster_without_gpus_exits_2(cluster, tiny_data, mlflow_uri, tmp_path):
    marker = f"gpu-{uuid.uuid4().hex}"
    env = cluster.client_env(marker, MLFLOW_TRACKING_URI=mlflow_uri)
    _expect_bad_config(
        Driver(["--data", str(tiny_data), "--gpu", "--name", "gpu"], env, tmp_path),
        "needs 2 GPUs but the cluster has 0",
    )
    assert not marked(marker)
    client = _client(mlflow_uri)
    experiment = client.get_experiment_by_name("resnet-ray")
    assert experiment is None or not _runs_named(mlflow_uri, "gpu")  # no MLflow run opened


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def test_demo_recipe_learns_on_a_local_ray(tmp_path, learn_data):
    """The default path of `make demo`: a local Ray started and stopped by the job, with
    Ray's default token authentication (the token given in the environment, not ~/.ray)."""
    from pipelines.manifest import read_manifest

    marker = f"demo-{uuid.uuid4().hex}"
    ray_tmp = Path(tempfile.mkdtemp(prefix="rr-", dir="/tmp"))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = base_env(
        marker,
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=secrets.token_hex(32),
        RAY_TMPDIR=str(ray_tmp),
        MLFLOW_TRACKING_URI=uri,
    )
    try:
        driver = _train(
            ["--data", str(learn_data), "--epochs", "5", "train.eval_every_epochs=5"],
            env,
            tmp_path,
        )
        assert driver.process.returncode == 0, driver.output + driver.stderr
        assert list(ray_tmp.rglob("session_*")), "no local Ray was started"
        assert not marked(marker), "Ray processes left behind"
    finally:
        stop_marked(marker)
        shutil.rmtree(ray_tmp, ignore_errors=True)

    top1 = float(re.search(r"final validation top-1: ([\d.]+)%", driver.output).group(1)) / 100
    assert top1 > 0.3, driver.output  # chance is 0.1
    console = driver.output + "\n" + driver.stderr
    noise = [
        line for line in console.splitlines() if any(re.search(n, line) for n in CONSOLE_NOISE)
    ]
    assert noise == [], console[-6000:]  # the noise with what surrounds it
    assert re.search(r"^epoch 5/5 done: step \d+ train loss", driver.output, re.M), driver.output
    assert f"mlflow ui --backend-store-uri {uri}" in driver.output
    # The cluster fixture's Ray runs beside this one; the job still names its own dashboard.
    assert "Found multiple active Ray instances" not in driver.output + driver.stderr

    (run,) = _runs_named(uri, "demo-resnet8")
    assert run.info.status == "FINISHED"
    assert math.isclose(run.data.metrics["val/top1"], top1, abs_tol=5e-5)
    params, tags = run.data.params, run.data.tags
    assert params["optim.lr"] == "0.1"
    assert params["train.epochs"] == "5"
    assert params["data.uri"] == str(learn_data)
    assert tags["dataset.checksum"] == read_manifest(str(learn_data)).checksum
    assert tags["ray"]
    assert tags["torch"]
    assert tags["mlflow"]
    assert tags["jpeg_decoder"].startswith(EXPECTED_DECODER)
    assert tags["cluster.workers"] == "2"
    assert tags["cluster.nodes"] == "1"
    assert re.fullmatch(r"[0-9a-f]{40}", tags["mlflow.source.git.commit"])
    assert Path(tags["checkpoint.latest"], "checkpoint.json").exists()
    assert tags["checkpoint.latest"].startswith(str(tmp_path / "results" / "demo-resnet8"))

    client = _client(uri)
    (version,) = client.search_model_versions("name='resnet-ray-resnet8'")
    assert version.run_id == run.info.run_id
    import mlflow

    mlflow.set_tracking_uri(uri)
    info = mlflow.models.get_model_info(f"models:/resnet-ray-resnet8/{version.version}")
    (inputs,) = info.signature.inputs.to_dict()
    assert inputs["tensor-spec"] == {"dtype": "uint8", "shape": (-1, 32, 32, 3)}
    assert tuple(info.signature.outputs.to_dict()[0]["tensor-spec"]["shape"]) == (-1, CLASSES)
    assert info.saved_input_example_info is not None
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "final")}
    assert artifacts == {
        "final/weights.safetensors",
        "final/config.json",
        "final/classes.json",
        "final/model.onnx",
    }
    assert run.data.tags["onnx.opset"] == "18"


@pytest.fixture(scope="module")
def finals() -> dict[str, dict[str, float]]:
    """Final metrics of the interrupted runs, to compare them with each other."""
    return {}


def _train_worker_pids(cluster: Cluster) -> list[int]:
    return sorted(
        pid for pid in marked(cluster.marker) if cmdline(pid).startswith("ray::RayTrainWorker")
    )


def test_killed_worker_restarts_from_the_checkpoint(
    cluster, tiny_data, mlflow_uri, tmp_path, finals
):
    env = cluster.client_env(f"kill-{uuid.uuid4().hex}", MLFLOW_TRACKING_URI=mlflow_uri)
    args = ["--data", str(tiny_data), "--storage", str(tmp_path / "runs"), "--name", "kill"]
    driver = Driver([*args, *RUN_ARGS], env, tmp_path)
    driver.wait_for(rf"epoch 2/{EPOCHS} batch 2/{STEPS_PER_EPOCH} ")
    workers = _train_worker_pids(cluster)
    assert len(workers) == 2, workers
    os.kill(workers[0], signal.SIGKILL)
    assert driver.finish() == 0, driver.output + driver.stderr

    resumed = re.search(r"resumed from step (\d+)", driver.output)
    assert resumed, driver.output
    step = int(resumed.group(1))
    # The newest checkpoint Ray had registered: every 4 steps and at each epoch end.
    assert step > 0, driver.output
    assert step % 4 == 0 or step % STEPS_PER_EPOCH == 0, driver.output
    run_id, histories = _assert_exact_run(mlflow_uri, "kill")
    assert "last_worker_failure" in _client(mlflow_uri).get_run(run_id).data.tags
    # Kept: the best 2 by validation top-1 plus the latest; mid-epoch checkpoints (no validation)
    # go first. Ray also keeps the one the restarted group resumed from.
    kept = sorted(
        int(p.name.split("-")[1]) for p in (tmp_path / "runs" / "kill").glob("checkpoint-*")
    )
    assert EPOCHS * STEPS_PER_EPOCH in kept, kept
    epoch_ends = [s for s in kept if s % STEPS_PER_EPOCH == 0]
    assert 2 <= len(epoch_ends) <= 3, kept
    assert len(kept) - len(epoch_ends) <= 1, kept  # of 5 mid-epoch checkpoints
    assert "checkpoint/score" not in _client(mlflow_uri).get_run(run_id).data.metrics
    finals["kill"] = {k: h[-1].value for k, h in histories.items() if k.startswith("val/")}


def test_stopped_run_resumes_when_resubmitted_with_ray_job_submit(
    cluster, tiny_data, mlflow_uri, tmp_path, finals
):
    """Stop the driver mid-epoch (SIGTERM, as `ray job stop` does), then re-submit the same
    command through the Jobs API with token authentication: it continues the same run at the
    exact batch, and the same MLflow run ends FINISHED."""
    env = cluster.client_env(f"resume-{uuid.uuid4().hex}", MLFLOW_TRACKING_URI=mlflow_uri)
    args = ["--data", str(tiny_data), "--storage", str(tmp_path / "runs"), "--name", "resume"]
    first = Driver([*args, *RUN_ARGS], env, tmp_path)
    # Past the mid-epoch checkpoint at step 12 (batch 2 of epoch 2).
    first.wait_for(rf"epoch 2/{EPOCHS} batch 4/{STEPS_PER_EPOCH} ")
    first.process.send_signal(signal.SIGTERM)
    assert first.finish() == 130, first.output + first.stderr
    assert "interrupted (SIGTERM)" in first.stderr
    assert "re-run the same command to resume" in first.stderr
    (stopped,) = _runs_named(mlflow_uri, "resume")
    assert stopped.info.status == "FAILED"  # never left RUNNING

    client_env = {k: v for k, v in env.items() if k != "RAY_ADDRESS"}
    refused = subprocess.run(
        [RAY_CLI, "job", "list", "--address", cluster.dashboard],
        env={**client_env, "RAY_AUTH_TOKEN": "0" * 64},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert refused.returncode != 0
    assert "Invalid authentication token" in refused.stdout + refused.stderr

    runtime_env = {"env_vars": {"MLFLOW_TRACKING_URI": mlflow_uri}}
    submitted = subprocess.run(
        [
            RAY_CLI, "job", "submit",
            "--address", cluster.dashboard,
            "--working-dir", str(REPO),
            "--runtime-env-json", json.dumps(runtime_env),
            "--", "python", "-m", "pipelines.train", *args, *RUN_ARGS,
        ],
        env=client_env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=420,
    )  # fmt: skip
    output = submitted.stdout + submitted.stderr
    assert submitted.returncode == 0, output
    assert re.search(r"Job 'raysubmit_\w+' succeeded", output), output
    resumed = re.search(r"resumed from step (\d+) \(epoch (\d+), (\d+) batches into it\)", output)
    assert resumed, output
    step, epoch, into = (int(g) for g in resumed.groups())
    assert step > 0, output
    assert step == (epoch - 1) * STEPS_PER_EPOCH + into, output
    assert f"MLflow run {stopped.info.run_id} (resumed)" in output
    run_id, histories = _assert_exact_run(mlflow_uri, "resume")
    assert run_id == stopped.info.run_id
    finals["resume"] = {k: h[-1].value for k, h in histories.items() if k.startswith("val/")}

    # The uploaded working directory: the code, without .venv, data or results (.gitignore).
    unpacked = cluster.temp_dir.glob("ray/session_*/runtime_resources/working_dir_files/*")
    packages = [path for path in unpacked if path.is_dir()]
    assert packages, "no working_dir package on the cluster"
    for package in packages:
        names = {p.name for p in package.iterdir()}
        assert {"pipelines", "resnet_core", "pyproject.toml"} <= names
        assert not names & {".venv", "data", "results", "mlflow.db", ".git"}, names


def test_interrupted_runs_end_with_the_same_model(finals):
    """Worker killed in one, driver stopped in the other, at different steps: resuming at the
    exact batch makes both the same computation, down to the validation loss."""
    if set(finals) != {"kill", "resume"}:
        pytest.skip("needs both interrupted runs of this module")
    assert finals["kill"]["val/count"] == finals["resume"]["val/count"]
    assert finals["kill"]["val/top1"] == finals["resume"]["val/top1"]
    assert math.isclose(finals["kill"]["val/loss"], finals["resume"]["val/loss"], rel_tol=1e-5)
