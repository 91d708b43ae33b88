"""A trained net, wherever it is, and how resnet-eval and resnet-predict score images with it.

What can be loaded (:func:`load_trained_model`): a checkpoint directory of resnet-train
(``state.safetensors`` + ``checkpoint.json``, local or ``s3://``), a run folder holding
``checkpoint-*`` directories (the newest is used), a ``final/`` folder (``weights.safetensors``
+ ``config.json`` + ``classes.json``), ``runs:/<run id>`` (that run's ``final/`` artifacts) and
``models:/<name>/<version | latest>`` or ``models:/<name>@<alias>`` (the registered version's
source run, then as ``runs:/``). Nothing is unpickled: the safetensors weights are loaded into
``resnet_core.create_model`` built from the training run's config.

Scoring (:func:`score_images`): encoded images -> the views of a test protocol (centre crop,
10-crop, multi-scale; paper §3.4) -> class probabilities, through ``Normalize -> net``: the same
input normalisation as training (``resnet_core.transforms.Normalize``).
"""

from __future__ import annotations

import json
import tempfile
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from pipelines import storage, tracking
from pipelines.config import JobConfig, from_dict
from pipelines.job.checkpoints import checkpoint_step, load_from, load_newest_intact, newest_first
from pipelines.job.ema import result_weights
from pipelines.job.final_model import CLASSES_FILE, CONFIG_FILE, FINAL_ARTIFACTS, WEIGHTS_FILE
from pipelines.job.parts import model_options, normalization
from pipelines.manifest import Manifest
from resnet_core.checkpoint import load_weights
from resnet_core.cpu_transforms import CenterCrop, decode_crop, decode_resize_shorter
from resnet_core.evaluation import (
    MULTISCALE_SHORTER_SIDES,
    predict_center,
    predict_multiscale,
    predict_ten_crop,
)
from resnet_core.models import create_model, is_cifar_model
from resnet_core.transforms import Normalize

MODES = ("center", "tencrop", "multiscale")
# Multi-scale shorter sides for the CIFAR nets at their 32x32 training crop: our choice, not the
# paper's (§4.2 tests CIFAR-10 on the 32x32 image only); ImageNet nets use the paper's
# MULTISCALE_SHORTER_SIDES at 224.
CIFAR_MULTISCALE_SHORTER_SIDES = (32, 40, 48)
CHECKPOINT_FILES = ("checkpoint.json", "state.safetensors")
_SOURCES = (
    "pass a checkpoint directory, a run folder with checkpoint-* directories, a final/ folder, "
    "runs:/<run id> or models:/<name>/<version|latest>"
)


class EvalInputError(ValueError):
    """Bad input to resnet-eval / resnet-predict; the message is one line with the fix."""


# ---------------------------------------------------------------------------------------------
# What to evaluate: checkpoint, final/ folder, runs:/, models:/
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainedModel:
    """A trained net as read from storage or MLflow, before it is built.

    config: the training run's configuration. weights: the bare model's state dict, CPU tensors.
    classes / class_names: the label order it was trained with (``classes.json``); None for
    checkpoints, which do not record it. run_id / experiment_id: the MLflow run that trained it,
    when known. origin: what was read, for messages and the eval run's params.
    """

    config: JobConfig
    weights: dict[str, Tensor]
    classes: tuple[str, ...] | None
    class_names: tuple[str, ...] | None
    run_id: str | None
    experiment_id: str | None
    origin: str


def load_trained_model(uri: str, tracking_uri: str) -> TrainedModel:
    """Resolve ``uri`` (see the module docstring) to the config and weights of a trained net.

    Raises EvalInputError, CheckpointError, ConfigError or StorageError (one line each) when it
    cannot.
    """
    if uri.startswith("runs:/"):
        run_id, _, subpath = uri.removeprefix("runs:/").strip("/").partition("/")
        return _from_run(run_id, subpath or FINAL_ARTIFACTS, tracking_uri, uri)
    if uri.startswith("models:/"):
        return _from_registry(uri, tracking_uri)
    if "://" in uri and not storage.is_s3(uri):
        raise EvalInputError(f"model location {storage.redact(uri)!r} is not supported; {_SOURCES}")
    return _from_location(storage.absolute_uri(uri), tracking_uri)


