"""resnet-report: our numbers beside the paper's (He et al., CVPR 2016), from recorded MLflow runs.

Run from a checkout:

    resnet-report --experiment resnet-ray --out report/       # every run of an experiment
    resnet-report --parent <sweep run id> --out report/       # a resnet-tune sweep's trials
    resnet-report --runs <id>,<id>,<id> --out report/         # hand-picked runs

Writes ``report.md`` and PNG figures to ``--out``:

* Table 6 (CIFAR-10 test error by depth): for each CIFAR net among the runs and each net of the
  paper's table, the paper's error beside ours. Ours is the best ``eval/center/top1_err`` of the
  resnet-eval runs of that net when there are any (CIFAR-10 is tested on the 32x32 image, §4.2),
  else the best ``val/error`` any training run of it reached. Plotted as
  ``cifar_error_by_depth.png``.
* Tables 2-3 (ImageNet, 10-crop testing) and Table 4 (multi-scale): from resnet-eval runs'
  ``eval/tencrop/*`` and ``eval/multiscale/*`` metrics, matched on the net and its shortcut
  option (§3.3; a run without one uses the family default: A for CIFAR, B for ImageNet ResNets).
* ``degradation_cifar.png`` / ``degradation_imagenet.png`` (paper Figs. 1, 4 and 6): training
  (thin) and validation (bold) error against the epoch of the plain and residual nets recorded,
  one colour per depth; the best run (lowest validation error) of each net is drawn.

A value that no run provides is shown as "—". Paper values come from ``resnet_core.paper`` only.
The files are logged to MLflow under ``report/``: on the parent run with ``--parent``, else on a
new run tagged ``resnet_ray.report`` in the runs' experiment. Exit status: 0 written, 2 bad input
(no such experiment or run, no runs; one line on stderr).
"""

from __future__ import annotations

import argparse
import math
import re
import shutil
import sys
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines import storage, tracking
from resnet_core.models import is_cifar_model
from resnet_core.paper import PAPER, PaperValue

REPORT_TAG = "resnet_ray.report"
MISSING = "—"
EXIT_BAD_INPUT = 2
# Paper metric -> the resnet-eval metric that measures the same thing on our runs.
EVAL_METRICS = {
    "top1_err_10crop": "eval/tencrop/top1_err",
    "top5_err_10crop": "eval/tencrop/top5_err",
    "top1_err_multiscale": "eval/multiscale/top1_err",
    "top5_err_multiscale": "eval/multiscale/top5_err",
}
CIFAR_EVAL_METRIC = "eval/center/top1_err"


class ReportInputError(ValueError):
    """Bad input to resnet-report; one line naming the value and the fix."""


# ---------------------------------------------------------------------------------------------
# Runs
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunInfo:
    """What the report needs of one MLflow run. model / shortcut: params ``model.name`` and
    ``model.shortcut`` (the family default when unset). metrics: the latest value of each."""

    run_id: str
    experiment_id: str
    model: str
    shortcut: str | None
    is_eval: bool
    metrics: dict[str, float]


def family_shortcut(model: str, shortcut: str | None) -> str | None:
    """The shortcut option a net was built with: None for plain nets; else the option given or
    the family default (§3.3/§4.2: A for the CIFAR nets, B for ImageNet ResNets)."""
    if model.startswith("plain"):
        return None
    if shortcut not in (None, "", "None"):
        return shortcut
    return "A" if is_cifar_model(model) else "B"


def run_info(run: Any) -> RunInfo | None:
    """None for runs that are not about one ResNet (reports, sweep parents)."""
    model = run.data.params.get("model.name")
    if not model or REPORT_TAG in run.data.tags:
        return None
    try:
        shortcut = family_shortcut(model, run.data.params.get("model.shortcut"))
    except ValueError:  # not a model name resnet_core knows
        return None
    metrics = dict(run.data.metrics)
    return RunInfo(
        run_id=run.info.run_id,
        experiment_id=run.info.experiment_id,
        model=model,
        shortcut=shortcut,
        is_eval=tracking.EVALUATES_TAG in run.data.tags
        or any(k.startswith("eval/") for k in metrics),
        metrics=metrics,
    )


