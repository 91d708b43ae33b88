"""Listing and reading ImageNet (every layout), CIFAR-10 and class-per-folder sources."""

import io
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines import sources
from pipelines.sources import (
    SourceError,
    SourceItem,
    list_cifar10,
    list_folder,
    list_imagenet,
    read_item,
)
from tests.fixtures_imagenet import (
    CIFAR_CLASSES,
    WNID_NAMES,
    WNIDS,
    cifar_pixels,
    jpeg_bytes,
    make_cifar10,
    make_devkit,
    make_imagenet_archives,
    make_imagenet_tree,
    make_kaggle_labels,
)

SORTED_WNIDS = sorted(WNIDS)


def summary(listing):
    """What must agree between layouts: classes and (key, label) per split."""
    return listing.classes, {
        s: [(i.key, i.label) for i in items] for s, items in listing.splits.items()
    }


def expected_imagenet(val_truth, train_per_class=3):
    train = [
        (f"train/{w}/{w}_{1000 + n}.JPEG", SORTED_WNIDS.index(w))
        for w in SORTED_WNIDS
        for n in range(train_per_class)
    ]
    val = [(f"val/{name}", SORTED_WNIDS.index(w)) for name, w in sorted(val_truth.items())]
    return SORTED_WNIDS, {"train": train, "val": val}


# --------------------------------------------------------------------------------- ImageNet


def test_flat_val_with_devkit_folder(tmp_path):
    val_truth = make_imagenet_tree(tmp_path)
    make_devkit(tmp_path, val_truth)
    listing = list_imagenet(tmp_path)
    assert listing.dataset == "imagenet"
    assert summary(listing) == expected_imagenet(val_truth)
    assert listing.class_names == [WNID_NAMES[w] for w in SORTED_WNIDS]
    for item in listing.splits["train"] + listing.splits["val"]:
        assert read_item(item) == Path(item.locator[1]).read_bytes()
        assert item.locator[0] == "file"


@pytest.mark.parametrize("labels", ["devkit_tar_gz", "kaggle_csv"])
def test_flat_val_with_other_label_files(tmp_path, labels):
    val_truth = make_imagenet_tree(tmp_path)
    if labels == "devkit_tar_gz":
        make_devkit(tmp_path, val_truth, as_tar_gz=True)
    else:
        make_kaggle_labels(tmp_path, val_truth)
    listing = list_imagenet(tmp_path)
    assert summary(listing) == expected_imagenet(val_truth)
    assert listing.class_names == [WNID_NAMES[w] for w in SORTED_WNIDS]


def test_explicit_val_labels_path(tmp_path):
    src, elsewhere = tmp_path / "imagenet", tmp_path / "labels"
    elsewhere.mkdir()
    val_truth = make_imagenet_tree(src)
    devkit = make_devkit(elsewhere, val_truth, as_tar_gz=True)
    assert summary(list_imagenet(src, val_labels=devkit)) == expected_imagenet(val_truth)
    with pytest.raises(SourceError, match=r"no_such\.csv"):
        list_imagenet(src, val_labels=elsewhere / "no_such.csv")


def test_val_sorted_into_class_folders_gives_the_same_keys(tmp_path):
    val_truth = make_imagenet_tree(tmp_path, val_layout="folders")
    listing = list_imagenet(tmp_path)  # no labels file needed
    assert summary(listing) == expected_imagenet(val_truth)
    assert listing.class_names == SORTED_WNIDS
    assert all(read_item(i) == Path(i.locator[1]).read_bytes() for i in listing.splits["val"])


def test_original_archives_match_the_extracted_tree(tmp_path):
    tree, archives = tmp_path / "tree", tmp_path / "archives"
    val_truth = make_imagenet_tree(tree, train_per_class=4, val_per_class=3)
    make_devkit(tree, val_truth)
    make_imagenet_archives(tree, archives)
    make_devkit(archives, val_truth, as_tar_gz=True)
    extracted, packed = list_imagenet(tree), list_imagenet(archives)
    assert summary(packed) == summary(extracted) == expected_imagenet(val_truth, 4)
    for split in ("train", "val"):
        for item, same in zip(packed.splits[split], extracted.splits[split], strict=True):
            assert item.locator[0] == "tar"
            assert read_item(item) == read_item(same)
    # The locator is all a worker needs: a bare tuple, no open handles, picklable.
    item = pickle.loads(pickle.dumps(packed.splits["train"][-1]))
    assert read_item(item) == read_item(extracted.splits["train"][-1])