def _client(tracking_uri: str) -> Any:
    from mlflow.tracking import MlflowClient

    tracking.quiet_store_logs()
    return MlflowClient(tracking_uri=tracking_uri)


def _store_exists(tracking_uri: str) -> bool:
    """False for an embedded SQLite store that was never created (it holds no runs)."""
    if tracking_uri.startswith("sqlite:///"):
        return Path(tracking_uri.removeprefix("sqlite:///")).exists()
    return True


def _from_run(run_id: str, subpath: str, tracking_uri: str, origin: str) -> TrainedModel:
    import mlflow
    from mlflow.exceptions import MlflowException

    where = storage.redact(tracking_uri)
    if not _store_exists(tracking_uri):
        raise EvalInputError(
            f"{origin}: there is no MLflow store at {where}; set MLFLOW_TRACKING_URI"
        )
    client = _client(tracking_uri)
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise EvalInputError(
            f"{origin}: MLflow run {run_id!r} is not in the store {where} — check the run id and "
            "MLFLOW_TRACKING_URI"
        ) from None
    with tempfile.TemporaryDirectory(prefix="resnet-eval-") as tmp:
        try:
            local = mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path=subpath, dst_path=tmp, tracking_uri=tracking_uri
            )
        except (MlflowException, OSError):
            local = None
        folder = Path(local) if local else None
        if folder is None or not (folder / WEIGHTS_FILE).is_file():
            latest = run.data.tags.get("checkpoint.latest")
            hint = (
                f"; evaluate its latest checkpoint instead: resnet-eval {latest}" if latest else ""
            )
            raise EvalInputError(
                f"{origin}: MLflow run {run_id} has no {subpath}/{WEIGHTS_FILE} artifact (a "
                f"finished resnet-train run logs final/{WEIGHTS_FILE}, {CONFIG_FILE} and "
                f"{CLASSES_FILE}){hint}"
            )
        trained = _read_final_folder(folder, origin)
    return replace(trained, run_id=run_id, experiment_id=run.info.experiment_id)


def _from_registry(uri: str, tracking_uri: str) -> TrainedModel:
    from mlflow.exceptions import MlflowException

    rest = uri.removeprefix("models:/").strip("/")
    if not _store_exists(tracking_uri):
        raise EvalInputError(
            f"{uri}: there is no MLflow store at {storage.redact(tracking_uri)}; set "
            "MLFLOW_TRACKING_URI"
        )
    client = _client(tracking_uri)
    try:
        if "@" in rest:
            name, _, alias = rest.partition("@")
            version = client.get_model_version_by_alias(name, alias)
        else:
            name, _, number = rest.rpartition("/")
            if not name:
                raise EvalInputError(f"{uri} names no version; use models:/<name>/<version|latest>")
            if number == "latest":
                escaped = name.replace("'", "\\'")
                versions = client.search_model_versions(f"name='{escaped}'")
                if not versions:
                    raise MlflowException(f"no versions of {name}")
                version = max(versions, key=lambda v: int(v.version))
            else:
                version = client.get_model_version(name, number)
    except MlflowException:
        raise EvalInputError(
            f"{uri} is not in the model registry of {storage.redact(tracking_uri)} — "
            "check the name and version (resnet-train registers resnet-ray-<model>)"
        ) from None
    if not version.run_id:
        raise EvalInputError(
            f"{uri} (version {version.version}) names no source run, so its final/ weights "
            "cannot be found; register versions from resnet-train runs"
        )
    # The version, not "latest" or an alias, is what this evaluation scored.
    origin = f"models:/{version.name}/{version.version}"
    return _from_run(version.run_id, FINAL_ARTIFACTS, tracking_uri, origin)