def _search_all(client: Any, experiment_id: str, filter_string: str = "") -> list[Any]:
    runs, token = [], None
    while True:
        page = client.search_runs(
            [experiment_id], filter_string=filter_string, max_results=1000, page_token=token
        )
        runs += list(page)
        token = page.token
        if not token:
            return runs


def collect_runs(
    client: Any, *, experiment: str | None, parent: str | None, run_ids: Sequence[str]
) -> tuple[list[Any], str]:
    """The selected MLflow runs and the experiment id the report belongs to.

    With ``parent``: its child runs, plus the resnet-eval runs of those children.
    """
    from mlflow.exceptions import MlflowException

    if experiment is not None:
        found = client.get_experiment_by_name(experiment)
        if found is None:
            raise ReportInputError(f"there is no MLflow experiment {experiment!r} in this store")
        return _search_all(client, found.experiment_id), found.experiment_id
    if parent is not None:
        try:
            parent_run = client.get_run(parent)
        except MlflowException:
            raise ReportInputError(f"there is no MLflow run {parent!r} in this store") from None
        experiment_id = parent_run.info.experiment_id
        everything = _search_all(client, experiment_id)
        children = [r for r in everything if r.data.tags.get("mlflow.parentRunId") == parent]
        child_ids = {r.info.run_id for r in children}
        evals = [r for r in everything if r.data.tags.get(tracking.EVALUATES_TAG) in child_ids]
        return children + evals, experiment_id
    runs = []
    for run_id in run_ids:
        try:
            runs.append(client.get_run(run_id))
        except MlflowException:
            raise ReportInputError(f"there is no MLflow run {run_id!r} in this store") from None
    return runs, runs[0].info.experiment_id


def epoch_series(client: Any, run_id: str, key: str) -> list[tuple[float, float]]:
    """``(epoch, value)`` points of a metric logged at epoch ends. resnet-train logs metrics at
    the optimizer step and the 1-based ``epoch`` at the same step; runs without an ``epoch``
    history use the step itself as the epoch."""
    epochs = {m.step: m.value for m in client.get_metric_history(run_id, "epoch")}
    points = []
    for m in client.get_metric_history(run_id, key):
        if not epochs:
            points.append((float(m.step), m.value))
        elif m.step in epochs:
            points.append((epochs[m.step], m.value))
    return sorted(points)


def best_val_error(client: Any, run: RunInfo) -> float:
    """The lowest validation error the training run reached (nan without one)."""
    values = [m.value for m in client.get_metric_history(run.run_id, "val/error")]
    values = [v for v in values if math.isfinite(v)]
    return min(values) if values else math.nan


# ---------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ours:
    """Our value (fraction) for one table cell and where it comes from."""

    value: float
    run_id: str
    source: str

    @property
    def percent(self) -> str:
        return f"{100 * self.value:.2f}"


def _best(candidates: Iterable[Ours]) -> Ours | None:
    finite = [c for c in candidates if math.isfinite(c.value)]
    return min(finite, key=lambda c: c.value) if finite else None


def paper_value(table: int, model: str, metric: str, shortcut: str | None) -> PaperValue | None:
    for row in PAPER:
        if (row.table, row.model, row.metric, row.shortcut) == (table, model, metric, shortcut):
            return row
    return None


def _paper_cell(row: PaperValue | None) -> str:
    """Errors with the paper's two decimals (7.40), other values as printed there (1.7)."""
    if row is None:
        return MISSING
    return f"{row.value:.2f}" if "err" in row.metric else f"{row.value:g}"


def _source_cell(ours: Ours | None) -> str:
    return "not run" if ours is None else f"{ours.source}, run `{ours.run_id[:8]}`"


def _depth(model: str) -> int:
    return int(re.sub(r"\D", "", model) or 0)


def _by_depth(model: str) -> tuple[int, str]:
    return (_depth(model), model)


def _markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def cifar_ours(client: Any, runs: Sequence[RunInfo]) -> dict[str, Ours]:
    """Per CIFAR net: the best resnet-eval centre error, else the best validation error."""
    out = {}
    for model in {r.model for r in runs if is_cifar_model(r.model)}:
        of_model = [r for r in runs if r.model == model]
        evals = [
            Ours(r.metrics[CIFAR_EVAL_METRIC], r.run_id, "eval center")
            for r in of_model
            if r.is_eval and CIFAR_EVAL_METRIC in r.metrics
        ]
        trained = [
            Ours(best_val_error(client, r), r.run_id, "best val") for r in of_model if not r.is_eval
        ]
        best = _best(evals) or _best(trained)
        if best is not None:
            out[model] = best
    return out


