"""resnet-eval and resnet-predict (pipelines.evaluate, pipelines.predict) on real shards written by
resnet-prepare, a local Ray and a SQLite MLflow store holding a training run recorded by
pipelines.job.final_model."""

from __future__ import annotations

import csv
import io
import os
import shutil
from dataclasses import replace
from pathlib import Path

import boto3
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from mlflow.tracking import MlflowClient
from ray.train import Checkpoint

from pipelines import data, evaluate, predict, tracking
from pipelines.config import JobConfig, flatten, to_dict
from pipelines.job import inference
from pipelines.job.final_model import log_final_model
from pipelines.job.parts import normalization
from pipelines.manifest import Manifest, read_manifest
from pipelines.prepare import main as prepare_main
from pipelines.recipes import build_recipe
from resnet_core.checkpoint import save_checkpoint, training_state
from resnet_core.cpu_transforms import CenterCrop, decode_crop
from resnet_core.evaluation import MULTISCALE_SHORTER_SIDES, predict_center
from resnet_core.models import create_model
from resnet_core.transforms import to_float_batch

CPU = torch.device("cpu")
NUM_CLASSES = 4
REGISTERED = "resnet-ray-resnet8"


@pytest.fixture(scope="module")
def dataset(ray_local, tmp_path_factory) -> Manifest:
    """4 classes of 160-400 px images; val: 12 rows in 3 shards of 4 (row groups of 2)."""
    out = tmp_path_factory.mktemp("shards") / "synthetic"
    status = prepare_main(
        [
            "synthetic",
            "--kind", "imagenet",
            "--classes", str(NUM_CLASSES),
            "--train-per-class", "3",
            "--val-per-class", "3",
            "--shard-rows", "5",
            "--row-group-rows", "2",
            "--out", str(out),
        ]
    )  # fmt: skip
    assert status == 0
    return read_manifest(str(out))


@pytest.fixture(scope="module")
def config(dataset) -> JobConfig:
    """The demo recipe (32x32 crops, per-pixel mean) with eval_resize 40, so 10-crop testing has
    ten distinct crops."""
    base = build_recipe("demo", "resnet8")
    return replace(
        base,
        data=replace(base.data, uri=dataset.root, eval_resize=40),
        run=replace(base.run, name="eval-test-resnet8"),
    )


@pytest.fixture(scope="module")
def net(config, dataset) -> torch.nn.Module:
    """A ResNet-8 whose predictions differ between images (a fresh one gives every image the
    same class): its classifier acts on the pooled features standardised over the training
    images' centre crops, with random class directions."""
    torch.manual_seed(0)
    model = create_model("resnet8", num_classes=NUM_CLASSES).eval()
    sampler = CenterCrop(config.data.eval_resize, config.data.image_size)
    rng = np.random.default_rng(0)
    crops = [
        decode_crop(image, sampler, rng, flip=False)
        for uri in dataset.shard_uris("train")
        for image in pq.read_table(uri).column("image").to_pylist()
    ]
    mean, std = normalization(config, dataset)
    x = to_float_batch(torch.from_numpy(np.stack(crops)), mean=mean, std=std)
    with torch.no_grad():
        fc, model.fc = model.fc, torch.nn.Identity()
        features = model(x)
        model.fc = fc
        weight = torch.randn(NUM_CLASSES, features.shape[1]) / (features.std(0) + 1e-6)
        fc.weight.copy_(weight)
        fc.bias.copy_(-weight @ features.mean(0))
    return model


@pytest.fixture(scope="module")
def spec(net, config, dataset) -> inference.ModelSpec:
    trained = inference.TrainedModel(
        config, net.state_dict(), dataset.classes, dataset.class_names, None, None, "test"
    )
    return inference.model_spec(trained, dataset)


@pytest.fixture(scope="module")
def val_rows(dataset) -> tuple[list[bytes], list[int], list[str]]:
    """Every val row (image bytes, label, key), read straight from the shards."""
    tables = [pq.read_table(uri) for uri in dataset.shard_uris("val")]
    column = lambda name: [v for t in tables for v in t.column(name).to_pylist()]  # noqa: E731
    return column("image"), column("label"), column("key")