def _from_location(uri: str, tracking_uri: str) -> TrainedModel:
    """A checkpoint directory, a run folder of checkpoints or a final/ folder, local or on S3."""
    fs, root = storage.resolve(uri)
    kind = _what_is_there(uri, fs, root)
    if kind == "final":
        with tempfile.TemporaryDirectory(prefix="resnet-eval-") as tmp:
            local = Path(tmp) if storage.is_s3(uri) else Path(root)
            if storage.is_s3(uri):
                for name in (WEIGHTS_FILE, CONFIG_FILE, CLASSES_FILE):
                    if storage.exists(fs, storage.join(root, name)):
                        (local / name).write_bytes(storage.read_bytes(fs, storage.join(root, name)))
            trained = _read_final_folder(local, storage.redact(uri))
    elif kind == "checkpoint":
        trained = _read_checkpoint(load_from(fs, root), storage.redact(uri))
    else:  # a run folder: its newest intact checkpoint, as training resumes from
        folder, state = load_newest_intact(fs, root, newest_first(fs, root))
        print(f"using the newest intact checkpoint of the run folder: {folder}", flush=True)
        trained = _read_checkpoint(state, storage.redact(storage.join(uri, folder)))
    run_id, experiment_id = _find_training_run(trained.config, tracking_uri)
    return replace(trained, run_id=run_id, experiment_id=experiment_id)


def _what_is_there(uri: str, fs: Any, root: str) -> str:
    """``checkpoint``, ``final`` or ``run`` (a folder of checkpoint-* folders); EvalInputError
    when ``uri`` holds none of them."""
    import pyarrow.fs as pafs

    try:
        if fs.get_file_info(root).type == pafs.FileType.File:
            raise EvalInputError(
                f"{storage.redact(uri)} is a file; pass the folder that holds it — {_SOURCES}"
            )
        prefix = root.rstrip("/") + "/"
        files = {p.removeprefix(prefix) for p in storage.list_files(fs, root)}
    except OSError as e:  # S3: credentials, permissions, network
        message = " ".join(str(e).split())[:200]
        raise EvalInputError(f"cannot list {storage.redact(uri)} ({message})") from None
    if not files:
        raise EvalInputError(f"{storage.redact(uri)} does not exist or is empty; {_SOURCES}")
    if all(name in files for name in CHECKPOINT_FILES):
        return "checkpoint"
    if WEIGHTS_FILE in files and CONFIG_FILE in files:
        return "final"
    if any(
        checkpoint_step(first) is not None and f"{first}/{CHECKPOINT_FILES[0]}" in files
        for first in {name.partition("/")[0] for name in files}
    ):
        return "run"
    raise EvalInputError(
        f"{storage.redact(uri)} holds no checkpoint: expected checkpoint.json + "
        f"state.safetensors, {WEIGHTS_FILE} + {CONFIG_FILE}, or checkpoint-* folders; {_SOURCES}"
    )


def _read_checkpoint(state: dict[str, Any], origin: str) -> TrainedModel:
    """The config and weights of a resnet-train checkpoint's state."""
    if not isinstance(state.get("config"), dict) or not isinstance(state.get("model"), dict):
        raise EvalInputError(
            f"checkpoint {origin} has no config or model weights: it was not written by "
            "resnet-train"
        )
    config = from_dict(JobConfig, state["config"])
    return TrainedModel(config, result_weights(config, state), None, None, None, None, origin)


def _read_final_folder(folder: Path, origin: str) -> TrainedModel:
    """weights.safetensors + config.json (+ classes.json) as resnet-train's final/ artifacts."""
    weights = load_weights(folder / WEIGHTS_FILE)
    config_path = folder / CONFIG_FILE
    if not config_path.is_file():
        raise EvalInputError(f"{origin} has {WEIGHTS_FILE} but no {CONFIG_FILE}; {_SOURCES}")
    try:
        config = from_dict(JobConfig, json.loads(config_path.read_text()))
        classes = class_names = None
        if (folder / CLASSES_FILE).is_file():
            listed = json.loads((folder / CLASSES_FILE).read_text())
            classes = tuple(str(c) for c in listed["classes"])
            class_names = tuple(str(c) for c in listed["class_names"])
    except (ValueError, KeyError, TypeError) as e:  # JSON errors are ValueErrors
        raise EvalInputError(f"{origin}: unreadable {CONFIG_FILE} / {CLASSES_FILE} ({e})") from None
    return TrainedModel(config, weights, classes, class_names, None, None, origin)


