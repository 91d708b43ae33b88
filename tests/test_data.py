"""The streaming reader (pipelines.data) on real shards written by resnet-prepare, on a local Ray."""

from __future__ import annotations

import dataclasses
import io
import json
import subprocess
import sys
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from pipelines import data, decode
from pipelines.manifest import read_manifest
from pipelines.prepare import main as prepare_main
from resnet_core.cpu_transforms import ImageAugment, decode_crop
from tests.fixtures_imagenet import write_shard

IMAGE_SIZE = 32  # small crops keep decoding fast; the synthetic images are 160-400 px


@pytest.fixture(scope="module")
def manifest(ray_local, tmp_path_factory):
    """4 classes; train: 48 rows in 7 shards, val: 20 rows in 3 shards (row groups of 3)."""
    out = tmp_path_factory.mktemp("shards") / "synthetic"
    status = prepare_main(
        [
            "synthetic",
            "--kind", "imagenet",
            "--classes", "4",
            "--train-per-class", "12",
            "--val-per-class", "5",
            "--shard-rows", "7",
            "--row-group-rows", "3",
            "--out", str(out),
        ]
    )  # fmt: skip
    assert status == 0
    return read_manifest(str(out))


def _shard_keys(uri: str) -> list[str]:
    return pq.read_table(uri, columns=["key"]).column("key").to_pylist()


_DECODE_OPTIONS = {f.name for f in dataclasses.fields(data.DecodeOptions)}


def _epoch(manifest, **overrides):
    """One epoch's batches; ``overrides`` set the plan's or the DecodeOptions' values."""
    values = {
        "split": "train",
        "mode": "paper",
        "world_size": 1,
        "rank": 0,
        "epoch": 0,
        "seed": 0,
        "batch_size": 4,
        "image_size": IMAGE_SIZE,
        "map_batch_rows": 4,
        "task_rows": 8,
        **overrides,
    }
    options = data.DecodeOptions(**{k: v for k, v in values.items() if k in _DECODE_OPTIONS})
    plan_args = {k: v for k, v in values.items() if k not in _DECODE_OPTIONS}
    return list(data.iter_batches(manifest, options, **plan_args).batches())


def _keys(batches) -> list[str]:
    return [key for batch in batches for key in batch.keys]