@pytest.fixture(scope="module")
def trained_run(mlflow_uri, config, dataset, net, tmp_path_factory) -> str:
    """A finished training run as resnet-train records it: its params, then final/ artifacts
    and the registered model written by log_final_model from a checkpoint."""
    client = MlflowClient(tracking_uri=mlflow_uri)
    experiment_id = tracking.ensure_experiment(client, config.run.experiment, mlflow_uri)
    run_id, _ = tracking.find_or_create_run(client, experiment_id, config.run_name)
    tracking.log_params_once(client, run_id, flatten(config))
    state = training_state(net, epoch=1, step=3, batches_in_epoch=0, config=to_dict(config))
    path = save_checkpoint(tmp_path_factory.mktemp("ckpt") / "state", state)
    log_final_model(mlflow_uri, run_id, config, dataset, Checkpoint.from_directory(str(path)))
    client.set_terminated(run_id, "FINISHED")
    return run_id


def protocol(config: JobConfig, scales=(32, 40, 48)) -> inference.Protocol:
    return inference.Protocol(config.data.image_size, config.data.eval_resize, tuple(scales))


def expected_errors(spec, config, val_rows, modes) -> dict[str, float]:
    """Top-1 error per mode computed in this process, all images in one call, by argmax."""
    images, labels, _ = val_rows
    scores = inference.score_images(
        inference.build_model(spec), images, modes, protocol(config), CPU
    )
    assert not scores.bad.any()
    return {
        mode: float((p.argmax(dim=1) != torch.tensor(labels)).double().mean())
        for mode, p in scores.probabilities.items()
    }


