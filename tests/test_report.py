"""resnet-report (pipelines.report) on runs recorded in a real SQLite MLflow store, shaped like the
runs resnet-train, resnet-tune and resnet-eval log."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient
from PIL import Image

from pipelines import report, tracking
from resnet_core.paper import PAPER

EXPERIMENT = "report-test"
STEPS_PER_EPOCH = 10


@pytest.fixture(scope="module")
def client(tmp_path_factory) -> Iterator[MlflowClient]:
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MLFLOW_TRACKING_URI", uri)
        tracking.quiet_store_logs()
        yield MlflowClient(tracking_uri=uri)


def training_run(
    client: MlflowClient,
    experiment_id: str,
    model: str,
    train_error: list[float],
    val_error: list[float],
    parent: str | None = None,
) -> str:
    """A run as resnet-train logs it: params, and at each epoch end's optimizer step the 1-based
    ``epoch``, ``train/error`` and ``val/error``."""
    tags = {"mlflow.parentRunId": parent} if parent else {}
    run_id = client.create_run(experiment_id, run_name=f"run-{model}", tags=tags).info.run_id
    client.log_param(run_id, "model.name", model)
    client.log_param(run_id, "model.shortcut", "None")
    now = int(time.time() * 1000)
    metrics = []
    for epoch, (train, val) in enumerate(zip(train_error, val_error, strict=True), start=1):
        step = epoch * STEPS_PER_EPOCH
        metrics += [
            Metric("epoch", epoch, now, step),
            Metric("train/error", train, now, step),
            Metric("val/error", val, now, step),
        ]
    client.log_batch(run_id, metrics=metrics)
    client.set_terminated(run_id)
    return run_id


def eval_run(
    client: MlflowClient,
    experiment_id: str,
    model: str,
    shortcut: str,
    metrics: dict[str, float],
    evaluates: str = "",
) -> str:
    """A run as resnet-eval logs it."""
    tags = {tracking.EVALUATES_TAG: evaluates} if evaluates else {}
    run_id = client.create_run(experiment_id, run_name=f"eval-{model}", tags=tags).info.run_id
    client.log_param(run_id, "model.name", model)
    client.log_param(run_id, "model.shortcut", shortcut)
    for key, value in metrics.items():
        client.log_metric(run_id, key, value)
    client.set_terminated(run_id)
    return run_id


@pytest.fixture(scope="module")
def recorded(client) -> dict[str, str]:
    """CIFAR plain/residual nets at depths 20 and 56 (plain-56 worse than plain-20: the
    degradation problem), a second, worse resnet20 run, an eval run of the better resnet20, and
    ImageNet eval runs of resnet34 (option B) and plain34."""
    experiment_id = client.create_experiment(EXPERIMENT)
    runs = {
        "resnet20": training_run(
            client, experiment_id, "resnet20", [0.5, 0.2, 0.1, 0.05], [0.5, 0.25, 0.12, 0.11]
        ),
        "resnet20-worse": training_run(
            client, experiment_id, "resnet20", [0.6, 0.4, 0.3, 0.25], [0.6, 0.45, 0.35, 0.3]
        ),
        "plain20": training_run(
            client, experiment_id, "plain20", [0.6, 0.3, 0.15, 0.1], [0.6, 0.3, 0.2, 0.15]
        ),
        "resnet56": training_run(
            client, experiment_id, "resnet56", [0.5, 0.15, 0.05, 0.02], [0.5, 0.2, 0.0731, 0.08]
        ),
        "plain56": training_run(
            client, experiment_id, "plain56", [0.7, 0.45, 0.3, 0.2], [0.7, 0.5, 0.35, 0.25]
        ),
    }
    runs["eval-resnet20"] = eval_run(
        client,
        experiment_id,
        "resnet20",
        "None",
        {"eval/center/top1_err": 0.0912, "eval/center/top5_err": 0.003},
        evaluates=runs["resnet20"],
    )
    runs["eval-resnet34"] = eval_run(
        client,
        experiment_id,
        "resnet34",
        "B",
        {
            "eval/tencrop/top1_err": 0.2561,
            "eval/tencrop/top5_err": 0.081,
            "eval/multiscale/top1_err": 0.2301,
            "eval/multiscale/top5_err": 0.0655,
        },
    )
    runs["eval-plain34"] = eval_run(
        client, experiment_id, "plain34", "None", {"eval/tencrop/top1_err": 0.3012}
    )
    return runs


def table_rows(markdown: str, heading: str) -> dict[str, list[str]]:
    """The rows of the table under ``heading``, keyed by first cell (plus shortcut if present)."""
    section = markdown.split(heading, 1)[1].split("\n## ", 1)[0]
    rows = {}
    lines = [line for line in section.splitlines() if line.startswith("| ")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    for line in lines[1:]:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        key = cells[0] if header[1] != "shortcut" else f"{cells[0]}/{cells[1]}"
        rows[key] = cells
    return rows


def check_pngs(folder: Path, names: list[str]) -> None:
    for name in names:
        with Image.open(folder / name) as image:
            image.verify()
            assert image.format == "PNG"


def test_report_of_an_experiment_sets_ours_beside_the_paper(client, recorded, tmp_path):
    out = tmp_path / "report"
    assert report.main(["--experiment", EXPERIMENT, "--out", str(out)]) == 0
    check_pngs(out, ["cifar_error_by_depth.png", "degradation_cifar.png"])
    assert not (out / "degradation_imagenet.png").exists()  # no ImageNet training runs
    markdown = (out / "report.md").read_text()
    assert "ImageNet: — (no plain or residual training runs recorded)" in markdown

    # Table 6: the paper column is resnet_core.paper's, exactly; ours prefers the eval run.
    table6 = table_rows(markdown, "## CIFAR-10, Table 6")
    paper6 = [r for r in PAPER if r.table == 6 and r.metric == "test_error"]
    assert {r.model for r in paper6} <= set(table6)
    for row in paper6:
        assert float(table6[row.model][2]) == row.value
        params = next(
            p for p in PAPER if (p.table, p.model, p.metric) == (6, row.model, "params_m")
        )
        assert float(table6[row.model][1]) == params.value
    assert table6["resnet20"][3] == "9.12"  # eval center, not the best val (11.00)
    assert recorded["eval-resnet20"][:8] in table6["resnet20"][4]
    assert table6["resnet56"][3] == "7.31"  # best val over the history, not the last (8.00)
    assert table6["plain20"][2:4] == ["—", "15.00"]  # not in the paper's table
    assert table6["resnet110"][3] == "—"
    assert "test_error_mean 6.61" in table6["resnet110"][5]

    # Tables 2-4: matched on model and shortcut option; ours is a percentage of eval metrics.
    table2 = table_rows(markdown, "## ImageNet, Table 2")
    assert [float(table2["plain34/none (plain)"][2]), table2["plain34/none (plain)"][3]] == [
        28.54,
        "30.12",
    ]
    assert table2["resnet34/A"][3] == "—"  # our resnet34 used option B
    table3 = table_rows(markdown, "## ImageNet, Table 3")
    assert table3["resnet34/B"][2:6] == ["24.52", "25.61", "7.46", "8.10"]
    assert table3["resnet152/B"][3] == "—"
    table4 = table_rows(markdown, "## ImageNet, Table 4")
    assert table4["resnet34/B"][2:6] == ["21.84", "23.01", "5.71", "6.55"]

    (report_run,) = client.search_runs(
        [client.get_experiment_by_name(EXPERIMENT).experiment_id],
        filter_string=f"tags.`{report.REPORT_TAG}` = 'true'",
    )
    logged = {a.path for a in client.list_artifacts(report_run.info.run_id, "report")}
    assert logged == {
        "report/report.md",
        "report/cifar_error_by_depth.png",
        "report/degradation_cifar.png",
    }


def test_degradation_curves_use_each_nets_best_run_by_epoch(client, recorded):
    experiment_id = client.get_experiment_by_name(EXPERIMENT).experiment_id
    runs = [info for run in client.search_runs([experiment_id]) if (info := report.run_info(run))]
    curves = report.degradation_curves(client, runs, cifar=True)
    assert set(curves) == {"resnet20", "plain20", "resnet56", "plain56"}
    run_id, series = curves["resnet20"]
    assert run_id == recorded["resnet20"]  # best val 0.11 beats the other run's 0.30
    assert series["train/error"] == [(1, 0.5), (2, 0.2), (3, 0.1), (4, 0.05)]
    assert [e for e, _ in series["val/error"]] == [1, 2, 3, 4]
    assert report.degradation_curves(client, runs, cifar=False) == {}


def test_report_of_a_sweep_is_logged_on_its_parent(client, tmp_path):
    experiment_id = client.create_experiment("sweep")
    parent = client.create_run(experiment_id, run_name="sweep").info.run_id
    child = training_run(client, experiment_id, "resnet32", [0.4, 0.1], [0.4, 0.2], parent)
    training_run(client, experiment_id, "plain32", [0.4, 0.3], [0.4, 0.35], parent)
    outside = training_run(client, experiment_id, "resnet44", [0.4, 0.1], [0.4, 0.05])
    eval_run(client, experiment_id, "resnet32", "A", {"eval/center/top1_err": 0.0801}, child)
    out = tmp_path / "sweep-report"
    assert report.main(["--parent", parent, "--out", str(out)]) == 0
    table6 = table_rows((out / "report.md").read_text(), "## CIFAR-10, Table 6")
    assert table6["resnet32"][3] == "8.01"
    assert table6["plain32"][3] == "35.00"
    assert table6["resnet44"][3] == "—"  # not a child of the sweep
    logged = {a.path for a in client.list_artifacts(parent, "report")}
    assert "report/degradation_cifar.png" in logged
    assert client.list_artifacts(outside) == []
    check_pngs(out, ["degradation_cifar.png", "cifar_error_by_depth.png"])


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--experiment", "no-such-experiment"], "no MLflow experiment 'no-such-experiment'"),
        (["--runs", "0123456789abcdef"], "no MLflow run '0123456789abcdef'"),
        (["--runs", ","], "names no run id"),
    ],
)
def test_bad_selection_is_one_line_and_exit_2(client, tmp_path, capsys, argv, message):
    assert report.main([*argv, "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert message in err
