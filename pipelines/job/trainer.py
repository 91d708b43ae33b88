"""The one place a TorchTrainer is made (:func:`build_trainer`), and a whole training run under
MLflow (:func:`run_training`), used by resnet-train, resnet-tune's trials and the benchmarks.
"""

from __future__ import annotations

import contextlib
import signal
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from ray.train import UserCallback

from pipelines import data as data_lib
from pipelines import storage, tracking
from pipelines.config import RESUME_MAY_CHANGE, JobConfig, flatten, to_dict
from pipelines.job.checkpoints import CHECKPOINT_SCORE
from pipelines.job.final_model import log_final_model
from pipelines.job.parts import StepPlan
from pipelines.job.runner import Extension, train_loop_per_worker
from pipelines.manifest import Manifest


class TrainingInterrupted(Exception):
    """SIGINT or SIGTERM stopped the run; its checkpoints stay and a re-run resumes it."""


class EndOnUnreadableShard(UserCallback):
    """Ends the run when a worker met a shard that no longer reads: Ray Train would restart the
    worker group (``scale.max_failures`` times), to read the same bytes again. An error raised
    by a callback ends the run at once: Ray Train's failure policy does not retry controller
    errors."""

    def after_exception(self, run_context: Any, worker_exceptions: dict[int, Exception]) -> None:
        for error in worker_exceptions.values():
            shard_error = data_lib.unreadable_shard(error)
            if shard_error is not None:
                raise shard_error


def build_trainer(
    config: JobConfig,
    callbacks: Sequence[Any] = (),
    extensions: Sequence[Extension] = (),
    *,
    loop: Callable[[dict[str, Any]], None] = train_loop_per_worker,
    loop_config: dict[str, Any] | None = None,
) -> Any:
    """The TorchTrainer of ``config``: its workers and resources, checkpoint storage (local or
    S3), worker-group restarts, and the checkpoints kept (the best ``train.keep_checkpoints`` by
    validation top-1, plus the latest, which Ray never deletes). ``callbacks``: Ray Train
    ``UserCallback``s (the MLflow writer, Tune's reporter); ``extensions``: features added to
    the loop (:class:`~pipelines.job.runner.Extension`). ``loop`` / ``loop_config``: another
    per-worker function and its argument (a benchmark's), instead of the training loop."""
    import pyarrow.fs as pafs
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    fs, path = storage.resolve(config.run.storage_path)
    storage_fs = None if isinstance(fs, pafs.LocalFileSystem) else fs
    sc = config.scale
    if loop_config is None:
        loop_config = {"config": to_dict(config), "extensions": list(extensions)}
        loop_config["submitted_at"] = time.time()  # the start of the start-up the run reports
    return TorchTrainer(
        loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=sc.num_workers,
            use_gpu=sc.use_gpu,
            resources_per_worker={
                "CPU": sc.cpus_per_worker,
                **({"GPU": sc.gpus_per_worker} if sc.use_gpu else {}),
            },
        ),
        run_config=RunConfig(
            name=config.run_name,
            storage_path=path if storage_fs is not None else config.run.storage_path,
            storage_filesystem=storage_fs,
            failure_config=FailureConfig(max_failures=sc.max_failures, controller_failure_limit=3),
            checkpoint_config=CheckpointConfig(
                num_to_keep=config.train.keep_checkpoints,
                checkpoint_score_attribute=CHECKPOINT_SCORE,
                checkpoint_score_order="max",
            ),
            callbacks=[*callbacks, EndOnUnreadableShard()],
            # Ray Train's INFO lines (one per report) stay in its log files.
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
    )


def cluster_tags(config: JobConfig) -> dict[str, str]:
    """The cluster shape the run used (the last one, for a resumed run)."""
    import ray

    resources = ray.cluster_resources()
    sc = config.scale
    return {
        "cluster.nodes": str(sum(1 for n in ray.nodes() if n.get("Alive"))),
        "cluster.cpus": f"{resources.get('CPU', 0):g}",
        "cluster.gpus": f"{resources.get('GPU', 0):g}",
        "cluster.workers": str(sc.num_workers),
        "cluster.use_gpu": str(sc.use_gpu),
        "cluster.cpus_per_worker": f"{sc.cpus_per_worker:g}",
    }