def table6(ours: dict[str, Ours]) -> tuple[str, list[tuple[str, float | None, Ours | None]]]:
    """Markdown of Table 6 and its rows (model, paper test error %, ours) for the plot."""
    paper_models = [r.model for r in PAPER if r.table == 6 and r.metric == "test_error"]
    models = sorted(set(paper_models) | set(ours), key=lambda m: (m.startswith("plain"), _depth(m)))
    rows, plotted = [], []
    for model in models:
        error = paper_value(6, model, "test_error", "A")
        params = paper_value(6, model, "params_m", "A")
        notes = [error.note] if error is not None and error.note else []
        notes += [
            f"{r.metric} {r.value:g}" + (f" ({r.note})" if r.note else "")
            for r in PAPER
            if r.table == 6 and r.model == model and r.metric not in ("test_error", "params_m")
        ]
        mine = ours.get(model)
        rows.append(
            [
                model,
                _paper_cell(params),
                _paper_cell(error),
                MISSING if mine is None else mine.percent,
                _source_cell(mine),
                "; ".join(notes),
            ]
        )
        plotted.append((model, None if error is None else error.value, mine))
    header = [
        "model",
        "params (M), paper",
        "test error (%), paper",
        "error (%), ours",
        "ours from",
        "paper note",
    ]
    return _markdown_table(header, rows), plotted


def imagenet_ours(runs: Sequence[RunInfo]) -> dict[tuple[str, str | None, str], Ours]:
    """(model, shortcut, paper metric) -> our best resnet-eval value of that metric."""
    out: dict[tuple[str, str | None, str], Ours] = {}
    for paper_metric, eval_metric in EVAL_METRICS.items():
        mode = eval_metric.split("/")[1]
        for r in runs:
            if not r.is_eval or eval_metric not in r.metrics or is_cifar_model(r.model):
                continue
            key = (r.model, r.shortcut, paper_metric)
            candidate = Ours(r.metrics[eval_metric], r.run_id, f"eval {mode}")
            out[key] = _best([c for c in (out.get(key), candidate) if c is not None])
    return out


def imagenet_table(table: int, metrics: Sequence[str], ours: dict) -> str:
    """Markdown of paper table ``table`` (2, 3 or 4): one row per (model, shortcut) it lists."""
    keys = list(
        dict.fromkeys(
            (r.model, r.shortcut) for r in PAPER if r.table == table and r.metric in metrics
        )
    )
    rows = []
    for model, shortcut in keys:
        row = [model, shortcut or "none (plain)"]
        sources = []
        for metric in metrics:
            mine = ours.get((model, shortcut, metric))
            row += [
                _paper_cell(paper_value(table, model, metric, shortcut)),
                MISSING if mine is None else mine.percent,
            ]
            if mine is not None:
                sources.append(_source_cell(mine))
        row.append("; ".join(dict.fromkeys(sources)) or "not run")
        rows.append(row)
    header = ["model", "shortcut"]
    for metric in metrics:
        label = metric.replace("_err_", " error (%), ").replace("10crop", "10-crop")
        label = label.replace("top1", "top-1").replace("top5", "top-5")
        header += [f"{label}, paper", f"{label.split(',')[0]}, ours"]
    header.append("ours from")
    return _markdown_table(header, rows)


# ---------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------


def degradation_curves(
    client: Any, runs: Sequence[RunInfo], cifar: bool
) -> dict[str, tuple[str, dict[str, list[tuple[float, float]]]]]:
    """model -> (run id, {"train/error": points, "val/error": points}) for the plain and residual
    nets of one family, each from its run with the lowest validation error."""
    curves = {}
    models = {r.model for r in runs if not r.is_eval and is_cifar_model(r.model) == cifar}
    for model in models:
        candidates = [(best_val_error(client, r), r) for r in runs if r.model == model]
        candidates = [(e, r) for e, r in candidates if not r.is_eval and math.isfinite(e)]
        if not candidates:
            continue
        best = min(candidates, key=lambda c: c[0])[1]
        series = {
            key: epoch_series(client, best.run_id, key) for key in ("train/error", "val/error")
        }
        if any(series.values()):
            curves[model] = (best.run_id, series)
    return curves


