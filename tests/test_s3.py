"""Storage and resnet-prepare against a real S3 protocol endpoint on loopback (moto server)."""

from __future__ import annotations

import hashlib
import io
import re
import shutil
import signal
import tempfile
from pathlib import Path

import boto3
import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines import data, prepare, storage, tracking
from pipelines.manifest import ManifestError, load_mean_image, read_manifest


@pytest.fixture(scope="module")
def ray_s3(s3_server, ray_local):
    """Ray started after the S3 environment is set, so its workers see the endpoint."""
    return s3_server


def s3_client(endpoint: str):
    return boto3.session.Session().client("s3", endpoint_url=endpoint, region_name="us-east-1")


@pytest.fixture
def bucket(s3_server, request) -> str:
    """A fresh, empty bucket per test."""
    name = "test-" + request.node.name.replace("_", "-")[:40].lower().strip("-")
    s3_client(s3_server).create_bucket(Bucket=name)
    return name


def object_keys(endpoint: str, bucket: str) -> list[str]:
    listed = s3_client(endpoint).list_objects_v2(Bucket=bucket)
    return sorted(o["Key"] for o in listed.get("Contents", []))


def test_storage_on_s3(s3_server, bucket):
    uri = f"s3://{bucket}/data/set"
    storage.check_writable(uri)
    storage.check_readable(uri)
    fs, root = storage.resolve(uri)
    assert isinstance(fs, pafs.S3FileSystem)
    assert root == f"{bucket}/data/set"
    path = storage.join(root, "train", "a.bin")
    assert not storage.exists(fs, path)
    storage.write_bytes(fs, path, b"one")
    storage.write_bytes(fs, path, b"two")
    assert storage.read_bytes(fs, path) == b"two"
    assert storage.list_files(fs, root) == [path]
    # No directory marker objects, only the file.
    assert object_keys(s3_server, bucket) == ["data/set/train/a.bin"]
    # The explicit endpoint wins over the environment's.
    fs2, _ = storage.resolve(uri, s3_endpoint=s3_server)
    assert storage.read_bytes(fs2, path) == b"two"


def test_storage_s3_errors_are_one_line(s3_server, monkeypatch):
    with pytest.raises(storage.StorageError, match="bucket 'no-such-bucket' does not exist"):
        storage.check_writable("s3://no-such-bucket/x")
    with pytest.raises(storage.StorageError, match="cannot reach S3"):
        storage.check_writable("s3://any-bucket/x", s3_endpoint="http://127.0.0.1:1")
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(storage.StorageError, match="no AWS credentials") as info:
        storage.check_writable("s3://any-bucket/x")
    assert "\n" not in str(info.value)


@pytest.mark.slow
def test_prepare_synthetic_to_s3(ray_s3, bucket, capsys):
    endpoint = ray_s3
    uri = f"s3://{bucket}/synthetic"
    argv = ["synthetic", "--classes", "3", "--train-per-class", "10", "--val-per-class", "4"]
    code = prepare.main([*argv, "--shard-rows", "12", "--out", uri + "/"])
    stdout = capsys.readouterr().out
    assert code == 0, stdout
    assert "shards done 4/4" in stdout
    assert "testing" not in stdout  # the dummy credentials

    keys = object_keys(endpoint, bucket)
    assert "synthetic/manifest.json" in keys
    assert "synthetic/mean_image.npy" in keys
    assert [k for k in keys if k.endswith(".parquet")] == [
        "synthetic/train/shard-00000-of-00003.parquet",
        "synthetic/train/shard-00001-of-00003.parquet",
        "synthetic/train/shard-00002-of-00003.parquet",
        "synthetic/val/shard-00000-of-00001.parquet",
    ]
    assert not [k for k in keys if k.endswith("/") or ".tmp-" in k]

    manifest = read_manifest(uri)
    assert manifest.root == uri
    assert manifest.num_rows("train") == 30
    assert manifest.num_rows("val") == 12
    client = s3_client(endpoint)
    manifest_bytes = client.get_object(Bucket=bucket, Key="synthetic/manifest.json")["Body"].read()
    assert hashlib.sha256(manifest_bytes).hexdigest() == manifest.checksum

    # Read back through pyarrow with an explicitly configured filesystem, as a reader would.
    fs = pafs.S3FileSystem(endpoint_override=endpoint, region="us-east-1")
    assert read_manifest(uri, filesystem=fs).checksum == manifest.checksum
    labels = []
    for split, info in manifest.splits.items():
        for shard, shard_uri in zip(info.shards, manifest.shard_uris(split), strict=True):
            assert shard_uri == f"{uri}/{shard.path}"
            body = client.get_object(Bucket=bucket, Key=f"synthetic/{shard.path}")["Body"].read()
            assert len(body) == shard.num_bytes
            assert hashlib.sha256(body).hexdigest() == shard.sha256
            table = pq.read_table(storage.fs_path(shard_uri), filesystem=fs)
            assert table.num_rows == shard.num_rows
            assert table.column_names == ["image", "label", "key", "height", "width"]
            for row in table.to_pylist():
                image = Image.open(io.BytesIO(row["image"]))
                assert image.size == (row["width"], row["height"]) == (32, 32)
            labels += table["label"].to_pylist()
    assert sorted(set(labels)) == [0, 1, 2]
    mean_image = load_mean_image(manifest)
    assert mean_image.shape == (3, 32, 32)
    assert 0 < float(np.mean(mean_image)) < 1