def test_kaggle_layout(tmp_path):
    tree = tmp_path / "ILSVRC" / "Data" / "CLS-LOC"
    val_truth = make_imagenet_tree(tree)
    make_kaggle_labels(tmp_path, val_truth)
    assert summary(list_imagenet(tmp_path)) == expected_imagenet(val_truth)


def test_flat_val_without_labels_fails_before_any_work(tmp_path):
    make_imagenet_tree(tmp_path)
    with pytest.raises(
        SourceError, match=r"val holds validation images without labels.*--val-labels"
    ):
        list_imagenet(tmp_path)
    make_imagenet_archives(tmp_path, tmp_path / "archives")
    with pytest.raises(SourceError, match=r"ILSVRC2012_img_val\.tar holds validation images"):
        list_imagenet(tmp_path / "archives")


def test_unusable_imagenet_sources(tmp_path):
    with pytest.raises(SourceError, match="missing does not exist"):
        list_imagenet(tmp_path / "missing")
    with pytest.raises(SourceError, match="holds no ImageNet images"):
        list_imagenet(tmp_path)
    (tmp_path / "file.tar").write_bytes(b"")
    with pytest.raises(SourceError, match=r"file\.tar is not a directory"):
        list_imagenet(tmp_path / "file.tar")
    (tmp_path / "train" / WNIDS[0]).mkdir(parents=True)
    with pytest.raises(SourceError, match=f"class folders without images \\({WNIDS[0]}\\)"):
        list_imagenet(tmp_path)


def test_half_sorted_val_is_refused(tmp_path):
    val_truth = make_imagenet_tree(tmp_path)
    make_devkit(tmp_path, val_truth)
    name = sorted(val_truth)[0]
    (tmp_path / "val" / val_truth[name]).mkdir()
    (tmp_path / "val" / name).rename(tmp_path / "val" / val_truth[name] / name)
    with pytest.raises(SourceError, match="both class folders and loose images"):
        list_imagenet(tmp_path)


def test_labels_naming_an_unknown_class_are_refused(tmp_path):
    val_truth = make_imagenet_tree(tmp_path)
    make_kaggle_labels(tmp_path, val_truth)
    shutil.rmtree(tmp_path / "train" / WNIDS[1])
    with pytest.raises(SourceError, match=f"{WNIDS[1]}, which train lacks"):
        list_imagenet(tmp_path)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads everything")
def test_unreadable_source(tmp_path):
    make_imagenet_tree(tmp_path / "src")
    (tmp_path / "src").chmod(0)
    try:
        with pytest.raises(SourceError, match="not readable"):
            list_imagenet(tmp_path / "src")
    finally:
        (tmp_path / "src").chmod(0o755)


# --------------------------------------------------------------------------------- folders


