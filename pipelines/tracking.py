"""MLflow for every command: where the store is, one deterministic run per name, one writer.

- Tracking URI: ``MLFLOW_TRACKING_URI``, else an embedded SQLite store ``mlflow.db`` in the
  directory the command was started from (resolved on the driver: Ray Train moves its workers'
  working directory, so relative paths would land in Ray's session folder).
- Run identity: a run is found by the tag ``resnet_ray.run_name``; a re-submitted or restarted job
  continues the same MLflow run instead of opening a new one.
- One writer: :class:`MlflowReporter` is a ``ray.train.UserCallback``; it runs in the Train controller
  and is the only code that logs while training. It skips steps already logged, so a resumed run
  never has duplicate steps.
- What the UI shows: experiments are marked model-training (``mlflow.experimentKind``), every run
  names its data as MLflow dataset inputs (one per split, digest = the manifest's checksum), its
  source (entry point, JOB or LOCAL, git commit and branch) and, as its description, the command
  line that started it.
- Secrets: nothing read from the environment is logged; URIs are logged without user info.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Collection, Iterator, Mapping
from pathlib import Path
from typing import Any

import mlflow
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import DatasetInput, InputTag, Metric, Param, Run, RunTag
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT
from ray.train import Checkpoint, UserCallback

from pipelines import storage
from pipelines.manifest import MANIFEST_NAME, Manifest
from resnet_core import jpeg

RUN_NAME_TAG = "resnet_ray.run_name"
FINAL_MODEL_TAG = "resnet_ray.final_model"  # the logged model's URI, set once it is logged
EVALUATES_TAG = "resnet_ray.evaluates"  # on a resnet-eval run: the training run it scored
EMBEDDED_DB = "mlflow.db"
EMBEDDED_ARTIFACTS = "mlartifacts"
# MLflow 3's record of what an experiment is for (the values of the UI's kind selector).
EXPERIMENT_KIND_TAG, MODEL_TRAINING = "mlflow.experimentKind", "custom_model_development"
# MLflow 3.17's UI picks its landing page by its GenAI / Model training switch, not by the
# kind: a link with this query opens an experiment on its runs.
UI_MODEL_TRAINING = "workflowType=machine_learning"
DESCRIPTION_TAG = "mlflow.note.content"  # the run's description in the UI (markdown)


def tracking_uri(workdir: str | Path | None = None) -> str:
    """``MLFLOW_TRACKING_URI`` or the embedded SQLite store in ``workdir`` (default: cwd)."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    root = Path(workdir or os.getcwd()).resolve()
    return f"sqlite:///{root / EMBEDDED_DB}"


class StoreUnreachable(ValueError):
    """The MLflow store cannot be reached; one line naming it (no credentials) and the fix."""


# A check before a command starts gives up within ~12 s: MLflow's own client retries a dead
# server 7 times with backoff, about four minutes.
CHECK_TIMEOUT_S, CHECK_RETRIES = 5, 1
_HTTP_SETTINGS = ("MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_HTTP_REQUEST_MAX_RETRIES")


@contextlib.contextmanager
def bounded_requests() -> Iterator[None]:
    """MLflow's HTTP client, inside the block, tries ``CHECK_RETRIES + 1`` times with a
    ``CHECK_TIMEOUT_S`` timeout (MLflow reads these settings from the environment per request)."""
    saved = {name: os.environ.get(name) for name in _HTTP_SETTINGS}
    os.environ.update(zip(_HTTP_SETTINGS, (str(CHECK_TIMEOUT_S), str(CHECK_RETRIES)), strict=True))
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def store_error(uri: str, error: BaseException) -> StoreUnreachable:
    """The one-line error for a store that did not answer; credentials never in it."""
    text = " ".join(str(error).split())
    if len(text) > 240:  # MLflow quotes the whole request; the cause is at the end
        text = f"{text[:120]} ... {text[-100:]}"
    return StoreUnreachable(
        f"cannot reach the MLflow store {storage.redact(uri)} ({type(error).__name__}: "
        f"{storage.redact(text)}); check MLFLOW_TRACKING_URI and that the server is up"
    )


