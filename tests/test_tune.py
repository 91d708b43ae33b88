"""resnet-tune end to end on a real local Ray and a real MLflow store (SQLite in tmp_path).

- A bad search space exits 2 with one line before Ray starts.
- A 4-trial ASHA sweep (two depths × a good and a terrible lr) stops trials early, releases every
  placement group, and leaves one parent and four child MLflow runs, a leaderboard, two plots
  and a registered model.
- A sweep whose driver is SIGKILLed resumes when the same command runs again: the finished
  trial is not re-run, the unfinished one completes, the MLflow runs are the same ones.
- The MLflow UI, in headless Chromium, shows that two-trial sweep and a 6-step resnet-train run
  as a user would read them (runs, datasets, sources, description, registered model, system
  metrics).

The module's Ray cluster (2 CPUs) names its dashboard in every worker's environment (see
``pipelines.tune.start_ray`` for why); after ``ray.shutdown`` no Ray process of ours is left.
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import ray
from PIL import Image

from pipelines import tracking
from pipelines import tune as tune_cmd
from pipelines.job.runner import Extension
from pipelines.job.session import free_loopback_port
from tests.browser import Browser, MlflowUi, find_chromium
from tests.clusters import STORE_BYTES

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
EPOCHS = 3


def processes_mentioning(text: str) -> set[int]:
    """PIDs whose command line contains ``text`` (read from /proc; other helpers' Ray clusters
    run on this machine too, so ours are told apart by their session folder)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or entry.name == str(os.getpid()):
            continue
        try:
            command = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if text.encode() in command:
            found.add(int(entry.name))
    return found


def ray_sessions_started_here() -> set[str]:
    """Ray session folders named after this process (Ray names them session_<time>_<pid>)."""
    temp = Path(os.environ.get("RAY_TMPDIR", "/tmp"), "ray")
    return {p.name for p in temp.glob(f"session_*_{os.getpid()}")}


def sweep_args(data: Path, storage: Path, name: str, *extra: str) -> list[str]:
    """One worker per trial with half a CPU and half a CPU of decoding: two trials fit in 2 CPUs;
    no ONNX export."""
    return [
        "--data", str(data),
        "--storage", str(storage),
        "--name", name,
        "--workers", "1",
        "--cpus-per-worker", "0.5",
        "--max-concurrent", "2",
        *extra,
        "data.decode_cpus=0.5",
        "train.global_batch=16",
        "train.export_onnx=false",  # ~6 CPU-s a trial; test_train's demo run checks the export
    ]  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Bad search spaces: nothing starts (runs first, before the module's Ray exists)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("space", "expected"),
    [
        (["--lr", "0,0.1"], "optim.lr=0.0 must be positive"),
        (["--lr", "1e-1:1e-3"], "0 < low < high"),
        (["--lr", "0.1,,0.2"], "is not a list like 0.01,0.1"),
        (["--models", "resnet8,resnet9"], "model.name='resnet9' is not a ResNet v1 model"),
        (["--models", "resnet8,"], "has an empty entry"),
        (["--batch", "30", "--workers", "4"], "not divisible by scale.num_workers=4"),
        (["--weight-decay", "0:1e-3"], "0 < low < high"),
        (["--grace-period", "5", "--epochs", "3"], "grace period <= epochs"),
    ],
)
def test_bad_search_space_exits_2_before_ray(
    space: list[str], expected: str, tmp_path: Path, capsys, monkeypatch
) -> None:
    import ray

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    before = ray_sessions_started_here()
    status = tune_cmd.main(
        ["--data", str(tmp_path / "no-data"), "--storage", str(tmp_path / "results"), *space]
    )
    err = capsys.readouterr().err
    assert status == 2
    assert err.startswith("resnet-tune: "), err
    assert err.count("\n") == 1, err
    assert expected in err
    assert not ray.is_initialized()
    assert ray_sessions_started_here() == before  # no local Ray was started
    assert not (tmp_path / "results").exists()
    assert not (tmp_path / "mlflow.db").exists()


