"""Everything a training command checks before any cluster resource is taken: the model, the
locations, a GPU request, the dataset against the recipe, and that a resumed run keeps its
config. Each raises ConfigError (or ManifestError / StorageError) with a one-line message that
names the value and the fix; the commands turn that into exit status 2.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from pipelines import storage, tracking
from pipelines.config import RESUME_MAY_CHANGE, ConfigError, JobConfig, flatten
from pipelines.job.parts import StepPlan, model_options, plan_steps
from pipelines.manifest import Manifest, ManifestError, read_manifest, verify_shards
from resnet_core.models import create_model
from resnet_core.pretrained import InitWeightsError, apply_init, load_init_weights

DEMO_DATA = "data/synthetic-cifar"
# The demo's synthetic dataset (created on first use): sized so that `make demo` trains to far
# above chance within about two minutes on two CPU cores.
DEMO_TRAIN_PER_CLASS = 500
DEMO_VAL_PER_CLASS = 100


def check_model(config: JobConfig) -> None:
    """Build the model once on the driver (0.01 s for the demo's, 1.5 s for ResNet-152):
    catches option mismatches such as a shortcut on a plain net before any worker tries."""
    try:
        create_model(config.model.name, **model_options(config))
    except ValueError as e:
        raise ConfigError(f"model options do not fit {config.model.name}: {e}") from None


def check_locations(config: JobConfig) -> None:
    """Checkpoint storage writable and dataset location readable (S3: credentials + bucket)."""
    storage.check_writable(config.run.storage_path)
    if storage.is_s3(config.data.uri):
        storage.check_readable(config.data.uri)


def check_gpu_locally(config: JobConfig, address: str | None) -> None:
    """A GPU request without a cluster to attach to needs CUDA on this machine."""
    attached = address or os.environ.get("RAY_ADDRESS")
    if config.scale.use_gpu and not attached and not torch.cuda.is_available():
        raise ConfigError(
            "scale.use_gpu=true but this machine has no CUDA GPU and no cluster is attached "
            "(--address / RAY_ADDRESS); drop --gpu or submit to a GPU cluster"
        )


def check_dataset(config: JobConfig, *, verify_data: bool = False) -> tuple[Manifest, StepPlan]:
    """The manifest, its splits, every shard's size (``verify_data``: and sha256) against the
    manifest, and that the recipe fits the dataset."""
    d = config.data
    manifest = read_manifest(d.uri)
    manifest.split(d.train_split)
    if manifest.num_rows(d.val_split) == 0:
        raise ConfigError(f"data.val_split={d.val_split!r} of {d.uri} has no images")
    verify_shards(manifest, [d.train_split, d.val_split], sha256=verify_data)
    if d.mean == "per_pixel" and manifest.mean_image_uri is None:
        raise ConfigError(f"data.mean=per_pixel but {d.uri} has no mean image; use per_channel")
    if (d.mean == "per_channel" or (d.normalize_std and d.mean != "imagenet")) and (
        manifest.pixel_mean_rgb is None or manifest.pixel_std_rgb is None
    ):
        raise ConfigError(f"data.mean={d.mean} needs pixel statistics, {d.uri} has none")
    try:
        plan = plan_steps(config, manifest)
    except ValueError as e:
        raise ConfigError(f"train.global_batch={config.train.global_batch}: {e}") from None
    profiled = config.train.profile_steps
    if profiled and sum(profiled) - 1 > plan.total_steps:
        raise ConfigError(
            f"train.profile_steps={profiled} ends at step {sum(profiled) - 1}, after the run's "
            f"last step ({plan.total_steps}); profile earlier steps"
        )
    if config.model.init:
        check_init(config, manifest)
    return manifest, plan


def check_init(config: JobConfig, manifest: Manifest) -> None:
    """The initial weights load, here, into the model for this dataset's classes (a torchvision
    name downloads into the cache now, once, rather than in every worker)."""
    m = config.model
    model = create_model(m.name, num_classes=manifest.num_classes, **model_options(config))
    try:
        apply_init(model, load_init_weights(m.init), reset_head=m.reset_head)
    except InitWeightsError as e:
        raise ConfigError(f"model.init: {e}") from None


def check_store() -> str:
    """The tracking URI, once its MLflow store answered: ConfigError within seconds otherwise
    (one line, no credentials)."""
    uri = tracking.tracking_uri()
    try:
        tracking.check_store(uri)
    except tracking.StoreUnreachable as e:
        raise ConfigError(str(e)) from None
    return uri


def check_resumable(config: JobConfig) -> None:
    """The MLflow store answers (within seconds), and a run of this name in it was started with
    the same config."""
    uri = check_store()
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).exists():
        return  # a new embedded store holds no runs; the run creates it
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    try:
        with tracking.bounded_requests():
            experiment = client.get_experiment_by_name(config.run.experiment)
            run = experiment and tracking.find_run(
                client, experiment.experiment_id, config.run_name
            )
    except Exception as e:  # any failure to reach or read the store
        raise ConfigError(str(tracking.store_error(uri, e))) from None
    if run is None:
        return
    conflicts = tracking.param_conflicts(
        run.data.params, flatten(config), may_change=RESUME_MAY_CHANGE
    )
    if conflicts:
        raise ConfigError(
            f"run {config.run_name!r} (MLflow run {run.info.run_id}) was started with "
            f"{conflicts[0]}; resuming it with another config would mix two runs — pass a new "
            "--name, or the original values"
        )


def job_warnings(config: JobConfig) -> list[str]:
    """Under ``ray job submit`` the working directory is a temporary copy of the upload:
    locations that default into it do not survive the job."""
    if "RAY_JOB_CONFIG_JSON_ENV_VAR" not in os.environ:  # set by Ray for a job's entrypoint
        return []
    notes = []
    if not os.environ.get("MLFLOW_TRACKING_URI"):
        notes.append(
            "MLFLOW_TRACKING_URI is not set, so the MLflow store lands in this job's temporary "
            "working directory; set it with --runtime-env-json "
            '\'{"env_vars": {"MLFLOW_TRACKING_URI": "http://..."}}\''
        )
    path = config.run.storage_path
    if not storage.is_s3(path) and Path(path).is_relative_to(Path.cwd()):
        notes.append(
            f"run.storage_path={path} is inside this job's temporary working directory, so its "
            "checkpoints cannot resume a later submission; pass --storage s3://... or a shared "
            "path"
        )
    return notes


def needs_demo_data(config: JobConfig) -> bool:
    """The demo recipe on its default location, not created yet."""
    uri = config.data.uri
    return (
        config.recipe == "demo"
        and uri == storage.absolute_uri(DEMO_DATA)
        and not Path(uri, "manifest.json").exists()
    )


def ensure_demo_data(config: JobConfig) -> None:
    """The embedded default: create the synthetic shards on first use (Ray must be up)."""
    from pipelines import shards
    from pipelines.synthetic import SyntheticSpec

    uri = config.data.uri
    print(f"no dataset at {uri}: creating the synthetic demo shards there (one time)", flush=True)
    spec = SyntheticSpec(
        num_classes=10,
        train_per_class=DEMO_TRAIN_PER_CLASS,
        val_per_class=DEMO_VAL_PER_CLASS,
        image_kind="cifar",
    )
    status = shards.write_dataset(shards.prepare_config("synthetic", uri, synthetic=spec))
    if status != 0:
        raise ManifestError(f"creating the demo dataset at {uri} failed (exit {status})")