def _jpeg(seed: int, size: tuple[int, int] = (96, 64)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------
# Plans (no Ray)
# ---------------------------------------------------------------------------------------------

SHARDS = [(f"mem://shard-{i}", 7) for i in range(6)] + [("mem://shard-6", 5)]  # 47 rows


def _plan(**overrides) -> data.EpochPlan:
    options = {
        "split": "train",
        "train": True,
        "world_size": 3,
        "rank": 0,
        "epoch": 0,
        "seed": 0,
        "batch_size": 4,
    }
    options.update(overrides)
    return data.EpochPlan.create(SHARDS, **options)


def _rows(plan: data.EpochPlan) -> list[tuple[str, int]]:
    return [(r.uri, row) for r in plan.ranges for row in range(r.start, r.stop)]


def test_training_plan_is_a_function_of_seed_and_epoch():
    assert _plan() == _plan()
    assert _rows(_plan(epoch=1)) != _rows(_plan())
    assert _rows(_plan(seed=1)) != _rows(_plan())


def test_training_plan_gives_every_rank_the_same_steps_and_disjoint_rows():
    for epoch in range(5):
        plans = [_plan(rank=r, epoch=epoch) for r in range(3)]
        # 47 rows // 3 ranks = 15 per rank -> 3 batches of 4 each, in every epoch.
        assert [p.steps for p in plans] == [3, 3, 3]
        assert [len(_rows(p)) for p in plans] == [12, 12, 12]
        rows = [row for p in plans for row in _rows(p)]
        assert len(set(rows)) == len(rows) == 36


def test_repeated_augmentation_deals_each_row_to_consecutive_ranks():
    """torchvision's RASampler: 1/k of the rows, each k times, the copies on k different ranks
    (consecutive), each copy marked so its augmentation is its own; every rank the same steps."""
    plans = [_plan(rank=r, epoch=2, repeats=2) for r in range(3)]
    assert [p.steps for p in plans] == [3, 3, 3]  # 47 // 2 // 3 = 7 rows a part, 14 a rank
    seen: dict[tuple[str, int], list[tuple[int, int]]] = {}
    for plan in plans:
        for r in plan.ranges:
            for row in range(r.start, r.stop):
                seen.setdefault((r.uri, row), []).append((plan.rank, r.copy))
    assert sum(len(v) for v in seen.values()) == 36
    for places in seen.values():
        ranks, copies = zip(*places, strict=True)
        assert len(set(ranks)) == len(ranks)  # never twice on one rank (2 copies, 3 ranks)
        assert len(set(copies)) == len(copies)
        if len(places) == 2:
            assert (ranks[1] - ranks[0]) % 3 in (1, 2)  # consecutive ranks
    assert sum(len(v) == 2 for v in seen.values()) >= 15
    assert _plan(repeats=1) == _plan()


def test_steps_per_epoch_caps_with_max_batches():
    assert _plan(max_batches=2).steps == 2
    assert len(_rows(_plan(max_batches=2))) == 8


def test_evaluation_plan_reads_every_row_exactly_once():
    all_rows = {(uri, row) for uri, n in SHARDS for row in range(n)}
    for world_size in (1, 2, 3, 5):
        plans = [_plan(train=False, world_size=world_size, rank=r) for r in range(world_size)]
        rows = [row for p in plans for row in _rows(p)]
        assert len(rows) == len(all_rows)
        assert set(rows) == all_rows
        sizes = [p.num_rows for p in plans]
        assert max(sizes) - min(sizes) <= 1
        assert [p.steps for p in plans] == [-(-n // 4) for n in sizes]


def test_plan_rejects_a_split_too_small_for_the_workers():
    with pytest.raises(ValueError, match=r"47 rows, fewer than world_size 3 x batch_size 16"):
        _plan(batch_size=16)
    with pytest.raises(ValueError, match="rank 3 / world_size 3"):
        _plan(rank=3)


# ---------------------------------------------------------------------------------------------
# Reading through Ray Data
# ---------------------------------------------------------------------------------------------


def test_steps_per_epoch_needs_only_the_manifest(manifest):
    steps = data.steps_per_epoch(manifest, "train", world_size=2, batch_size=4)
    assert steps == 48 // 2 // 4
    for epoch in (0, 1):
        for rank in (0, 1):
            plan = data.plan_epoch(
                manifest, "train", train=True, world_size=2, rank=rank, epoch=epoch, seed=3,
                batch_size=4,
            )  # fmt: skip
            assert plan.steps == steps


def test_rows_come_shuffled_within_tasks_with_their_labels(manifest):
    """Every row of the rank's plan once; each task's rows (up to 8) come together, the tasks
    in an order that changes with the epoch (the shuffle that needs no buffer)."""
    plan = data.plan_epoch(
        manifest, "train", train=True, world_size=2, rank=1, epoch=2, seed=0, batch_size=4
    )
    tasks = [
        frozenset(_shard_keys(r.uri)[lo:hi])
        for r in plan.ranges
        for lo, hi in decode.aligned_pieces(r.start, r.stop, 8, data.task_offset(plan, 8))
    ]
    batches = _epoch(manifest, world_size=2, rank=1, epoch=2)
    keys = _keys(batches)
    assert sorted(keys) == sorted(k for task in tasks for k in task)
    in_plan_order = [k for r in plan.ranges for k in _shard_keys(r.uri)[r.start : r.stop]]
    assert keys != in_plan_order
    task_of = {k: i for i, task in enumerate(tasks) for k in task}
    runs = [task_of[k] for i, k in enumerate(keys) if i == 0 or task_of[k] != task_of[keys[i - 1]]]
    assert sorted(runs) == list(range(len(tasks)))  # each task's rows come together ...
    assert runs != sorted(runs)  # ... the tasks in a fresh order
    assert _keys(_epoch(manifest, world_size=2, rank=1, epoch=3)) != keys
    offsets = {data.task_offset(dataclasses.replace(plan, epoch=e), 8) for e in range(8)}
    assert len(offsets) > 1  # the rows sharing a task change between epochs
    labels = {}
    for uri in manifest.shard_uris("train"):
        table = pq.read_table(uri, columns=["key", "label"])
        labels.update(zip(table["key"].to_pylist(), table["label"].to_pylist(), strict=True))
    for batch in batches:
        assert batch.images.dtype == torch.uint8
        assert batch.images.shape == (4, IMAGE_SIZE, IMAGE_SIZE, 3)
        assert batch.labels.tolist() == [labels[k] for k in batch.keys]
        assert batch.num_bad == 0


def test_same_seed_gives_the_same_batches_pixel_for_pixel(manifest):
    first = _epoch(manifest, shuffle_buffer=12)
    second = _epoch(manifest, shuffle_buffer=12)
    assert len(first) == 12
    assert _keys(first) == _keys(second)
    assert all(torch.equal(a.images, b.images) for a, b in zip(first, second, strict=True))
    # The augmentation is random: the same image differs between epochs.
    other = _epoch(manifest, shuffle_buffer=12, epoch=1)
    assert _keys(other) != _keys(first)
    assert sorted(_keys(other)) == sorted(_keys(first))  # 48 rows, batch 4: nothing dropped
    crops = {k: img for b in first for k, img in zip(b.keys, b.images, strict=True)}
    other_crops = {k: img for b in other for k, img in zip(b.keys, b.images, strict=True)}
    assert sum(torch.equal(crops[k], other_crops[k]) for k in crops) < len(crops) // 4


def test_which_chunks_share_a_decode_task_changes_no_row_order_or_pixel(manifest):
    """chunks_per_task is execution only: one chunk per task, three, or the cluster's choice
    (here all of them: 8-row chunks of 32 px) give the same batches pixel for pixel, from as
    many blocks as tasks."""
    import ray

    batches = {k: _epoch(manifest, chunks_per_task=k) for k in (1, 3, None)}
    for k in (3, None):
        assert _keys(batches[k]) == _keys(batches[1])
        pairs = zip(batches[1], batches[k], strict=True)
        assert all(torch.equal(a.images, b.images) for a, b in pairs)
    plan = data.plan_epoch(
        manifest, "train", train=True, world_size=1, rank=0, epoch=0, seed=0, batch_size=4
    )
    chunks = len(data._chunks(plan, 8))
    assert 0 < data.smallest_object_store() <= ray.cluster_resources()["object_store_memory"]
    for k, tasks in ((1, chunks), (3, -(-chunks // 3)), (None, 1)):
        options = data.DecodeOptions(
            mode="paper", image_size=IMAGE_SIZE, map_batch_rows=4, task_rows=8, chunks_per_task=k
        )
        assert data.build_dataset(plan, options).materialize().num_blocks() == tasks


def test_a_decode_task_takes_about_512_rows_within_a_sixteenth_of_the_smallest_store():
    large = data.DecodeOptions(mode="paper", image_size=224)  # 64-row chunks, 9.6 MB of crops
    assert large.task_rows == 64
    assert data.chunks_per_task(large, 8 * 2**30) == 8  # 512 rows
    assert data.chunks_per_task(large, 400 * 2**20) == 2  # 25 MiB of output at most
    assert data.chunks_per_task(large, 80 * 2**20) == 1  # never less than one chunk
    small = data.DecodeOptions(mode="cifar", image_size=32)
    assert data.chunks_per_task(small, 8 * 2**30) == 1  # its chunks are 512 rows already
    with pytest.raises(ValueError, match="chunks_per_task 0 must be positive"):
        data.DecodeOptions(mode="paper", image_size=224, chunks_per_task=0)
    with pytest.raises(ValueError, match="its mixing depends on the blocks"):
        data.DecodeOptions(mode="paper", image_size=224, chunks_per_task=2, shuffle_buffer=64)


def test_a_range_reads_exactly_its_rows_across_row_groups(tmp_path):
    images = [_jpeg(i, (20, 16)) for i in range(50)]
    uri = write_shard(tmp_path / "s.parquet", images, row_group_size=40)
    whole = pq.read_table(uri)
    for start, stop in ((0, 50), (3, 37), (17, 33), (38, 45), (16, 32), (49, 50)):
        table = decode.read_rows(uri, start, stop)
        for column in ("image", "label", "key"):
            assert table.column(column).to_pylist() == whole.column(column).to_pylist()[start:stop]


def test_per_image_policies_change_every_crop_and_replay_exactly(manifest):
    """TrivialAugment then RandomErasing (p=1) in the decode tasks: the same rows, every image
    changed and holding an erased box of the given colour; the same plan gives the same
    pixels."""
    colour = (1, 2, 3)
    policy = ImageAugment("ta_wide", erase_p=1.0, erase_value=colour)
    plain = _epoch(manifest)
    first, again = _epoch(manifest, augment=policy), _epoch(manifest, augment=policy)
    assert _keys(first) == _keys(plain)
    assert all(torch.equal(a.images, b.images) for a, b in zip(first, again, strict=True))
    images = torch.cat([b.images for b in first])
    assert not [
        i
        for i, (a, b) in enumerate(zip(torch.cat([b.images for b in plain]), images, strict=True))
        if torch.equal(a, b)
    ]
    erased = (images == torch.tensor(colour, dtype=torch.uint8)).all(dim=-1)  # (N, H, W)
    assert bool(erased.flatten(1).any(dim=1).all())
    with pytest.raises(ValueError, match="training decode tasks only"):
        data.DecodeOptions(mode="eval_center", image_size=IMAGE_SIZE, augment=policy)


def test_repeated_copies_of_a_row_get_their_own_crops(manifest):
    ranks = [_epoch(manifest, world_size=2, rank=r, repeats=2) for r in range(2)]
    crops = [
        {k: img for b in batches for k, img in zip(b.keys, b.images, strict=True)}
        for batches in ranks
    ]
    shared = crops[0].keys() & crops[1].keys()
    assert len(shared) >= 16  # 48 rows: 24 distinct, each on both ranks (up to the batch cut)
    assert sum(torch.equal(crops[0][k], crops[1][k]) for k in shared) <= len(shared) // 4


def test_skip_batches_yields_exactly_the_tail(manifest):
    options = {"shuffle_buffer": 12, "epoch": 1, "world_size": 2, "rank": 0}
    full = _epoch(manifest, **options)
    tail = _epoch(manifest, skip_batches=2, **options)
    assert len(full) == 6
    assert len(tail) == 4
    assert _keys(tail) == _keys(full[2:])
    assert all(torch.equal(a.images, b.images) for a, b in zip(tail, full[2:], strict=True))
    assert _epoch(manifest, skip_batches=6, **options) == []


def test_an_epoch_resumed_on_another_world_size_trains_each_of_its_rows_once(manifest):
    """Global batch 6: 8 steps on 2 ranks (3 rows each, a shuffle buffer); after 3 steps the
    untrained rows go to 3 ranks (2 each) for the 5 steps left, then to 1 rank after 2 more."""
    options = {"shuffle_buffer": 5, "epoch": 1, "batch_size": 3, "world_size": 2}
    split_keys = data.read_split_keys(manifest, "train")
    planned, trained = [], []
    done = np.zeros(len(split_keys), dtype=bool)
    for rank in (0, 1):
        batches = _epoch(manifest, rank=rank, **options)
        planned += _keys(batches)
        for batch in batches[:3]:
            done[batch.rows] = True
            trained += batch.keys
    assert len(planned) == 48
    assert not done.all()
    resume = {"split": "train", "epoch": 1, "seed": 0, "global_batch": 6, "steps": 8}
    for world, batches_done, steps in ((3, 3, 2), (1, 5, 3)):
        restored = done.copy()  # the checkpoint's record, the same for every rank
        for rank in range(world):
            plan = data.plan_remainder(
                manifest, done=restored, planned_world=2, world_size=world, rank=rank,
                batches_done=batches_done, **resume,
            )  # fmt: skip
            assert (plan.steps, plan.batch_size) == (8 - batches_done, 6 // world)
            decoding = data.DecodeOptions(mode="paper", image_size=IMAGE_SIZE, shuffle_buffer=5)
            for batch in list(data.EpochBatches(plan, decoding).batches())[:steps]:
                assert [split_keys[row] for row in batch.rows] == list(batch.keys)
                done[batch.rows] = True
                trained += batch.keys
    assert done.all()
    assert Counter(trained) == Counter(planned)  # every row of the epoch once, no repeats
    with pytest.raises(ValueError, match="does not match its position"):
        data.plan_remainder(
            manifest, done=done, planned_world=2, world_size=3, rank=0, batches_done=5, **resume
        )


def test_evaluation_reads_every_image_once_across_two_ranks(manifest):
    keys = []
    for rank in (0, 1):
        batches = _epoch(
            manifest, split="val", mode="eval_center", world_size=2, rank=rank, batch_size=3
        )
        assert [len(b.keys) for b in batches] == [3, 3, 3, 1]
        keys += _keys(batches)
    assert len(keys) == 20
    assert Counter(keys) == Counter(data.read_split_keys(manifest, "val"))


def test_eval_full_gives_the_central_square_for_ten_crop(manifest):
    batches = _epoch(
        manifest, split="val", mode="eval_full", batch_size=8, eval_resize=40, max_batches=1
    )
    assert len(batches) == 1
    assert batches[0].images.shape == (8, 40, 40, 3)


def test_mode_must_fit_the_plan(manifest):
    plan = data.plan_epoch(
        manifest, "val", train=False, world_size=1, rank=0, epoch=0, seed=0, batch_size=4
    )
    with pytest.raises(ValueError, match="does not fit an evaluation plan"):
        data.build_dataset(plan, data.DecodeOptions(mode="paper", image_size=IMAGE_SIZE))
    with pytest.raises(ValueError, match="shuffle_buffer is for training"):
        data.DecodeOptions(mode="eval_center", image_size=32, shuffle_buffer=8)


def test_a_decode_task_yields_its_map_batches_crops_as_one_block(tmp_path):
    """A training task decodes its permuted rows map batch by map batch, each with the generator
    of (seed, epoch, crc32 of its keys), into one contiguous array: one block for Ray Data, the
    pixels of a decode in one process; a bad row is a copy of a good row of its map batch."""
    images = [_jpeg(i, (80 + 8 * i, 64)) for i in range(12)]
    images[5] = b"not an image"
    uri = write_shard(tmp_path / "s.parquet", images, row_group_size=5)  # groups cut the task
    chunk = {"uri": [uri], "start": [1], "stop": [11], "base": [100], "copy": [0]}
    options = data.DecodeOptions(mode="paper", image_size=IMAGE_SIZE, map_batch_rows=4)
    (block,) = decode._decode_chunks(
        {key: np.asarray(value) for key, value in chunk.items()}, options=options, seed=3, epoch=2
    )
    rows = 1 + decode._task_order(uri, 1, 11, seed=3, epoch=2)
    assert block["row"].tolist() == (100 + rows).tolist()
    assert block["image"].shape == (10, IMAGE_SIZE, IMAGE_SIZE, 3)
    assert block["image"].flags.c_contiguous
    crops, sources = {}, []
    for part in (rows[0:3], rows[3:7], rows[7:10]):  # cut at the multiples of 4 of the shard
        keys = "\0".join(f"hand/{row:03d}" for row in part).encode()
        rng = np.random.default_rng([3, 2, zlib.crc32(keys)])
        good = [row for row in part if row != 5]
        for row in good:  # the bad row draws nothing and becomes the first good row's copy
            crops[row] = decode_crop(images[row], decode._sampler(options), rng)
        sources += [row if row != 5 else good[0] for row in part]
    np.testing.assert_array_equal(block["image"], np.stack([crops[row] for row in sources]))
    assert block["label"].tolist() == sources
    assert block["bad"].tolist() == [row == 5 for row in rows]


def test_a_decode_task_runs_in_a_process_that_never_loads_torch(tmp_path):
    """What Ray ships to a decode task (the function and its options, pickled by reference) loads
    and runs in a fresh process without torch: the CPU path, device decode's crop planning and
    hybrid decode. Torch costs a decode process ~2 CPU-s to import and ~300 MB of its own
    memory; only an augment policy (torchvision v2) loads it."""
    import ray.cloudpickle

    uri = write_shard(tmp_path / "s.parquet", [_jpeg(i, (80, 64)) for i in range(8)])
    chunks = {"uri": [uri], "start": [0], "stop": [8], "base": [0], "copy": [0]}
    chunks = {key: np.asarray(value) for key, value in chunks.items()}
    paper = {"mode": "paper", "image_size": IMAGE_SIZE, "map_batch_rows": 4}
    policy = data.DecodeOptions(**paper, augment=ImageAugment(policy="ta_wide"))
    cases = [
        data.DecodeOptions(**paper),
        data.DecodeOptions(**paper, device=torch.device("cpu")),
        data.DecodeOptions(**paper, device=torch.device("cpu"), cpu_share=0.5),
        policy,  # the check's own check: a policy does load torch
    ]
    calls = [(decode._decode_chunks, chunks, {"options": o, "seed": 0, "epoch": 0}) for o in cases]
    code = (
        "import pickle, sys\n"
        "for fn, chunks, kwargs in pickle.loads(sys.stdin.buffer.read()):\n"
        "    rows = sum(len(block['label']) for block in fn(chunks, **kwargs))\n"
        "    print(rows, 'torch' in sys.modules)\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", code],
        input=ray.cloudpickle.dumps(calls),
        capture_output=True,
        cwd=Path(__file__).resolve().parents[1],
        check=True,
    )
    assert run.stdout.decode().split("\n")[:4] == ["8 False", "8 False", "8 False", "8 True"]


def test_undecodable_images_are_counted_not_fatal(ray_local, tmp_path):
    good = [_jpeg(i) for i in range(6)]
    images = [good[0], b"not an image", good[2], good[3][: len(good[3]) // 3], good[4], good[5]]
    uri = write_shard(tmp_path / "bad.parquet", images, labels=[0, 1, 2, 3, 4, 5])
    plan_args = {"split": "hand", "world_size": 1, "rank": 0, "epoch": 0, "seed": 0}

    train_plan = data.EpochPlan.create([(uri, 6)], train=True, batch_size=3, **plan_args)
    train = data.EpochBatches(
        train_plan,
        data.DecodeOptions(mode="paper", image_size=IMAGE_SIZE, map_batch_rows=6, task_rows=6),
    )
    batches = list(train.batches())
    assert len(batches) == 2
    assert train.num_bad == 2
    keys = _keys(batches)
    # Rows 1 and 3 became copies of good rows of the same map batch (image, label and key).
    assert len(keys) == 6
    assert {"hand/001", "hand/003"}.isdisjoint(keys)
    labels = torch.cat([b.labels for b in batches]).tolist()
    assert labels == [int(k[-3:]) for k in keys]
    # ... while their row ids stay their own: every planned row was consumed once.
    assert sorted(int(row) for b in batches for row in b.rows) == list(range(6))

    eval_plan = data.EpochPlan.create([(uri, 6)], train=False, batch_size=4, **plan_args)
    evaluation = data.EpochBatches(
        eval_plan, data.DecodeOptions(mode="eval_center", image_size=IMAGE_SIZE)
    )
    batches = list(evaluation.batches())
    assert _keys(batches) == ["hand/000", "hand/002", "hand/004", "hand/005"]
    assert [int(row) for b in batches for row in b.rows] == [0, 2, 4, 5]
    assert [b.num_bad for b in batches] == [2, 0]
    assert evaluation.num_bad == 2


def test_a_batch_without_any_good_image_fails_with_the_reason(ray_local, tmp_path):
    uri = write_shard(tmp_path / "broken.parquet", [b"junk"] * 4, labels=[0] * 4)
    plan = data.EpochPlan.create(
        [(uri, 4)], split="hand", train=True, world_size=1, rank=0, epoch=0, seed=0, batch_size=2
    )
    with pytest.raises(Exception, match=r"all 4 images in rows 0\.\.3 .* failed to decode"):
        list(data.EpochBatches(plan, data.DecodeOptions(mode="paper", image_size=IMAGE_SIZE)))


def test_a_shard_that_no_longer_reads_is_named_with_the_fix(ray_local, tmp_path):
    """Through Ray Data's task errors, the reader raises one ShardUnreadable naming the shard
    and the dataset to re-prepare: a footer that no longer parses, a missing file, too few
    rows."""
    root = tmp_path / "dataset"
    (root / "train").mkdir(parents=True)
    uri = write_shard(root / "train" / "s.parquet", [_jpeg(i) for i in range(4)], labels=[0] * 4)
    data_bytes = Path(uri).read_bytes()
    options = data.DecodeOptions(mode="paper", image_size=IMAGE_SIZE)
    plan_args = {"split": "hand", "train": True, "world_size": 1, "rank": 0, "epoch": 0}

    def read(rows: int) -> None:
        plan = data.EpochPlan.create([(uri, rows)], seed=0, batch_size=2, **plan_args)
        list(data.EpochBatches(plan, options).batches())

    Path(uri).write_bytes(data_bytes[:-4] + b"XXXX")
    with pytest.raises(data.ShardUnreadable) as failed:
        read(4)
    message = str(failed.value)
    assert message.startswith(f"shard {uri} does not parse (")
    assert f"re-run resnet-prepare with --out {root} " in message
    assert "\n" not in message
    Path(uri).unlink()
    with pytest.raises(data.ShardUnreadable, match=f"shard {uri} is missing"):
        read(4)
    Path(uri).write_bytes(data_bytes)
    with pytest.raises(data.ShardUnreadable, match="has 4 rows, the manifest promised at least 6"):
        read(6)


def test_cifar_mode_pads_crops_and_flips_fixed_size_images(ray_local, tmp_path):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    pngs = []
    for image in pixels:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        pngs.append(buffer.getvalue())
    uri = write_shard(tmp_path / "cifar.parquet", pngs, labels=list(range(8)))
    plan_args = {"split": "hand", "world_size": 1, "rank": 0, "epoch": 0, "seed": 0}

    eval_plan = data.EpochPlan.create([(uri, 8)], train=False, batch_size=8, **plan_args)
    (batch,) = data.EpochBatches(
        eval_plan, data.DecodeOptions(mode="eval_center", image_size=32, eval_resize=32)
    )
    assert np.array_equal(batch[0].numpy(), pixels)  # CIFAR evaluation sees the stored images

    train_plan = data.EpochPlan.create([(uri, 8)], train=True, batch_size=8, **plan_args)
    cifar = data.DecodeOptions(mode="cifar", image_size=32)
    (images, labels) = next(iter(data.EpochBatches(train_plan, cifar)))
    (again, _) = next(iter(data.EpochBatches(train_plan, cifar)))
    assert images.shape == (8, 32, 32, 3)
    assert torch.equal(images, again)
    assert not torch.equal(images, torch.from_numpy(pixels[labels.numpy()]))

    # The tutorial recipe's mode adds rotation and zoom on top: same shapes, other pixels.
    (tutorial, tutorial_labels) = next(
        iter(
            data.EpochBatches(train_plan, data.DecodeOptions(mode="cifar_tutorial", image_size=32))
        )
    )
    assert tutorial.shape == (8, 32, 32, 3)
    assert torch.equal(tutorial_labels, labels)
    assert not torch.equal(tutorial, images)


@pytest.mark.slow
def test_reader_feeds_a_two_worker_torch_trainer(manifest, tmp_path):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    def loop(config: dict) -> None:
        import ray.train

        from pipelines import data as data_lib
        from pipelines.manifest import read_manifest as read

        context = ray.train.get_context()
        rank, world = context.get_world_rank(), context.get_world_size()
        dataset = read(config["uri"])
        common = {"world_size": world, "rank": rank, "seed": 0, "epoch": 0, "batch_size": 4}
        paper = data_lib.DecodeOptions("paper", 32, num_cpus=0.5, shuffle_buffer=8)
        center = data_lib.DecodeOptions("eval_center", 32, num_cpus=0.5)
        train = data_lib.iter_batches(dataset, paper, split="train", **common)
        val = data_lib.iter_batches(dataset, center, split="val", **common)
        result = {
            "train": [k for b in train.batches() for k in b.keys],
            "val": [k for b in val.batches() for k in b.keys],
            "steps": train.plan.steps,
        }
        Path(config["out"], f"rank-{rank}.json").write_text(json.dumps(result))
        ray.train.report({"train_rows": len(result["train"])})

    trainer = TorchTrainer(
        loop,
        train_loop_config={"uri": manifest.root, "out": str(tmp_path)},
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
        run_config=RunConfig(name="data-reader", storage_path=str(tmp_path / "runs")),
    )
    trainer.fit()
    ranks = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert [r["steps"] for r in ranks] == [6, 6]
    assert [len(r["train"]) for r in ranks] == [24, 24]
    assert not set(ranks[0]["train"]) & set(ranks[1]["train"])
    val = ranks[0]["val"] + ranks[1]["val"]
    assert [len(r["val"]) for r in ranks] == [10, 10]
    assert Counter(val) == Counter(data.read_split_keys(manifest, "val"))