# ---------------------------------------------------------------------------------------------
# Real sweeps on one module-wide Ray
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_address() -> Iterator[str]:
    """A local Ray (2 CPUs); yields its GCS address. On teardown: shut down, then check that no
    raylet/gcs_server of ours survived and that ``~/.ray`` was not created."""
    import ray

    home_ray = Path.home() / ".ray"
    had_home_ray = home_ray.exists()
    port = free_loopback_port()
    with pytest.MonkeyPatch.context() as env:
        env.setenv("RAY_AUTH_MODE", "disabled")
        # Set before ray.init so the raylet, and so every worker of every job, inherits it.
        env.setenv("RAY_API_SERVER_ADDRESS", f"http://127.0.0.1:{port}")
        context = ray.init(
            num_cpus=2,
            object_store_memory=STORE_BYTES,
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            dashboard_port=port,
            log_to_driver=False,
        )
        session = Path(context.address_info["session_dir"]).name
        try:
            yield context.address_info["gcs_address"]
        finally:
            ray.shutdown()
    deadline = time.monotonic() + 60
    while processes_mentioning(session) and time.monotonic() < deadline:
        time.sleep(1)
    assert not processes_mentioning(session), "Ray processes left behind after ray.shutdown()"
    assert had_home_ray or not home_ray.exists()


