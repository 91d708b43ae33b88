"""Parameter and multiply-add counting, the paper's numbers, and the resnet-selfcheck command."""

import pytest
import torch
from torch import nn

from resnet_core.models import create_model, is_cifar_model
from resnet_core.paper import PAPER, PaperValue
from resnet_core.summary import (
    ModelSummary,
    main,
    paper_tables,
    summarize,
)
from tests.jpeg_decoder import EXPECTED_DECODER

TABLE1 = [row for row in PAPER if row.table == 1 and row.metric == "gmacs"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models and inputs are tiny: with 2 threads on 2 busy cores, the threads' barriers
    cost more than the arithmetic they share."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_summarize_counts_conv_and_linear_multiply_adds():
    model = nn.Sequential(
        nn.Conv2d(3, 8, kernel_size=3, stride=2, padding=1),  # -> 8 x 4 x 4
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, kernel_size=3, padding=1, groups=4, bias=False),  # 2 inputs per group
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 5),
    )
    summary = summarize(model, (3, 8, 8))
    conv1 = (8 * 4 * 4) * (3 * 3 * 3)
    conv2 = (8 * 4 * 4) * (2 * 3 * 3)
    linear = 5 * (8 * 4 * 4)
    params = (8 * 27 + 8) + 2 * 8 + 8 * 2 * 9 + (128 * 5 + 5)  # BatchNorm has 2 x 8
    assert summary == ModelSummary(params=params, macs=conv1 + conv2 + linear)


def test_summarize_restores_modes_and_leaves_weights_alone():
    model = create_model("resnet20")
    model.train()
    model.layer2.eval()
    before = {key: value.clone() for key, value in model.state_dict().items()}
    # Batch 1 with 1x1 maps would fail in train-mode BatchNorm: summarize runs in eval mode.
    summary = summarize(model, (3, 4, 4))
    assert summary.macs > 0
    assert model.training
    assert model.layer1.training
    assert not model.layer2.training
    assert not model.layer2[0].bn1.training
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_meta_device_gives_the_same_counts_as_cpu():
    cpu = create_model("resnet18")
    with torch.device("meta"):
        meta = create_model("resnet18")
    assert summarize(meta, (3, 64, 96)) == summarize(cpu, (3, 64, 96))


@pytest.mark.parametrize("row", TABLE1, ids=lambda row: row.model)
def test_multiply_adds_within_3_percent_of_table1(row):
    with torch.device("meta"):
        model = create_model(row.model)
    gmacs = summarize(model, (3, 224, 224)).macs / 1e9
    assert gmacs == pytest.approx(row.value, rel=0.03)


def test_v15_costs_more_multiply_adds_than_v1_for_the_same_parameters():
    with torch.device("meta"):
        v1 = summarize(create_model("resnet50"), (3, 224, 224))
        v15 = summarize(create_model("resnet50", stride_in_3x3=True), (3, 224, 224))
    assert v15.params == v1.params
    assert 1.03 < v15.macs / v1.macs < 1.10


def test_paper_rows_name_real_models_and_are_unique():
    keys = [(row.table, row.model, row.metric, row.shortcut) for row in PAPER]
    assert len(set(keys)) == len(keys)
    for row in PAPER:
        assert isinstance(row, PaperValue)
        assert row.table in (1, 2, 3, 4, 6)
        assert row.shortcut in (None, "A", "B", "C")
        assert is_cifar_model(row.model) == (row.table == 6)
        assert (row.shortcut is None) or row.model.startswith("resnet")
        assert row.value > 0
    # Table 3: the three shortcut options for ResNet-34 rank C < B < A in top-1 error.
    resnet34 = {
        r.shortcut: r.value
        for r in PAPER
        if r.table == 3 and r.model == "resnet34" and r.metric == "top1_err_10crop"
    }
    assert resnet34["C"] < resnet34["B"] < resnet34["A"]


def test_paper_tables_lists_every_model_and_passes():
    text = paper_tables()
    for name in ("resnet18", "resnet50", "resnet152", "plain18", "plain34", "resnet1202"):
        assert name in text
    assert "Table 1" in text
    assert "Table 6" in text
    assert "FAIL" not in text
    assert text.count(" ok") == 7 + 6
    assert text.count("equal") == 5


def test_selfcheck_main_prints_tables_and_returns_0(capsys):
    assert main() == 0
    out = capsys.readouterr().out
    assert "Table 1" in out
    assert "Table 6" in out
    assert "torchvision resnet18 weights -> ours" in out
    assert "(ok, tolerance 1e-05)" in out
    assert f"JPEG decoder: {EXPECTED_DECODER}" in out
    assert "all checks passed" in out