def test_folder_without_splits(tmp_path):
    for name in ("cat/a.jpg", "cat/deep/b.JPG", "dog/c.Png", "dog/notes.txt", "ant/d.jpeg"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(jpeg_bytes(len(name)))
    listing = list_folder(tmp_path)
    assert listing.classes == listing.class_names == ["ant", "cat", "dog"]
    assert summary(listing)[1] == {
        "train": [("ant/d.jpeg", 0), ("cat/a.jpg", 1), ("cat/deep/b.JPG", 1), ("dog/c.Png", 2)]
    }
    assert read_item(listing.splits["train"][0]) == (tmp_path / "ant/d.jpeg").read_bytes()


def test_folder_with_train_and_val(tmp_path):
    for name in ("train/a/1.jpg", "train/b/2.jpg", "val/b/3.jpg"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(jpeg_bytes(1))
    listing = list_folder(tmp_path)
    assert summary(listing) == (
        ["a", "b"],
        {"train": [("train/a/1.jpg", 0), ("train/b/2.jpg", 1)], "val": [("val/b/3.jpg", 1)]},
    )
    (tmp_path / "val" / "zebra").mkdir()
    (tmp_path / "val" / "zebra" / "4.jpg").write_bytes(jpeg_bytes(2))
    with pytest.raises(SourceError, match=r"classes that the training split lacks \(zebra\)"):
        list_folder(tmp_path)


def test_unusable_folders(tmp_path):
    with pytest.raises(SourceError, match="nope does not exist"):
        list_folder(tmp_path / "nope")
    with pytest.raises(SourceError, match="no class subfolders"):
        list_folder(tmp_path)
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(SourceError, match=r"without images \(empty_class\)"):
        list_folder(tmp_path)


# --------------------------------------------------------------------------------- CIFAR-10


def decoded(item: SourceItem) -> np.ndarray:
    image = Image.open(io.BytesIO(read_item(item)))
    assert (image.format, image.mode, image.size) == ("PNG", "RGB", (32, 32))
    return np.asarray(image)


@pytest.mark.parametrize("as_tar_gz", [False, True])
def test_cifar10_rows_labels_and_pixels(tmp_path, as_tar_gz):
    src = make_cifar10(tmp_path, per_batch=20, as_tar_gz=as_tar_gz)
    listing = list_cifar10(src)
    assert listing.dataset == "cifar10"
    assert listing.classes == listing.class_names == list(CIFAR_CLASSES)
    assert [len(listing.splits[s]) for s in ("train", "val")] == [100, 20]
    assert set(listing.splits) == {"train", "val"}  # val = the test batch when val_size=0
    item = listing.splits["train"][45]  # batch 3 (index 2), row 5
    assert (item.key, item.label) == ("data_batch_3/00005", (2 + 5) % 10)
    stored = cifar_pixels(2, 20)[5]
    assert np.array_equal(decoded(item), stored.reshape(3, 32, 32).transpose(1, 2, 0))
    test_item = listing.splits["val"][3]
    assert (test_item.key, test_item.label) == ("test_batch/00003", (5 + 3) % 10)
    assert np.array_equal(
        decoded(test_item), cifar_pixels(5, 20)[3].reshape(3, 32, 32).transpose(1, 2, 0)
    )


def test_cifar10_archive_and_folder_agree(tmp_path):
    archive = make_cifar10(tmp_path / "a", as_tar_gz=True)
    folder = make_cifar10(tmp_path / "b")
    packed, extracted = list_cifar10(archive), list_cifar10(tmp_path / "b")  # parent folder works
    assert summary(packed) == summary(extracted) == summary(list_cifar10(folder))
    assert [read_item(i) for i in packed.splits["val"]] == [
        read_item(i) for i in extracted.splits["val"]
    ]


def test_cifar10_seeded_validation_split(tmp_path):
    src = make_cifar10(tmp_path, per_batch=20)
    listing = list_cifar10(src, val_size=10, seed=3)
    train, val, test = (summary(listing)[1][s] for s in ("train", "val", "test"))
    assert (len(train), len(val), len(test)) == (90, 10, 20)
    everything = summary(list_cifar10(src))[1]
    assert sorted(train + val) == sorted(everything["train"])
    assert test == everything["val"]
    assert summary(list_cifar10(src, val_size=10, seed=3)) == summary(listing)
    assert summary(list_cifar10(src, val_size=10, seed=4))[1]["val"] != val
    with pytest.raises(SourceError, match="val_size=100 is out of range"):
        list_cifar10(src, val_size=100)


def test_cifar10_batches_are_loaded_once_per_process(tmp_path):
    listing = list_cifar10(make_cifar10(tmp_path, as_tar_gz=True))
    sources._load_cifar_batch.cache_clear()
    for item in listing.splits["train"][::-1]:
        read_item(item)
    assert sources._load_cifar_batch.cache_info().misses == 5


class _RunsAShellCommand:
    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_cifar10_refuses_pickles_that_run_code(tmp_path):
    src = make_cifar10(tmp_path)
    marker = tmp_path / "pwned"
    evil = {b"label_names": [_RunsAShellCommand(f"touch {marker}")]}
    (src / "batches.meta").write_bytes(pickle.dumps(evil, protocol=2))
    with pytest.raises(SourceError, match=r"refusing to load global (posix|os)\.system"):
        list_cifar10(src)
    assert not marker.exists()


def test_cifar10_missing_or_foreign(tmp_path):
    with pytest.raises(SourceError, match="does not exist"):
        list_cifar10(tmp_path / "nothing")
    with pytest.raises(SourceError, match="no CIFAR-10 at"):
        list_cifar10(tmp_path)
    folder = make_cifar10(tmp_path)
    (folder / "data_batch_2").write_bytes(pickle.dumps({b"data": [1, 2]}, protocol=2))
    with pytest.raises(SourceError, match="data_batch_2 lacks uint8 data"):
        list_cifar10(folder)


def test_unknown_locator():
    with pytest.raises(ValueError, match="unknown locator kind 'ftp'"):
        read_item(SourceItem("k", 0, ("ftp", "x")))