def plot_degradation(
    curves: dict[str, tuple[str, dict[str, list[tuple[float, float]]]]], title: str, path: Path
) -> None:
    """Plain nets left, ResNets right; thin: training error, bold: validation error (the paper's
    Fig. 4/6 style), one colour per depth shared by both panels."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    depths = sorted({_depth(m) for m in curves})
    colours = {d: f"C{i % 10}" for i, d in enumerate(depths)}
    figure = Figure(figsize=(11, 4.4), layout="constrained")
    plain_axes, residual_axes = figure.subplots(1, 2, sharey=True)
    for model in sorted(curves, key=_by_depth):
        axes = plain_axes if model.startswith("plain") else residual_axes
        colour = colours[_depth(model)]
        series = curves[model][1]
        for key, width, style in (("train/error", 0.9, "--"), ("val/error", 2.2, "-")):
            points = series.get(key) or []
            if points:
                epochs, errors = zip(*points, strict=True)
                kind = "train" if key == "train/error" else "val"
                axes.plot(
                    epochs,
                    [100 * e for e in errors],
                    style,
                    color=colour,
                    linewidth=width,
                    label=f"{model} {kind}",
                )
    for axes, name in ((plain_axes, "plain"), (residual_axes, "ResNet")):
        axes.set_title(name)
        axes.set_xlabel("epoch")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.grid(True, alpha=0.3)
        if axes.lines:
            axes.legend(fontsize="small")
    plain_axes.set_ylabel("error (%)")
    figure.suptitle(title)
    figure.savefig(path, dpi=120)


def plot_cifar_by_depth(rows: Sequence[tuple[str, float | None, Ours | None]], path: Path) -> None:
    """Table 6 as a plot: test error against depth, paper's ResNets and our nets."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.4, 4.4), layout="constrained")
    axes = figure.add_subplot()
    paper = sorted((_depth(m), v) for m, v, _ in rows if v is not None)
    if paper:
        axes.plot(*zip(*paper, strict=True), "k-o", label="paper ResNet (Table 6)")
    for prefix, marker in (("resnet", "s"), ("plain", "^")):
        points = sorted(
            (_depth(m), 100 * o.value) for m, _, o in rows if o is not None and m.startswith(prefix)
        )
        if points:
            axes.plot(*zip(*points, strict=True), marker, linestyle=":", label=f"ours, {prefix}")
    axes.set_xscale("log")
    depths = sorted({_depth(m) for m, _, _ in rows})
    axes.set_xticks(depths, [str(d) for d in depths], minor=False)
    axes.set_xticks([], minor=True)
    axes.set_xlabel("depth (layers)")
    axes.set_ylabel("CIFAR-10 test error (%)")
    axes.set_title("CIFAR-10 error by depth")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend()
    figure.savefig(path, dpi=120)


# ---------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------


