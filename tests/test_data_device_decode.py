"""The device decode path (``data.decode_device=device``): Ray Data tasks only plan the crops, the
Train worker decodes its batches on its device. Exercised here with device="cpu"; the ``gpu``
tests repeat the comparisons with CUDA (nvJPEG).

The device path must crop exactly where the CPU path crops (same boxes, same flips, same rows in
the same order); its pixels differ a little (whole-pixel boxes, no draft decoding, another
resampler implementation), which the mean-absolute-difference bounds below allow for.
"""

from __future__ import annotations

import io
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines import data, decode
from pipelines.config import ConfigError, DataConfig, JobConfig, validate
from pipelines.job.hybrid import HybridDecode
from pipelines.manifest import read_manifest
from pipelines.prepare import main as prepare_main
from resnet_core import transforms
from resnet_core.cpu_transforms import RandomResizedCrop, ScaleAugment, decode_crop, sample_crop
from resnet_core.transforms import decode_jpeg_crops
from tests.fixtures_imagenet import encode, smooth_pixels, write_shard

IMAGE_SIZE = 32
# The device path's tolerance against the CPU path, in uint8 levels: the same boxes and filter
# (resample_crops), but a full-resolution decode where the CPU path drafts (DCT scaling) and
# float instead of Pillow's fixed-point rounding. On the same decoded pixels: 1 level at most.
MAD_DEVICE = 0.75  # mean absolute difference over a crop
MAX_DEVICE = 3  # any single pixel of a smooth photo (fine texture drafts less faithfully)


