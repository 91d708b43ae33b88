"""Top-k counts against a brute-force reference, and exact aggregation across gloo workers."""

import copy
import json
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from resnet_core.checkpoint import load_checkpoint, save_checkpoint
from resnet_core.metrics import RunningMean, TopKAccumulator, topk_correct


def brute_force_topk_correct(logits: torch.Tensor, targets: torch.Tensor, k: int) -> int:
    correct = 0
    for row, target in zip(logits.tolist(), targets.tolist(), strict=True):
        ranked = sorted(range(len(row)), key=lambda c: row[c], reverse=True)
        correct += target in ranked[:k]
    return correct


@pytest.mark.parametrize(("batch", "classes"), [(64, 10), (17, 3), (1, 1), (0, 7)])
def test_topk_correct_matches_brute_force(batch, classes):
    generator = torch.Generator().manual_seed(batch * 100 + classes)
    logits = torch.randn(batch, classes, generator=generator)
    targets = torch.randint(0, classes, (batch,), generator=generator)
    ks = (1, 2, 5, 12)
    counts = topk_correct(logits, targets, ks)
    assert counts.dtype == torch.int64
    assert counts.tolist() == [brute_force_topk_correct(logits, targets, k) for k in ks]
    assert counts[-1] == batch  # k=12 exceeds every class count here: all samples are correct


def test_topk_correct_rejects_bad_input():
    with pytest.raises(ValueError, match="logits must have shape"):
        topk_correct(torch.randn(4), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"targets must have shape \(4,\)"):
        topk_correct(torch.randn(4, 3), torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="ks must be distinct positive ints"):
        topk_correct(torch.randn(4, 3), torch.zeros(4, dtype=torch.long), ks=(0, 1))


def test_accumulator_over_batches_equals_one_pass():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(100, 10, generator=generator)
    targets = torch.randint(0, 10, (100,), generator=generator)
    accumulator = TopKAccumulator(ks=(1, 5), num_classes=10)
    for start in range(0, 100, 30):
        accumulator.update(logits[start : start + 30], targets[start : start + 30])
    top1, top5 = (brute_force_topk_correct(logits, targets, k) for k in (1, 5))
    assert accumulator.compute() == {"top1": top1 / 100, "top5": top5 / 100, "count": 100}

    per_class = accumulator.per_class_accuracy()
    predictions = logits.argmax(dim=1)
    for c in range(10):
        members = targets == c
        assert (
            per_class[c].item() == (predictions[members] == c).sum().item() / members.sum().item()
        )


def test_accumulator_guards():
    accumulator = TopKAccumulator(num_classes=4)
    with pytest.raises(ValueError, match="no samples accumulated"):
        accumulator.compute()
    with pytest.raises(ValueError, match=r"targets must lie in \[0, 4\), got 6"):
        accumulator.update(torch.randn(2, 4), torch.tensor([1, 6]))
    with pytest.raises(ValueError, match="logits have 3 classes but this accumulator counts 4"):
        accumulator.update(torch.randn(2, 3), torch.tensor([1, 2]))
    assert torch.isnan(accumulator.per_class_accuracy()).all()
    accumulator.update(torch.randn(2, 4), torch.tensor([1, 2]))
    accumulator.all_reduce()  # single process: a no-op that marks the counts global
    with pytest.raises(RuntimeError, match="all_reduce\\(\\) called twice"):
        accumulator.all_reduce()
    with pytest.raises(RuntimeError, match="update\\(\\) after all_reduce\\(\\)"):
        accumulator.update(torch.randn(2, 4), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="per-class accuracy needs"):
        TopKAccumulator().per_class_accuracy()


def test_state_dict_resumes_mid_epoch_through_a_checkpoint(tmp_path):
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(50, 6, generator=generator)
    targets = torch.randint(0, 6, (50,), generator=generator)
    whole = TopKAccumulator(ks=(1, 3), num_classes=6)
    whole.update(logits, targets)
    loss = RunningMean()
    loss.update(torch.tensor(2.0), n=20)

    first_half = TopKAccumulator(ks=(1, 3), num_classes=6)
    first_half.update(logits[:20], targets[:20])
    save_checkpoint(tmp_path / "c", {"acc": first_half.state_dict(), "loss": loss.state_dict()})
    state = load_checkpoint(tmp_path / "c")

    resumed = TopKAccumulator(ks=(1, 3), num_classes=6)
    resumed.load_state_dict(state["acc"])
    resumed.update(logits[20:], targets[20:])
    assert resumed.compute() == whole.compute()
    torch.testing.assert_close(
        resumed.per_class_accuracy(), whole.per_class_accuracy(), rtol=0, atol=0, equal_nan=True
    )
    resumed_loss = RunningMean()
    resumed_loss.load_state_dict(state["loss"])
    resumed_loss.update(4.0, n=30)
    assert resumed_loss.compute() == (2.0 * 20 + 4.0 * 30) / 50

    with pytest.raises(ValueError, match="accumulator state has ks=\\(1, 3\\)"):
        TopKAccumulator(ks=(1, 5), num_classes=6).load_state_dict(state["acc"])


