"""Ray- and MLflow-aware commands of resnet-ray and the job core they share (docs/ARCHITECTURE.md).

Ray's driver prints what its other processes log; two of its own settings (read once, when
``ray`` is first imported, so they are set here, before any command imports it) keep that to our
lines: no "(RayTrainWorker pid=...)" prefix on forwarded lines, and three kinds of Ray- and
torch-internal noise dropped from the console (they stay in Ray's log files): the Train
placement-group cleaner's "Failed to query Ray Train Controller actor state" (every second while
the state API is unreachable), core_worker's error about Train's own PreemptionWatcher actor
(ray-project/ray#53727), and c10d's "hostname of the client socket cannot be retrieved" on hosts
without reverse DNS. MLflow's artifact progress bars (drawn whenever tqdm is installed) would
fill stderr, which our commands keep to one line per error. A value the user set wins. The
workers of a local Ray also drop Ray Train's warnings about reaching the autoscaler
(:func:`quiet_local_worker`).
"""

import logging
import os

_CONSOLE_NOISE = "|".join(
    (
        r"Failed to query Ray Train Controller actor state",
        r"Actor with class name: 'PreemptionWatcher' .* has constructor arguments",
        r"\[c10d\] The hostname of the client socket cannot be retrieved",
    )
)
os.environ.setdefault("RAY_DEDUP_LOGS_SKIP_REGEX", _CONSOLE_NOISE)
os.environ.setdefault("RAY_DISABLE_WORKER_LOG_PREFIX", "1")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

# Ray Train's controller asks the cluster's autoscaler for the run's resources (a 5 s ray.get);
# on an overloaded machine that times out and logs a warning with its traceback.
TRAIN_AUTOSCALER_LOGGER = (
    "ray.train.v2._internal.execution.scaling_policy.autoscaling_coordinator_client"
)


def quiet_local_worker() -> None:
    """Run first in every worker process of a local Ray (``ray.init``'s
    ``worker_process_setup_hook``: :func:`pipelines.job.session.ray_session`). A local Ray has no
    autoscaler, so the controller's request for resources has no one to serve it, and its
    timeouts are noise; errors still show. A filter, not a level: Ray Train's logging set-up
    (``dictConfig``) resets the levels of the loggers below ``ray.train``, not their filters."""
    logging.getLogger(TRAIN_AUTOSCALER_LOGGER).addFilter(_errors_only)


def _errors_only(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.ERROR
