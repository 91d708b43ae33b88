"""The trained model as ONNX: exported from the served PyTorch model (uint8 NHWC images in, input
normalisation inside, logits out; any batch size, the crop size fixed) and checked against it
with onnxruntime; :class:`OnnxModel` runs the file where a PyTorch model would be called.

torch.onnx's ``torch.export``-based exporter (``dynamo=True``, PyTorch's default since 2.9; it
needs onnxscript); the opset is recorded with the run (``OPSET``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

OPSET = 18
INPUT, OUTPUT = "images", "logits"
# fp32 on the CPU: onnxruntime's kernels sum in another order than PyTorch's.
TOLERANCE = 1e-4


def export_onnx(model: nn.Module, example: np.ndarray, path: str | Path) -> float:
    """Write ``model`` (eval mode, takes ``example``'s uint8 (N, S, S, 3) layout) to ``path`` and
    return the largest logit difference onnxruntime shows on ``example``; ValueError when it is
    above :data:`TOLERANCE` (relative to the logits' scale)."""
    path = Path(path)
    x = torch.from_numpy(example)
    with torch.no_grad():
        expected = model(x).numpy()
        torch.onnx.export(
            model,
            (x,),
            str(path),
            dynamo=True,
            opset_version=OPSET,
            input_names=[INPUT],
            output_names=[OUTPUT],
            dynamic_shapes=({0: torch.export.Dim("batch")},),
            external_data=False,  # one self-contained file (ResNet-152: 240 MB, under 2 GB)
            verbose=False,
        )
    got = OnnxModel(path)(x).numpy()
    difference = float(np.abs(got - expected).max())
    if got.shape != expected.shape or difference > TOLERANCE * max(1.0, np.abs(expected).max()):
        raise ValueError(
            f"onnxruntime's logits of {path.name} differ from PyTorch's by {difference:.3g} "
            f"(tolerance {TOLERANCE} x the logits' scale)"
        )
    return difference


class OnnxModel(nn.Module):
    """An exported model run by onnxruntime on the CPU, called like the PyTorch model:
    uint8 (N, S, S, 3) or (N, 3, S, S) tensor in, float32 logits tensor out."""

    def __init__(self, path: str | Path) -> None:
        super().__init__()
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3  # errors only: no per-session warnings on the console
        self.session = onnxruntime.InferenceSession(
            str(path), options, providers=["CPUExecutionProvider"]
        )
        self.eval()  # the export is an inference graph (BatchNorm with running statistics)

    def forward(self, images: Tensor) -> Tensor:
        if images.shape[1] == 3 and images.shape[-1] != 3:  # NCHW, as Normalize also takes
            images = images.permute(0, 2, 3, 1)
        array = np.ascontiguousarray(images.cpu().numpy(), dtype=np.uint8)
        (logits,) = self.session.run([OUTPUT], {INPUT: array})
        return torch.from_numpy(logits)