def eval_runs(mlflow_uri: str, trained_run: str) -> list:
    client = MlflowClient(tracking_uri=mlflow_uri)
    experiment_id = client.get_run(trained_run).info.experiment_id
    return client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{tracking.EVALUATES_TAG}` = '{trained_run}'",
        order_by=["attributes.start_time DESC"],
    )


# ---------------------------------------------------------------------------------------------
# Scoring protocols
# ---------------------------------------------------------------------------------------------


def test_ten_crop_equals_mean_of_the_ten_single_crop_evaluations(spec, config, val_rows):
    model = inference.build_model(spec)
    images = val_rows[0][:3]
    ten = inference.score_images(model, images, ["tencrop"], protocol(config), CPU)
    size, resize = config.data.image_size, config.data.eval_resize
    far, middle = resize - size, round((resize - size) / 2)
    corners = [(0, 0), (0, far), (far, 0), (far, far), (middle, middle)]  # (top, left)
    for i, image in enumerate(images):
        square = decode_crop(image, CenterCrop(resize, resize), np.random.default_rng(), flip=False)
        singles = []
        for view in (square, square[:, ::-1]):  # the image, then its mirror
            for top, left in corners:
                crop = np.ascontiguousarray(view[top : top + size, left : left + size])
                singles.append(predict_center(model, torch.from_numpy(crop[None]))[0])
        assert len({tuple(s.tolist()) for s in singles}) == 10  # ten different views
        torch.testing.assert_close(ten.probabilities["tencrop"][i], torch.stack(singles).mean(0))


def test_multiscale_scores_every_paper_scale(spec, config, val_rows):
    """The whole image at 224, 256, 384, 480 and 640 (and mirrored): the result is the mean of
    the five single-scale results, so every scale was accepted and counted once."""
    model = inference.build_model(spec)
    image = val_rows[0][:1]
    scales = MULTISCALE_SHORTER_SIDES
    together = inference.score_images(model, image, ["multiscale"], protocol(config, scales), CPU)
    alone = [
        inference.score_images(model, image, ["multiscale"], protocol(config, [s]), CPU)
        for s in scales
    ]
    per_scale = torch.stack([a.probabilities["multiscale"][0] for a in alone])
    assert len({tuple(p.tolist()) for p in per_scale}) == len(scales)
    torch.testing.assert_close(together.probabilities["multiscale"][0], per_scale.mean(0))
    assert inference.default_scales("resnet50", 224) == MULTISCALE_SHORTER_SIDES
    assert inference.default_scales("resnet8", 32) == inference.CIFAR_MULTISCALE_SHORTER_SIDES


def test_images_of_different_sizes_score_as_they_do_alone(spec, config, val_rows):
    model = inference.build_model(spec)
    images = val_rows[0][:3]
    modes = ["center", "tencrop", "multiscale"]
    batch = inference.score_images(model, images, modes, protocol(config), CPU)
    for i, image in enumerate(images):
        alone = inference.score_images(model, [image], modes, protocol(config), CPU)
        for mode in modes:
            torch.testing.assert_close(
                batch.probabilities[mode][i], alone.probabilities[mode][0], atol=1e-5, rtol=0
            )


def test_undecodable_image_is_dropped_from_every_mode(spec, config, val_rows):
    model = inference.build_model(spec)
    images = [val_rows[0][0], b"not an image", val_rows[0][1]]
    scores = inference.score_images(model, images, ["center", "multiscale"], protocol(config), CPU)
    assert scores.bad.tolist() == [False, True, False]
    assert "UnidentifiedImageError" in scores.first_error
    assert {p.shape for p in scores.probabilities.values()} == {(2, NUM_CLASSES)}


# ---------------------------------------------------------------------------------------------
# Workers: every image exactly once
# ---------------------------------------------------------------------------------------------


def test_two_workers_score_every_image_exactly_once(spec, config, dataset, val_rows):
    modes = ("center", "tencrop", "multiscale")
    options = {"cpus_per_worker": 1, "use_gpu": False, "modes": modes, "batch_size": 3}
    two = evaluate.run_workers(
        spec, dataset, "val", workers=2, protocol=protocol(config), **options
    )
    keys = [key for r in two for key in r.keys]
    split_keys = data.read_split_keys(dataset, "val")
    assert len(keys) == len(set(keys)) == dataset.num_rows("val") == 12
    assert set(keys) == set(split_keys)
    assert [len(r.keys) for r in two] == [6, 6]
    evaluate.check_exactly_once(two, split_keys)

    one = evaluate.run_workers(
        spec, dataset, "val", workers=1, protocol=protocol(config), **options
    )
    expected = expected_errors(spec, config, val_rows, modes)
    for mode, result in zip(modes, evaluate.summarize(two, modes), strict=True):
        assert result.images == 12
        assert result.top1_err == pytest.approx(expected[mode], abs=1e-12)
        merged_two = evaluate.merge_accuracy([r.accuracy[mode] for r in two])
        merged_one = evaluate.merge_accuracy([r.accuracy[mode] for r in one])
        for name in ("correct", "count", "class_correct", "class_count"):
            assert torch.equal(getattr(merged_two, name), getattr(merged_one, name))


def test_check_exactly_once_rejects_repeats_and_gaps():
    def worker(rank: int, keys: list[str]) -> evaluate.WorkerResult:
        return evaluate.WorkerResult(rank, keys, [], {}, 0.0)

    split = ["a", "b", "c", "d"]
    evaluate.check_exactly_once([worker(0, ["a", "b"]), worker(1, ["c", "d"])], split)
    with pytest.raises(evaluate.EvalError, match=r"more than once.*'b'"):
        evaluate.check_exactly_once([worker(0, ["a", "b"]), worker(1, ["b", "c", "d"])], split)
    with pytest.raises(evaluate.EvalError, match="read 3 images, the split has 4"):
        evaluate.check_exactly_once([worker(0, ["a", "b"]), worker(1, ["c"])], split)


# ---------------------------------------------------------------------------------------------
# The command: model sources, MLflow, bad input
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_runs_uri_evaluates_the_runs_final_artifacts(
    trained_run, mlflow_uri, spec, config, val_rows, capsys
):
    status = evaluate.main([f"runs:/{trained_run}", "--modes", "center,tencrop", "--workers", "2"])
    assert status == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "worker 2/2" in out
    (run,) = eval_runs(mlflow_uri, trained_run)
    client = MlflowClient(tracking_uri=mlflow_uri)
    assert run.info.experiment_id == client.get_run(trained_run).info.experiment_id
    assert run.info.status == "FINISHED"
    assert run.data.params["eval.trained_run"] == f"runs:/{trained_run}"
    assert run.data.params["model.name"] == "resnet8"
    expected = expected_errors(spec, config, val_rows, ["center", "tencrop"])
    for mode in ("center", "tencrop"):
        assert run.data.metrics[f"eval/{mode}/top1_err"] == pytest.approx(expected[mode])
        assert run.data.metrics[f"eval/{mode}/top5_err"] == 0.0  # 4 classes: always in top 5
        assert run.data.metrics[f"eval/{mode}/images"] == 12
    folder = client.download_artifacts(run.info.run_id, "eval")
    rows = list(csv.DictReader(io.StringIO(Path(folder, "per_class_accuracy.csv").read_text())))
    assert [r["class"] for r in rows] == list(read_manifest(config.data.uri).classes)
    assert sum(int(r["images"]) for r in rows) == 12
    correct = sum(float(r["center_top1_acc"]) * int(r["images"]) for r in rows)
    assert correct == pytest.approx(12 * (1 - expected["center"]))


def _served(mlflow_uri: str, device: str):
    """The registered model as a client loads it, on ``device``."""
    import mlflow

    mlflow.set_tracking_uri(mlflow_uri)
    return mlflow.pyfunc.load_model(f"models:/{REGISTERED}/1", model_config={"device": device})


def _center_crops(config: JobConfig, images: list[bytes]) -> np.ndarray:
    sampler = CenterCrop(config.data.eval_resize, config.data.image_size)
    rng = np.random.default_rng(0)
    return np.stack([decode_crop(image, sampler, rng, flip=False) for image in images])


@pytest.mark.slow
def test_the_registered_model_takes_uint8_images_and_normalises_them(
    trained_run, mlflow_uri, spec, config, val_rows
):
    """The served model: uint8 (N, H, W, 3) in (its signature says so), logits out, equal to
    the net after the training run's input normalisation; code and safetensors, no pickle."""
    import mlflow

    mlflow.set_tracking_uri(mlflow_uri)
    info = mlflow.models.get_model_info(f"models:/{REGISTERED}/1")
    (inputs,), (outputs,) = info.signature.inputs.to_dict(), info.signature.outputs.to_dict()
    assert inputs["tensor-spec"] == {"dtype": "uint8", "shape": (-1, 32, 32, 3)}
    assert outputs["tensor-spec"] == {"dtype": "float32", "shape": (-1, NUM_CLASSES)}
    assert info.saved_input_example_info is not None
    served = _served(mlflow_uri, "cpu")
    assert served.unwrap_python_model().device == CPU
    crops = _center_crops(config, val_rows[0])
    logits = served.predict(crops)
    with torch.no_grad():
        expected = inference.build_model(spec)(torch.from_numpy(crops)).numpy()
    np.testing.assert_allclose(logits, expected, rtol=0, atol=1e-5)
    # Without the per-pixel mean the logits would differ: the normalisation is in the model.
    net_alone = inference.build_model(spec)[1]
    with torch.no_grad():
        raw = net_alone(torch.from_numpy(crops).permute(0, 3, 1, 2).float() / 255).numpy()
    assert np.abs(raw - logits).max() > 1e-2
    files = Path(mlflow.artifacts.download_artifacts(f"models:/{REGISTERED}/1"))
    suffixes = {p.suffix for p in files.rglob("*") if p.is_file()}
    assert not suffixes & {".pkl", ".pickle", ".pth", ".pt"}, suffixes


@pytest.mark.gpu
def test_the_registered_model_loads_on_cuda(trained_run, mlflow_uri, config, val_rows):
    crops = _center_crops(config, val_rows[0])
    on_cpu = _served(mlflow_uri, "cpu").predict(crops)
    on_cuda = _served(mlflow_uri, "cuda")
    assert on_cuda.unwrap_python_model().device.type == "cuda"
    np.testing.assert_allclose(on_cuda.predict(crops), on_cpu, rtol=2e-2, atol=2e-2)


@pytest.mark.slow
def test_models_uri_resolves_to_the_source_run(trained_run, mlflow_uri, spec, config, val_rows):
    expected = expected_errors(spec, config, val_rows, ["center"])["center"]
    for uri in (f"models:/{REGISTERED}/latest", f"models:/{REGISTERED}/1"):
        assert evaluate.main([uri, "--modes", "center"]) == 0
        newest = eval_runs(mlflow_uri, trained_run)[0]
        assert newest.data.params["eval.source"] == f"models:/{REGISTERED}/1"
        assert newest.data.metrics["eval/center/top1_err"] == pytest.approx(expected)


@pytest.mark.slow
def test_run_folder_uses_its_newest_checkpoint(
    trained_run, mlflow_uri, net, spec, config, val_rows, tmp_path, capsys
):
    """A Train run folder: the newest checkpoint-* is evaluated and the MLflow run of the same
    run name is found (run names are deterministic)."""
    blank = create_model("resnet8", num_classes=NUM_CLASSES)
    folder = tmp_path / config.run_name
    for name, model in (
        ("checkpoint-000000003-0badc0de", blank),
        ("checkpoint-000000012-1234abcd", net),
    ):
        state = training_state(model, epoch=1, step=1, batches_in_epoch=0, config=to_dict(config))
        save_checkpoint(folder / name, state)
    assert evaluate.main([str(folder), "--modes", "center", "--workers", "2"]) == 0
    assert "checkpoint-000000012-1234abcd" in capsys.readouterr().out
    newest = eval_runs(mlflow_uri, trained_run)[0]
    assert newest.data.params["eval.source"].endswith("checkpoint-000000012-1234abcd")
    expected = expected_errors(spec, config, val_rows, ["center"])["center"]
    assert newest.data.metrics["eval/center/top1_err"] == pytest.approx(expected)


@pytest.mark.slow
def test_run_folder_falls_back_from_a_corrupt_newest_and_breaks_ties_by_write_time(
    trained_run, mlflow_uri, net, spec, config, val_rows, tmp_path, capsys
):
    """As training resumes: the newest intact checkpoint, a warning for each one skipped; of
    two checkpoints at the same step, the one written last, whatever their attempt ids."""
    blank = create_model("resnet8", num_classes=NUM_CLASSES)
    folder = tmp_path / config.run_name
    saves = [
        ("checkpoint-000000012-ffffffff", blank),  # written first, the higher id
        ("checkpoint-000000012-00000000", net),  # the same step, written last
        ("checkpoint-000000020-abcdef01", net),  # the newest, corrupted below
    ]
    for i, (name, model) in enumerate(saves):
        state = training_state(model, epoch=1, step=1, batches_in_epoch=0, config=to_dict(config))
        save_checkpoint(folder / name, state)
        os.utime(folder / name / "checkpoint.json", ns=(10**18 + i * 10**9,) * 2)
    (folder / saves[2][0] / "state.safetensors").write_bytes(b"cut short")
    with pytest.warns(UserWarning, match=f"skipping checkpoint {saves[2][0]}, trying the previous"):
        assert evaluate.main([str(folder), "--modes", "center"]) == 0
    assert f"run folder: {saves[1][0]}" in capsys.readouterr().out
    newest = eval_runs(mlflow_uri, trained_run)[0]
    assert newest.data.params["eval.source"].endswith(saves[1][0])
    expected = expected_errors(spec, config, val_rows, ["center"])["center"]
    assert newest.data.metrics["eval/center/top1_err"] == pytest.approx(expected)


@pytest.fixture(scope="module")
def checkpoint_dir(net, config, tmp_path_factory) -> Path:
    state = training_state(net, epoch=1, step=3, batches_in_epoch=0, config=to_dict(config))
    return save_checkpoint(tmp_path_factory.mktemp("run") / "checkpoint-000000003-cafe", state)


def assert_bad_input(argv: list[str], message: str, capsys) -> None:
    assert evaluate.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("resnet-eval: ")
    assert message in err


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["{missing}"], "does not exist"),
        (["{file}"], "is a file; pass the folder that holds it"),
        (["{checkpoint}", "--modes", "center,fivecrop"], "unknown mode 'fivecrop'"),
        (["{checkpoint}", "--modes", "multiscale", "--scales", "224,0"], "--scales"),
        (["{checkpoint}", "--data", "{empty}"], "no manifest.json"),
        (["{checkpoint}", "--eval-resize", "16"], "below the evaluation crop 32"),
        (["{checkpoint}", "--workers", "0"], "--workers 0 must be >= 1"),
        (["{checkpoint}", "--experiment", ""], "--experiment='' is not a valid MLflow"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    mlflow_uri, checkpoint_dir, tmp_path, capsys, arguments, message
):
    file = tmp_path / "weights.safetensors"
    file.write_bytes(b"")
    values = {
        "missing": tmp_path / "nothing",
        "file": file,
        "checkpoint": checkpoint_dir,
        "empty": tmp_path,
    }
    assert_bad_input([a.format(**values) for a in arguments], message, capsys)


def test_a_failing_worker_is_one_line_and_exit_1(
    mlflow_uri, checkpoint_dir, dataset, tmp_path, capsys
):
    """A shard that lost rows after its manifest was written: the worker reading it fails."""
    broken = tmp_path / "broken"
    shutil.copytree(dataset.root, broken)
    shard = broken / dataset.splits["val"].shards[-1].path
    pq.write_table(pq.read_table(shard).slice(0, 2), shard)
    assert evaluate.main([str(checkpoint_dir), "--data", str(broken), "--workers", "2"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith(f"resnet-eval: shard {shard} has 2 rows, the manifest promised")
    assert f"re-run resnet-prepare with --out {broken} " in err


@pytest.mark.slow
@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["runs:/0123456789abcdef"], "MLflow run '0123456789abcdef' is not in the store"),
        ([f"models:/{REGISTERED}/99"], "is not in the model registry"),
        (["runs:/{run}/model"], "has no model/weights.safetensors"),
    ],
)
def test_bad_mlflow_source_is_one_line_and_exit_2(trained_run, capsys, arguments, message):
    assert_bad_input([a.format(run=trained_run) for a in arguments], message, capsys)


def test_checkpoint_run_folder_on_s3(s3_server, net, config, tmp_path):
    """A Train run folder on S3: the newest checkpoint's two files are fetched and loaded."""
    s3 = boto3.session.Session().client("s3", endpoint_url=s3_server, region_name="us-east-1")
    s3.create_bucket(Bucket="runs")
    blank = create_model("resnet8", num_classes=NUM_CLASSES)
    for name, model in (("checkpoint-000000002-aa", blank), ("checkpoint-000000005-bb", net)):
        state = training_state(model, epoch=1, step=1, batches_in_epoch=0, config=to_dict(config))
        local = save_checkpoint(tmp_path / name, state)
        for path in local.iterdir():
            s3.upload_file(str(path), "runs", f"results/{config.run_name}/{name}/{path.name}")
    store = f"sqlite:///{tmp_path / 'no-store.db'}"
    trained = inference.load_trained_model(f"s3://runs/results/{config.run_name}", store)
    assert trained.origin == f"s3://runs/results/{config.run_name}/checkpoint-000000005-bb"
    assert trained.config == config
    assert trained.run_id is None  # no MLflow store to find the training run in
    for key, value in net.state_dict().items():
        assert torch.equal(trained.weights[key], value)


# ---------------------------------------------------------------------------------------------
# resnet-predict
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_predict_prints_top5_with_names_and_flags_a_bad_file(
    trained_run, spec, config, dataset, val_rows, tmp_path, capsys
):
    paths = []
    for i in range(2):
        paths.append(tmp_path / f"image{i}.jpg")
        paths[-1].write_bytes(val_rows[0][i])
    bad = tmp_path / "notes.jpg"
    bad.write_text("not an image")
    missing = tmp_path / "missing.jpg"
    argv = ["--model", f"runs:/{trained_run}", str(paths[0]), str(bad), str(missing), str(paths[1])]
    assert predict.main(argv) == 1
    captured = capsys.readouterr()
    err_lines = captured.err.splitlines()
    assert len(err_lines) == 2
    assert err_lines[0].startswith(f"resnet-predict: {bad}: not a decodable image")
    assert err_lines[1].startswith(f"resnet-predict: {missing}: cannot read the file")

    scores = inference.score_images(
        inference.build_model(spec), val_rows[0][:2], ["center"], protocol(config), CPU
    )
    lines = captured.out.splitlines()
    assert len(lines) == 2 * (1 + NUM_CLASSES)  # 4 classes: all of them are the top 5
    for i, path in enumerate(paths):
        block = lines[i * (1 + NUM_CLASSES) : (i + 1) * (1 + NUM_CLASSES)]
        assert block[0] == str(path)
        probabilities = scores.probabilities["center"][i]
        order = probabilities.argsort(descending=True).tolist()
        for line, label in zip(block[1:], order, strict=True):
            percent, name = line.strip().split("%  ")
            assert float(percent) == pytest.approx(100 * float(probabilities[label]), abs=0.006)
            assert name == f"{dataset.class_names[label]} ({dataset.classes[label]})"