def test_prepare_without_credentials_writes_nothing(s3_server, bucket, capsys, monkeypatch):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    code = prepare.main(["synthetic", "--classes", "2", "--out", f"s3://{bucket}/ds"])
    captured = capsys.readouterr()
    assert code == 2
    assert captured.out == ""
    assert captured.err == (
        f"resnet-prepare: --out: no AWS credentials found for s3://{bucket}/ds — set "
        "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE, or attach an IAM role)\n"
    )
    monkeypatch.undo()
    assert object_keys(s3_server, bucket) == []


def test_prepare_to_missing_bucket_writes_nothing(s3_server, capsys):
    before = s3_client(s3_server).list_buckets()["Buckets"]
    code = prepare.main(["synthetic", "--classes", "2", "--out", "s3://missing-bucket/ds"])
    captured = capsys.readouterr()
    assert code == 2
    assert captured.err.count("\n") == 1
    assert "bucket 'missing-bucket' does not exist" in captured.err
    assert s3_client(s3_server).list_buckets()["Buckets"] == before
    with pytest.raises(ManifestError, match=r"no manifest\.json at s3://missing-bucket/ds"):
        read_manifest("s3://missing-bucket/ds")


def test_credentials_in_uri_are_refused(s3_server, capsys):
    code = prepare.main(["synthetic", "--out", "s3://AKIAXYZ:hunter2@bucket/ds"])
    err = capsys.readouterr().err
    assert code == 2
    assert "are not accepted" in err
    assert "hunter2" not in err
    assert "AKIAXYZ" not in err


def _shard_keys(manifest, split: str) -> list[str]:
    keys = []
    for uri in manifest.shard_uris(split):
        fs, path = storage.resolve(uri)
        keys += pq.read_table(path, filesystem=fs, columns=["key"]).column("key").to_pylist()
    return keys


def test_throttled_and_slow_reads_lose_and_repeat_no_row(ray_s3, bucket, s3_throttle):
    """S3 under load: the first read of each shard range gets 503 SlowDown, every later one
    comes 50 ms late. The readers' retries absorb it: two ranks' training epoch is batch for
    batch the one read from a calm endpoint (every row once), evaluation reads each image once."""
    uri = f"s3://{bucket}/data"
    argv = ["synthetic", "--classes", "3", "--train-per-class", "16", "--val-per-class", "4"]
    assert prepare.main([*argv, "--shard-rows", "12", "--row-group-rows", "4", "--out", uri]) == 0
    manifest = read_manifest(uri)
    train_keys, val_keys = _shard_keys(manifest, "train"), _shard_keys(manifest, "val")

    def epoch(split: str, mode: str) -> list[list[str]]:
        options = data.DecodeOptions(mode=mode, image_size=32, map_batch_rows=4, task_rows=8)
        ranks = [
            data.iter_batches(
                manifest, options, split=split, world_size=2, rank=rank, epoch=0, seed=0,
                batch_size=4,
            )
            for rank in range(2)
        ]  # fmt: skip
        return [[key for batch in rank.batches() for key in batch.keys] for rank in ranks]

    calm = epoch("train", "paper")
    s3_throttle.on(".parquet", delay_s=0.05)
    throttled = epoch("train", "paper")
    evaluated = epoch("val", "eval_center")
    assert s3_throttle.throttled >= len(manifest.splits["train"].shards) + 1  # + val's shard
    assert s3_throttle.slowed >= s3_throttle.throttled
    assert throttled == calm
    keys = [key for rank in throttled for key in rank]
    assert len(keys) == len(set(keys)) == 48
    assert set(keys) == set(train_keys)
    assert sorted(key for rank in evaluated for key in rank) == sorted(val_keys)


