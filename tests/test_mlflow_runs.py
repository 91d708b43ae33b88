"""What the MLflow UI reads from our runs, against a real SQLite store in tmp_path (no Ray): the
experiment kind, the dataset inputs, MLflow's source tags and the run description.

The browser test (tests/test_tune.py, ``test_the_mlflow_ui_shows_...``) checks the same things
in the rendered UI, on runs a real training and a real sweep wrote.
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from pipelines import evaluate, tracking, tune
from pipelines.job.inference import TrainedModel
from pipelines.manifest import MANIFEST_NAME, Manifest, encode_manifest, parse_manifest
from pipelines.recipes import build_recipe


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[MlflowClient, str]:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    tracking.quiet_store_logs()
    return MlflowClient(tracking_uri=uri), uri


def manifest(root: str, train_rows: int, *, val_rows: int = 8) -> Manifest:
    """A manifest (no shards behind it): two splits of one shard each, 2 classes."""

    def split(name: str, rows: int) -> dict:
        shard = {"path": f"{name}/0.parquet", "num_rows": rows, "bytes": 100, "sha256": "0" * 64}
        return {"num_rows": rows, "shards": [shard]}

    data = {
        "format_version": 1,
        "dataset": "synthetic",
        "classes": ["a", "b"],
        "class_names": ["a", "b"],
        "splits": {"train": split("train", train_rows), "val": split("val", val_rows)},
        "image": {"max_side": None, "quality": 90},
    }
    return parse_manifest(encode_manifest(data), root)


def inputs_by_context(client: MlflowClient, run_id: str) -> dict[str, object]:
    """The run's dataset inputs by their ``mlflow.data.context`` tag."""
    found = {}
    for dataset_input in client.get_run(run_id).inputs.dataset_inputs:
        (context,) = [t.value for t in dataset_input.tags if t.key == "mlflow.data.context"]
        found[context] = dataset_input.dataset
    return found


# ---------------------------------------------------------------------------------------------
# The experiment kind
# ---------------------------------------------------------------------------------------------


def test_experiments_are_marked_model_training_new_and_existing_ones(store):
    client, uri = store
    kind = tracking.EXPERIMENT_KIND_TAG
    created = tracking.ensure_experiment(client, "resnet-ray", uri)
    assert client.get_experiment(created).tags[kind] == "custom_model_development"
    # One made before (by an older version, or by hand) is marked when a run is added to it.
    older = client.create_experiment("older")
    assert kind not in client.get_experiment(older).tags
    assert tracking.ensure_experiment(client, "older", uri) == older
    assert client.get_experiment(older).tags[kind] == "custom_model_development"
    # A kind somebody chose stays.
    chosen = client.create_experiment("chosen", tags={kind: "genai_development"})
    tracking.ensure_experiment(client, "chosen", uri)
    assert client.get_experiment(chosen).tags[kind] == "genai_development"


def test_the_printed_ui_link_opens_the_experiments_runs():
    local = tracking.ui_command("sqlite:////tmp/x/mlflow.db", "7")
    assert local.endswith(
        "--port 5000, then http://127.0.0.1:5000/#/experiments/7?workflowType=machine_learning"
    )
    server = tracking.ui_command("https://user:secret@mlflow.example:5000", "7")
    assert (
        server == "open https://mlflow.example:5000/#/experiments/7?workflowType=machine_learning"
    )
    assert tracking.ui_command("https://mlflow.example") == "open https://mlflow.example"


# ---------------------------------------------------------------------------------------------
# Dataset inputs
# ---------------------------------------------------------------------------------------------