@pytest.fixture(scope="module")
def dataset(ray_address: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 synthetic classes × (100 train + 25 val) 32×32 images."""
    from pipelines import prepare

    out = tmp_path_factory.mktemp("tune-data") / "synthetic"
    status = prepare.main(
        [
            "synthetic",
            "--classes", "4",
            "--train-per-class", "100",
            "--val-per-class", "25",
            "--out", str(out),
        ]
    )  # fmt: skip
    assert status == 0
    return out


@pytest.fixture
def mlflow_uri(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


def run_with_deadline(argv: list[str], seconds: float) -> int:
    """``tune.main(argv)`` in a thread; fails the test instead of hanging forever."""
    outcome: dict[str, object] = {}

    def target() -> None:
        try:
            outcome["status"] = tune_cmd.main(argv)
        except BaseException as e:
            outcome["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        pytest.fail(f"resnet-tune {' '.join(argv)} still running after {seconds:.0f} s (hang)")
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome["status"]  # type: ignore[return-value]


def wait_for_no_reserved_groups(seconds: float) -> list[dict]:
    """Placement groups still CREATED after waiting up to ``seconds`` (release is asynchronous)."""
    from ray.util import placement_group_table

    deadline = time.monotonic() + seconds
    while True:
        reserved = [pg for pg in placement_group_table().values() if pg["state"] == "CREATED"]
        if not reserved or time.monotonic() > deadline:
            return reserved
        time.sleep(1)


def sweep_runs(client, name: str) -> tuple[object, list]:
    """(parent run, child runs) of the sweep ``name``."""
    experiment = client.get_experiment_by_name("resnet-ray")
    parents = client.search_runs(
        [experiment.experiment_id], f"tags.`{tracking.RUN_NAME_TAG}` = '{name}'"
    )
    assert len(parents) == 1, [p.info.run_name for p in parents]
    parent = parents[0]
    children = client.search_runs(
        [experiment.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
    )
    return parent, children


def test_asha_sweep_stops_trials_early_and_records_everything(
    ray_address: str, dataset: Path, mlflow_uri: str, tmp_path: Path, capsys
) -> None:
    import mlflow
    from mlflow.tracking import MlflowClient

    storage = tmp_path / "results"
    argv = sweep_args(
        dataset,
        storage,
        "asha",
        "--models", "resnet8,resnet14",
        "--lr", "0.1,0.0001",  # 1e-4 barely moves the weights in an epoch: ASHA stops it
        "--epochs", str(EPOCHS),
        "--grace-period", "1",
        "--reduction-factor", "2",
    )  # fmt: skip
    status = run_with_deadline(argv, seconds=1200)
    out = capsys.readouterr().out
    assert status == 0, out[-3000:]
    assert wait_for_no_reserved_groups(30) == []

    client = MlflowClient(tracking_uri=mlflow_uri)
    parent, children = sweep_runs(client, "asha")
    assert parent.info.status == "FINISHED"
    assert parent.data.params["sweep.models"] == "resnet8,resnet14"
    assert "optim.lr" not in parent.data.params  # swept: a per-child param
    assert len(children) == 4
    grid = {(c.data.params["model.name"], float(c.data.params["optim.lr"])) for c in children}
    assert grid == {(m, lr) for m in ("resnet8", "resnet14") for lr in (0.1, 0.0001)}
    epochs_run = {}
    for child in children:
        assert child.info.status == "FINISHED"
        assert child.info.run_name.startswith("asha-")
        params = child.data.params
        assert params["train.epochs"] == str(EPOCHS)
        assert params["train.global_batch"] == "16"
        # Epochs Tune saw; MLflow may hold one more (logged while Tune was stopping it).
        ran = int(child.data.tags["tune.epochs_run"])
        epochs_run[child.info.run_name] = ran
        assert child.data.tags["stopped_early"] == str(ran < EPOCHS).lower()
        history = client.get_metric_history(child.info.run_id, "epoch")
        epochs = [int(m.value) for m in history]
        assert epochs == list(range(1, len(epochs) + 1))
        assert len(epochs) >= ran
    assert min(epochs_run.values()) < EPOCHS, epochs_run  # ASHA stopped at least one trial
    assert max(epochs_run.values()) == EPOCHS

    best_run_id = parent.data.tags["best.run_id"]
    best = client.get_run(best_run_id)
    assert best.data.tags["stopped_early"] == "false"
    assert best.data.params["optim.lr"] == "0.1"
    assert parent.data.tags["best.model_uri"] == best.data.tags[tracking.FINAL_MODEL_TAG]
    registered = f"resnet-ray-{best.data.params['model.name']}"
    versions = client.search_model_versions(f"name = '{registered}'")
    assert [v.run_id for v in versions] == [best_run_id]
    assert math.isclose(
        parent.data.metrics["best/val_top1"],
        client.get_metric_history(best_run_id, "val/top1")[-1].value,
    )

    artifacts = Path(
        mlflow.artifacts.download_artifacts(
            run_id=parent.info.run_id, dst_path=str(tmp_path / "art"), tracking_uri=mlflow_uri
        )
    )
    rows = (artifacts / "leaderboard" / "leaderboard.csv").read_text().splitlines()
    assert rows[0].startswith("rank,trial,model,lr,weight_decay,batch,best_val_top1")
    assert len(rows) == 1 + 4
    assert rows[1].split(",")[-1] == best_run_id  # ranked first
    assert (artifacts / "leaderboard" / "leaderboard.md").read_text().count("\n") == 2 + 4
    for png in ("val_error_vs_lr.png", "best_curves_per_depth.png"):
        with Image.open(artifacts / "plots" / png) as image:
            image.verify()
    assert "| 1 |" in out
    assert "stopped_early" in out
    # Train runs of the trials and the Tune experiment share the storage root.
    assert (storage / "asha").is_dir()
    assert sorted(p.name for p in storage.glob("asha-*")) == sorted(epochs_run)


def trial_finished(experiment: Path) -> str | None:
    """The id of a trial the (running) sweep has recorded as finished, if any."""
    from ray import tune

    if not tune.Tuner.can_restore(str(experiment)):
        return None
    try:
        trials = tune_cmd.trial_statuses(str(experiment), None)
    except (OSError, ValueError):
        return None  # the state file is being rewritten
    return next((t.trial_id for t in trials if t.status == "TERMINATED"), None)


def folder_snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in root.rglob("*")
        if p.is_file()
    }


@pytest.fixture(scope="module")
def ui_store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The MLflow store of the two-trial sweep below, which the MLflow UI test shows."""
    return f"sqlite:///{tmp_path_factory.mktemp('ui-store') / 'mlflow.db'}"


def test_sweep_resumes_after_its_driver_is_killed(
    ray_address: str, dataset: Path, ui_store: str, tmp_path: Path, capsys, monkeypatch
) -> None:
    from mlflow.tracking import MlflowClient

    mlflow_uri = ui_store
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_uri)
    storage = tmp_path / "results"
    # Two trials one after the other, no early stopping (grace period = epochs).
    argv = sweep_args(
        dataset,
        storage,
        "resume",
        "--models", "resnet8",
        "--lr", "0.1,0.05",
        "--epochs", "2",
        "--grace-period", "2",
        "--max-concurrent", "1",
    )  # fmt: skip
    env = {
        **os.environ,
        "RAY_ADDRESS": ray_address,
        "RAY_AUTH_MODE": "disabled",
        "MLFLOW_TRACKING_URI": mlflow_uri,
    }
    log = tmp_path / "first-run.log"
    with log.open("w") as out:
        driver = subprocess.Popen(
            [sys.executable, "-m", "pipelines.tune", *argv],
            cwd=tmp_path,
            env={**env, "PYTHONPATH": str(REPO)},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 900
        finished = None
        while finished is None:
            assert driver.poll() is None, "sweep ended before it was killed:\n" + log.read_text()
            assert time.monotonic() < deadline, "no trial finished in time:\n" + log.read_text()
            time.sleep(2)
            finished = trial_finished(storage / "resume")
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait()

    client = MlflowClient(tracking_uri=mlflow_uri)
    parent, children = sweep_runs(client, "resume")
    finished_child = next(c for c in children if c.info.run_name == f"resume-{finished}")
    assert finished_child.info.status == "FINISHED"
    history_before = client.get_metric_history(finished_child.info.run_id, "val/error")
    train_folder = storage / f"resume-{finished}"
    snapshot = folder_snapshot(train_folder)
    assert snapshot

    # The killed driver's job is gone: its reservations are released before the re-run.
    assert wait_for_no_reserved_groups(60) == []
    status = run_with_deadline(argv, seconds=900)
    out = capsys.readouterr().out
    assert status == 0, out[-3000:]
    assert "resuming sweep resume: keeping 1 finished trial(s)" in out, [
        line for line in out.splitlines() if "sweep" in line or "trial" in line
    ]

    parent_after, children_after = sweep_runs(client, "resume")
    assert parent_after.info.run_id == parent.info.run_id
    assert parent_after.info.status == "FINISHED"
    assert len(children_after) == 2
    assert {c.info.run_id for c in children} <= {c.info.run_id for c in children_after}
    # The finished trial was not trained again: same files, same metric history.
    assert folder_snapshot(train_folder) == snapshot
    history_after = client.get_metric_history(finished_child.info.run_id, "val/error")
    assert [(m.step, m.value, m.timestamp) for m in history_after] == [
        (m.step, m.value, m.timestamp) for m in history_before
    ]
    for child in children_after:
        assert child.info.status == "FINISHED"
        assert child.data.tags["tune.outcome"] == "completed"
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "train/window_loss")]
        assert steps == sorted(set(steps))  # resumed runs log no step twice
        epochs = [m.value for m in client.get_metric_history(child.info.run_id, "epoch")]
        assert epochs == [1.0, 2.0]


