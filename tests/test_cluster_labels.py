"""Decode tasks on a heterogeneous cluster (three nodes on this machine): a head, a GPU node
(logical GPUs, the train label the cluster configs set) and a CPU-only node labelled for
decoding. The job's reader sends its decode tasks to the decode node first, through Ray's label
scheduling, and falls back to any node where no node has the label."""

from __future__ import annotations

import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipelines import data, shards
from pipelines.config import DataConfig
from pipelines.manifest import Manifest, read_manifest
from pipelines.synthetic import SyntheticSpec
from tests.clusters import LocalCluster

pytestmark = pytest.mark.slow

DECODE_LABEL = DataConfig.decode_nodes  # the default: resnet-ray/role=decode


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    import ray

    # A short root: Ray's Unix sockets live under it and their paths must stay < 108 bytes.
    cluster = LocalCluster(Path(tempfile.mkdtemp(prefix="rl-", dir="/tmp")))
    try:
        cluster.start_head(num_cpus=1)
        cluster.add_node("gpu", num_cpus=1, num_gpus=1, labels="resnet-ray/role=train")
        # Eight logical CPUs: the head raylet subtracts each task it sends there from its view
        # of the node until the node's own report arrives (late on a loaded machine); with two,
        # that view reached zero and tasks fell back to the head (CI: 9 of 17).
        cluster.add_node("decode", num_cpus=8, labels=DECODE_LABEL)
        with pytest.MonkeyPatch.context() as env:
            for name, value in cluster.auth_env().items():
                env.setenv(name, value)
            ray.init(address=cluster.gcs_address, log_to_driver=False)
            try:
                yield cluster
            finally:
                ray.shutdown()
    finally:
        left = cluster.stop()
        assert not left, f"cluster processes survived: {left}"


@pytest.fixture(scope="module")
def dataset(cluster, tmp_path_factory) -> Manifest:
    out = tmp_path_factory.mktemp("data") / "tiny"
    spec = SyntheticSpec(num_classes=4, train_per_class=32, val_per_class=4, image_kind="cifar")
    assert shards.write_dataset(shards.prepare_config("synthetic", str(out), synthetic=spec)) == 0
    return read_manifest(str(out))


def _finished_decode_tasks(address: str) -> Counter:
    """How many decode tasks have finished on each node (by node name), from Ray's state API
    once its count has settled (task events arrive a little after the tasks end). The address
    is explicit: other clusters may run on this machine (parallel test files)."""
    import ray
    from ray.util.state import list_tasks

    names = {n["NodeID"]: n["NodeName"] for n in ray.nodes()}
    previous = None
    for _ in range(20):
        tasks = list_tasks(
            address,
            filters=[("name", "=", "MapBatches(_decode_chunks)"), ("state", "=", "FINISHED")],
            detail=True,
            limit=10_000,
            raise_on_missing_output=False,
        )
        counts = Counter(names.get(task.node_id, task.node_id) for task in tasks)
        if counts == previous:
            return counts
        previous = counts
        time.sleep(1.0)
    return previous


def test_decode_tasks_go_to_the_decode_node_first_and_anywhere_without_one(cluster, dataset):
    address = cluster.gcs_address
    key, _, value = DECODE_LABEL.partition("=")
    before = _finished_decode_tasks(address)
    _read_epoch(dataset, ((key, value),), epoch=0, concurrency=1)
    preferred = _finished_decode_tasks(address) - before
    # One task at a time on the decode node's eight CPUs: most run there. Some may fall back to
    # another node when the submitting raylet's view of the decode node is stale.
    assert preferred["decode"] > sum(preferred.values()) / 2, preferred
    before = _finished_decode_tasks(address)
    _read_epoch(dataset, ((key, "no-such-node"),), epoch=1)
    fallback = _finished_decode_tasks(address) - before
    assert sum(fallback.values()) > 0, fallback  # no node has the label: they ran anyway
    before = _finished_decode_tasks(address)
    _read_epoch(dataset, (), epoch=2)  # no preference: Ray Data spreads them over the nodes
    anywhere = _finished_decode_tasks(address) - before
    assert sum(n for node, n in anywhere.items() if node != "decode") > 0, anywhere


def _read_epoch(
    manifest: Manifest, prefer: tuple[tuple[str, str], ...], epoch: int, concurrency: int = 2
) -> None:
    options = data.DecodeOptions(
        "cifar",
        32,
        map_batch_rows=8,
        task_rows=8,
        chunks_per_task=1,
        concurrency=concurrency,
        prefer_nodes=prefer,
    )
    batches = data.iter_batches(
        manifest, options, split="train", world_size=1, rank=0, epoch=epoch, seed=0, batch_size=8
    )
    assert sum(len(labels) for _, labels in batches) == 128  # every row, once