def test_two_runs_on_different_shards_are_told_apart_by_digest(store, tmp_path):
    client, uri = store
    experiment = tracking.ensure_experiment(client, "resnet-ray", uri)
    first = manifest(str(tmp_path / "a"), train_rows=40)
    second = manifest(str(tmp_path / "b"), train_rows=48)
    splits = {"training": "train", "validation": "val", "testing": "absent"}
    runs = {}
    for name, data in (("first", first), ("second", second)):
        runs[name] = client.create_run(experiment, run_name=name).info.run_id
        tracking.log_datasets(client, runs[name], data, splits)
    tracking.log_datasets(client, runs["first"], first, splits)  # a resumed run logs again

    datasets = inputs_by_context(client, runs["first"])
    assert set(datasets) == {"training", "validation"}  # the manifest has no "absent" split
    train, val = datasets["training"], datasets["validation"]
    assert (train.name, val.name) == ("synthetic/train", "synthetic/val")
    assert train.digest == val.digest == first.checksum[:12]
    assert json.loads(train.source) == {"uri": f"{tmp_path / 'a'}/{MANIFEST_NAME}"}
    assert train.source_type == "local"
    assert json.loads(train.profile) == {
        "split": "train",
        "num_rows": 40,
        "num_shards": 1,
        "num_classes": 2,
    }
    assert json.loads(val.profile)["num_rows"] == 8
    columns = json.loads(train.schema)["mlflow_colspec"]
    assert [(c["name"], c["type"]) for c in columns] == [
        ("image", "binary"),
        ("label", "integer"),
        ("key", "string"),
        ("height", "integer"),
        ("width", "integer"),
    ]
    assert len(client.get_run(runs["first"]).inputs.dataset_inputs) == 2  # not 4

    other = inputs_by_context(client, runs["second"])["training"]
    assert other.name == train.name
    assert other.digest != train.digest
    for name, data in (("first", first), ("second", second)):
        found = client.search_runs(
            [experiment],
            f"dataset.digest = '{data.checksum[:12]}' AND dataset.context = 'training'",
        )
        assert [r.info.run_id for r in found] == [runs[name]]


def test_an_s3_dataset_source_has_no_credentials():
    data = manifest("s3://AKIAKEY:secret@bucket/imagenet", train_rows=4)
    (dataset_input,) = tracking.dataset_inputs(data, {"training": "train"})
    source = dataset_input.dataset.source
    assert json.loads(source) == {"uri": "s3://bucket/imagenet/manifest.json"}
    assert dataset_input.dataset.source_type == "s3"
    assert "secret" not in dataset_input.dataset.to_proto().SerializeToString().decode("latin-1")


# ---------------------------------------------------------------------------------------------
# Source tags and the description
# ---------------------------------------------------------------------------------------------


def command(monkeypatch: pytest.MonkeyPatch, orig_argv: list[str], argv: list[str]) -> None:
    monkeypatch.setattr(sys, "orig_argv", orig_argv)
    monkeypatch.setattr(sys, "argv", argv)


def test_the_command_line_is_exact_and_has_no_credentials(monkeypatch):
    args = [
        "--data", "s3://AKIAKEY:secret@bucket/imagenet",
        "--storage", "s3://bucket/runs",
        "--s3-endpoint", "http://minio:minio123@127.0.0.1:9000",
        "--address", "admin:hunter2@head:6379",
        "--name", "lr 0.1",
        "optim.lr=0.1",
    ]  # fmt: skip
    script = "/venv/bin/resnet-train"
    command(monkeypatch, ["/venv/bin/python", script, *args], [script, *args])
    line = tracking.command_line()
    assert shlex.split(line) == [
        script,
        "--data", "s3://bucket/imagenet",
        "--storage", "s3://bucket/runs",
        "--s3-endpoint", "http://127.0.0.1:9000",
        "--address", "head:6379",
        "--name", "lr 0.1",
        "optim.lr=0.1",
    ]  # fmt: skip
    assert not {"secret", "minio123", "hunter2", "AKIAKEY"} & set(line.replace(":", " ").split())
    assert tracking.environment_tags()["mlflow.source.name"] == "resnet-train"
    # `python -m`, as a `ray job submit` entrypoint: the module is the entry point.
    command(
        monkeypatch,
        ["python", "-m", "pipelines.train", "--address=ray://u:p@head:10001"],
        ["/repo/pipelines/train.py", "--address=ray://u:p@head:10001"],
    )
    assert tracking.command_line() == "python -m pipelines.train --address=ray://head:10001"
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")
    tags = tracking.environment_tags()
    assert (tags["mlflow.source.name"], tags["mlflow.source.type"]) == ("pipelines.train", "JOB")


