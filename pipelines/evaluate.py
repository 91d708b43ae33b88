"""resnet-eval: score a trained ResNet on a prepared split with the paper's test protocols
(He et al., CVPR 2016, §3.4): single centre crop, 10-crop, fully-convolutional multi-scale.

Run from a checkout:

    resnet-eval runs:/<run id>                                  # a finished resnet-train run
    resnet-eval models:/resnet-ray-resnet50/latest --data s3://bucket/imagenet --workers 8 --gpu
    resnet-eval results/demo-resnet8 --modes center,tencrop,multiscale   # a run's latest checkpoint
    resnet-eval results/demo-resnet8/checkpoint-000000390-ab12cd34 --split val --scales 32,40,48

What can be evaluated: a checkpoint directory of resnet-train (``state.safetensors`` +
``checkpoint.json``, local or ``s3://``), a run folder holding ``checkpoint-*`` directories (the
newest is used), a ``final/`` folder (``weights.safetensors`` + ``config.json`` +
``classes.json``), ``runs:/<run id>`` (that run's ``final/`` artifacts) and
``models:/<name>/<version | latest>`` or ``models:/<name>@<alias>`` (the registered version's
source run, then as ``runs:/``). Nothing is unpickled: the safetensors weights are loaded into
``resnet_core.create_model`` built from the training run's config.

Modes (``--modes``, default ``center``):
    center      shorter side resized to ``eval_resize``, the central ``image_size`` crop
    tencrop     the central ``eval_resize`` square, ten ``image_size`` crops (corners, centre and
                their mirrors), softmax averaged (§3.4, following Krizhevsky et al. 2012)
    multiscale  the whole image with its shorter side at each of ``--scales``, and its mirror,
                softmax averaged (§3.4 "fully-convolutional form"; default scales 224 .. 640 for
                ImageNet nets, 32, 40, 48 for the CIFAR nets, both scaled to the training crop)
``image_size`` and ``eval_resize`` come from the training config (``--eval-resize`` overrides the
latter; CIFAR recipes use eval_resize = image_size, where 10-crop only averages the mirror).

Workers: ``--workers N`` Ray tasks (``--cpus-per-worker`` each, one GPU each with ``--gpu``); each
reads and scores one contiguous row range of the split (``data.plan_epoch(train=False)``), so
every image is scored exactly once. The driver checks that: the keys the workers scored are the
split's keys, each once. Metrics are exact counts summed over the workers.

The result: a table of top-1/top-5 error per mode on stdout, and a new MLflow run (in the
training run's experiment when it is known) tagged ``resnet_ray.evaluates=<training run id>``,
with metrics ``eval/<mode>/top1_err`` and ``eval/<mode>/top5_err`` (fractions) and the per-class
top-1 accuracy as ``eval/per_class_accuracy.csv``.

Exit status: 0 done; 1 the evaluation failed (e.g. not every image was scored exactly once);
2 bad input (one line on stderr, nothing evaluated).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from pipelines import data as data_lib
from pipelines import storage, tracking
from pipelines.config import ConfigError, JobConfig, from_dict
from pipelines.manifest import Manifest, ManifestError, read_manifest
from pipelines.train import CHECKPOINT_NAME, model_options, normalization
from resnet_core.checkpoint import CheckpointError, load_checkpoint, load_weights
from resnet_core.evaluation import (
    MULTISCALE_SHORTER_SIDES,
    predict_center,
    predict_multiscale,
    predict_ten_crop,
)
from resnet_core.metrics import TopKAccumulator
from resnet_core.models import create_model, is_cifar_model
from resnet_core.transforms import CenterCrop, decode_crop, decode_resize_shorter, to_float_batch

MODES = ("center", "tencrop", "multiscale")
# Multi-scale shorter sides for the CIFAR nets at their 32x32 training crop: our choice, not the
# paper's (§4.2 tests CIFAR-10 on the 32x32 image only); ImageNet nets use the paper's
# MULTISCALE_SHORTER_SIDES at 224.
CIFAR_MULTISCALE_SHORTER_SIDES = (32, 40, 48)
EVALUATES_TAG = "resnet_ray.evaluates"
FINAL_ARTIFACTS = "final"
WEIGHTS_FILE, CONFIG_FILE, CLASSES_FILE = "weights.safetensors", "config.json", "classes.json"
CHECKPOINT_FILES = ("checkpoint.json", "state.safetensors")
TOP_K = (1, 5)
EXIT_FAILED, EXIT_BAD_INPUT = 1, 2
_SOURCES = (
    "pass a checkpoint directory, a run folder with checkpoint-* directories, a final/ folder, "
    "runs:/<run id> or models:/<name>/<version|latest>"
)


class EvalInputError(ValueError):
    """Bad input to resnet-eval / resnet-predict; the message is one line with the fix."""


class EvalError(RuntimeError):
    """The evaluation ran but its result cannot be trusted (e.g. an image scored twice)."""


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

    where = tracking.strip_userinfo(tracking_uri)
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
            f"{uri}: there is no MLflow store at {tracking.strip_userinfo(tracking_uri)}; set "
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
            f"{uri} is not in the model registry of {tracking.strip_userinfo(tracking_uri)} — "
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
    import pyarrow.fs as pafs

    fs, root = storage.resolve(uri)
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
        kind, folder = "checkpoint", ""
    elif WEIGHTS_FILE in files and CONFIG_FILE in files:
        kind, folder = "final", ""
    else:
        steps = {
            (int(m.group(1)), first)
            for name in files
            if (first := name.partition("/")[0])
            and (m := CHECKPOINT_NAME.fullmatch(first))
            and f"{first}/{CHECKPOINT_FILES[0]}" in files
        }
        if not steps:
            raise EvalInputError(
                f"{storage.redact(uri)} holds no checkpoint: expected checkpoint.json + "
                f"state.safetensors, {WEIGHTS_FILE} + {CONFIG_FILE}, or checkpoint-* folders; "
                f"{_SOURCES}"
            )
        kind, folder = "checkpoint", max(steps)[1]
        print(f"using the newest checkpoint of the run folder: {folder}", flush=True)
    origin = storage.redact(storage.join(uri, folder) if folder else uri)
    names = CHECKPOINT_FILES if kind == "checkpoint" else (WEIGHTS_FILE, CONFIG_FILE, CLASSES_FILE)
    with tempfile.TemporaryDirectory(prefix="resnet-eval-") as tmp:
        local = Path(tmp) if storage.is_s3(uri) else Path(root, folder)
        if storage.is_s3(uri):
            for name in names:
                path = storage.join(root, folder, name) if folder else storage.join(root, name)
                if storage.exists(fs, path):
                    (local / name).write_bytes(storage.read_bytes(fs, path))
        if kind == "final":
            trained = _read_final_folder(local, origin)
        else:
            state = load_checkpoint(local)
            if not isinstance(state.get("config"), dict) or not isinstance(
                state.get("model"), dict
            ):
                raise EvalInputError(
                    f"checkpoint {origin} has no config or model weights: it was not written by "
                    "resnet-train"
                )
            trained = TrainedModel(
                config=from_dict(JobConfig, state["config"]),
                weights=state["model"],
                classes=None,
                class_names=None,
                run_id=None,
                experiment_id=None,
                origin=origin,
            )
    run_id, experiment_id = _find_training_run(trained.config, tracking_uri)
    return replace(trained, run_id=run_id, experiment_id=experiment_id)


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


class Normalize(nn.Module):
    """[0, 1] float NCHW images -> the model's input: minus the training mean, divided by the std
    when the recipe uses one, exactly as resnet-train's ``to_float_batch`` does on its crops.

    A per-pixel mean image (paper §3.4) of the training crop size is bilinearly resized to each
    input's height and width, so every crop of 10-crop testing gets the mean of a training crop
    and whole images at any scale get the mean stretched to their size. (Caffe, the paper's
    framework, subtracts a crop of a 256x256 mean image instead; per-channel means are the same
    either way.)
    """

    def __init__(self, mean: Tensor, std: Tensor | None) -> None:
        super().__init__()
        if mean.ndim == 1:
            mean = mean.view(3, 1, 1)
        self.register_buffer("mean", mean.float().clone())
        self.register_buffer("std", None if std is None else std.float().view(3, 1, 1).clone())

    def _mean_for(self, height: int, width: int) -> Tensor:
        if self.mean.shape[-2:] in ((1, 1), (height, width)):
            return self.mean
        # Not cached: whole images come in as many sizes as the dataset has; this costs far
        # less than the forward pass it precedes.
        return nn.functional.interpolate(
            self.mean[None], size=(height, width), mode="bilinear", align_corners=False
        )[0]

    def forward(self, x: Tensor) -> Tensor:
        x = x - self._mean_for(*x.shape[-2:])
        if self.std is not None:
            x = x / self.std
        return x


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
    mean, std = normalization(config, manifest, torch.device("cpu"))  # ManifestError: no mean image
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
    """``Normalize -> net`` in eval mode, on the CPU: takes [0, 1] float NCHW images."""
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


_ZERO_MEAN = (0.0, 0.0, 0.0)  # to_float_batch only scales to [0, 1]; Normalize does the rest


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
        batches = [
            to_float_batch(
                torch.from_numpy(np.stack([views[i][s] for i in indices])).to(device),
                mean=_ZERO_MEAN,
            )
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


# ---------------------------------------------------------------------------------------------
# Workers: one Ray task per exactly-once row range
# ---------------------------------------------------------------------------------------------


@dataclass
class WorkerResult:
    """What one worker scored. keys: every row it read (scored or undecodable), in order.
    accuracy: per mode, its TopKAccumulator counts (``state_dict``)."""

    rank: int
    keys: list[str]
    bad_keys: list[str]
    accuracy: dict[str, dict[str, Any]]
    seconds: float
    first_error: str = ""


def evaluate_rank(
    spec: ModelSpec,
    manifest: Manifest,
    split: str,
    *,
    rank: int,
    world_size: int,
    modes: Sequence[str],
    protocol: Protocol,
    batch_size: int,
    use_gpu: bool,
) -> WorkerResult:
    """Score rank ``rank``'s exactly-once share of ``split`` (runs inside a Ray task)."""
    started = time.perf_counter()
    device = torch.device("cuda" if use_gpu else "cpu")
    model = build_model(spec).to(device)
    plan = data_lib.plan_epoch(
        manifest,
        split,
        train=False,
        world_size=world_size,
        rank=rank,
        epoch=0,
        seed=0,
        batch_size=batch_size,
    )
    accuracy = {
        mode: TopKAccumulator(ks=TOP_K, num_classes=spec.num_classes, device=device)
        for mode in modes
    }
    keys: list[str] = []
    bad_keys: list[str] = []
    first_error = ""
    for table in data_lib.read_plan_rows(plan, chunk_rows=batch_size):
        chunk_keys = table.column("key").to_pylist()
        labels = torch.from_numpy(table.column("label").to_numpy().astype(np.int64))
        scores = score_images(model, table.column("image").to_pylist(), modes, protocol, device)
        keys += chunk_keys
        bad_keys += [k for k, bad in zip(chunk_keys, scores.bad, strict=True) if bad]
        first_error = first_error or scores.first_error
        good_labels = labels[torch.from_numpy(~scores.bad)].to(device)
        for mode, probabilities in scores.probabilities.items():
            accuracy[mode].update(probabilities.to(device), good_labels)
    return WorkerResult(
        rank=rank,
        keys=keys,
        bad_keys=bad_keys,
        accuracy={mode: acc.state_dict() for mode, acc in accuracy.items()},
        seconds=time.perf_counter() - started,
        first_error=first_error,
    )


