"""The MLflow model resnet-train logs and registers: uint8 images in, class logits out.

MLflow stores this file as the model's code ("models from code": nothing is pickled) beside the
artifacts :func:`pipelines.job.final_model.log_final_model` writes — the net's safetensors
weights, its input normalisation and ``net.json`` (model name, options, classes) — with
``resnet_core`` in the model's code paths. It loads on any device::

    model = mlflow.pyfunc.load_model("models:/resnet-ray-resnet50/1")          # CUDA if present
    model = mlflow.pyfunc.load_model(uri, model_config={"device": "cpu"})
    logits = model.predict(images)   # uint8 (N, H, W, 3) RGB at the training crop size

The input normalisation (mean, optional std) is part of the model, so a client sends decoded
pixels as they are (resize and centre-crop like ``resnet-predict``).
"""

import json
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch
from torch import nn

from resnet_core.checkpoint import load_weights
from resnet_core.models import create_model
from resnet_core.transforms import Normalize


def build_served_net(artifacts: dict[str, str]) -> nn.Module:
    """``Normalize -> net`` in eval mode on the CPU, from the model's artifact files."""
    spec = json.loads(Path(artifacts["net"]).read_text())
    net = create_model(spec["name"], num_classes=len(spec["classes"]), **spec["options"])
    net.load_state_dict(load_weights(artifacts["weights"]))
    stats = load_weights(artifacts["normalization"])
    return nn.Sequential(Normalize(stats["mean"], stats.get("std")), net).eval()


class ResNetClassifier(mlflow.pyfunc.PythonModel):
    """The served net; ``model_config={"device": ...}`` picks the device (default ``auto``: CUDA
    when available, else the CPU)."""

    def load_context(self, context: Any) -> None:
        device = (context.model_config or {}).get("device") or "auto"
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.net = build_served_net(context.artifacts).to(self.device)

    # An ndarray hint: MLflow reads the hint, and takes this one as "no schema to infer".
    def predict(self, context: Any, model_input: np.ndarray, params: Any = None) -> np.ndarray:
        images = torch.as_tensor(np.asarray(model_input, dtype=np.uint8)).to(self.device)
        with torch.inference_mode():
            return self.net(images).float().cpu().numpy()


mlflow.models.set_model(ResNetClassifier())