def run_training(
    config: JobConfig,
    manifest: Manifest,
    plan: StepPlan,
    extensions: Sequence[Extension] = (),
) -> dict[str, Any]:
    """Fit the TorchTrainer under MLflow (Ray must be up); returns the final metrics plus
    ``mlflow_run_id`` and ``mlflow_experiment_id``. The MLflow run ends FINISHED when every step
    is done and the final model is logged, FAILED otherwise (also on interrupt:
    TrainingInterrupted)."""
    from mlflow.tracking import MlflowClient

    uri = tracking.tracking_uri()
    tracking.quiet_store_logs()
    client = MlflowClient(tracking_uri=uri)
    experiment_id, run_id, resumed = _open_run(client, uri, config, manifest, plan)
    print(
        f"MLflow run {run_id} ({'resumed' if resumed else 'new'}) in {storage.redact(uri)}",
        flush=True,
    )
    try:
        trainer = build_trainer(config, [tracking.MlflowReporter(uri, run_id)], extensions)
        result = trainer.fit()
        metrics = dict(result.metrics or {})
        reached = int(metrics.get("step", 0))
        if reached < plan.total_steps:  # Ray Train ends an aborted run without an error
            raise TrainingInterrupted(
                f"training stopped at step {reached} of {plan.total_steps} (aborted)"
            )
        if client.get_run(run_id).data.tags.get(tracking.FINAL_MODEL_TAG) is None:
            log_final_model(uri, run_id, config, manifest, result.checkpoint)
    except (KeyboardInterrupt, SystemExit):
        # SIGINT: Ray Train aborts the run and exits; SIGTERM: sigterm_interrupts() below.
        client.set_terminated(run_id, "FAILED")
        raise TrainingInterrupted(f"interrupted ({last_signal()})") from None
    except BaseException as e:
        shard_error = data_lib.unreadable_shard(e)
        if shard_error is not None:
            tracking.set_tags(client, run_id, {"failure": str(shard_error)[:5000]})
        client.set_terminated(run_id, "FAILED")
        if shard_error is not None:
            raise shard_error from None
        raise
    client.set_terminated(run_id, "FINISHED")
    return {**metrics, "mlflow_run_id": run_id, "mlflow_experiment_id": experiment_id}


def _open_run(
    client: Any, uri: str, config: JobConfig, manifest: Manifest, plan: StepPlan
) -> tuple[str, str, bool]:
    """``(experiment_id, run_id, resumed)`` of the run's MLflow run (found again by run name,
    or new), its tags, params and dataset inputs set; a new run's description is the command
    line that started it."""
    experiment_id = tracking.ensure_experiment(client, config.run.experiment, uri)
    tags = {
        **tracking.environment_tags(),
        **cluster_tags(config),
        "recipe": config.recipe,
        "model": config.model.name,
        "dataset.checksum": manifest.checksum,
        "dataset.uri": storage.redact(config.data.uri),
        "plan.steps_per_epoch": str(plan.steps_per_epoch),
        "plan.total_steps": str(plan.total_steps),
    }
    run_id, resumed = tracking.find_or_create_run(
        client, experiment_id, config.run_name, tags={**tags, **tracking.description_tags()}
    )
    try:
        if resumed:
            tracking.set_tags(client, run_id, tags)
        tracking.log_params_once(client, run_id, flatten(config), may_change=RESUME_MAY_CHANGE)
        tracking.log_datasets(client, run_id, manifest, run_splits(config))
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    return experiment_id, run_id, resumed


def run_splits(config: JobConfig) -> dict[str, str]:
    """The splits a training run reads, by MLflow input context."""
    return {
        tracking.TRAINING: config.data.train_split,
        tracking.VALIDATION: config.data.val_split,
    }


# Ray Train turns an interrupt during fit() into its own abort and sys.exit, which loses the
# signal's name: the SIGTERM handler records it.
_RECEIVED: list[str] = []


def last_signal() -> str:
    """The name of the last signal :func:`sigterm_interrupts` turned into an interrupt."""
    return _RECEIVED[-1] if _RECEIVED else "SIGINT"


def _raise_interrupt(signum: int, frame: Any) -> None:
    _RECEIVED.append(signal.Signals(signum).name)
    raise KeyboardInterrupt(_RECEIVED[-1])


@contextlib.contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt inside the block, as SIGINT does: a stopped job
    (``ray job stop``, ``kill``) ends its MLflow run and says how to resume."""
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
