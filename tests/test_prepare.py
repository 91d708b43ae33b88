"""resnet-prepare end to end on a local Ray: round trips, the audit, resume, bad input."""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines import prepare, shards
from pipelines.manifest import load_mean_image, read_manifest
from pipelines.sources import SourceItem, list_folder, list_synthetic, read_item
from pipelines.synthetic import SyntheticSpec
from tests.fixtures_imagenet import (
    CIFAR_CLASSES,
    WNID_NAMES,
    WNIDS,
    cifar_pixels,
    make_cifar10,
    make_devkit,
    make_imagenet_archives,
    make_imagenet_tree,
    oddity_files,
)

# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def run_prepare(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    """Run the command in this process (it reuses the module's Ray); (exit code, stdout, stderr)."""
    code = prepare.main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def read_split(out: Path, split: str) -> list[dict]:
    """Every row of a split, read through the manifest."""
    manifest = read_manifest(str(out))
    return [row for uri in manifest.shard_uris(split) for row in pq.read_table(uri).to_pylist()]


def decode(data: bytes, image_format: str = "JPEG") -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == image_format
        assert image.mode == "RGB"
        return np.asarray(image)


def assert_manifest_matches_files(out: Path) -> None:
    """Every shard's size, sha256 and row count are what the manifest says."""
    manifest = read_manifest(str(out))
    for split, info in manifest.splits.items():
        assert info.num_rows == sum(s.num_rows for s in info.shards)
        for shard, uri in zip(info.shards, manifest.shard_uris(split), strict=True):
            data = Path(uri).read_bytes()
            assert len(data) == shard.num_bytes
            assert hashlib.sha256(data).hexdigest() == shard.sha256
            assert pq.read_metadata(uri).num_rows == shard.num_rows