def run_workers(
    spec: ModelSpec,
    manifest: Manifest,
    split: str,
    *,
    workers: int,
    cpus_per_worker: float,
    use_gpu: bool,
    modes: Sequence[str],
    protocol: Protocol,
    batch_size: int,
) -> list[WorkerResult]:
    """One Ray task per rank; results in rank order. Ray must be initialised."""
    import ray

    spec_ref = ray.put(spec)
    task = ray.remote(_evaluate_rank_task).options(
        num_cpus=cpus_per_worker, num_gpus=1 if use_gpu else 0, max_retries=1
    )
    pending = [
        task.remote(
            spec_ref,
            manifest,
            split,
            rank=rank,
            world_size=workers,
            modes=tuple(modes),
            protocol=protocol,
            batch_size=batch_size,
            use_gpu=use_gpu,
            threads=max(1, math.floor(cpus_per_worker)),
        )
        for rank in range(workers)
    ]
    results = []
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        result: WorkerResult = ray.get(done[0])
        print(
            f"worker {result.rank + 1}/{workers}: {len(result.keys)} images in "
            f"{result.seconds:.1f} s",
            flush=True,
        )
        results.append(result)
    return sorted(results, key=lambda r: r.rank)


def _evaluate_rank_task(spec: ModelSpec, manifest: Manifest, split: str, **kwargs: Any) -> Any:
    torch.set_num_threads(kwargs.pop("threads"))
    return evaluate_rank(spec, manifest, split, **kwargs)