def _find_training_run(config: JobConfig, tracking_uri: str) -> tuple[str | None, str | None]:
    """The MLflow run of this config's run name (run names are deterministic), if recorded."""
    if not _store_exists(tracking_uri):
        return None, None
    client = _client(tracking_uri)
    experiment = client.get_experiment_by_name(config.run.experiment)
    if experiment is None:
        return None, None
    run = tracking.find_run(client, experiment.experiment_id, config.run_name)
    return (run.info.run_id, experiment.experiment_id) if run else (None, None)


# ---------------------------------------------------------------------------------------------
# The model and its input normalisation
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSpec:
    """Everything a worker needs to rebuild the net: plain values and CPU tensors."""

    name: str
    num_classes: int
    options: dict[str, Any]
    weights: dict[str, Tensor]
    mean: Tensor  # (3,) per channel or (3, S, S) per pixel, [0, 1] units
    std: Tensor | None


def model_spec(trained: TrainedModel, manifest: Manifest) -> ModelSpec:
    """Check that the net fits the dataset (classes, normalisation statistics) and return what
    workers build it from; EvalInputError when it does not fit."""
    config = trained.config
    if trained.classes is not None and trained.classes != manifest.classes:
        raise EvalInputError(
            f"{trained.origin} was trained on {len(trained.classes)} classes "
            f"({', '.join(trained.classes[:3])}, ...) but the dataset at "
            f"{storage.redact(manifest.root)} has {manifest.num_classes} "
            f"({', '.join(manifest.classes[:3])}, ...) in another order or set; evaluate on the "
            "dataset the model was trained on"
        )
    d = config.data
    needs_stats = d.mean == "per_channel" or (d.normalize_std and d.mean != "imagenet")
    if needs_stats and (manifest.pixel_mean_rgb is None or manifest.pixel_std_rgb is None):
        raise EvalInputError(
            f"the model was trained with data.mean={d.mean} (normalize_std={d.normalize_std}) but "
            f"{storage.redact(manifest.root)} has no pixel statistics (no training split); "
            f"pass --data with the training dataset ({storage.redact(d.uri)})"
        )
    mean, std = normalization(config, manifest)  # ManifestError: no mean image
    spec = ModelSpec(
        name=config.model.name,
        num_classes=manifest.num_classes,
        options=model_options(config),
        weights=trained.weights,
        mean=mean,
        std=std,
    )
    build_model(spec, origin=trained.origin)  # the weights must fit before any worker starts
    return spec


def build_model(spec: ModelSpec, origin: str = "the weights") -> nn.Module:
    """``Normalize -> net`` in eval mode, on the CPU: takes uint8 images (NHWC or NCHW)."""
    net = create_model(spec.name, num_classes=spec.num_classes, **spec.options)
    try:
        net.load_state_dict(spec.weights)
    except RuntimeError as e:
        message = " ".join(str(e).split())[:300]
        raise EvalInputError(
            f"{origin} does not fit {spec.name} with {spec.num_classes} classes ({message}); "
            "evaluate on the dataset the model was trained on"
        ) from None
    return nn.Sequential(Normalize(spec.mean, spec.std), net).eval()


# ---------------------------------------------------------------------------------------------
# Scoring: encoded images -> class probabilities under one protocol
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Protocol:
    """How encoded images become model inputs (pixels).

    image_size: crop side, the training crop. eval_resize: shorter side before the centre crop
    (center), and the side of the central square that ten_crop cuts (tencrop). scales: whole-image
    shorter sides (multiscale).
    """

    image_size: int
    eval_resize: int
    scales: tuple[int, ...]