def write_report(client: Any, runs: Sequence[RunInfo], out: Path, selection: str) -> list[Path]:
    """report.md and the figures in ``out``; returns the files written."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    table6_md, table6_rows = table6(cifar_ours(client, runs))
    imagenet = imagenet_ours(runs)
    sections = [
        "# Our ResNets beside the paper (He et al., CVPR 2016)",
        f"Runs: {selection} ({len(runs)} runs: {sum(not r.is_eval for r in runs)} training, "
        f"{sum(r.is_eval for r in runs)} evaluation). Errors in %; ours is the best run of each "
        f"net; {MISSING} = not run.",
        "## CIFAR-10, Table 6",
        "Ours: resnet-eval centre error when evaluated, else the best validation error.",
        table6_md,
        "![CIFAR-10 error by depth](cifar_error_by_depth.png)",
        "## ImageNet, Table 2: plain vs ResNet, top-1 error, 10-crop testing",
        imagenet_table(2, ["top1_err_10crop"], imagenet),
        "## ImageNet, Table 3: 10-crop testing",
        imagenet_table(3, ["top1_err_10crop", "top5_err_10crop"], imagenet),
        "## ImageNet, Table 4: single model, multi-scale testing",
        imagenet_table(4, ["top1_err_multiscale", "top5_err_multiscale"], imagenet),
    ]
    plot_cifar_by_depth(table6_rows, out / "cifar_error_by_depth.png")
    written.append(out / "cifar_error_by_depth.png")
    sections.append("## Degradation: plain vs residual nets (paper Figs. 1, 4, 6)")
    for cifar, family, figure in ((True, "CIFAR-10", "Fig. 6"), (False, "ImageNet", "Fig. 4")):
        curves = degradation_curves(client, runs, cifar)
        if not curves:
            sections.append(f"{family}: {MISSING} (no plain or residual training runs recorded)")
            continue
        name = f"degradation_{'cifar' if cifar else 'imagenet'}.png"
        plot_degradation(
            curves,
            f"{family}: thin dashed = training error, bold = validation error (paper {figure})",
            out / name,
        )
        written.append(out / name)
        listed = ", ".join(f"{m} (run `{curves[m][0][:8]}`)" for m in sorted(curves, key=_by_depth))
        sections += [f"{family}: {listed}", f"![{family} degradation]({name})"]
    (out / "report.md").write_text("\n\n".join(sections) + "\n")
    return [out / "report.md", *written]


def log_report(
    client: Any, files: Sequence[Path], experiment_id: str, parent: str | None, selection: str
) -> str:
    """The report's files (only these, not whatever else --out holds) as MLflow artifacts under
    ``report/``: on ``parent``, else on a new report run. Returns the run that holds them."""
    with tempfile.TemporaryDirectory(prefix="resnet-report-") as tmp:
        for path in files:
            shutil.copy(path, tmp)
        if parent is not None:
            client.log_artifacts(parent, tmp, artifact_path="report")
            return parent
        run = client.create_run(
            experiment_id, run_name="report", tags={REPORT_TAG: "true", "report.runs": selection}
        )
        try:
            client.log_artifacts(run.info.run_id, tmp, artifact_path="report")
        except BaseException:
            client.set_terminated(run.info.run_id, "FAILED")
            raise
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="resnet-report",
        description="Markdown + PNG report of MLflow runs beside the paper's Tables 2-4, 6 and "
        "Figs. 1, 4, 6; logged back to MLflow. Exit status: 0 written, 2 bad input.",
        epilog="MLflow store: MLFLOW_TRACKING_URI, else mlflow.db in the current directory.",
    )
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--experiment", help="every run of this MLflow experiment")
    which.add_argument("--parent", help="the child runs of this run (a resnet-tune sweep)")
    which.add_argument("--runs", help="comma-separated run ids")
    parser.add_argument("--out", default="report", help="output folder (default: report)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Write and log the report; returns the exit status."""
    args = build_parser().parse_args(argv)
    from mlflow.tracking import MlflowClient

    uri = tracking.tracking_uri()
    tracking.quiet_store_logs()
    client = MlflowClient(tracking_uri=uri)
    run_ids = [r.strip() for r in (args.runs or "").split(",") if r.strip()]
    selection = (
        f"experiment {args.experiment}"
        if args.experiment
        else f"children of run {args.parent}"
        if args.parent
        else f"runs {', '.join(run_ids)}"
    )
    try:
        if args.runs is not None and not run_ids:
            raise ReportInputError(f"--runs {args.runs!r} names no run id")
        found, experiment_id = collect_runs(
            client, experiment=args.experiment, parent=args.parent, run_ids=run_ids
        )
        runs = [info for run in found if (info := run_info(run)) is not None]
        if not runs:
            raise ReportInputError(
                f"{selection} holds no runs with a model.name param (resnet-train, resnet-tune "
                "or resnet-eval runs)"
            )
    except ReportInputError as e:
        print(f"resnet-report: {storage.redact(str(e))}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT
    files = write_report(client, runs, Path(args.out), selection)
    run_id = log_report(client, files, experiment_id, args.parent, selection)
    print(f"wrote {', '.join(str(f) for f in files)}")
    print(f"logged to MLflow run {run_id} (artifacts report/)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