def smooth_image(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A gradient with mild noise: JPEG keeps it within a couple of grey levels."""
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    base = rng.uniform(40, 200, size=3)
    slope = rng.uniform(-50, 50, size=(2, 3))
    pixels = base + x[..., None] * slope[0] + y[..., None] * slope[1]
    return np.clip(pixels + rng.normal(0, 2, pixels.shape), 0, 255).astype(np.uint8)


def save(path: Path, image: Image.Image, fmt: str, **kwargs) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format=fmt, **kwargs)


def make_folder_tree(root: Path) -> dict[str, str]:
    """Three classes of small images in every repairable variant; key -> expected repair."""
    rng = np.random.default_rng(0)
    repairs = {}
    for c, name in enumerate(("cat", "dog", "eel")):
        for i in range(3):
            rgb = Image.fromarray(smooth_image(rng, 20 + 7 * i, 30 - 3 * c))
            save(root / name / f"{i}.jpg", rgb, "JPEG", quality=95)
            repairs[f"{name}/{i}.jpg"] = None
    rgb = Image.fromarray(smooth_image(rng, 24, 24))
    save(root / "cat" / "rgb.png", rgb, "PNG")
    save(root / "dog" / "gray.jpg", rgb.convert("L"), "JPEG", quality=95)
    save(root / "eel" / "cmyk.jpg", rgb.convert("CMYK"), "JPEG", quality=95)
    save(root / "eel" / "nested" / "rgba.png", rgb.convert("RGBA"), "PNG")  # opaque alpha
    repairs.update(
        {"cat/rgb.png": "png", "dog/gray.jpg": "grayscale", "eel/cmyk.jpg": "cmyk"}
        | {"eel/nested/rgba.png": "rgba"}
    )
    return repairs


# ---------------------------------------------------------------------------------------------
# Plan, budget and geometry (no Ray)
# ---------------------------------------------------------------------------------------------


def _items(n: int, num_classes: int = 4) -> list[SourceItem]:
    return [SourceItem(f"k{i:04d}", i % num_classes, ("file", f"/x/{i}")) for i in range(n)]


def test_plan_shards_is_deterministic_balanced_and_mixed():
    splits = {"train": _items(103), "val": _items(10), "empty": []}
    plan = shards.plan_shards(splits, shard_rows=25, seed=0, settings={"quality": 95})
    train = [s for s in plan if s.split == "train"]
    assert [len(s.items) for s in train] == [20, 21, 20, 21, 21]
    assert [s.path for s in train][:2] == [
        "train/shard-00000-of-00005.parquet",
        "train/shard-00001-of-00005.parquet",
    ]
    assert sorted(i.key for s in train for i in s.items) == [i.key for i in splits["train"]]
    assert all(len({i.label for i in s.items}) == 4 for s in train)  # classes mix in every shard
    assert [s.with_stats for s in plan] == [True] * 5 + [False]
    assert not [s for s in plan if s.split == "empty"]

    again = shards.plan_shards(splits, shard_rows=25, seed=0, settings={"quality": 95})
    assert again == plan
    reseeded = shards.plan_shards(splits, shard_rows=25, seed=1, settings={"quality": 95})
    assert [s.items for s in reseeded] != [s.items for s in plan]
    requality = shards.plan_shards(splits, shard_rows=25, seed=0, settings={"quality": 90})
    assert [s.items for s in requality] == [s.items for s in plan]
    assert not {s.fingerprint for s in requality} & {s.fingerprint for s in plan}


def test_skip_budget():
    assert shards.skip_budget("3", 10**6) == 3
    assert shards.skip_budget("0.001", 12_345) == 12
    assert shards.skip_budget("0", 10) == 0
    for bad in ("-1", "1.5", "x", "0.5.1"):
        with pytest.raises(shards.PrepareError, match="--max-skipped"):
            shards.skip_budget(bad, 10)


def test_resize_center_crop():
    rgb = np.zeros((40, 80, 3), dtype=np.uint8)
    rgb[:, 20:60] = 200  # the central square survives the crop, the black sides do not
    crop = shards.resize_center_crop(rgb, 20)
    assert crop.shape == (20, 20, 3)
    assert (crop[:, 1:-1] == 200).all()
    assert crop.min() > 150  # only the antialiasing filter's edge reaches the black
    same = smooth_image(np.random.default_rng(0), 8, 8)
    assert shards.resize_center_crop(same, 8) is same


# ---------------------------------------------------------------------------------------------
# Round trips
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_synthetic_round_trip(ray_local, tmp_path, capsys, monkeypatch):
    # A relative --out: the driver must resolve it, since Ray tasks run in other directories.
    monkeypatch.chdir(tmp_path)
    args = ["--classes", "4", "--train-per-class", "20", "--val-per-class", "5"]
    code, out, _ = run_prepare(capsys, "synthetic", *args, "--shard-rows", "30", "--out", "ds")
    assert code == 0
    assert "shards done 4/4" in out
    assert "audit: 100 images, 100 written, 0 repaired, 0 skipped, 0 resized" in out
    root = tmp_path / "ds"
    manifest = read_manifest("ds")
    assert manifest.root == str(root)

    listing = list_synthetic(SyntheticSpec(4, 20, 5, "cifar", 0))
    assert manifest.dataset == "synthetic"
    assert list(manifest.classes) == listing.classes
    assert list(manifest.class_names) == listing.class_names
    assert {s: manifest.num_rows(s) for s in manifest.splits} == {"train": 80, "val": 20}
    assert [s.num_rows for s in manifest.splits["train"].shards] == [26, 27, 27]
    assert_manifest_matches_files(root)

    train_pixels = []
    for split, items in listing.splits.items():
        rows = read_split(root, split)
        by_key = {item.key: item for item in items}
        assert sorted(r["key"] for r in rows) == sorted(by_key)
        for row in rows:
            item = by_key[row["key"]]
            assert row["label"] == item.label
            pixels = decode(row["image"])
            assert pixels.shape == (row["height"], row["width"], 3) == (32, 32, 3)
            source = np.asarray(Image.open(io.BytesIO(read_item(item))).convert("RGB"))
            assert np.abs(pixels.astype(int) - source).mean() < 1.0
            if split == "train":
                train_pixels.append(pixels / 255.0)
        for uri in manifest.shard_uris(split):
            assert len(set(pq.read_table(uri, columns=["label"])["label"].to_pylist())) > 1

    # Statistics: exactly those of the stored training images.
    train_pixels = np.stack(train_pixels)
    np.testing.assert_allclose(
        manifest.pixel_mean_rgb, train_pixels.mean(axis=(0, 1, 2)), atol=1e-9
    )
    np.testing.assert_allclose(manifest.pixel_std_rgb, train_pixels.std(axis=(0, 1, 2)), atol=1e-9)
    mean_image = load_mean_image(manifest)
    assert mean_image.shape == (3, 32, 32)
    np.testing.assert_allclose(mean_image, train_pixels.mean(axis=0).transpose(2, 0, 1), atol=1e-6)


@pytest.mark.slow
def test_folder_round_trip_repairs_every_variant(ray_local, tmp_path, capsys):
    src = tmp_path / "src"
    repairs = make_folder_tree(src)
    code, out, _ = run_prepare(
        capsys, "folder", "--src", str(src), "--out", str(tmp_path / "ds"), "--shard-rows", "5",
        "--mean-size", "16",
    )  # fmt: skip
    assert code == 0
    manifest = read_manifest(str(tmp_path / "ds"))
    assert manifest.classes == ("cat", "dog", "eel")
    assert list(manifest.splits) == ["train"]
    assert len(manifest.splits["train"].shards) == 3
    assert_manifest_matches_files(tmp_path / "ds")

    listing = list_folder(src)
    by_key = {item.key: item for item in listing.splits["train"]}
    rows = read_split(tmp_path / "ds", "train")
    assert sorted(r["key"] for r in rows) == sorted(by_key) == sorted(repairs)
    for row in rows:
        item = by_key[row["key"]]
        assert row["label"] == item.label
        pixels = decode(row["image"])
        assert pixels.shape == (row["height"], row["width"], 3)
        source = np.asarray(Image.open(io.BytesIO(read_item(item))).convert("RGB"))
        assert np.abs(pixels.astype(int) - source).mean() < 3.0, row["key"]

    audit = manifest.raw["audit"]
    expected = {}
    for key, reason in repairs.items():
        if reason:
            expected.setdefault(reason, []).append(key)
    assert audit["repaired"] == expected
    assert audit["skipped"] == {}
    assert {r: n for r, n in audit["counts"]["repaired"].items() if n} == {
        "cmyk": 1, "grayscale": 1, "png": 1, "rgba": 1,
    }  # fmt: skip
    assert "audit: 13 images, 13 written, 4 repaired, 0 skipped" in out
    assert "  repaired cmyk: 1 (eel/cmyk.jpg)" in out
    assert load_mean_image(manifest).shape == (3, 16, 16)


@pytest.mark.slow
def test_imagenet_oddities_are_counted_and_budgeted(ray_local, tmp_path, capsys):
    src = tmp_path / "ILSVRC2012"
    val_truth = make_imagenet_tree(src, oddities=True)
    make_devkit(src, val_truth)
    out = tmp_path / "ds"
    args = ["imagenet", "--src", str(src), "--out", str(out), "--shard-rows", "10"]
    prefix = f"train/{WNIDS[0]}/{WNIDS[0]}_"
    oddities = oddity_files()
    expected_skips = {skip: prefix + name for name, (_, _, skip) in oddities.items() if skip}
    expected_repairs = {fix: prefix + name for name, (_, fix, _) in oddities.items() if fix}
    assert len(expected_skips) == 4
    assert len(expected_repairs) == 5

    # Over the budget: exit 1, every skipped file listed, shards kept, no manifest.
    code, stdout, stderr = run_prepare(capsys, *args, "--max-skipped", "3")
    assert code == 1
    assert "audit: 25 images, 21 written, 5 repaired, 4 skipped, 0 resized" in stdout
    assert "4 images skipped, over the budget of 3 (--max-skipped 3)" in stderr
    for reason, key in expected_skips.items():
        assert f"  {key}: {reason} (" in stderr
    assert not (out / "manifest.json").exists()
    assert list((out / "train").glob("*.parquet"))

    # Within the budget: the same counts, in the manifest and on screen.
    code, stdout, stderr = run_prepare(capsys, *args, "--max-skipped", "4")
    assert code == 0, stderr
    for reason, key in {**expected_skips, **expected_repairs}.items():
        kind = "skipped" if reason in expected_skips else "repaired"
        assert f"  {kind} {reason}: 1 ({key})" in stdout
    manifest = read_manifest(str(out))
    audit = manifest.raw["audit"]
    assert audit["counts"]["images"] == 25
    assert audit["counts"]["written"] == 21
    assert audit["counts"]["skipped"] == {
        "empty": 1, "not_an_image": 1, "truncated": 1, "decompression_bomb": 1, "unreadable": 0,
    }  # fmt: skip
    assert audit["counts"]["repaired"] == {
        "cmyk": 1, "grayscale": 1, "png": 1, "rgba": 1, "palette": 1, "other_mode": 0,
        "other_format": 0,
    }  # fmt: skip
    assert audit["repaired"] == {reason: [key] for reason, key in expected_repairs.items()}
    assert {r: [e["key"] for e in entries] for r, entries in audit["skipped"].items()} == {
        reason: [key] for reason, key in expected_skips.items()
    }
    assert all(e["detail"] for entries in audit["skipped"].values() for e in entries)

    # Labels: sorted WNIDs; validation labels from the devkit; names from meta.mat.
    assert manifest.classes == tuple(sorted(WNIDS))
    assert manifest.class_names == tuple(WNID_NAMES[w] for w in sorted(WNIDS))
    val = {row["key"]: row["label"] for row in read_split(out, "val")}
    assert val == {f"val/{name}": sorted(WNIDS).index(w) for name, w in val_truth.items()}
    train = read_split(out, "train")
    assert len(train) == 9 + 6  # 3 classes x 3, plus the clean and the 5 repaired oddities
    assert all(decode(row["image"]).shape == (row["height"], row["width"], 3) for row in train)
    assert load_mean_image(manifest).shape == (3, 224, 224)


@pytest.mark.slow
def test_imagenet_archives_match_extracted_folders(ray_local, tmp_path, capsys):
    tree = tmp_path / "extracted"
    val_truth = make_imagenet_tree(tree, train_per_class=4, val_per_class=2)
    make_devkit(tree, val_truth, as_tar_gz=True)
    archives = tmp_path / "archives"
    make_imagenet_archives(tree, archives)
    (archives / "ILSVRC2012_devkit_t12.tar.gz").write_bytes(
        (tree / "ILSVRC2012_devkit_t12.tar.gz").read_bytes()
    )
    options = ["--shard-rows", "5", "--mean-size", "32"]
    for src, out in ((tree, "from-tree"), (archives, "from-tars")):
        code, _, stderr = run_prepare(
            capsys, "imagenet", "--src", str(src), "--out", str(tmp_path / out), *options
        )
        assert code == 0, stderr
    from_tree = read_manifest(str(tmp_path / "from-tree"))
    from_tars = read_manifest(str(tmp_path / "from-tars"))
    for split in ("train", "val"):
        rows_tree = {r["key"]: (r["label"], r["image"]) for r in read_split(from_tree.root, split)}
        rows_tars = {r["key"]: (r["label"], r["image"]) for r in read_split(from_tars.root, split)}
        assert rows_tree == rows_tars
        assert len(rows_tree) == {"train": 12, "val": 6}[split]
    # Same keys, labels and bytes in the same plan: the shards are byte-identical.
    assert from_tree.splits == from_tars.splits
    assert from_tree.raw["audit"] == from_tars.raw["audit"]
    np.testing.assert_array_equal(load_mean_image(from_tree), load_mean_image(from_tars))


@pytest.mark.slow
def test_cifar10_archive_with_held_out_val(ray_local, tmp_path, capsys):
    archive = make_cifar10(tmp_path, per_batch=4, as_tar_gz=True)
    out = tmp_path / "ds"
    code, _, stderr = run_prepare(
        capsys, "cifar10", "--src", str(archive), "--out", str(out), "--val-size", "5"
    )
    assert code == 0, stderr
    manifest = read_manifest(str(out))
    assert manifest.classes == CIFAR_CLASSES
    assert {s: manifest.num_rows(s) for s in manifest.splits} == {"train": 15, "val": 5, "test": 4}
    assert manifest.mean_image_size == 32
    # CIFAR-10 stays lossless: shards hold the PNG of the stored array, nothing is "repaired".
    assert manifest.raw["image"]["format"] == "png"
    assert not manifest.raw["audit"]["counts"]["repaired"].get("png")
    batches = {name: cifar_pixels(b, 4) for b, name in enumerate(
        [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    )}  # fmt: skip
    keys = set()
    for split in ("train", "val", "test"):
        for row in read_split(out, split):
            batch, index = row["key"].split("/")
            b = int(batch[-1]) - 1 if batch.startswith("data_batch") else 5
            assert row["label"] == (b + int(index)) % 10
            source = batches[batch][int(index)].reshape(3, 32, 32).transpose(1, 2, 0)
            assert np.array_equal(decode(row["image"], "PNG"), source)  # exact pixels
            keys.add(row["key"])
    assert len(keys) == 24
    assert all(k.startswith("test_batch/") for k in (r["key"] for r in read_split(out, "test")))


# ---------------------------------------------------------------------------------------------
# Resume
# ---------------------------------------------------------------------------------------------


def _mtimes(root: Path) -> dict[str, int]:
    return {
        str(p.relative_to(root)): p.stat().st_mtime_ns
        for p in root.rglob("*")
        if p.is_file() and p.name != "manifest.json"
    }


@pytest.mark.slow
def test_interrupted_prepare_resumes_only_missing_shards(ray_local, tmp_path, capsys):
    out = tmp_path / "ds"
    args = ["synthetic", "--classes", "3", "--train-per-class", "20", "--val-per-class", "4"]
    args += ["--shard-rows", "15", "--out", str(out)]
    assert run_prepare(capsys, *args)[0] == 0
    clean = json.loads((out / "manifest.json").read_text())
    before = _mtimes(out)

    # What an interrupted run leaves: no manifest, one shard without marker, one marker whose
    # shard never landed.
    (out / "manifest.json").unlink()
    (out / "_progress" / "train-00001.json").unlink()
    (out / "train" / "shard-00003-of-00004.parquet").unlink()
    code, stdout, _ = run_prepare(capsys, *args)
    assert code == 0
    assert "72 images in 5 shards: 3 already written, 2 to write" in stdout
    assert "shards done 2/2" in stdout
    after = _mtimes(out)
    rewritten = {name for name in after if after[name] != before.get(name)}
    assert rewritten == {
        "train/shard-00001-of-00004.parquet",
        "train/shard-00003-of-00004.parquet",
        "_progress/train-00001.json",
        "_progress/train-00001.mean.npy",
        "_progress/train-00003.json",
        "_progress/train-00003.mean.npy",
        "mean_image.npy",
    }
    resumed = json.loads((out / "manifest.json").read_text())
    assert {**resumed, "created_utc": None} == {**clean, "created_utc": None}

    # A complete dataset: nothing to do, and the manifest keeps its bytes (and checksum).
    manifest_bytes = (out / "manifest.json").read_bytes()
    code, stdout, _ = run_prepare(capsys, *args)
    assert code == 0
    assert "5 already written, 0 to write" in stdout
    assert (out / "manifest.json").read_bytes() == manifest_bytes


@pytest.mark.slow
def test_over_budget_then_fixed_file_resumes(ray_local, tmp_path, capsys):
    src = tmp_path / "src"
    rng = np.random.default_rng(1)
    for name in ("a", "b", "c"):
        for i in range(2):
            save(src / name / f"{i}.jpg", Image.fromarray(smooth_image(rng, 16, 16)), "JPEG")
    good = (src / "b" / "1.jpg").read_bytes()
    (src / "b" / "1.jpg").write_bytes(good[: len(good) // 2])  # truncated
    (src / "c" / "0.jpg").write_bytes(b"")
    out = tmp_path / "ds"
    args = ["folder", "--src", str(src), "--out", str(out), "--shard-rows", "2"]

    code, stdout, stderr = run_prepare(capsys, *args, "--max-skipped", "1")
    assert code == 1
    assert "audit: 6 images, 4 written, 0 repaired, 2 skipped" in stdout
    assert "  skipped empty: 1 (c/0.jpg)" in stdout
    assert "  skipped truncated: 1 (b/1.jpg)" in stdout
    assert "2 images skipped, over the budget of 1 (--max-skipped 1)" in stderr
    assert "  b/1.jpg: truncated" in stderr
    assert "  c/0.jpg: empty" in stderr
    assert not (out / "manifest.json").exists()
    assert len(list((out / "train").glob("*.parquet"))) == 3  # shards stay for the re-run

    markers = [json.loads(p.read_text()) for p in (out / "_progress").glob("*.json")]
    with_skips = sum(1 for m in markers if any(m["skipped"].values()))
    assert 1 <= with_skips <= 2

    (src / "b" / "1.jpg").write_bytes(good)
    (src / "c" / "0.jpg").write_bytes((src / "c" / "1.jpg").read_bytes())
    code, stdout, _ = run_prepare(capsys, *args, "--max-skipped", "0")
    assert code == 0
    # Only the shards that skipped an image are redone; the fixed files are now in.
    assert f"6 images in 3 shards: {3 - with_skips} already written, {with_skips} to write" in (
        stdout
    )
    manifest = read_manifest(str(out))
    assert manifest.num_rows("train") == 6
    assert manifest.raw["audit"]["skipped"] == {}
    assert sorted(r["key"] for r in read_split(out, "train")) == [
        "a/0.jpg", "a/1.jpg", "b/0.jpg", "b/1.jpg", "c/0.jpg", "c/1.jpg",
    ]  # fmt: skip
    assert_manifest_matches_files(out)


@pytest.mark.slow
def test_shard_with_skipped_image_is_redone_after_fix(ray_local, tmp_path, capsys):
    src = tmp_path / "src"
    rng = np.random.default_rng(2)
    for name in ("a", "b"):
        for i in range(4):
            save(src / name / f"{i}.jpg", Image.fromarray(smooth_image(rng, 16, 16)), "JPEG")
    good = (src / "a" / "2.jpg").read_bytes()
    (src / "a" / "2.jpg").write_bytes(b"this is not an image")
    out = tmp_path / "ds"
    args = ["folder", "--src", str(src), "--out", str(out), "--shard-rows", "2"]
    code, _, stderr = run_prepare(capsys, *args, "--max-skipped", "0")
    assert code == 1
    assert "  a/2.jpg: not_an_image" in stderr
    before = _mtimes(out)

    (src / "a" / "2.jpg").write_bytes(good)
    code, stdout, _ = run_prepare(capsys, *args, "--max-skipped", "0")
    assert code == 0
    assert "8 images in 4 shards: 3 already written, 1 to write" in stdout
    after = _mtimes(out)
    changed = {n for n in after if n.endswith(".parquet") and after[n] != before[n]}
    assert len(changed) == 1
    assert "a/2.jpg" in pq.read_table(out / next(iter(changed)))["key"].to_pylist()
    assert read_manifest(str(out)).num_rows("train") == 8


@pytest.mark.slow
def test_failed_shard_task_exits_1_and_rerun_recovers(ray_local, tmp_path, capsys):
    out = tmp_path / "ds"
    args = ["synthetic", "--classes", "2", "--train-per-class", "6", "--val-per-class", "2"]
    args += ["--shard-rows", "4", "--out", str(out)]
    out.mkdir()
    (out / "_progress").write_text("a file where the marker folder goes")  # every task fails
    code, _, stderr = run_prepare(capsys, *args)
    assert code == 1
    assert "writing shards failed" in stderr
    assert "re-run the same command" in stderr
    assert not (out / "manifest.json").exists()

    (out / "_progress").unlink()
    code, stdout, _ = run_prepare(capsys, *args)
    assert code == 0
    assert "16 images in 4 shards: 0 already written, 4 to write" in stdout
    assert_manifest_matches_files(out)


# ---------------------------------------------------------------------------------------------
# Bad input: one line, exit 2, nothing written
# ---------------------------------------------------------------------------------------------


def _assert_refused(capsys, out: Path, *argv: str) -> str:
    code, stdout, stderr = run_prepare(capsys, *argv)
    assert code == 2
    assert stdout == ""
    assert stderr.count("\n") == 1
    assert stderr.startswith("resnet-prepare: ")
    assert not out.exists()
    return stderr


def test_bad_src_is_refused(tmp_path, capsys):
    out = tmp_path / "ds"
    err = _assert_refused(capsys, out, "folder", "--src", str(tmp_path / "nope"), "--out", str(out))
    assert str(tmp_path / "nope") in err
    empty = tmp_path / "empty"
    empty.mkdir()
    err = _assert_refused(capsys, out, "cifar10", "--src", str(empty), "--out", str(out))
    assert "cifar-10-python.tar.gz" in err


def test_imagenet_without_devkit_is_refused(tmp_path, capsys):
    src = tmp_path / "ILSVRC2012"
    image = Image.fromarray(smooth_image(np.random.default_rng(0), 8, 8))
    save(src / "train" / "n01440764" / "n01440764_1.JPEG", image, "JPEG")
    save(src / "val" / "ILSVRC2012_val_00000001.JPEG", image, "JPEG")
    out = tmp_path / "ds"
    err = _assert_refused(capsys, out, "imagenet", "--src", str(src), "--out", str(out))
    assert "--val-labels" in err
    err = _assert_refused(
        capsys, out, "imagenet", "--src", str(src), "--out", str(out),
        "--val-labels", str(tmp_path / "devkit.tar.gz"),
    )  # fmt: skip
    assert str(tmp_path / "devkit.tar.gz") in err


def test_bad_options_are_refused(tmp_path, capsys):
    out = tmp_path / "ds"
    _assert_refused(capsys, out, "synthetic", "--out", str(out), "--shard-rows", "0")
    _assert_refused(capsys, out, "synthetic", "--out", str(out), "--max-skipped", "lots")
    _assert_refused(capsys, out, "synthetic", "--out", str(out), "--classes", "1")
    _assert_refused(capsys, out, "synthetic", "--out", str(out), "--quality", "101")
    err = _assert_refused(capsys, out, "folder", "--src", "s3://b/x", "--out", str(out))
    assert "local paths" in err
    (tmp_path / "file").write_text("x")
    _assert_refused(capsys, out, "synthetic", "--out", str(tmp_path / "file" / "ds"))
    src = tmp_path / "src"
    src.mkdir()
    _assert_refused(capsys, out, "folder", "--src", str(src), "--out", str(src / "ds"))
    assert os.listdir(src) == []