def check_store(uri: str) -> None:
    """Reach the store within seconds (a server: one request, bounded); an embedded store that
    does not exist yet is fine. StoreUnreachable otherwise."""
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).exists():
        return
    quiet_store_logs()
    try:
        with bounded_requests():
            MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
    except Exception as e:  # any failure to reach or read the store
        raise store_error(uri, e) from None


def quiet_store_logs() -> None:
    """MLflow announces creating and upgrading its SQLite tables, and checking a logged model's
    input example, at INFO on stderr, which a command keeps for its own errors; warnings still
    show."""
    for name in ("mlflow.store.db.utils", "alembic", "mlflow.pyfunc"):
        logging.getLogger(name).setLevel(logging.WARNING)


def ui_command(uri: str, experiment_id: str | None = None) -> str:
    """The exact command that opens the MLflow UI on this store (a tracking server: its URL),
    and with ``experiment_id`` the page of that experiment's runs (:func:`ui_url`).

    The ``mlflow`` program is the one installed beside this Python (``.venv/bin/mlflow``), so the
    command works without activating the environment. User info never appears in it.
    """
    page = f", then {ui_url(uri, experiment_id)}" if experiment_id else ""
    if uri.startswith(("http://", "https://")):
        return f"open {ui_url(uri, experiment_id) if experiment_id else storage.redact(uri)}"
    beside = Path(sys.executable).parent / "mlflow"
    program = str(beside) if beside.exists() else "mlflow"
    if not uri.startswith("sqlite:///"):
        return f"{program} ui --backend-store-uri {storage.redact(uri)} --port 5000{page}"
    root = Path(uri.removeprefix("sqlite:///")).parent
    return (
        f"{program} ui --backend-store-uri {uri} "
        f"--default-artifact-root {root / EMBEDDED_ARTIFACTS} --port 5000{page}"
    )


def ui_url(uri: str, experiment_id: str) -> str:
    """The UI page of the experiment's runs, in the UI's Model training view: on the tracking
    server ``uri``, else on :func:`ui_command`'s ``mlflow ui`` (port 5000)."""
    server = uri.startswith(("http://", "https://"))
    base = storage.redact(uri).rstrip("/") if server else "http://127.0.0.1:5000"
    return f"{base}/#/experiments/{experiment_id}?{UI_MODEL_TRAINING}"


def ensure_experiment(client: MlflowClient, name: str, uri: str) -> str:
    """Experiment id for ``name``, created on first use (artifacts beside an embedded store),
    marked as a model-training experiment (:func:`mark_model_training`)."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        mark_model_training(client, experiment.experiment_id, experiment.tags)
        return experiment.experiment_id
    location = None
    if uri.startswith("sqlite:///"):
        location = (Path(uri.removeprefix("sqlite:///")).parent / EMBEDDED_ARTIFACTS).as_uri()
    return client.create_experiment(
        name, artifact_location=location, tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING}
    )


def mark_model_training(
    client: MlflowClient, experiment_id: str, tags: Mapping[str, str] | None = None
) -> None:
    """Tag the experiment as model training, MLflow 3's way, unless it has a kind already (one
    a user chose stays). ``tags``: the experiment's tags when already read."""
    if tags is None:
        tags = client.get_experiment(experiment_id).tags
    if EXPERIMENT_KIND_TAG not in tags:
        client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING)