# ---------------------------------------------------------------------------------------------
# The MLflow UI in a real browser, over the sweep above and a tiny resnet-train run
# ---------------------------------------------------------------------------------------------


def expand_run(browser: Browser, run_name: str) -> None:
    """Click the expander of a parent run's row in the runs table."""
    browser.evaluate(
        f"""(() => {{
            const link = [...document.querySelectorAll('[role=gridcell] a')]
                .find(a => a.innerText.trim() === {json.dumps(run_name)});
            link.closest('[role=gridcell]').querySelector('button').click();
        }})()"""
    )


def test_the_mlflow_ui_opens_on_the_runs_with_their_data_source_and_models(
    ray_address: str, dataset: Path, ui_store: str, tmp_path: Path
) -> None:
    """`mlflow ui` as the commands print it, in headless Chromium, over the sweep's store plus a
    6-step resnet-train run (`python -m pipelines.train`, on the module's Ray): the printed link
    opens the experiment on its runs (not MLflow's GenAI overview); the runs table shows the
    training run and the sweep with its trials, their dataset (name and digest) and source;
    the run page shows the description (the command), source, datasets and registered model;
    the System metrics tab each worker's metrics. Screenshots: tmp_path/*.png."""
    from mlflow.tracking import MlflowClient

    from pipelines.manifest import read_manifest

    chromium = find_chromium()
    if chromium is None:
        pytest.skip("no chromium on this machine: apt-get install -y chromium (README, Tests)")
    client = MlflowClient(tracking_uri=ui_store)
    experiment = client.get_experiment_by_name("resnet-ray")
    sweep = experiment and tracking.find_run(client, experiment.experiment_id, "resume")
    if sweep is None or sweep.info.status != "FINISHED":
        pytest.skip("shows the sweep of test_sweep_resumes_after_its_driver_is_killed: run both")
    trials = [r.info.run_name for r in sweep_runs(client, "resume")[1]]
    assert experiment.tags[tracking.EXPERIMENT_KIND_TAG] == tracking.MODEL_TRAINING
    argv = [
        sys.executable, "-m", "pipelines.train",
        "--data", str(dataset),
        "--storage", str(tmp_path / "results"),
        "--name", "demo-resnet8",
        "--workers", "1",
        "--cpus-per-worker", "0.5",
        "--epochs", "1",
        "data.decode_cpus=0.5",
        "train.global_batch=64",
        "train.export_onnx=false",
        "train.system_metrics_interval_s=0.5",
    ]  # fmt: skip
    env = {
        **os.environ,
        "RAY_ADDRESS": ray_address,
        "RAY_AUTH_MODE": "disabled",
        "MLFLOW_TRACKING_URI": ui_store,
        "PYTHONPATH": str(REPO),
    }
    with MlflowUi(tracking.ui_command(ui_store), tmp_path) as ui:  # starts while the run trains
        done = subprocess.run(
            argv, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600
        )
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        printed = re.search(r"then http://127\.0\.0\.1:5000(/\S+)", done.stdout)
        assert printed, done.stdout[-2000:]
        run = tracking.find_run(client, experiment.experiment_id, "demo-resnet8")
        tags = run.data.tags
        assert tags["mlflow.source.name"] == "pipelines.train"
        assert shlex.join(argv) in tags["mlflow.note.content"]  # the exact command
        digest = read_manifest(str(dataset)).checksum[:12]
        (version,) = client.search_model_versions(f"run_id = '{run.info.run_id}'")
        ui.wait_until_up()
        browser = Browser(chromium, tmp_path / "chromium-profile", width=1600, height=900)
        try:
            browser.open(ui.url + printed.group(1))
            text = browser.wait_for_text(
                "demo-resnet8", "resume", f"synthetic/train ({digest})", "pipelines.train"
            )
            assert browser.evaluate("location.hash").startswith(
                f"#/experiments/{experiment.experiment_id}/runs"
            )
            assert "Token Usage" not in text  # the GenAI overview's
            # The assistant's side panel, open on a first visit, narrows the table.
            close = '[data-component-id="mlflow.assistant.chat_panel.close"]'
            browser.evaluate(f"document.querySelector({json.dumps(close)})?.click()")
            expand_run(browser, "resume")
            browser.wait_for_text(*trials, "pipelines.tune")  # the sweep's source
            browser.screenshot(tmp_path / "runs.png")

            run_page = f"{ui.url}/#/experiments/{experiment.experiment_id}/runs/{run.info.run_id}"
            browser.open(f"{run_page}?{tracking.UI_MODEL_TRAINING}")
            browser.wait_for_text(
                "Started by:",
                "python -m pipelines.train --data",
                f"synthetic/train ({digest})",
                tags["mlflow.source.git.commit"][:7],
                "Registered models",
                f"{version.name}\nv{version.version}",
            )
            browser.screenshot(tmp_path / "run.png")

            browser.open(f"{run_page}/system-metrics?{tracking.UI_MODEL_TRAINING}")
            browser.wait_for_text("worker_0/cpu_utilization_percentage")
            browser.screenshot(tmp_path / "system-metrics.png")
        finally:
            browser.close()


