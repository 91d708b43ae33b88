"""resnet-predict: the top-5 classes of image files under a trained ResNet.

Run from a checkout:

    resnet-predict --model runs:/<run id> cat.jpg dog.png
    resnet-predict --model models:/resnet-ray-resnet50/latest --mode tencrop photo.jpg
    resnet-predict --model results/demo-resnet8 --data data/synthetic-cifar img.png
    resnet-predict --model runs:/<run id> --onnx model.onnx cat.jpg   # under onnxruntime

``--model`` takes everything resnet-eval takes (checkpoint, run folder, final/ folder, runs:/,
models:/). The model's input normalisation (per-pixel or per-channel mean) and, for checkpoints,
the class names come from the dataset's manifest: the one the model was trained on, or
``--data``. Each image is scored as resnet-eval scores it (``--mode``, default ``center``: the
shorter side resized to eval_resize, the central training-size crop).

Prints, per image, its path and five lines ``probability  class name (class id)``. An image that
cannot be read or decoded gets one line on stderr and the others are still scored. Exit status:
0 every image scored, 1 some image could not be, 2 bad model or dataset (nothing scored).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from pipelines import storage
from pipelines.config import ConfigError
from pipelines.job.checks import check_store
from pipelines.job.inference import (
    MODES,
    EvalInputError,
    Protocol,
    build_model,
    default_scales,
    load_trained_model,
    model_spec,
    score_images,
)
from pipelines.manifest import ManifestError, read_manifest
from resnet_core.checkpoint import CheckpointError
from resnet_core.export import OnnxModel

TOP = 5
EXIT_UNREADABLE, EXIT_BAD_INPUT = 1, 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="resnet-predict",
        description="Print the top-5 classes and their probabilities for image files. Exit "
        "status: 0 all scored, 1 some image unreadable, 2 bad model or dataset.",
    )
    parser.add_argument(
        "--model",
        required=True,
        help="checkpoint directory, run folder, final/ folder, runs:/<run id> or "
        "models:/<name>/<version|latest>",
    )
    parser.add_argument(
        "--data",
        help="dataset whose manifest gives the normalisation and class names "
        "(default: the one the model was trained on)",
    )
    parser.add_argument(
        "--onnx",
        metavar="FILE",
        help="score with this ONNX export of the model (final/model.onnx of its run) under "
        "onnxruntime; --model still gives the classes and the evaluation sizes",
    )
    parser.add_argument("--mode", default="center", choices=MODES, help="test protocol")
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    return parser


def format_top(probabilities: torch.Tensor, classes: Sequence[str], names: Sequence[str]) -> str:
    """Lines ``  87.21%  tabby cat (n02123045)`` for the most probable classes, best first."""
    values, labels = probabilities.topk(min(TOP, probabilities.numel()))
    lines = []
    for value, label in zip(values.tolist(), labels.tolist(), strict=True):
        cls, name = classes[label], names[label]
        shown = name if name == cls else f"{name} ({cls})"
        lines.append(f"  {100 * value:6.2f}%  {shown}")
    return "\n".join(lines)


def _fail(message: object) -> None:
    print(f"resnet-predict: {storage.redact(str(message))}", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Score each image; returns the exit status (see the module docstring)."""
    args = build_parser().parse_args(argv)
    try:
        trained = load_trained_model(args.model, check_store())
        data_uri = storage.absolute_uri(args.data or trained.config.data.uri)
        manifest = read_manifest(data_uri)
        spec = model_spec(trained, manifest)
        if args.onnx and not Path(args.onnx).is_file():
            raise EvalInputError(f"--onnx {args.onnx}: no such file (final/model.onnx of a run)")
        if args.onnx and args.mode == "multiscale":
            raise EvalInputError(
                "the ONNX model takes crops of one size: use --mode center or tencrop"
            )
    except (EvalInputError, ConfigError, CheckpointError, ManifestError, storage.StorageError) as e:
        _fail(e)
        return EXIT_BAD_INPUT
    d = trained.config.data
    protocol = Protocol(d.eval_crop, d.eval_resize, default_scales(spec.name, d.image_size))
    classes = trained.classes or manifest.classes
    names = trained.class_names or manifest.class_names
    model = OnnxModel(args.onnx) if args.onnx else build_model(spec, trained.origin)
    device = torch.device("cpu")
    status = 0
    for path in args.images:
        try:
            data = Path(path).read_bytes()
        except OSError as e:
            _fail(f"{path}: cannot read the file ({e.strerror or e})")
            status = EXIT_UNREADABLE
            continue
        scores = score_images(model, [data], [args.mode], protocol, device)
        if scores.bad[0]:
            _fail(f"{path}: not a decodable image ({scores.first_error})")
            status = EXIT_UNREADABLE
            continue
        print(path)
        print(format_top(scores.probabilities[args.mode][0], classes, names), flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