def check_exactly_once(results: Sequence[WorkerResult], split_keys: Sequence[str]) -> None:
    """Every key of the split scored (or found undecodable) by exactly one worker, once;
    EvalError naming the first offending key otherwise."""
    seen = [key for r in results for key in r.keys]
    repeated = [key for key, n in Counter(seen).items() if n > 1]
    if repeated:
        raise EvalError(
            f"{len(repeated)} images were read more than once (e.g. {repeated[0]!r}); the "
            "workers' row ranges overlap — a bug in data.plan_epoch"
        )
    missing = set(split_keys) - set(seen)
    extra = set(seen) - set(split_keys)
    if missing or extra or len(seen) != len(split_keys):
        example = next(iter(missing or extra), "")
        raise EvalError(
            f"the workers read {len(seen)} images, the split has {len(split_keys)} "
            f"({len(missing)} missing, {len(extra)} unknown, e.g. {example!r}); the shards "
            "changed after their manifest — re-run resnet-prepare"
        )


def merge_accuracy(states: Sequence[dict[str, Any]]) -> TopKAccumulator:
    """The workers' TopKAccumulator counts summed into one accumulator."""
    first = states[0]
    merged = TopKAccumulator(ks=first["ks"], num_classes=first["num_classes"])
    totals = {
        name: sum((s[name] for s in states[1:]), start=first[name].clone())
        for name in ("correct", "count", "class_correct", "class_count")
    }
    merged.load_state_dict({"ks": first["ks"], "num_classes": first["num_classes"], **totals})
    return merged