# ------------------------------------------------------------------------------------------
# Two gloo workers with shards of different sizes
# ------------------------------------------------------------------------------------------

NUM_CLASSES = 7
SHARD_SIZES = (3, 37)  # uneven, as Ray Data block splits make them


def evaluation_set() -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and targets whose small shard is all correct and whose large shard is mostly wrong,
    so the mean of per-worker accuracies is far from the exact accuracy."""
    generator = torch.Generator().manual_seed(7)
    logits = torch.randn(sum(SHARD_SIZES), NUM_CLASSES, generator=generator)
    targets = torch.randint(0, NUM_CLASSES, (sum(SHARD_SIZES),), generator=generator)
    targets[: SHARD_SIZES[0]] = logits[: SHARD_SIZES[0]].argmax(dim=1)
    return logits, targets


def shard(rank: int, logits: torch.Tensor, targets: torch.Tensor):
    start = sum(SHARD_SIZES[:rank])
    stop = start + SHARD_SIZES[rank]
    return logits[start:stop], targets[start:stop]


def worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size
    )
    try:
        logits, targets = shard(rank, *evaluation_set())
        batches = [(logits[i : i + 8], targets[i : i + 8]) for i in range(0, len(targets), 8)]
        accumulator = TopKAccumulator(ks=(1, 5), num_classes=NUM_CLASSES)
        loss = RunningMean()
        for batch_logits, batch_targets in batches:
            accumulator.update(batch_logits, batch_targets)
            loss.update(
                torch.nn.functional.cross_entropy(batch_logits, batch_targets), len(batch_targets)
            )
        local = accumulator.compute()
        result = {
            "local": local,
            "global": accumulator.all_reduce().compute(),
            "per_class": accumulator.per_class_accuracy().tolist(),
            "loss": loss.all_reduce().compute(),
        }

        # Mid-epoch resume as TopKAccumulator documents it: after the first batch the writing rank
        # keeps a reduced copy; after the restart only that rank loads it and all continue.
        first = TopKAccumulator(ks=(1, 5), num_classes=NUM_CLASSES)
        first.update(*batches[0])
        snapshot = copy.deepcopy(first).all_reduce().state_dict()
        resumed = TopKAccumulator(ks=(1, 5), num_classes=NUM_CLASSES)
        if rank == 0:
            resumed.load_state_dict(snapshot)
        for batch in batches[1:]:
            resumed.update(*batch)
        result["resumed"] = resumed.all_reduce().compute()
        with open(f"{out_dir}/rank{rank}.json", "w") as f:
            json.dump(result, f)
    finally:
        dist.destroy_process_group()


def test_two_workers_with_uneven_shards_aggregate_exactly(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]

    logits, targets = evaluation_set()
    single = TopKAccumulator(ks=(1, 5), num_classes=NUM_CLASSES)
    single.update(logits, targets)
    expected = single.compute()
    expected_loss = torch.nn.functional.cross_entropy(logits.double(), targets).item()
    for result in results:
        assert result["global"] == expected
        assert result["resumed"] == expected
        torch.testing.assert_close(
            torch.tensor(result["per_class"], dtype=torch.float64),
            single.per_class_accuracy(),
            rtol=0,
            atol=0,
            equal_nan=True,
        )
        assert result["loss"] == pytest.approx(expected_loss, rel=1e-6)
    assert results[0]["local"]["count"] == SHARD_SIZES[0]
    assert results[1]["local"]["count"] == SHARD_SIZES[1]

    mean_of_workers = (results[0]["local"]["top1"] + results[1]["local"]["top1"]) / 2
    assert results[0]["local"]["top1"] == 1.0
    assert abs(mean_of_workers - expected["top1"]) > 0.3


@pytest.mark.gpu
def test_accumulator_counts_on_the_gpu_match_the_cpu():
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(300, 10, generator=generator)
    targets = torch.randint(0, 10, (300,), generator=generator)
    on_cpu = TopKAccumulator(num_classes=10)
    on_gpu = TopKAccumulator(num_classes=10, device="cuda")
    on_cpu.update(logits, targets)
    on_gpu.update(logits.cuda(), targets.cuda())
    assert on_gpu.correct.is_cuda
    assert on_gpu.compute() == on_cpu.compute()
    assert torch.equal(on_gpu.per_class_accuracy(), on_cpu.per_class_accuracy())
