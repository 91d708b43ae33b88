"""pipelines.storage (local filesystem) and pipelines.manifest: no Ray, no network."""

from __future__ import annotations

import copy
import hashlib
import io
import json
import os
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pytest

from pipelines import manifest as manifest_lib
from pipelines import storage


def test_redact_strips_userinfo_only():
    assert storage.redact("s3://AKIA:secret@bucket/prefix") == "s3://bucket/prefix"
    assert storage.redact("http://user:pw@minio:9000") == "http://minio:9000"
    assert storage.redact("s3://bucket/a@b") == "s3://bucket/a@b"
    assert storage.redact("/data/x@y") == "/data/x@y"


def test_absolute_uri_join_and_fs_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert storage.absolute_uri("data/out") == str(tmp_path / "data" / "out")
    assert storage.absolute_uri("s3://bucket/prefix/") == "s3://bucket/prefix"
    assert storage.join("s3://bucket/prefix", "train", "a.parquet") == (
        "s3://bucket/prefix/train/a.parquet"
    )
    assert storage.fs_path("s3://bucket/prefix/x") == "bucket/prefix/x"
    assert storage.fs_path("s3://bucket") == "bucket"
    with pytest.raises(storage.StorageError, match="gs://bucket"):
        storage.absolute_uri("gs://bucket/x")
    with pytest.raises(storage.StorageError, match="are not accepted") as info:
        storage.absolute_uri("s3://AKIAXYZ:hunter2@bucket/x")
    assert "hunter2" not in str(info.value)
    assert "AKIAXYZ" not in str(info.value)


def test_write_bytes_is_atomic_and_replaces(tmp_path):
    fs, root = storage.resolve(str(tmp_path / "out"))
    path = storage.join(root, "deep", "file.bin")
    assert not storage.exists(fs, path)
    storage.write_bytes(fs, path, b"first")
    storage.write_bytes(fs, path, b"second")
    assert storage.read_bytes(fs, path) == b"second"
    assert storage.exists(fs, path)
    # Only the final file is left: the temporary sibling was renamed into place.
    assert storage.list_files(fs, root) == [path]
    assert storage.list_files(fs, storage.join(root, "missing")) == []


def test_check_writable_creates_nothing(tmp_path):
    storage.check_writable(str(tmp_path / "a" / "b" / "c"))
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "file").write_text("x")
    with pytest.raises(storage.StorageError, match="is a file"):
        storage.check_writable(str(tmp_path / "file" / "out"))


def test_check_readable(tmp_path):
    storage.check_readable(str(tmp_path))
    with pytest.raises(storage.StorageError, match="does not exist") as info:
        storage.check_readable(str(tmp_path / "nope"))
    assert "\n" not in str(info.value)


@pytest.mark.skipif(os.geteuid() == 0, reason="root can read and write anything")
def test_permissions_are_checked(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o000)
    try:
        with pytest.raises(storage.StorageError, match="not readable"):
            storage.check_readable(str(locked))
        with pytest.raises(storage.StorageError, match="not writable"):
            storage.check_writable(str(locked / "out"))
    finally:
        locked.chmod(0o700)


def _manifest_dict() -> dict:
    shard = {"path": "train/shard-00000-of-00001.parquet", "num_rows": 3, "bytes": 10}
    return {
        "format_version": 1,
        "dataset": "synthetic",
        "created_utc": "2026-01-01T00:00:00+00:00",
        "source": "synthetic",
        "classes": ["a", "b"],
        "class_names": ["A", "B"],
        "splits": {
            "train": {"num_rows": 3, "shards": [{**shard, "sha256": "0" * 64}]},
            "val": {"num_rows": 0, "shards": []},
        },
        "image": {"format": "jpeg", "max_side": None, "quality": 95, "max_pixels": 100},
        "pixel_mean_rgb": [0.5, 0.4, 0.3],
        "pixel_std_rgb": [0.2, 0.2, 0.2],
        "mean_image": {"path": "mean_image.npy", "size": 4, "split": "train"},
        "audit": {"repaired": {}, "skipped": {}, "counts": {}},
    }


def test_manifest_round_trip(tmp_path):
    fs, root = storage.resolve(str(tmp_path))
    checksum = manifest_lib.write_manifest(fs, root, _manifest_dict())
    written = (tmp_path / "manifest.json").read_bytes()
    assert checksum == hashlib.sha256(written).hexdigest()

    for uri in (str(tmp_path), str(tmp_path / "manifest.json")):
        m = manifest_lib.read_manifest(uri)
        assert m.root == str(tmp_path)
        assert m.checksum == checksum
        assert m.classes == ("a", "b")
        assert m.class_names == ("A", "B")
        assert m.num_classes == 2
        assert m.num_rows("train") == 3
        assert m.num_rows("val") == 0
        assert m.shard_uris("train") == [str(tmp_path / "train/shard-00000-of-00001.parquet")]
        assert m.splits["train"].shards[0].num_bytes == 10
        assert m.pixel_mean_rgb == (0.5, 0.4, 0.3)
        assert m.mean_image_uri == str(tmp_path / "mean_image.npy")
        assert m.raw["source"] == "synthetic"
    with pytest.raises(manifest_lib.ManifestError, match=r"split 'test' .*\['train', 'val'\]"):
        m.shard_uris("test")
    # An explicit filesystem is used as given.
    assert manifest_lib.read_manifest(str(tmp_path), pafs.LocalFileSystem()).checksum == checksum