def test_source_tags_name_the_checkout(tmp_path, monkeypatch):
    import subprocess

    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    monkeypatch.delenv("RESNET_RAY_GIT_COMMIT", raising=False)
    repo = tmp_path / "repo"
    repo.mkdir()

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, check=True)
        return done.stdout.strip()

    git("init", "-q", "-b", "sweeps")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty", "-m", "c")
    tags = tracking.environment_tags(repo)
    assert tags["mlflow.source.git.commit"] == git("rev-parse", "HEAD")
    assert tags["mlflow.source.git.branch"] == "sweeps"
    assert tags["mlflow.source.type"] == "LOCAL"
    git("checkout", "-q", "--detach")
    assert "mlflow.source.git.branch" not in tracking.environment_tags(repo)  # on no branch
    outside = tmp_path / "not-a-checkout"
    outside.mkdir()
    tags = tracking.environment_tags(outside)
    assert not {"mlflow.source.git.commit", "mlflow.source.git.branch"} & set(tags)


def test_a_sweep_parent_and_an_eval_run_carry_datasets_source_and_description(
    store, tmp_path, monkeypatch
):
    """The parent run of resnet-tune and the run of resnet-eval, opened as the commands open
    them (no Ray needed for either)."""
    client, uri = store
    data_dir = tmp_path / "data"
    sweep_argv = ["--data", str(data_dir), "--models", "resnet8", "--lr", "0.1,0.05"]
    script = "/venv/bin/resnet-tune"
    command(monkeypatch, ["/venv/bin/python", script, *sweep_argv], [script, *sweep_argv])
    sweep = tune.resolve_sweep(tune.build_parser().parse_args(sweep_argv))
    data = manifest(str(data_dir), train_rows=40)
    experiment_id, parent_id, _ = tune.open_parent_run(client, uri, sweep, data)
    parent = client.get_run(parent_id)
    started_by = f"/venv/bin/resnet-tune --data {data_dir} --models resnet8 --lr 0.1,0.05"
    assert started_by in parent.data.tags["mlflow.note.content"]
    assert parent.data.tags["mlflow.source.name"] == "resnet-tune"
    assert set(inputs_by_context(client, parent_id)) == {"training", "validation"}
    assert client.get_experiment(experiment_id).tags[tracking.EXPERIMENT_KIND_TAG]

    # resnet-eval of a run in an experiment made before experiments were marked.
    older = client.create_experiment("older")
    trained_id = client.create_run(older).info.run_id
    config = build_recipe("demo")
    trained = TrainedModel(config, {}, None, None, trained_id, older, f"runs:/{trained_id}")
    script = "/venv/bin/resnet-eval"
    eval_argv = [script, f"runs:/{trained_id}"]
    command(monkeypatch, ["/venv/bin/python", *eval_argv], eval_argv)
    result = evaluate.ModeResult("center", 8, 0.5, 0.0, np.zeros(2))
    run_id = evaluate.log_evaluation(
        tracking_uri=uri,
        trained=trained,
        experiment=None,
        manifest=data,
        split="val",
        params={"eval.split": "val"},
        results=[result],
        bad_images=0,
        csv_text="",
    )
    (evaluated,) = inputs_by_context(client, run_id).items()
    assert evaluated[0] == "evaluation"
    assert (evaluated[1].name, json.loads(evaluated[1].profile)["num_rows"]) == ("synthetic/val", 8)
    tags = client.get_run(run_id).data.tags
    assert f"/venv/bin/resnet-eval runs:/{trained_id}" in tags["mlflow.note.content"]
    assert client.get_experiment(older).tags[tracking.EXPERIMENT_KIND_TAG] == (
        "custom_model_development"
    )