@pytest.mark.slow
def test_training_from_and_to_s3_survives_a_killed_driver(
    ray_s3, bucket, s3_throttle, tmp_path, monkeypatch
):
    """Shards on a throttled S3 (503 SlowDown once per shard range, reads slowed), checkpoints on
    S3: the driver is SIGKILLed mid-epoch (its local Ray with it), the same command resumes from
    the checkpoint on S3 at the exact batch, the one MLflow run finishes without a worker
    restart, and resnet-eval scores the run folder on S3."""
    from mlflow.tracking import MlflowClient

    from pipelines import evaluate
    from tests.drivers import Driver, base_env, marked, stop_marked

    data_uri, runs_uri = f"s3://{bucket}/data", f"s3://{bucket}/runs"
    argv = ["synthetic", "--classes", "4", "--train-per-class", "24", "--val-per-class", "4"]
    assert prepare.main([*argv, "--out", data_uri]) == 0
    s3_throttle.on(".parquet", delay_s=0.02)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    ray_tmp = Path(tempfile.mkdtemp(prefix="rs-", dir="/tmp"))
    marker = f"s3-train-{ray_tmp.name}"
    env = base_env(
        marker, RAY_AUTH_MODE="disabled", RAY_TMPDIR=str(ray_tmp), MLFLOW_TRACKING_URI=uri
    )
    args = [
        "--data",
        data_uri,
        "--storage",
        runs_uri,
        "--name",
        "s3run",
        "--epochs",
        "2",
        "--workers",
        "1",
        "train.global_batch=16",
        "train.log_every_steps=1",
        "train.checkpoint_every_steps=3",
        "train.export_onnx=false",
    ]  # fmt: skip  (96 rows: 6 steps an epoch; checkpoints at 3, 6, 9 and 12)
    try:
        first = Driver(args, env, tmp_path)
        first.wait_for(r"epoch 2/2 batch 4/6 ")  # past the checkpoint at step 9
        first.process.send_signal(signal.SIGKILL)
        first.finish()
        stop_marked(marker)  # the killed driver's local Ray
        second = Driver(args, env, tmp_path)
        assert second.finish() == 0, second.output + second.stderr
    finally:
        stop_marked(marker)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert not marked(marker)
    # The newest checkpoint Ray had registered on S3 when the driver died: 9, or 6 when the
    # step-9 upload was still in flight. Either way the rest of the run happens exactly once.
    resumed = re.search(
        r"resumed from step (\d+) \(epoch 2, (\d+) batches into it\)", second.output
    )
    assert resumed, second.output
    step, into = (int(g) for g in resumed.groups())
    assert (step, into) in ((6, 0), (9, 3)), second.output
    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("resnet-ray").experiment_id])
    assert run.info.status == "FINISHED"
    assert s3_throttle.throttled > 0
    assert "worker_failures" not in run.data.tags  # the retries absorbed every SlowDown
    samples = client.get_metric_history(run.info.run_id, "train/epoch_samples")
    assert sorted((m.step, m.value) for m in samples) == [(6, 96), (12, 96)]
    losses = [m.step for m in client.get_metric_history(run.info.run_id, "train/window_loss")]
    assert sorted(losses) == list(range(1, 13))  # every step once (the epoch ends included)
    assert run.data.tags["checkpoint.latest"].startswith(f"{runs_uri}/s3run/checkpoint-")
    assert any(k.startswith("runs/s3run/checkpoint-") for k in object_keys(ray_s3, bucket))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert evaluate.main([f"{runs_uri}/s3run", "--modes", "center"]) == 0
    runs = client.search_runs([run.info.experiment_id])
    (evaluation,) = [r for r in runs if r.info.run_id != run.info.run_id]
    assert evaluation.data.tags[tracking.EVALUATES_TAG] == run.info.run_id
    assert evaluation.data.metrics["eval/center/images"] == 16