def test_manifest_errors_are_one_line(tmp_path):
    with pytest.raises(manifest_lib.ManifestError, match=r"no manifest\.json at .*resnet-prepare"):
        manifest_lib.read_manifest(str(tmp_path))

    def error_for(data: dict | bytes) -> str:
        raw = data if isinstance(data, bytes) else json.dumps(data).encode()
        (tmp_path / "manifest.json").write_bytes(raw)
        with pytest.raises(manifest_lib.ManifestError) as info:
            manifest_lib.read_manifest(str(tmp_path))
        assert "\n" not in str(info.value)
        return str(info.value)

    assert "not valid JSON" in error_for(b"{not json")
    assert "format_version 2" in error_for({**_manifest_dict(), "format_version": 2})
    missing_classes = _manifest_dict()
    del missing_classes["classes"]
    assert "malformed" in error_for(missing_classes)
    wrong_rows = copy.deepcopy(_manifest_dict())
    wrong_rows["splits"]["train"]["num_rows"] = 4
    assert "do not add up" in error_for(wrong_rows)
    # write_manifest refuses to write what read_manifest would reject.
    fs, root = storage.resolve(str(tmp_path / "other"))
    with pytest.raises(manifest_lib.ManifestError):
        manifest_lib.write_manifest(fs, root, wrong_rows)
    assert not (tmp_path / "other").exists()


def test_load_mean_image(tmp_path):
    fs, root = storage.resolve(str(tmp_path))
    manifest_lib.write_manifest(fs, root, _manifest_dict())
    m = manifest_lib.read_manifest(str(tmp_path))
    mean = np.random.default_rng(0).random((3, 4, 4), dtype=np.float32)
    np.save(tmp_path / "mean_image.npy", mean)
    np.testing.assert_array_equal(manifest_lib.load_mean_image(m), mean)

    np.save(tmp_path / "mean_image.npy", mean[:, :2])
    with pytest.raises(manifest_lib.ManifestError, match=r"expected float32 \(3, 4, 4\)"):
        manifest_lib.load_mean_image(m)

    # A pickled object array is never unpickled.
    buffer = io.BytesIO()
    np.save(buffer, np.array([{"x": 1}], dtype=object), allow_pickle=True)
    Path(tmp_path / "mean_image.npy").write_bytes(buffer.getvalue())
    with pytest.raises(ValueError, match="allow_pickle"):
        manifest_lib.load_mean_image(m)


def test_manifest_without_train_split_has_no_mean_image(tmp_path):
    data = _manifest_dict()
    data.update(pixel_mean_rgb=None, pixel_std_rgb=None, mean_image=None)
    fs, root = storage.resolve(str(tmp_path))
    manifest_lib.write_manifest(fs, root, data)
    m = manifest_lib.read_manifest(str(tmp_path))
    assert m.mean_image_uri is None
    assert m.pixel_mean_rgb is None
    with pytest.raises(manifest_lib.ManifestError, match="no mean image"):
        manifest_lib.load_mean_image(m)


def _dataset_with_shards(tmp_path) -> manifest_lib.Manifest:
    """A manifest whose train split names two real files with their true sizes and sha256."""
    data = _manifest_dict()
    shards = []
    for i, content in enumerate((b"first shard bytes", b"second")):
        path = tmp_path / "train" / f"shard-{i:05d}-of-00002.parquet"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(content)
        shards.append(
            {
                "path": f"train/{path.name}",
                "num_rows": 1,
                "bytes": len(content),
                "sha256": hashlib.sha256(content).hexdigest(),
            }
        )
    data["splits"]["train"] = {"num_rows": 2, "shards": shards}
    fs, root = storage.resolve(str(tmp_path))
    manifest_lib.write_manifest(fs, root, data)
    return manifest_lib.read_manifest(str(tmp_path))


def test_verify_shards_names_a_missing_or_cut_short_shard_and_the_fix(tmp_path):
    m = _dataset_with_shards(tmp_path)
    manifest_lib.verify_shards(m, ["train", "val"], sha256=True)
    second = tmp_path / "train" / "shard-00001-of-00002.parquet"
    second.write_bytes(b"sec")  # cut short
    with pytest.raises(
        manifest_lib.ManifestError,
        match=rf"shard train/{second.name} of {tmp_path} is 3 bytes, the manifest says 6: .* "
        rf"re-run resnet-prepare with --out {tmp_path}",
    ):
        manifest_lib.verify_shards(m, ["train"])
    second.unlink()
    with pytest.raises(manifest_lib.ManifestError, match=f"{second.name} .* is missing"):
        manifest_lib.verify_shards(m, ["train"])


def test_verify_shards_checks_sha256_only_when_asked(tmp_path):
    m = _dataset_with_shards(tmp_path)
    (tmp_path / "train" / "shard-00000-of-00002.parquet").write_bytes(b"FIRST SHARD BYTES")
    manifest_lib.verify_shards(m, ["train"])  # the same size: the cheap check passes
    with pytest.raises(
        manifest_lib.ManifestError,
        match=r"shard-00000-of-00002\.parquet .* has other bytes than the manifest's sha256: .* "
        r"delete it and re-run resnet-prepare",
    ):
        manifest_lib.verify_shards(m, ["train"], sha256=True)