# ---------------------------------------------------------------------------------------------
# Trials that fail: once (retried from their checkpoint), and every time (FAILED)
# ---------------------------------------------------------------------------------------------


class FailingTrial(Extension):
    """Raises in a trial's Train worker after step 3 (the checkpoint at step 2 exists): once for
    a model named in ``once`` (a marker file remembers it), every time for ``always``."""

    def __init__(self, marker_dir: str, once: str, always: str) -> None:
        self.marker_dir, self.once, self.always = marker_dir, once, always

    def after_step(self, runner: Any, result: Any) -> None:
        model = runner.config.model.name
        with Path(self.marker_dir, f"steps-{model}").open("a") as steps:
            steps.write(f"{runner.step}\n")  # every step trained, across the retries
        marker = Path(self.marker_dir, model)
        if runner.step == 3 and (
            model == self.always or (model == self.once and not marker.exists())
        ):
            marker.touch()
            raise RuntimeError(f"injected failure in the {model} trial")


# The extension travels to the trials' workers, which cannot import this test module.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def test_a_trial_that_fails_once_retries_from_its_checkpoint_one_that_always_fails_ends_failed(
    ray_address: str, dataset: Path, mlflow_uri: str, tmp_path: Path, capsys
) -> None:
    """Train's own restarts are off (scale.max_failures=0), so the failures reach Tune: the
    resnet8 trial fails once and Tune's retry (--max-failures 1) resumes its Train run from its
    checkpoint; the resnet14 trial fails every time and ends FAILED; the sweep still finishes
    and says so (exit 1, leaderboard, MLflow)."""
    from mlflow.tracking import MlflowClient

    storage = tmp_path / "results"
    argv = sweep_args(
        dataset,
        storage,
        "failing",
        "--models", "resnet8,resnet14",
        "--epochs", "2",
        "--grace-period", "2",
        "--max-failures", "1",
        "scale.max_failures=0",
        "train.checkpoint_every_steps=2",
    )  # fmt: skip
    sweep = tune_cmd.resolve_sweep(tune_cmd.build_parser().parse_args(argv))
    failing = FailingTrial(str(tmp_path), once="resnet8", always="resnet14")
    status = tune_cmd.launch(sweep, address=None, extensions=[failing])
    out = capsys.readouterr().out
    assert status == 1, out[-3000:]
    assert "1 trials failed" in out

    client = MlflowClient(tracking_uri=mlflow_uri)
    parent, children = sweep_runs(client, "failing")
    assert parent.info.status == "FINISHED"
    by_model = {c.data.params["model.name"]: c for c in children}
    retried, failed = by_model["resnet8"], by_model["resnet14"]
    assert (retried.info.status, retried.data.tags["tune.outcome"]) == ("FINISHED", "completed")
    assert (failed.info.status, failed.data.tags["tune.outcome"]) == ("FAILED", "failed")
    trained = [int(s) for s in (tmp_path / "steps-resnet8").read_text().split()]
    # The retry resumed from the checkpoint at step 2: it trained step 3 again, nothing before.
    assert trained[:4] == [1, 2, 3, 3], trained
    assert trained[3:] == list(range(3, trained[-1] + 1))
    epochs = [m.value for m in client.get_metric_history(retried.info.run_id, "epoch")]
    assert epochs == [1.0, 2.0]
    board = Path(
        client.download_artifacts(parent.info.run_id, "leaderboard", str(tmp_path / "board"))
    )
    rows = {
        r.split(",")[2]: r.split(",")[9]
        for r in board.joinpath("leaderboard.csv").read_text().splitlines()[1:]
    }
    assert rows == {"resnet8": "completed", "resnet14": "failed"}
    assert wait_for_no_reserved_groups(30) == []