@dataclass(frozen=True)
class ModeResult:
    """One mode's result: images scored, top-1 and top-5 error (fractions), per-class top-1
    accuracy (nan for classes without images)."""

    mode: str
    images: int
    top1_err: float
    top5_err: float
    per_class_accuracy: np.ndarray = field(repr=False)


def summarize(results: Sequence[WorkerResult], modes: Sequence[str]) -> list[ModeResult]:
    out = []
    for mode in modes:
        accuracy = merge_accuracy([r.accuracy[mode] for r in results])
        if int(accuracy.count) == 0:
            raise EvalError("no image of the split could be decoded; re-run resnet-prepare")
        summary = accuracy.compute()
        out.append(
            ModeResult(
                mode=mode,
                images=int(summary["count"]),
                top1_err=1.0 - summary["top1"],
                top5_err=1.0 - summary["top5"],
                per_class_accuracy=accuracy.per_class_accuracy().numpy(),
            )
        )
    return out


# ---------------------------------------------------------------------------------------------
# Output: table, per-class CSV, MLflow
# ---------------------------------------------------------------------------------------------


def format_table(results: Sequence[ModeResult]) -> str:
    lines = [f"{'mode':<12}{'images':>8}{'top-1 err':>12}{'top-5 err':>12}"]
    for r in results:
        lines.append(
            f"{r.mode:<12}{r.images:>8}{100 * r.top1_err:>11.2f}%{100 * r.top5_err:>11.2f}%"
        )
    return "\n".join(lines)


