"""resnet-eval: score a trained ResNet on a prepared split with the paper's test protocols
(He et al., CVPR 2016, §3.4): single centre crop, 10-crop, fully-convolutional multi-scale.

Run from a checkout:

    resnet-eval runs:/<run id>                                  # a finished resnet-train run
    resnet-eval models:/resnet-ray-resnet50/latest --data s3://bucket/imagenet --workers 8 --gpu
    resnet-eval results/demo-resnet8 --modes center,tencrop,multiscale   # a run's latest checkpoint
    resnet-eval results/demo-resnet8/checkpoint-000000390-ab12cd34 --split val --scales 32,40,48

What can be evaluated (``pipelines.job.inference``): a checkpoint directory of resnet-train
(local or ``s3://``), a run folder holding ``checkpoint-*`` directories (the newest is used), a
``final/`` folder, ``runs:/<run id>`` (that run's ``final/`` artifacts) and
``models:/<name>/<version | latest>`` or ``models:/<name>@<alias>``. Nothing is unpickled.

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
import math
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from pipelines import data as data_lib
from pipelines import storage, tracking
from pipelines.config import ConfigError, JobConfig, check_experiment_name
from pipelines.job.checks import check_store
from pipelines.job.inference import (
    MODES,
    EvalInputError,
    ModelSpec,
    Protocol,
    TrainedModel,
    build_model,
    default_scales,
    load_trained_model,
    model_spec,
    score_images,
)
from pipelines.job.session import local_cpus, ray_session
from pipelines.manifest import Manifest, ManifestError, read_manifest
from pipelines.storage import StorageError
from resnet_core.checkpoint import CheckpointError
from resnet_core.metrics import TopKAccumulator

TOP_K = (1, 5)
EXIT_FAILED, EXIT_BAD_INPUT = 1, 2


class EvalError(RuntimeError):
    """The evaluation ran but its result cannot be trusted (e.g. an image scored twice)."""


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
    """A new MLflow run with the metrics, the per-class CSV and the split as its dataset input
    (context "evaluation"); returns its id."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    tracking.quiet_store_logs()
    client = MlflowClient(tracking_uri=tracking_uri)
    if trained.experiment_id is not None and experiment is None:
        experiment_id = trained.experiment_id
        tracking.mark_model_training(client, experiment_id)
    else:
        name = experiment or trained.config.run.experiment
        experiment_id = tracking.ensure_experiment(client, name, tracking_uri)
    tags = {
        **tracking.environment_tags(),
        **tracking.description_tags(),
        "model": trained.config.model.name,
        "dataset.checksum": manifest.checksum,
        "dataset.uri": storage.redact(manifest.root),
    }
    if trained.run_id:
        tags[tracking.EVALUATES_TAG] = trained.run_id
    run_name = f"eval-{trained.config.run_name}-{split}"
    run = client.create_run(experiment_id, run_name=run_name, tags=tags)
    run_id = run.info.run_id
    try:
        if trained.run_id:
            params = {**params, "eval.trained_run": f"runs:/{trained.run_id}"}
        tracking.log_params_once(client, run_id, params)
        tracking.log_datasets(client, run_id, manifest, {tracking.EVALUATION: split})
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
    if args.experiment is not None:
        check_experiment_name(args.experiment, "--experiment")


def resolve_protocol(args: argparse.Namespace, config: JobConfig) -> Protocol:
    d = config.data
    eval_resize = args.eval_resize or d.eval_resize
    if eval_resize < d.eval_crop:
        raise EvalInputError(
            f"--eval-resize {eval_resize} is below the evaluation crop {d.eval_crop}; use at "
            f"least {d.eval_crop}"
        )
    scales = parse_scales(args.scales) if args.scales else None
    return Protocol(
        image_size=d.eval_crop,
        eval_resize=eval_resize,
        scales=scales or default_scales(config.model.name, d.image_size),
    )


def _fail(message: object, status: int) -> int:
    print(f"resnet-eval: {storage.redact(str(message))}", file=sys.stderr, flush=True)
    return status


@dataclass(frozen=True)
class Evaluation:
    """One resnet-eval run, resolved and checked before Ray starts."""

    trained: TrainedModel
    spec: ModelSpec
    manifest: Manifest
    data_uri: str
    split: str
    rows: int
    modes: tuple[str, ...]
    protocol: Protocol
    workers: int

    def describe(self) -> str:
        p = self.protocol
        scales = f", scales {','.join(map(str, p.scales))}" if "multiscale" in self.modes else ""
        return (
            f"evaluating {self.spec.name} from {self.trained.origin} on split {self.split!r} of "
            f"{storage.redact(self.data_uri)} ({self.rows} images): modes "
            f"{', '.join(self.modes)}; crop {p.image_size}, eval_resize {p.eval_resize}{scales}; "
            f"{self.workers} worker(s)"
        )


