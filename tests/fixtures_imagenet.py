"""Generators of tiny source datasets in the exact layouts they are distributed in.

Plain functions taking a directory (pytest's tmp_path): ILSVRC2012 extracted folders (flat val or
val/<wnid>/), the devkit (meta.mat + ground truth, folder or .tar.gz), Kaggle's
LOC_val_solution.csv + LOC_synset_mapping.txt, the original tar archives (train: a tar of
per-class tars), the images real copies contain that need repair or skipping, and CIFAR-10's
python batches; and shards written by hand in resnet-prepare's schema. Reused by the sources,
audit, prepare and reader tests.
"""

from __future__ import annotations

import io
import pickle
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

WNIDS = ("n01440764", "n01443537", "n01484850")
WNID_NAMES = {
    "n01440764": "tench, Tinca tinca",
    "n01443537": "goldfish, Carassius auratus",
    "n01484850": "great white shark, white shark, man-eater",
}
# Devkit ILSVRC2012_IDs: 1-based, in the devkit's own order (not sorted by WNID, as in the real
# meta.mat), so a reader that confuses the two orders gets wrong labels.
DEVKIT_IDS = {"n01484850": 1, "n01440764": 2, "n01443537": 3}


def encode(pixels: np.ndarray, format: str = "JPEG", mode: str | None = None, **options) -> bytes:
    """Encode a uint8 (H, W, 3) array, optionally converted to `mode`, in `format`."""
    image = Image.fromarray(pixels)
    if mode is not None:
        image = image.convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


