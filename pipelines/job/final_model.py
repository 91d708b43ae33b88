"""The end of a training run in MLflow: the final weights as files, and the served model.

``final/`` artifacts: ``weights.safetensors`` (the bare net's state dict), ``config.json`` (the
run's config) and ``classes.json`` — what ``resnet-eval runs:/<id>`` reads. The MLflow model
``model`` (registered as ``run.registered_model`` or ``resnet-ray-<model>``) is
:mod:`pipelines.served_model`: uint8 images in, logits out, input normalisation included, no
pickle, loadable on CPU and CUDA. It is loaded back and checked against the net before the run
counts as done. ``final/model.onnx`` is the same model as ONNX (uint8 NHWC in, logits out), checked
with onnxruntime; tags ``onnx.opset`` and ``onnx.max_logit_difference`` record how.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipelines import tracking
from pipelines.config import JobConfig, to_dict
from pipelines.job.ema import result_weights
from pipelines.job.parts import model_options, normalization
from pipelines.manifest import Manifest
from resnet_core.checkpoint import load_checkpoint, save_weights
from resnet_core.export import OPSET, export_onnx
from resnet_core.models import create_model
from resnet_core.transforms import Normalize

FINAL_ARTIFACTS = "final"
WEIGHTS_FILE, CONFIG_FILE, CLASSES_FILE = "weights.safetensors", "config.json", "classes.json"
ONNX_FILE = "model.onnx"
SERVED_MODEL_CODE = Path(__file__).resolve().parents[1] / "served_model.py"
RESNET_CORE = Path(__file__).resolve().parents[2] / "resnet_core"
# How close the served model's logits must be to the net's: the same float32 ops on the CPU;
# on CUDA, cuDNN's TF32 convolutions round differently.
SERVED_TOLERANCE = {"cpu": 1e-5, "cuda": 2e-2}


def log_final_model(
    uri: str, run_id: str, config: JobConfig, manifest: Manifest, checkpoint: Any
) -> str:
    """Log the ``final/`` files, the served model and its ONNX export of ``checkpoint`` (a Ray
    Train checkpoint of this run; its EMA weights when the run keeps an EMA) to MLflow run
    ``run_id``, register it, and tag the run with the model's URI (``tracking.FINAL_MODEL_TAG``),
    which it returns."""
    with tempfile.TemporaryDirectory(prefix="resnet-final-") as tmp:
        checkpoint.to_directory(tmp)
        state = load_checkpoint(tmp)
    weights = result_weights(config, state)
    net = create_model(config.model.name, num_classes=manifest.num_classes, **model_options(config))
    net.load_state_dict(weights)
    mean, std = normalization(config, manifest)
    served = nn.Sequential(Normalize(mean, std), net).eval()
    with tempfile.TemporaryDirectory(prefix="resnet-final-") as tmp:
        files = write_final_files(Path(tmp), config, manifest, net, mean, std)
        _log_files(uri, run_id, files)
        model_uri = _log_served_model(uri, run_id, config, files, served)
        onnx_tags = (
            _log_onnx(uri, run_id, config, served, Path(tmp)) if config.train.export_onnx else {}
        )
    from mlflow.tracking import MlflowClient

    tags = {tracking.FINAL_MODEL_TAG: model_uri, **onnx_tags}
    client = MlflowClient(tracking_uri=uri)
    for key, value in tags.items():
        client.set_tag(run_id, key, value)
    return model_uri


def _log_onnx(
    uri: str, run_id: str, config: JobConfig, served: nn.Module, folder: Path
) -> dict[str, str]:
    """``final/model.onnx``, checked with onnxruntime on random images; its tags. A model the
    exporter cannot handle is reported (a line, the ``onnx.error`` tag), not a failed run."""
    from mlflow.tracking import MlflowClient

    size = config.data.eval_crop
    example = np.random.default_rng(0).integers(0, 256, (2, size, size, 3), dtype=np.uint8)
    path = folder / ONNX_FILE
    try:
        difference = export_onnx(served, example, path)
    except Exception as e:  # the exporter's and onnxruntime's errors have no common base
        line = " ".join(str(e).split())[:300]
        print(f"resnet-train: warning: no ONNX model: {type(e).__name__}: {line}", flush=True)
        return {"onnx.error": f"{type(e).__name__}: {line}"}
    MlflowClient(tracking_uri=uri).log_artifact(run_id, str(path), artifact_path=FINAL_ARTIFACTS)
    return {"onnx.opset": str(OPSET), "onnx.max_logit_difference": f"{difference:.3g}"}


def write_final_files(
    folder: Path,
    config: JobConfig,
    manifest: Manifest,
    net: nn.Module,
    mean: torch.Tensor,
    std: torch.Tensor | None,
) -> dict[str, Path]:
    """The final weights, config, classes, and the served model's net description and input
    statistics, as files in ``folder``."""
    files = {
        "weights": save_weights(folder / WEIGHTS_FILE, net, metadata={"model": config.model.name}),
        "config": folder / CONFIG_FILE,
        "classes": folder / CLASSES_FILE,
        "net": folder / "net.json",
        "normalization": folder / "normalization.safetensors",
    }
    files["config"].write_text(json.dumps(to_dict(config), indent=2))
    classes = {"classes": list(manifest.classes), "class_names": list(manifest.class_names)}
    files["classes"].write_text(json.dumps(classes))
    spec = {"name": config.model.name, "options": model_options(config), **classes}
    files["net"].write_text(json.dumps(spec))
    stats = {"mean": mean} if std is None else {"mean": mean, "std": std}
    save_weights(files["normalization"], stats)
    return files


def _log_files(uri: str, run_id: str, files: dict[str, Path]) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    for key in ("weights", "config", "classes"):
        client.log_artifact(run_id, str(files[key]), artifact_path=FINAL_ARTIFACTS)


def _log_served_model(
    uri: str, run_id: str, config: JobConfig, files: dict[str, Path], served: nn.Module
) -> str:
    import mlflow
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    size = config.data.eval_crop
    example = np.zeros((1, size, size, 3), dtype=np.uint8)
    with torch.no_grad():
        expected = served(torch.from_numpy(example)).numpy()
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, size, size, 3))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, expected.shape[1]))]),
    )
    mlflow.set_tracking_uri(uri)
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(SERVED_MODEL_CODE),
            artifacts={key: str(files[key]) for key in ("weights", "net", "normalization")},
            code_paths=[str(RESNET_CORE)],
            # auto: CUDA when available; load_model may set it. MLflow copies this into the
            # run's params, where "device: auto" reads as what it is.
            model_config={"device": "auto"},
            signature=signature,
            input_example=example,
            registered_model_name=config.run.registered_model or f"resnet-ray-{config.model.name}",
            # The model's own requirements: MLflow would otherwise infer them by re-loading the
            # model in a subprocess, about a minute on two cores.
            pip_requirements=_requirements(),
        )
    check_served_model(info.model_uri, example, expected)
    return info.model_uri


def _requirements() -> list[str]:
    import mlflow
    import safetensors

    return [
        *mlflow.pytorch.get_default_pip_requirements(),
        f"mlflow=={mlflow.__version__}",
        f"safetensors=={safetensors.__version__}",
        f"numpy=={np.__version__}",
    ]


def check_served_model(model_uri: str, example: np.ndarray, expected: np.ndarray) -> None:
    """Load the logged model on the CPU (and on CUDA when present) and compare its logits with
    the net's; RuntimeError when they differ."""
    import mlflow

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        model = mlflow.pyfunc.load_model(model_uri, model_config={"device": device})
        got = model.predict(example)
        tolerance = SERVED_TOLERANCE[device]
        if got.shape != expected.shape or not np.allclose(got, expected, tolerance, tolerance):
            raise RuntimeError(
                f"the logged model {model_uri} loaded on {device} does not reproduce the net's "
                f"logits (max difference {np.abs(got - expected).max():.3g})"
            )