def _photo(seed: int, width: int = 160, height: int = 120) -> bytes:
    """A smooth JPEG, darker on the left than on the right, so a wrong flip shows."""
    texture = smooth_pixels(seed, height, width).astype(np.int32)
    ramp = np.linspace(0, 255, width, dtype=np.int32)[None, :, None]
    return encode(((texture + ramp) // 2).astype(np.uint8), quality=92)


def _broken_huffman_table(jpeg: bytes) -> bytes:
    """``jpeg`` with a Huffman table no decoder accepts: the header still parses (size, mode,
    end marker), only decoding fails."""
    table = jpeg.index(b"\xff\xc4") + 5  # DHT marker, length, class/id: then 16 code counts
    return jpeg[:table] + b"\xff" * 16 + jpeg[table + 16 :]


def _tensors(datas: list[bytes]) -> list[torch.Tensor]:
    return [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]


def _chunk(uri: str, rows: int, *, on_worker: bool, mode: str = "paper") -> dict[str, np.ndarray]:
    """One decode task over all ``rows`` of a shard, as one map batch."""
    chunk = {"uri": [uri], "start": [0], "stop": [rows], "base": [0], "copy": [0]}
    chunk = {key: np.asarray(value) for key, value in chunk.items()}
    options = data.DecodeOptions(
        mode=mode,
        image_size=IMAGE_SIZE,
        eval_resize=36,
        map_batch_rows=rows,
        task_rows=rows,
        device="cpu" if on_worker else None,
    )
    (out,) = decode._decode_chunks(chunk, options=options, seed=0, epoch=0)
    return out


def _both_paths(uri: str, rows: int, mode: str, device: str) -> tuple[data.Batch, data.Batch]:
    """(CPU path batch, device path batch) of one map batch, without Ray."""
    train = mode in data.TRAIN_MODES
    cpu = data._ToBatch(drop_bad=not train, pin_memory=False)(
        _chunk(uri, rows, on_worker=False, mode=mode)
    )
    encoded = data._ToEncoded(pin_memory=False)(_chunk(uri, rows, on_worker=True, mode=mode))
    size = 36 if mode == "eval_full" else IMAGE_SIZE
    on_device = data._decode_on_worker(encoded, size=size, device=torch.device(device), train=train)
    return cpu, on_device


def _mad(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.cpu().int() - b.cpu().int()).abs().float().mean().item()


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> int:
    return int((a.cpu().int() - b.cpu().int()).abs().max())


# ---------------------------------------------------------------------------------------------
# resnet_core: the shared draws and the batched device decode
# ---------------------------------------------------------------------------------------------


def test_sample_crop_makes_exactly_the_draws_of_decode_crop():
    jpeg = _photo(1)
    for sampler in (ScaleAugment(36, 67, 32), RandomResizedCrop(32)):
        used, planned = np.random.default_rng(5), np.random.default_rng(5)
        for _ in range(4):
            decode_crop(jpeg, sampler, used)
            sample_crop(sampler, planned, 160, 120)
        assert used.random() == planned.random()  # both generators advanced alike


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_decode_jpeg_crops_resamples_sub_pixel_boxes_like_pillow(device):
    # Sizes different enough for several padding groups; boxes down- and upscale, sub-pixel.
    sizes = [(200, 150), (640, 90), (60, 420), (210, 160), (96, 96), (330, 250)]
    datas = [_photo(i, w, h) for i, (w, h) in enumerate(sizes)]
    boxes = [
        (10.3, 5.7, 110.2, 125.9), (0, 0, 640, 90), (5.5, 20.25, 50.75, 400.1),
        (3.2, 7.9, 20.4, 30.3), (0.5, 0.5, 95.5, 95.5), (100.1, 20.9, 300.6, 249.2),
    ]  # fmt: skip
    flips = [False, True, False, True, True, False]
    images, bad = decode_jpeg_crops(_tensors(datas), boxes, flips, 48, device=device)
    assert images.shape == (6, 48, 48, 3)
    assert images.dtype == torch.uint8
    assert images.device.type == device
    assert images.is_contiguous()  # NHWC memory: channels_last for to_float_batch
    assert not bad.any()
    assert len(transforms._size_groups([(h, w) for w, h in sizes])) > 1
    # Pillow's resample of the very pixels the device decoded: 1 level apart at most (2 on
    # CUDA, which resamples in fp16).
    decoded = transforms._decode_jpegs(_tensors(datas), torch.device(device))
    for i, (pixels, box, flip) in enumerate(zip(decoded, boxes, flips, strict=True)):
        source = Image.fromarray(pixels.permute(1, 2, 0).cpu().numpy())
        expected = source.resize((48, 48), Image.Resampling.BILINEAR, box=box)
        if flip:
            expected = expected.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        assert _max_diff(images[i], torch.from_numpy(np.array(expected))) <= (
            1 if device == "cpu" else 2
        )


def test_size_groups_cover_every_image_once_in_few_groups():
    rng = np.random.default_rng(0)
    shapes = [(int(h), int(w)) for h, w in rng.integers(32, 2000, size=(256, 2))]
    groups = transforms._size_groups(shapes)
    assert 1 < len(groups) <= transforms.MAX_SIZE_GROUPS
    assert sorted(i for group in groups for i in group) == list(range(256))
    assert transforms._size_groups([(375, 500), (500, 375)] * 8) == [list(range(16))]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_decode_jpeg_crops_marks_undecodable_rows_bad(device):
    good = _photo(3)
    datas = [good, b"not a jpeg at all", _broken_huffman_table(good), good]
    boxes = [(0.0, 0.0, 100.0, 100.0)] * 4
    images, bad = decode_jpeg_crops(_tensors(datas), boxes, [False] * 4, 16, device=device)
    assert bad.tolist() == [False, True, True, False]
    assert torch.equal(images[0], images[3])
    assert images[1].sum() == 0  # bad rows are left black


# ---------------------------------------------------------------------------------------------
# The decode tasks and the worker-side decode (no Ray)
# ---------------------------------------------------------------------------------------------


def test_device_tasks_draw_the_cpu_paths_boxes_and_flips(tmp_path):
    datas = [_photo(i, 120 + 20 * i, 100 + 10 * i) for i in range(8)]
    uri = write_shard(tmp_path / "s.parquet", datas, row_group_size=4)
    planned = _chunk(uri, 8, on_worker=True)
    order = decode._task_order(uri, 0, 8, seed=0, epoch=0)  # a training task's rows, permuted
    datas = [datas[i] for i in order]
    keys = [f"hand/{i:03d}" for i in order]
    assert planned["key"].tolist() == keys
    rng = np.random.default_rng([0, 0, zlib.crc32("\0".join(keys).encode())])
    sampler = decode._sampler(data.DecodeOptions("paper", IMAGE_SIZE, eval_resize=36))
    expected = [sample_crop(sampler, rng, *Image.open(io.BytesIO(d)).size) for d in datas]
    np.testing.assert_array_equal(planned["box"], [box for box, _ in expected])
    assert planned["flip"].tolist() == [flip for _, flip in expected]
    assert 0 < planned["flip"].sum() < 8
    assert planned["image"].tolist() == datas  # shipped encoded, not decoded
    assert not planned["raw"].any()


@pytest.mark.parametrize("mode", ["paper", "inception", "eval_center", "eval_full"])
def test_device_path_crops_where_the_cpu_path_crops(tmp_path, mode):
    datas = [_photo(i, 120 + 20 * i, 100 + 10 * i) for i in range(8)]
    uri = write_shard(tmp_path / "s.parquet", datas, row_group_size=4)
    cpu, on_device = _both_paths(uri, 8, mode, "cpu")
    assert on_device.keys == cpu.keys
    assert torch.equal(on_device.labels, cpu.labels)
    assert on_device.images.shape == cpu.images.shape
    for mine, theirs in zip(on_device.images, cpu.images, strict=True):
        # Right crop and right flip: far closer to the CPU crop than to its mirror image.
        assert _mad(mine, theirs) < MAD_DEVICE
        assert _max_diff(mine, theirs) <= MAX_DEVICE
        assert _mad(mine, theirs) < _mad(mine, theirs.flip(1)) / 3 or mode.startswith("eval")


@pytest.mark.parametrize("mode", ["paper", "eval_center"])
def test_bad_rows_are_counted_like_the_cpu_path(tmp_path, mode):
    good = [_photo(i) for i in range(7)]
    images = [
        good[0],
        b"not an image",  # no header: bad in the task
        good[2][: len(good[2]) // 2],  # truncated: decoded (and failed) in the task, like PNGs
        _broken_huffman_table(good[3]),  # the header parses: fails on the worker
        encode(smooth_pixels(9, 90, 100), format="PNG"),  # decoded in the task, travels as pixels
        good[5],
        good[6] + b"trailing bytes",  # decoded in the task: PIL judges it, as on the CPU path
    ]
    uri = write_shard(tmp_path / "bad.parquet", images, row_group_size=4)
    planned = _chunk(uri, 7, on_worker=True, mode=mode)
    bad_in_task = [False, True, True, False, False, False, False]
    raw = [False, False, False, False, True, False, True]
    if mode == "paper":  # a training task's rows come permuted
        order = decode._task_order(uri, 0, 7, seed=0, epoch=0)
        bad_in_task, raw = [bad_in_task[i] for i in order], [raw[i] for i in order]
    assert planned["bad"].tolist() == bad_in_task
    assert planned["raw"].tolist() == raw
    cpu, on_device = _both_paths(uri, 7, mode, "cpu")
    assert on_device.num_bad == cpu.num_bad == 3
    if mode == "paper":  # training: bad rows replaced by copies of good rows, 7 rows stay
        assert len(on_device.keys) == 7
        assert set(on_device.keys) <= {f"hand/{i:03d}" for i in (0, 4, 5, 6)}
        assert on_device.labels.tolist() == [int(k[-3:]) for k in on_device.keys]
    else:  # evaluation: dropped, in both paths
        kept = ("hand/000", "hand/004", "hand/005", "hand/006")
        assert on_device.keys == cpu.keys == kept
        # Rows decoded in the task have the CPU path's very pixels.
        assert _mad(on_device.images[1], cpu.images[1]) == 0
        assert _mad(on_device.images[3], cpu.images[3]) == 0


def test_a_batch_with_no_decodable_image_fails_training_with_the_fix(tmp_path):
    uri = write_shard(
        tmp_path / "s.parquet", [_broken_huffman_table(_photo(2))] * 2, row_group_size=4
    )
    encoded = data._ToEncoded(pin_memory=False)(_chunk(uri, 2, on_worker=True))
    with pytest.raises(
        ValueError, match=r"none of the 2 images of a batch .* data.decode_device=cpu"
    ):
        data._decode_on_worker(encoded, size=IMAGE_SIZE, device=torch.device("cpu"), train=True)


# ---------------------------------------------------------------------------------------------
# Options and configuration
# ---------------------------------------------------------------------------------------------


def test_cifar_modes_do_not_decode_on_the_device():
    with pytest.raises(ValueError, match="mode 'cifar' cannot decode on the Train worker"):
        data.DecodeOptions(mode="cifar", image_size=32, device="cpu")


def _validate(**data_options) -> None:
    validate(JobConfig(data=DataConfig(**data_options)))


def test_config_validates_decode_device():
    _validate(decode_device="device", augment="inception", image_size=224, eval_resize=256)
    _validate(decode_device="auto", augment="paper", hybrid_cpu_share=0.0)
    with pytest.raises(ConfigError, match=r"data.decode_device='gpu'; use one of: cpu, device"):
        _validate(decode_device="gpu")
    with pytest.raises(
        ConfigError, match=r"data.augment='cifar' reads 32x32 images whole: use data.decode_device"
    ):
        _validate(decode_device="auto", augment="cifar")
    with pytest.raises(ConfigError, match=r"data.hybrid_cpu_share=1.5 must be in \[0, 1\]"):
        _validate(decode_device="auto", augment="paper", hybrid_cpu_share=1.5)


# ---------------------------------------------------------------------------------------------
# Hybrid decode (data.decode_device=auto): the tasks decode a share of the map batches
# ---------------------------------------------------------------------------------------------


def _map_batches(uri: str, rows: int, **options) -> list[dict[str, np.ndarray]]:
    """A decode task over all ``rows`` of a shard in map batches of 4 (training, paper)."""
    chunk = {"uri": [uri], "start": [0], "stop": [rows], "base": [0], "copy": [0]}
    chunk = {key: np.asarray(value) for key, value in chunk.items()}
    options = data.DecodeOptions(
        mode="paper", image_size=IMAGE_SIZE, map_batch_rows=4, task_rows=rows, **options
    )
    return list(decode._decode_chunks(chunk, options=options, seed=0, epoch=0))


def test_hybrid_decode_sends_map_batches_to_the_cpu_by_their_keys_with_the_same_crops(tmp_path):
    datas = [_photo(i, 120 + 10 * i, 100 + 5 * i) for i in range(32)]
    uri = write_shard(tmp_path / "s.parquet", datas, row_group_size=8)
    (task,) = _map_batches(uri, 32)  # the CPU path yields the task's map batches as one block
    cpu = [{key: column[i : i + 4] for key, column in task.items()} for i in range(0, 32, 4)]
    device = _map_batches(uri, 32, device="cpu")
    hybrid = _map_batches(uri, 32, device="cpu", cpu_share=0.5)
    assert all(_map_batches(uri, 32, device="cpu", cpu_share=1.0)[0]["raw"])
    on_cpu = [bool(batch["raw"].all()) for batch in hybrid]
    assert True in on_cpu  # 8 map batches: each way at least once
    assert False in on_cpu
    for ours, theirs, planned, raw in zip(hybrid, cpu, device, on_cpu, strict=True):
        assert ours["key"].tolist() == theirs["key"].tolist()
        if raw:  # the CPU path's pixels exactly, shipped as raw rows
            assert [bytes(b) for b in ours["image"]] == [i.tobytes() for i in theirs["image"]]
        else:  # planned for the device: the device path's rows exactly
            np.testing.assert_array_equal(ours["box"], planned["box"])
            assert ours["image"].tolist() == planned["image"].tolist()
    # The worker turns both kinds into one batch within the device path's tolerance.
    encoded = data._ToEncoded(pin_memory=False)(
        {k: np.concatenate([b[k] for b in hybrid]) for k in hybrid[0]}
    )
    batch = data._decode_on_worker(encoded, size=IMAGE_SIZE, device=torch.device("cpu"), train=True)
    expected = np.concatenate([b["image"] for b in cpu])
    assert _mad(batch.images, torch.from_numpy(expected)) < MAD_DEVICE


def test_hybrid_share_moves_towards_the_side_that_kept_the_other_waiting():
    balance = HybridDecode(0.5)
    balance.epoch_started -= 10.0  # a 10 s epoch
    cpu = torch.device("cpu")
    assert (
        balance.rebalance(data.DecodeWaits(stream_s=0.02, decode_s=0.0), cpu) == 0.5
    )  # both keep up
    assert balance.rebalance(data.DecodeWaits(stream_s=0.0, decode_s=1.0), cpu) == pytest.approx(
        0.6, abs=1e-3
    )
    assert balance.rebalance(data.DecodeWaits(stream_s=9.0, decode_s=0.0), cpu) == pytest.approx(
        0.35, abs=1e-3
    )
    for _ in range(3):
        balance.rebalance(data.DecodeWaits(stream_s=9.0, decode_s=0.0), cpu)
    assert balance.share == 0.0  # clamped
    restored = HybridDecode(0.5)
    restored.load_state_dict(balance.state_dict())
    assert restored.share == 0.0


# ---------------------------------------------------------------------------------------------
# Through a local Ray
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def manifest(ray_local, tmp_path_factory):
    """2 classes of synthetic ImageNet-like JPEGs (160-400 px): 16 train rows, 6 val rows."""
    out = tmp_path_factory.mktemp("shards") / "synthetic"
    status = prepare_main(
        [
            "synthetic", "--kind", "imagenet", "--classes", "2", "--train-per-class", "8",
            "--val-per-class", "3", "--shard-rows", "5", "--row-group-rows", "2",
            "--out", str(out),
        ]
    )  # fmt: skip
    assert status == 0
    return read_manifest(str(out))


def _epoch(
    manifest, device: str | None, *, mode: str = "paper", split: str = "train", skip_batches=0
) -> tuple[list[data.Batch], int]:
    options = data.DecodeOptions(
        mode=mode,
        image_size=IMAGE_SIZE,
        map_batch_rows=4,
        task_rows=8,
        shuffle_buffer=8 if mode in data.TRAIN_MODES else None,
        device=device,
    )
    epoch = data.iter_batches(
        manifest, options, split=split, world_size=1, rank=0, epoch=1, seed=0, batch_size=4,
        skip_batches=skip_batches,
    )  # fmt: skip
    return list(epoch.batches()), epoch.num_bad


@pytest.mark.parametrize("mode", ["paper", "eval_center"])
def test_iter_batches_decodes_on_the_worker_like_the_cpu_path(manifest, mode):
    split = "train" if mode == "paper" else "val"
    cpu, cpu_bad = _epoch(manifest, None, mode=mode, split=split)
    on_device, device_bad = _epoch(manifest, "cpu", mode=mode, split=split)
    assert [b.keys for b in on_device] == [b.keys for b in cpu]
    assert len(on_device) == (4 if mode == "paper" else 2)
    assert device_bad == cpu_bad == 0
    for mine, theirs in zip(on_device, cpu, strict=True):
        assert torch.equal(mine.labels, theirs.labels)
        assert mine.images.shape == theirs.images.shape
        assert 0 < _mad(mine.images, theirs.images) < MAD_DEVICE  # > 0: another decoder


def test_a_prefetched_hybrid_epoch_is_the_epoch_and_stops_when_closed(manifest, tmp_path):
    options = data.DecodeOptions(
        mode="paper", image_size=IMAGE_SIZE, map_batch_rows=4, task_rows=8, shuffle_buffer=8,
        device="cpu", cpu_share=0.5,
    )  # fmt: skip
    where = {"split": "train", "world_size": 1, "rank": 0, "epoch": 0, "seed": 0}

    def epoch() -> data.EpochBatches:
        return data.iter_batches(manifest, options, batch_size=4, **where)

    direct = list(epoch().batches())
    ahead = data.Prefetched(epoch())
    fetched = list(ahead.batches())
    assert [b.keys for b in fetched] == [b.keys for b in direct]
    for mine, theirs in zip(fetched, direct, strict=True):  # hybrid decode is deterministic
        assert torch.equal(mine.images, theirs.images)
    assert ahead.waits.stream_s > 0  # the consumer's waits are measured by cause
    early = data.Prefetched(epoch(), depth=1)
    next(early.batches())
    early.close()
    assert not early._thread.is_alive()
    # A failure in the helper thread reaches the consumer.
    missing = data.EpochPlan.create(
        [(str(tmp_path / "gone.parquet"), 6)], split="train", train=True, world_size=1, rank=0,
        epoch=0, seed=0, batch_size=3,
    )  # fmt: skip
    with pytest.raises(data.ShardUnreadable, match=r"gone\.parquet"):
        list(data.Prefetched(data.EpochBatches(missing, options)).batches())


def test_iter_batches_device_path_resumes_mid_epoch(manifest):
    full, _ = _epoch(manifest, "cpu")
    tail, _ = _epoch(manifest, "cpu", skip_batches=3)
    assert [b.keys for b in tail] == [b.keys for b in full[3:]]
    assert torch.equal(tail[0].images, full[3].images)


@pytest.mark.parametrize("train", [True, False])
def test_bad_rows_through_ray_are_counted_not_fatal(ray_local, tmp_path, train):
    good = [_photo(i) for i in range(6)]
    images = [good[0], b"not an image", good[2], _broken_huffman_table(good[3]), good[4], good[5]]
    uri = write_shard(tmp_path / "bad.parquet", images, row_group_size=4)
    plan = data.EpochPlan.create(
        [(uri, 6)], split="hand", train=train, world_size=1, rank=0, epoch=0, seed=0,
        batch_size=3,
    )  # fmt: skip
    mode = "paper" if train else "eval_center"
    counts = []
    for device in (None, "cpu"):
        options = data.DecodeOptions(
            mode=mode, image_size=IMAGE_SIZE, map_batch_rows=6, task_rows=6, device=device
        )
        epoch = data.EpochBatches(plan, options)
        sizes = [len(batch.keys) for batch in epoch.batches()]
        assert sizes == ([3, 3] if train else [2, 2])
        counts.append(epoch.num_bad)
    assert counts == [2, 2]


@pytest.mark.gpu
def test_iter_batches_decodes_on_cuda_like_the_cpu_path(manifest):
    cpu, _ = _epoch(manifest, None)
    on_gpu, _ = _epoch(manifest, "cuda")
    assert [b.keys for b in on_gpu] == [b.keys for b in cpu]
    for mine, theirs in zip(on_gpu, cpu, strict=True):
        assert mine.images.device.type == "cuda"
        assert _mad(mine.images, theirs.images) < MAD_DEVICE


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["paper", "inception", "eval_center"])
def test_cuda_decode_crops_where_the_cpu_path_crops(tmp_path, mode):
    datas = [_photo(i, 120 + 20 * i, 100 + 10 * i) for i in range(8)]
    uri = write_shard(tmp_path / "s.parquet", datas, row_group_size=4)
    cpu, on_gpu = _both_paths(uri, 8, mode, "cuda")
    assert on_gpu.keys == cpu.keys
    assert _mad(on_gpu.images, cpu.images) < MAD_DEVICE
    assert _max_diff(on_gpu.images, cpu.images) <= MAX_DEVICE