def resolve_evaluation(args: argparse.Namespace, tracking_uri: str) -> Evaluation:
    """The model, dataset and protocol of the command line; EvalInputError (or ConfigError,
    CheckpointError, ManifestError, StorageError) when they do not fit."""
    modes = parse_modes(args.modes)
    check_numbers(args)
    check_store()  # the run is logged there at the end; a models:/ or runs:/ model is read now
    trained = load_trained_model(args.model, tracking_uri)
    protocol = resolve_protocol(args, trained.config)
    data_uri = storage.absolute_uri(args.data or trained.config.data.uri)
    manifest = read_manifest(data_uri)
    rows = manifest.num_rows(args.split)
    if rows == 0:
        raise EvalInputError(f"split {args.split!r} of {storage.redact(data_uri)} has no images")
    spec = model_spec(trained, manifest)
    workers = min(args.workers, rows)
    return Evaluation(trained, spec, manifest, data_uri, args.split, rows, modes, protocol, workers)


def score_split(job: Evaluation, args: argparse.Namespace) -> list[WorkerResult]:
    """Every image of the split scored exactly once by the workers (Ray must be up);
    EvalError when the shards and the manifest disagree."""
    results = run_workers(
        job.spec,
        job.manifest,
        job.split,
        workers=job.workers,
        cpus_per_worker=args.cpus_per_worker,
        use_gpu=args.gpu,
        modes=job.modes,
        protocol=job.protocol,
        batch_size=args.batch_size,
    )
    split_keys = data_lib.read_split_keys(job.manifest, job.split)
    if len(split_keys) != job.rows:
        raise EvalError(
            f"the shards of split {job.split!r} hold {len(split_keys)} rows, the manifest "
            f"says {job.rows}; re-run resnet-prepare"
        )
    check_exactly_once(results, split_keys)
    return results


def record(
    job: Evaluation, args: argparse.Namespace, results: Sequence[WorkerResult], uri: str
) -> str:
    """Print the table (and any undecodable images); log the MLflow run; returns its id."""
    mode_results = summarize(results, job.modes)
    bad = [key for r in results for key in r.bad_keys]
    print(format_table(mode_results), flush=True)
    if bad:
        error = next(r.first_error for r in results if r.first_error)
        print(
            f"resnet-eval: warning: {len(bad)} of {job.rows} images could not be decoded and "
            f"were not scored (e.g. {bad[0]!r}: {error})",
            file=sys.stderr,
            flush=True,
        )
    class_counts = merge_accuracy([r.accuracy[job.modes[0]] for r in results]).class_count
    p = job.protocol
    params = {
        "model.name": job.spec.name,
        "model.shortcut": job.trained.config.model.shortcut,
        "eval.source": job.trained.origin,
        "eval.data": storage.redact(job.data_uri),
        "eval.split": job.split,
        "eval.modes": ",".join(job.modes),
        "eval.image_size": p.image_size,
        "eval.eval_resize": p.eval_resize,
        "eval.scales": ",".join(map(str, p.scales)),
        "eval.workers": job.workers,
        "eval.batch_size": args.batch_size,
    }
    return log_evaluation(
        tracking_uri=uri,
        trained=job.trained,
        experiment=args.experiment,
        manifest=job.manifest,
        split=job.split,
        params=params,
        results=mode_results,
        bad_images=len(bad),
        csv_text=per_class_csv(mode_results, job.manifest, class_counts),
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run resnet-eval; returns the exit status (see the module docstring)."""
    import ray

    args = build_parser().parse_args(argv)
    uri = tracking.tracking_uri()
    try:
        job = resolve_evaluation(args, uri)
    except (EvalInputError, ConfigError, CheckpointError, ManifestError, StorageError) as e:
        return _fail(e, EXIT_BAD_INPUT)
    print(job.describe(), flush=True)
    try:
        with ray_session(
            args.address,
            num_cpus=local_cpus(job.workers * args.cpus_per_worker),
            gpus_needed=1 if args.gpu else 0,
            gpus_for="--gpu",
        ):
            results = score_split(job, args)
    except ConfigError as e:
        return _fail(e, EXIT_BAD_INPUT)
    except EvalError as e:
        return _fail(e, EXIT_FAILED)
    except ray.exceptions.RayError as e:  # a worker raised or died
        shard_error = data_lib.unreadable_shard(e)
        if shard_error is not None:  # the dataset changed since the checks: say which shard
            return _fail(shard_error, EXIT_FAILED)
        cause = getattr(e, "cause", None) or e
        first_line = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
        return _fail(f"a worker failed: {type(cause).__name__}: {first_line}", EXIT_FAILED)
    run_id = record(job, args, results, uri)
    print(f"MLflow run: {run_id}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