def per_class_csv(results: Sequence[ModeResult], manifest: Manifest, class_counts: Tensor) -> str:
    """label, class, name, images, then ``<mode>_top1_acc`` per mode (empty without images)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["label", "class", "name", "images", *(f"{r.mode}_top1_acc" for r in results)])
    for label, (cls, name) in enumerate(zip(manifest.classes, manifest.class_names, strict=True)):
        accuracies = [r.per_class_accuracy[label] for r in results]
        writer.writerow(
            [
                label,
                cls,
                name,
                int(class_counts[label]),
                *("" if math.isnan(a) else f"{a:.6f}" for a in accuracies),
            ]
        )
    return out.getvalue()


def log_evaluation(
    *,
    tracking_uri: str,
    trained: TrainedModel,
    experiment: str | None,
    manifest: Manifest,
    split: str,
    params: dict[str, Any],
    results: Sequence[ModeResult],
    bad_images: int,
    csv_text: str,
) -> str:
    """A new MLflow run with the metrics and the per-class CSV; returns its id."""
    from mlflow.entities import Metric

    client = _client(tracking_uri)
    if trained.experiment_id is not None and experiment is None:
        experiment_id = trained.experiment_id
    else:
        name = experiment or trained.config.run.experiment
        experiment_id = tracking.ensure_experiment(client, name, tracking_uri)
    tags = {
        **tracking.environment_tags(),
        "model": trained.config.model.name,
        "dataset.checksum": manifest.checksum,
        "dataset.uri": storage.redact(manifest.root),
    }
    if trained.run_id:
        tags[EVALUATES_TAG] = trained.run_id
    run_name = f"eval-{trained.config.run_name}-{split}"
    run = client.create_run(experiment_id, run_name=run_name, tags=tags)
    run_id = run.info.run_id
    try:
        if trained.run_id:
            params = {**params, "eval.trained_run": f"runs:/{trained.run_id}"}
        tracking.log_params_once(client, run_id, params)
        now = int(time.time() * 1000)
        metrics = [Metric("eval/bad_images", float(bad_images), now, 0)]
        for r in results:
            metrics += [
                Metric(f"eval/{r.mode}/top1_err", r.top1_err, now, 0),
                Metric(f"eval/{r.mode}/top5_err", r.top5_err, now, 0),
                Metric(f"eval/{r.mode}/images", float(r.images), now, 0),
            ]
        client.log_batch(run_id, metrics=metrics)
        with tempfile.TemporaryDirectory(prefix="resnet-eval-") as tmp:
            Path(tmp, "per_class_accuracy.csv").write_text(csv_text)
            Path(tmp, "summary.txt").write_text(format_table(results) + "\n")
            client.log_artifacts(run_id, tmp, artifact_path="eval")
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")
    return run_id


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="resnet-eval",
        description="Evaluate a trained ResNet on a prepared split: centre crop, 10-crop and "
        "multi-scale testing (paper §3.4) over Ray workers, every image exactly once; logs a new "
        "MLflow run. Exit status: 0 done, 1 evaluation failed, 2 bad input.",
        epilog="MLflow store: MLFLOW_TRACKING_URI, else mlflow.db in the current directory.",
    )
    parser.add_argument(
        "model",
        help="checkpoint directory, run folder, final/ folder (local or s3://), runs:/<run id> "
        "or models:/<name>/<version|latest>",
    )
    parser.add_argument("--data", help="dataset URI (default: the one the model was trained on)")
    parser.add_argument("--split", default="val", help="split to evaluate (default: val)")
    parser.add_argument(
        "--modes",
        default="center",
        help=f"comma-separated, of {', '.join(MODES)} (default: center)",
    )
    parser.add_argument(
        "--scales",
        help="multiscale shorter sides, comma-separated (default: 224,256,384,480,640 for "
        "ImageNet nets, 32,40,48 for CIFAR nets, scaled to the training crop)",
    )
    parser.add_argument("--eval-resize", type=int, help="override the config's data.eval_resize")
    parser.add_argument("--workers", type=int, default=1, help="Ray tasks (default: 1)")
    parser.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs per task")
    parser.add_argument("--gpu", action="store_true", help="one GPU per worker")
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward pass")
    parser.add_argument("--experiment", help="MLflow experiment (default: the training run's)")
    parser.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS or local)")
    return parser


def parse_modes(text: str) -> tuple[str, ...]:
    modes = tuple(m.strip() for m in text.split(",") if m.strip())
    unknown = [m for m in modes if m not in MODES]
    if not modes or unknown:
        raise EvalInputError(
            f"--modes {text!r}: unknown mode {unknown[0] if unknown else '(none)'!r}; use a "
            f"comma-separated list of {', '.join(MODES)}"
        )
    return tuple(dict.fromkeys(modes))


def parse_scales(text: str) -> tuple[int, ...]:
    try:
        scales = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        scales = ()
    if not scales or any(s < 1 for s in scales):
        raise EvalInputError(
            f"--scales {text!r} must be positive integer shorter sides, e.g. 224,256,384,480,640"
        )
    return scales


def check_numbers(args: argparse.Namespace) -> None:
    for flag, value in (("--workers", args.workers), ("--batch-size", args.batch_size)):
        if value < 1:
            raise EvalInputError(f"{flag} {value} must be >= 1")
    if args.cpus_per_worker <= 0:
        raise EvalInputError(f"--cpus-per-worker {args.cpus_per_worker} must be positive")


def resolve_protocol(args: argparse.Namespace, config: JobConfig) -> Protocol:
    d = config.data
    eval_resize = args.eval_resize or d.eval_resize
    if eval_resize < d.image_size:
        raise EvalInputError(
            f"--eval-resize {eval_resize} is below the training crop {d.image_size}; use at "
            f"least {d.image_size}"
        )
    scales = parse_scales(args.scales) if args.scales else None
    return Protocol(
        image_size=d.image_size,
        eval_resize=eval_resize,
        scales=scales or default_scales(config.model.name, d.image_size),
    )


def start_ray(address: str | None, workers: int, cpus_per_worker: float, use_gpu: bool) -> bool:
    """Attach to ``address`` / RAY_ADDRESS, else start a local Ray; True when started here.
    A GPU request the cluster cannot meet is bad input."""
    import ray

    started = False
    if not ray.is_initialized():
        if address or os.environ.get("RAY_ADDRESS"):
            ray.init(address=address)
        else:
            needed = math.ceil(workers * cpus_per_worker)
            ray.init(num_cpus=max(os.cpu_count() or 1, needed), include_dashboard=False)
        started = True
    gpus = ray.cluster_resources().get("GPU", 0)
    if use_gpu and gpus < 1:
        if started:
            ray.shutdown()
        raise EvalInputError(
            "--gpu but the Ray cluster has no GPU; drop --gpu or attach a GPU cluster"
        )
    return started


def _fail(message: object, status: int) -> int:
    print(f"resnet-eval: {message}", file=sys.stderr, flush=True)
    return status


def main(argv: Sequence[str] | None = None) -> int:
    """Run resnet-eval; returns the exit status (see the module docstring)."""
    args = build_parser().parse_args(argv)
    uri = tracking.tracking_uri()
    try:
        modes = parse_modes(args.modes)
        check_numbers(args)
        trained = load_trained_model(args.model, uri)
        protocol = resolve_protocol(args, trained.config)
        data_uri = storage.absolute_uri(args.data or trained.config.data.uri)
        manifest = read_manifest(data_uri)
        rows = manifest.num_rows(args.split)
        if rows == 0:
            raise EvalInputError(
                f"split {args.split!r} of {storage.redact(data_uri)} has no images"
            )
        spec = model_spec(trained, manifest)
    except (
        EvalInputError,
        ConfigError,
        CheckpointError,
        ManifestError,
        storage.StorageError,
    ) as e:
        return _fail(e, EXIT_BAD_INPUT)
    workers = min(args.workers, rows)
    print(
        f"evaluating {spec.name} from {trained.origin} on split {args.split!r} of "
        f"{storage.redact(data_uri)} ({rows} images): modes {', '.join(modes)}; crop "
        f"{protocol.image_size}, eval_resize {protocol.eval_resize}"
        + (f", scales {','.join(map(str, protocol.scales))}" if "multiscale" in modes else "")
        + f"; {workers} worker(s)",
        flush=True,
    )
    import ray

    try:
        started = start_ray(args.address, workers, args.cpus_per_worker, args.gpu)
    except EvalInputError as e:
        return _fail(e, EXIT_BAD_INPUT)
    try:
        results = run_workers(
            spec,
            manifest,
            args.split,
            workers=workers,
            cpus_per_worker=args.cpus_per_worker,
            use_gpu=args.gpu,
            modes=modes,
            protocol=protocol,
            batch_size=args.batch_size,
        )
        split_keys = data_lib.read_split_keys(manifest, args.split)
        if len(split_keys) != rows:
            raise EvalError(
                f"the shards of split {args.split!r} hold {len(split_keys)} rows, the manifest "
                f"says {rows}; re-run resnet-prepare"
            )
        check_exactly_once(results, split_keys)
        mode_results = summarize(results, modes)
    except EvalError as e:
        return _fail(e, EXIT_FAILED)
    except ray.exceptions.RayError as e:  # a worker raised or died
        cause = getattr(e, "cause", None) or e
        first_line = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
        return _fail(f"a worker failed: {type(cause).__name__}: {first_line}", EXIT_FAILED)
    finally:
        if started:
            ray.shutdown()
    bad = [key for r in results for key in r.bad_keys]
    print(format_table(mode_results), flush=True)
    if bad:
        error = next(r.first_error for r in results if r.first_error)
        print(
            f"resnet-eval: warning: {len(bad)} of {rows} images could not be decoded and were "
            f"not scored (e.g. {bad[0]!r}: {error})",
            file=sys.stderr,
            flush=True,
        )
    class_counts = merge_accuracy([r.accuracy[modes[0]] for r in results]).class_count
    params = {
        "model.name": spec.name,
        "model.shortcut": trained.config.model.shortcut,
        "eval.source": trained.origin,
        "eval.data": storage.redact(data_uri),
        "eval.split": args.split,
        "eval.modes": ",".join(modes),
        "eval.image_size": protocol.image_size,
        "eval.eval_resize": protocol.eval_resize,
        "eval.scales": ",".join(map(str, protocol.scales)),
        "eval.workers": workers,
        "eval.batch_size": args.batch_size,
    }
    run_id = log_evaluation(
        tracking_uri=uri,
        trained=trained,
        experiment=args.experiment,
        manifest=manifest,
        split=args.split,
        params=params,
        results=mode_results,
        bad_images=len(bad),
        csv_text=per_class_csv(mode_results, manifest, class_counts),
    )
    print(f"MLflow run: {run_id}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