def default_scales(model_name: str, image_size: int) -> tuple[int, ...]:
    """Multi-scale shorter sides for a net trained on ``image_size`` crops: the paper's 224..640
    for ImageNet nets (CIFAR nets: 32, 40, 48), scaled by ``image_size`` / 224 (/ 32)."""
    sides, reference = (
        (CIFAR_MULTISCALE_SHORTER_SIDES, 32)
        if is_cifar_model(model_name)
        else (MULTISCALE_SHORTER_SIDES, 224)
    )
    return tuple(round(side * image_size / reference) for side in sides)


def decode_views(data: bytes, mode: str, protocol: Protocol) -> list[np.ndarray]:
    """The uint8 (H, W, 3) views of one encoded image that ``mode`` scores: one crop (center),
    the central ``eval_resize`` square (tencrop; cut into ten crops later), the whole image at
    each scale (multiscale). Decoding as resnet-train's validation does (JPEG draft decoding)."""
    rng = np.random.default_rng(0)  # centre crops draw nothing
    if mode == "center":
        sampler = CenterCrop(resize=protocol.eval_resize, size=protocol.image_size)
        return [decode_crop(data, sampler, rng, flip=False)]
    if mode == "tencrop":
        sampler = CenterCrop(resize=protocol.eval_resize, size=protocol.eval_resize)
        return [decode_crop(data, sampler, rng, flip=False)]
    if mode == "multiscale":
        return [decode_resize_shorter(data, side) for side in protocol.scales]
    raise ValueError(f"mode {mode!r} is unknown; use one of {', '.join(MODES)}")


def score_views(
    model: nn.Module,
    views: Sequence[Sequence[np.ndarray]],
    mode: str,
    protocol: Protocol,
    device: torch.device,
) -> Tensor:
    """Class probabilities (N, K) on the CPU for N images' views (from :func:`decode_views`).

    Images whose views have the same sizes go through the model together (whole images of
    different sizes cannot share a batch); the rows keep the order of ``views``.
    """
    groups: dict[tuple[tuple[int, ...], ...], list[int]] = defaultdict(list)
    for i, image_views in enumerate(views):
        groups[tuple(v.shape for v in image_views)].append(i)
    out: Tensor | None = None
    for indices in groups.values():
        # uint8 NCHW views: the model's Normalize makes them its float input.
        batches = [
            torch.from_numpy(np.stack([views[i][s] for i in indices]))
            .to(device)
            .permute(0, 3, 1, 2)
            for s in range(len(views[indices[0]]))
        ]
        if mode == "center":
            probabilities = predict_center(model, batches[0])
        elif mode == "tencrop":
            probabilities = predict_ten_crop(model, batches[0], protocol.image_size)
        else:
            probabilities = predict_multiscale(model, batches, flip=True)
        if out is None:
            out = torch.empty(len(views), probabilities.shape[1])
        out[indices] = probabilities.cpu()
    if out is None:
        raise ValueError("score_views got no images")
    return out


@dataclass(frozen=True)
class Scores:
    """Probabilities per mode for the decodable images of a chunk (in chunk order), which rows
    were undecodable, and the first decode error."""

    probabilities: dict[str, Tensor]
    bad: np.ndarray
    first_error: str


def score_images(
    model: nn.Module,
    datas: Sequence[bytes],
    modes: Sequence[str],
    protocol: Protocol,
    device: torch.device,
) -> Scores:
    """Score encoded images under every mode; an image that fails to decode in any mode is
    dropped from all of them (and counted)."""
    unknown = [mode for mode in modes if mode not in MODES]
    if unknown:
        raise EvalInputError(f"mode {unknown[0]!r} is unknown; use one of {', '.join(MODES)}")
    decoded: list[dict[str, list[np.ndarray]]] = []
    bad = np.zeros(len(datas), dtype=bool)
    first_error = ""
    for i, data in enumerate(datas):
        try:
            decoded.append({mode: decode_views(data, mode, protocol) for mode in modes})
        except Exception as e:  # any failure of one image's bytes makes it a bad image
            bad[i] = True
            first_error = first_error or f"{type(e).__name__}: {e}"
    probabilities = {}
    if decoded:
        for mode in modes:
            views = [d[mode] for d in decoded]
            probabilities[mode] = score_views(model, views, mode, protocol, device)
    return Scores(probabilities, bad, first_error)