def find_run(client: MlflowClient, experiment_id: str, run_name: str) -> Run | None:
    """The run tagged ``run_name`` in the experiment (the newest if several), or None."""
    escaped = run_name.replace("'", "\\'")
    found = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{RUN_NAME_TAG}` = '{escaped}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return found[0] if found else None


def find_or_create_run(
    client: MlflowClient,
    experiment_id: str,
    run_name: str,
    *,
    tags: Mapping[str, str] | None = None,
    parent_run_id: str | None = None,
) -> tuple[str, bool]:
    """``(run_id, resumed)``: the run tagged ``run_name`` in the experiment (set RUNNING
    again), or a new one."""
    found = find_run(client, experiment_id, run_name)
    if found is not None:
        run_id = found.info.run_id
        client.update_run(run_id, status="RUNNING")
        return run_id, True
    all_tags = {RUN_NAME_TAG: run_name, **(tags or {})}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = client.create_run(experiment_id, run_name=run_name, tags=all_tags)
    return run.info.run_id, False


def _param_text(value: Any) -> str:
    return "None" if value is None else str(value)[:6000]


def param_conflicts(
    existing: Mapping[str, str], params: Mapping[str, Any], *, may_change: Collection[str] = ()
) -> list[str]:
    """``["key=old (now new)", ...]`` for every param whose logged value differs from ``params``
    (those in ``may_change`` may: the run keeps their first values)."""
    return [
        f"{key}={existing[key]} (now {_param_text(value)})"
        for key, value in params.items()
        if key in existing and key not in may_change and existing[key] != _param_text(value)
    ]


def log_params_once(
    client: MlflowClient,
    run_id: str,
    params: Mapping[str, Any],
    *,
    may_change: Collection[str] = (),
) -> None:
    """Logs params; a resumed run with a different value for one raises with the fix (but for
    those in ``may_change``, which keep their first values)."""
    existing = client.get_run(run_id).data.params
    conflicts = param_conflicts(existing, params, may_change=may_change)
    if conflicts:
        raise ValueError(
            f"run {run_id} was started with {conflicts[0]}; resuming it with another value "
            "would mix two configurations — pass a new run name (--name)"
        )
    new = [Param(k, _param_text(v)) for k, v in params.items() if k not in existing]
    for start in range(0, len(new), 100):
        client.log_batch(run_id, params=new[start : start + 100])


def set_tags(client: MlflowClient, run_id: str, tags: Mapping[str, str]) -> None:
    """Set (or overwrite) ``tags`` in one request."""
    client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])


def environment_tags(workdir: str | Path | None = None) -> dict[str, str]:
    """Git commit and branch, the run's source, library versions and the JPEG decoder in use
    (region decoding, or Pillow and why): what a reader of the run needs to reproduce it and
    its speed. The source is MLflow's: the entry point (``mlflow.source.name``: the module of
    ``python -m``, else the program) and ``mlflow.source.type``, JOB for a ``ray job submit``
    entrypoint, else LOCAL.

    The commit is ``RESNET_RAY_GIT_COMMIT`` (set it where the code is not a git checkout, e.g. a
    ``ray job submit`` working directory), else ``git rev-parse HEAD`` in ``workdir`` (default:
    the folder holding this code); the branch comes from the checkout only.
    """
    import pyarrow
    import ray
    import torch
    import torchvision

    tags = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "ray": ray.__version__,
        "mlflow": mlflow.__version__,
        "pyarrow": pyarrow.__version__,
        "jpeg_decoder": jpeg.status(),
        "mlflow.source.name": _entry_point(),
        # Ray's job supervisor gives every entrypoint it starts its job config in this variable.
        "mlflow.source.type": "JOB" if "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ else "LOCAL",
    }
    commit = os.environ.get("RESNET_RAY_GIT_COMMIT") or _git(workdir, "rev-parse", "HEAD")
    if commit:
        tags["mlflow.source.git.commit"] = commit
    branch = _git(workdir, "rev-parse", "--abbrev-ref", "HEAD")
    if branch and branch != "HEAD":  # HEAD: a detached checkout, on no branch
        tags["mlflow.source.git.branch"] = branch
    return tags


def _git(workdir: str | Path | None, *args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", *args],
            cwd=workdir or Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _command_words() -> tuple[list[str], str | None]:
    """This process's command line, and the module it runs with ``-m`` (else None): ``python -m
    module args`` as given, else the program (a console script such as
    ``.venv/bin/resnet-train``) and its arguments."""
    interpreter_part = sys.orig_argv[: len(sys.orig_argv) - len(sys.argv) + 1]
    if "-m" in interpreter_part[:-1]:
        return list(sys.orig_argv), interpreter_part[interpreter_part.index("-m") + 1]
    return list(sys.argv), None


def _entry_point() -> str:
    """The module run with ``-m``, else the program's file name."""
    _, module = _command_words()
    return module or Path(sys.argv[0]).name


# user:password@ before a host without a scheme (a Ray address may be written so).
_BARE_USERINFO = re.compile(r"^[^/@\s]*@")


def command_line() -> str:
    """The command line that started this process, shell-quoted, credentials removed: user
    info of every URI (``--data``, ``--storage``, ``--s3-endpoint``, overrides) and of the Ray
    ``--address``. Nothing else in a command carries secrets (those come from the environment)."""
    words = [storage.redact(word) for word in _command_words()[0]]
    for i, word in enumerate(words):
        if "://" in word:
            continue
        if word.startswith("--address="):
            words[i] = "--address=" + _BARE_USERINFO.sub("", word.removeprefix("--address="))
        elif i > 0 and words[i - 1] == "--address":
            words[i] = _BARE_USERINFO.sub("", word)
    return shlex.join(words)


def description_tags() -> dict[str, str]:
    """The run's description (MLflow's ``mlflow.note.content``, markdown): the command line that
    started it. Set when a run is created only: a resumed run keeps the command that began it."""
    command = command_line()[:7000]  # MLflow keeps tag values up to 8000 characters
    return {DESCRIPTION_TAG: f"Started by:\n\n```\n{command}\n```\n"}


# ---------------------------------------------------------------------------------------------
# Dataset inputs: each split a run reads, as MLflow's dataset API records it
# ---------------------------------------------------------------------------------------------

TRAINING, VALIDATION, EVALUATION = "training", "validation", "evaluation"  # input contexts
DIGEST_CHARS = 12  # of the manifest's sha256: MLflow keeps digests up to 36 characters


class SplitDataset(MetaDataset):
    """One split of a prepared dataset as an MLflow dataset: named ``<dataset>/<split>``, its
    source the manifest's location (no user info), its digest the manifest's checksum, the shard
    columns as schema and the split's rows, shards and classes as profile."""

    def __init__(self, manifest: Manifest, split: str) -> None:
        from mlflow.data.dataset_source_registry import get_dataset_source_from_json

        location = storage.redact(storage.join(manifest.root, MANIFEST_NAME))
        kind = "s3" if storage.is_s3(location) else "local"
        source = get_dataset_source_from_json(json.dumps({"uri": location}), kind)
        info = manifest.split(split)
        self._profile = {
            "split": split,
            "num_rows": info.num_rows,
            "num_shards": len(info.shards),
            "num_classes": manifest.num_classes,
        }
        super().__init__(
            source,
            name=f"{manifest.dataset}/{split}",
            digest=manifest.checksum[:DIGEST_CHARS],
            schema=_shard_schema(),
        )

    @property
    def profile(self) -> dict[str, Any]:
        return self._profile

    def to_dict(self) -> dict[str, str]:
        return {**super().to_dict(), "profile": json.dumps(self._profile)}


def _shard_schema() -> Any:
    """The shards' columns (pipelines.shards.SHARD_SCHEMA) as an MLflow schema."""
    import pyarrow as pa
    from mlflow.types import ColSpec, DataType, Schema

    from pipelines.shards import SHARD_SCHEMA

    def kind(arrow: pa.DataType) -> DataType:
        if pa.types.is_binary(arrow):
            return DataType.binary
        if pa.types.is_string(arrow):
            return DataType.string
        return DataType.long if arrow.bit_width > 32 else DataType.integer

    return Schema([ColSpec(kind(field.type), field.name) for field in SHARD_SCHEMA])


def dataset_inputs(manifest: Manifest, splits: Mapping[str, str]) -> list[DatasetInput]:
    """MLflow dataset inputs for ``splits`` (input context → split name, e.g. ``{"training":
    "train"}``); splits the manifest lacks are left out."""
    return [
        DatasetInput(
            SplitDataset(manifest, split)._to_mlflow_entity(),
            tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)],
        )
        for context, split in splits.items()
        if split in manifest.splits
    ]


def log_datasets(
    client: MlflowClient, run_id: str, manifest: Manifest, splits: Mapping[str, str]
) -> None:
    """Log :func:`dataset_inputs` to the run (again on a resumed run: MLflow keeps one each)."""
    client.log_inputs(run_id, datasets=dataset_inputs(manifest, splits))


UNLOGGED_PREFIX = "checkpoint/"  # report keys for Ray's checkpoint ranking only
# System metrics, MLflow's "System metrics" tab (pipelines.job.system_metrics): each rank reports
# its own (system/worker_<rank>/...), logged from every rank.
SYSTEM_PREFIX = "system/"
# "artifact/<path in the run>": a file a worker wrote to the run's storage (the value, a path or
# s3:// URI, which every node and the controller reach), logged as the run's artifact <path>.
ARTIFACT_PREFIX = "artifact/"


class MlflowReporter(UserCallback):
    """The single MLflow writer of a Train run, living in the Train controller.

    Every rank reports the same globally reduced metrics (all-reduced in the loop); rank 0's dict
    is logged, plus each rank's own ``system/`` metrics and ``artifact/`` files. Keys ending in
    ``_step`` name the x-axis; ``step`` is the global optimizer step.
    """

    def __init__(self, uri: str, run_id: str) -> None:
        self.uri = uri
        self.run_id = run_id
        self._last_step: dict[str, int] | None = None  # per metric key, loaded lazily
        self._worker_failures = 0  # worker-group failures in this submission

    def _client(self) -> MlflowClient:
        return MlflowClient(tracking_uri=self.uri)

    def _load_last_steps(self, client: MlflowClient) -> dict[str, int]:
        run = client.get_run(self.run_id)
        last: dict[str, int] = {}
        for key in run.data.metrics:
            history = client.get_metric_history(self.run_id, key)
            last[key] = max((m.step for m in history), default=-1)
        return last

    def after_report(
        self,
        run_context: Any,
        metrics: list[dict[str, Any]],
        checkpoint: Checkpoint | None,
    ) -> None:
        client = self._client()
        if self._last_step is None:
            self._last_step = self._load_last_steps(client)
        reported = metrics[0] if metrics else {}
        step = int(reported.get("step", 0))
        system = {k: v for m in metrics[1:] for k, v in m.items() if k.startswith(SYSTEM_PREFIX)}
        self._log_metrics(client, {**reported, **system}, step)
        for rank_metrics in metrics:
            self._log_artifacts(client, rank_metrics)
        if checkpoint is not None:
            uri = storage.redact(checkpoint.path)
            if checkpoint.filesystem is not None and "://" not in uri:
                scheme = checkpoint.filesystem.type_name
                uri = f"{scheme}://{uri}" if scheme != "local" else uri
            client.set_tag(self.run_id, "checkpoint.latest", uri)
            client.log_batch(
                self.run_id,
                tags=[RunTag(f"checkpoint.step_{step:09d}", uri)],
            )

    def _log_metrics(self, client: MlflowClient, reported: dict[str, Any], step: int) -> None:
        """The finite numbers of ``reported`` at ``step``, but for steps already logged."""
        now = int(time.time() * 1000)
        batch = []
        for key, value in reported.items():
            if key == "step" or not isinstance(value, int | float) or isinstance(value, bool):
                continue
            if key.startswith(UNLOGGED_PREFIX):  # Ray's bookkeeping, not a training metric
                continue
            if not math.isfinite(float(value)) or step <= self._last_step.get(key, -1):
                continue
            batch.append(Metric(key, float(value), now, step))
            self._last_step[key] = step
        for start in range(0, len(batch), 1000):  # MLflow's limit per log_batch
            client.log_batch(self.run_id, metrics=batch[start : start + 1000])

    def _log_artifacts(self, client: MlflowClient, reported: dict[str, Any]) -> None:
        """The files named by ``artifact/<path>`` keys, copied from storage into the run."""
        for key, location in reported.items():
            if not key.startswith(ARTIFACT_PREFIX) or not isinstance(location, str):
                continue
            folder, _, name = key.removeprefix(ARTIFACT_PREFIX).rpartition("/")
            fs, path = storage.resolve(location)
            with tempfile.TemporaryDirectory(prefix="resnet-artifact-") as tmp:
                local = Path(tmp, name)
                local.write_bytes(storage.read_bytes(fs, path))
                client.log_artifact(self.run_id, str(local), artifact_path=folder or None)

    def after_exception(self, run_context: Any, worker_exceptions: dict[int, Exception]) -> None:
        client = self._client()
        summary = "; ".join(
            f"rank {r}: {type(e).__name__}" for r, e in sorted(worker_exceptions.items())
        )
        self._worker_failures += 1
        set_tags(
            client,
            self.run_id,
            {"last_worker_failure": summary[:5000], "worker_failures": str(self._worker_failures)},
        )