def smooth_pixels(seed: int, height: int = 48, width: int = 64) -> np.ndarray:
    """A smooth random RGB image (uint8 (H, W, 3)) that JPEG encodes compactly."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, size=(4, 5, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BILINEAR))


def jpeg_bytes(seed: int, height: int = 48, width: int = 64) -> bytes:
    """A clean RGB JPEG."""
    return encode(smooth_pixels(seed, height, width), quality=90)


def _png_with_size(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height (CRC fixed up) over a tiny image's data."""
    png = bytearray(encode(smooth_pixels(0, 8, 8), format="PNG"))
    ihdr = png[12:29]  # chunk type + 13 data bytes, right after the 8-byte signature + length
    ihdr[4:12] = struct.pack(">II", width, height)
    png[12:29] = ihdr
    png[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    return bytes(png)


def oddity_files() -> dict[str, tuple[bytes, str | None, str | None]]:
    """File name -> (bytes, expected repair reason, expected skip reason) with default limits.

    Every kind of bad file real ImageNet-like copies hold, plus one clean JPEG.
    """
    pixels = smooth_pixels(7)
    height, width, _ = pixels.shape
    alpha = np.broadcast_to(np.linspace(0, 255, width, dtype=np.uint8), (height, width))
    rgba = np.dstack([pixels, alpha])  # transparent on the left, opaque on the right
    full = jpeg_bytes(8)
    return {
        "clean.JPEG": (full, None, None),
        "cmyk.JPEG": (encode(pixels, mode="CMYK"), "cmyk", None),
        "gray.JPEG": (encode(pixels, mode="L"), "grayscale", None),
        "rgba.png": (_encode_rgba(rgba), "rgba", None),
        "palette.png": (encode(pixels, format="PNG", mode="P"), "palette", None),
        "png_named.JPEG": (encode(pixels, format="PNG"), "png", None),
        "truncated.JPEG": (full[: len(full) // 2], None, "truncated"),
        "empty.JPEG": (b"", None, "empty"),
        "text.JPEG": (b"<html><body>404 Not Found</body></html>\n", None, "not_an_image"),
        "bomb.png": (_png_with_size(100_000, 100_000), None, "decompression_bomb"),
    }


def _encode_rgba(rgba: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgba, mode="RGBA").save(buffer, format="PNG")
    return buffer.getvalue()


def make_imagenet_tree(
    root: Path,
    *,
    train_per_class: int = 3,
    val_per_class: int = 2,
    val_layout: str = "flat",
    oddities: bool = False,
) -> dict[str, str]:
    """Write `root/train/<wnid>/<wnid>_<n>.JPEG` and validation images; return val file -> WNID.

    val_layout: "flat" (root/val/ILSVRC2012_val_<8 digits>.JPEG, labels elsewhere) or "folders"
        (root/val/<wnid>/ILSVRC2012_val_....JPEG, as torchvision or valprep.sh sort them).
    oddities: also put every file of `oddity_files()` into the first class (names prefixed by
        its WNID), so its audit counts are exactly one per reason.
    Validation numbers interleave the classes (class i of image n is n mod 3), as in the real set.
    """
    seed = 0
    for wnid in WNIDS:
        folder = root / "train" / wnid
        folder.mkdir(parents=True)
        for n in range(train_per_class):
            seed += 1
            (folder / f"{wnid}_{1000 + n}.JPEG").write_bytes(jpeg_bytes(seed))
    if oddities:
        for name, (data, _, _) in oddity_files().items():
            (root / "train" / WNIDS[0] / f"{WNIDS[0]}_{name}").write_bytes(data)
    val_truth = {}
    for number in range(1, val_per_class * len(WNIDS) + 1):
        wnid = WNIDS[number % len(WNIDS)]
        name = f"ILSVRC2012_val_{number:08d}.JPEG"
        folder = root / "val" / (wnid if val_layout == "folders" else "")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(jpeg_bytes(100 + number))
        val_truth[name] = wnid
    return val_truth


def make_devkit(root: Path, val_truth: dict[str, str], *, as_tar_gz: bool = False) -> Path:
    """Write ILSVRC2012_devkit_t12 (data/meta.mat + ground truth) under `root`; return its path.

    meta.mat has the real structure: a `synsets` struct array whose leaves (num_children == 0)
    are the classes, plus one non-leaf synset that a reader must ignore.
    """
    import scipy.io

    fields = [
        "ILSVRC2012_ID",
        "WNID",
        "words",
        "gloss",
        "num_children",
        "children",
        "wordnet_height",
        "num_train_images",
    ]
    synsets = np.zeros((len(WNIDS) + 1, 1), dtype=[(f, object) for f in fields])
    for row, wnid in enumerate(sorted(WNIDS, key=DEVKIT_IDS.get)):
        synsets[row, 0] = (
            DEVKIT_IDS[wnid],
            wnid,
            WNID_NAMES[wnid],
            "a fish",
            0,
            np.zeros((0,)),
            0,
            1300,
        )
    synsets[-1, 0] = (1001, "n01439121", "cyprinid", "a family", 2, np.array([2, 3]), 1, 0)
    meta = io.BytesIO()
    scipy.io.savemat(meta, {"synsets": synsets})
    numbers = sorted(val_truth)  # ILSVRC2012_val_00000001.JPEG, ... in order
    truth = "".join(f"{DEVKIT_IDS[val_truth[name]]}\n" for name in numbers)
    files = {
        "data/meta.mat": meta.getvalue(),
        "data/ILSVRC2012_validation_ground_truth.txt": truth.encode(),
    }
    devkit = root / "ILSVRC2012_devkit_t12"
    if as_tar_gz:
        archive = root / "ILSVRC2012_devkit_t12.tar.gz"
        with tarfile.open(archive, "w:gz") as tar:
            for name, data in files.items():
                _add_bytes(tar, f"ILSVRC2012_devkit_t12/{name}", data)
        return archive
    for name, data in files.items():
        (devkit / name).parent.mkdir(parents=True, exist_ok=True)
        (devkit / name).write_bytes(data)
    return devkit


def make_kaggle_labels(root: Path, val_truth: dict[str, str]) -> Path:
    """Write LOC_val_solution.csv and LOC_synset_mapping.txt under `root`; return the CSV path."""
    lines = ["ImageId,PredictionString"]
    for name, wnid in sorted(val_truth.items(), reverse=True):  # Kaggle's file is not sorted
        lines.append(f"{Path(name).stem},{wnid} 10 20 30 40 {wnid} 1 2 3 4 ")
    solution = root / "LOC_val_solution.csv"
    solution.write_text("\n".join(lines) + "\n")
    mapping = "".join(f"{wnid} {WNID_NAMES[wnid]}\n" for wnid in sorted(WNIDS))
    (root / "LOC_synset_mapping.txt").write_text(mapping)
    return solution


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def make_imagenet_archives(tree: Path, out: Path) -> tuple[Path, Path]:
    """Write the original archives of an extracted tree: (train tar, val tar) in `out`.

    ILSVRC2012_img_train.tar holds one uncompressed `<wnid>.tar` per class with the class's
    JPEGs at its top level; ILSVRC2012_img_val.tar holds the validation JPEGs at its top level.
    """
    out.mkdir(parents=True, exist_ok=True)
    train_tar, val_tar = out / "ILSVRC2012_img_train.tar", out / "ILSVRC2012_img_val.tar"
    with tarfile.open(train_tar, "w") as outer:
        for class_dir in sorted((tree / "train").iterdir()):
            inner = io.BytesIO()
            with tarfile.open(fileobj=inner, mode="w") as tar:
                for path in sorted(class_dir.iterdir()):
                    _add_bytes(tar, path.name, path.read_bytes())
            _add_bytes(outer, f"{class_dir.name}.tar", inner.getvalue())
    with tarfile.open(val_tar, "w") as tar:
        for path in sorted((tree / "val").rglob("*.JPEG")):
            _add_bytes(tar, path.name, path.read_bytes())
    return train_tar, val_tar


CIFAR_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)


def make_cifar10(root: Path, *, per_batch: int = 20, as_tar_gz: bool = False) -> Path:
    """Write a tiny CIFAR-10 python version with the real pickle structure; return its path.

    Five `data_batch_<i>` and a `test_batch` of `per_batch` rows each, plus `batches.meta`, all
    dicts with bytes keys pickled with protocol 2 as the originals are. Row r of batch b has
    label (b + r) % 10 and pixels derived from (b, r), so a reader's rows can be checked.
    """
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    meta = {
        b"label_names": [c.encode() for c in CIFAR_CLASSES],
        b"num_cases_per_batch": per_batch,
        b"num_vis": 3072,
    }
    files = {"batches.meta": meta}
    for b, name in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        files[name] = {
            b"batch_label": f"batch {b}".encode(),
            b"labels": [(b + r) % 10 for r in range(per_batch)],
            b"data": cifar_pixels(b, per_batch),
            b"filenames": [f"img_{b}_{r}.png".encode() for r in range(per_batch)],
        }
    for name, content in files.items():
        with open(folder / name, "wb") as f:
            pickle.dump(content, f, protocol=2)
    if not as_tar_gz:
        return folder
    archive = root / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname="cifar-10-batches-py")
    return archive


def cifar_pixels(batch: int, rows: int) -> np.ndarray:
    """The uint8 (rows, 3072) data `make_cifar10` stores in batch number `batch` (test = 5)."""
    return np.random.default_rng(batch).integers(0, 256, size=(rows, 3072), dtype=np.uint8)


def write_shard(
    path: Path, images: list[bytes], labels: list[int] | None = None, *, row_group_size: int = 2
) -> str:
    """A shard of ``images`` keyed ``hand/000``, ``hand/001``, ...; labels default to 0, 1, ..."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines.shards import SHARD_SCHEMA

    table = pa.table(
        {
            "image": images,
            "label": list(range(len(images))) if labels is None else labels,
            "key": [f"hand/{i:03d}" for i in range(len(images))],
            "height": [0] * len(images),
            "width": [0] * len(images),
        },
        schema=SHARD_SCHEMA,
    )
    pq.write_table(table, path, row_group_size=row_group_size)
    return str(path)
