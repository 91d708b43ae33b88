"""The ResNet v1 family: shapes, sizes, shortcut options, initialisation, torchvision interchange."""

import math

import pytest
import torch
import torchvision
from torch import nn

from resnet_core.models import (
    BasicBlock,
    Bottleneck,
    ZeroPadShortcut,
    create_model,
    is_cifar_model,
    model_names,
)
from resnet_core.paper import PAPER

IMAGENET = ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"]
# Published by torchvision for its resnetNN(); the paper gives no ImageNet parameter counts.
TORCHVISION_PARAMS = {
    "resnet18": 11_689_512,
    "resnet34": 21_797_672,
    "resnet50": 25_557_032,
    "resnet101": 44_549_160,
    "resnet152": 60_192_808,
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models and inputs are tiny: with 2 threads on 2 busy cores, the threads' barriers
    cost more than the arithmetic they share."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def build():
    """Models in eval mode, built once per module: tests must only read them (no loading)."""
    cache: dict[tuple, nn.Module] = {}

    def get(name: str, **options) -> nn.Module:
        key = (name, tuple(sorted(options.items())))
        if key not in cache:
            cache[key] = create_model(name, **options).eval()
        return cache[key]

    return get


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def randomize_batchnorm(model: nn.Module, generator: torch.Generator) -> None:
    """Random BN affine parameters and statistics, so that interchange checks exercise them."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(0.5 + torch.rand(m.num_features, generator=generator))
                m.bias.copy_(0.1 * torch.randn(m.num_features, generator=generator))
                m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=generator))
                m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=generator))


def shortcuts(model: nn.Module) -> list[nn.Module | None]:
    return [m.downsample for m in model.modules() if isinstance(m, BasicBlock | Bottleneck)]


# --- names -------------------------------------------------------------------------------------


def test_model_names_are_the_paper_nets():
    names = model_names()
    assert names[:7] == [*IMAGENET, "plain18", "plain34"]
    for depth in (20, 32, 44, 56, 110, 1202):
        assert f"resnet{depth}" in names
    for depth in (20, 32, 44, 56):
        assert f"plain{depth}" in names
    assert len(set(names)) == len(names)


@pytest.mark.parametrize(
    ("name", "cifar"),
    [
        ("resnet18", False),
        ("resnet50", False),
        ("plain34", False),
        ("resnet20", True),
        ("resnet1202", True),
        ("plain56", True),
        ("resnet8", True),
        ("plain26", True),
    ],
)
def test_is_cifar_model(name, cifar):
    assert is_cifar_model(name) is cifar


@pytest.mark.parametrize(
    "name",
    [
        *("resnet19", "resnet2", "resnet0", "resnet", "resnet020", "ResNet18", "resnext50"),
        *("plain50", "plain152", "resnet-18", " resnet18", ""),
    ],
)
def test_invalid_names_raise_with_the_bad_value(name):
    with pytest.raises(ValueError, match="unknown model name") as error:
        create_model(name)
    assert repr(name) in str(error.value)
    assert "6n+2" in str(error.value)
    with pytest.raises(ValueError, match="unknown model name"):
        is_cifar_model(name)


def test_non_string_name_raises():
    with pytest.raises(ValueError, match="18"):
        create_model(18)


@pytest.mark.parametrize(
    ("name", "options", "bad"),
    [
        ("resnet18", {"num_classes": 0}, "0"),
        ("resnet20", {"num_classes": -3}, "-3"),
        ("resnet20", {"num_classes": 10.0}, "10.0"),
        ("resnet20", {"num_classes": True}, "True"),
        ("resnet18", {"shortcut": "D"}, "'D'"),
        ("resnet20", {"shortcut": "a"}, "'a'"),
        ("plain20", {"shortcut": "A"}, "'A'"),
        ("plain18", {"shortcut": "B"}, "'B'"),
        ("resnet50", {"stride_in_3x3": "yes"}, "'yes'"),
        ("resnet50", {"zero_init_residual": 1}, "1"),
        ("plain34", {"zero_init_residual": True}, "True"),
    ],
)
def test_invalid_options_raise_with_the_bad_value(name, options, bad):
    with pytest.raises(ValueError) as error:
        create_model(name, **options)
    assert bad in str(error.value)


# --- shapes and depth ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", model_names())
def test_output_shape_for_every_name(build, name):
    model = build(name)
    size = 32 if is_cifar_model(name) else 64
    with torch.no_grad():
        logits = model(torch.randn(2, 3, size, size))
    assert logits.shape == (2, 10 if is_cifar_model(name) else 1000)


@pytest.mark.parametrize("name", [*model_names(), "resnet8", "plain14", "resnet26"])
def test_weighted_layers_match_the_depth_in_the_name(build, name):
    """The paper counts convs and the fc on the main path; projection shortcuts are extra."""
    model = build(name)
    weighted = [
        module_name
        for module_name, m in model.named_modules()
        if isinstance(m, nn.Conv2d | nn.Linear) and ".downsample." not in module_name
    ]
    assert len(weighted) == int(name.removeprefix("resnet").removeprefix("plain"))


def test_num_classes(build):
    assert build("resnet18", num_classes=7)(torch.randn(1, 3, 32, 32)).shape == (1, 7)
    assert build("resnet20", num_classes=100)(torch.randn(1, 3, 32, 32)).shape == (1, 100)


@pytest.mark.parametrize(
    ("name", "options", "channels", "reduction"),
    [
        ("resnet18", {}, 512, 32),
        ("resnet18", {"shortcut": "A"}, 512, 32),
        ("resnet50", {}, 2048, 32),
        ("resnet50", {"shortcut": "A"}, 2048, 32),
        ("plain34", {}, 512, 32),
        ("resnet20", {}, 64, 4),
        ("resnet20", {"shortcut": "B"}, 64, 4),
        ("plain20", {}, 64, 4),
    ],
)
@pytest.mark.parametrize(("height", "width"), [(32, 32), (33, 47), (96, 64)])
def test_any_input_of_32_px_or_more_works(build, name, options, channels, reduction, height, width):
    model = build(name, **options)
    image = torch.randn(2, 3, height, width)
    with torch.no_grad():
        features = model.forward_features(image)
        logits = model(image)
    assert features.shape == (
        2,
        channels,
        math.ceil(height / reduction),
        math.ceil(width / reduction),
    )
    assert logits.shape == (2, 10 if is_cifar_model(name) else 1000)
    # forward = features -> global average pool -> fc.
    torch.testing.assert_close(logits, model.fc(features.mean(dim=(2, 3))))


# --- sizes -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", IMAGENET)
def test_imagenet_parameter_counts_equal_torchvision(build, name):
    assert n_params(build(name)) == TORCHVISION_PARAMS[name]


@pytest.mark.parametrize(
    "row", [row for row in PAPER if row.table == 6 and row.metric == "params_m"], ids=str
)
def test_cifar_parameter_counts_match_table6(build, row):
    decimals = len(repr(row.value).split(".")[1])
    assert round(n_params(build(row.model)) / 1e6, decimals) == row.value


@pytest.mark.parametrize(("resnet", "plain"), [("resnet20", "plain20"), ("resnet34", "plain34")])
def test_shortcut_a_adds_no_parameters_and_c_adds_more_than_b(build, resnet, plain):
    a = n_params(build(resnet, shortcut="A"))
    b = n_params(build(resnet, shortcut="B"))
    c = n_params(build(resnet, shortcut="C"))
    assert a == n_params(build(plain))
    assert a < b < c


# --- shortcuts ---------------------------------------------------------------------------------


def test_shortcut_options_place_projections_as_in_section_3_3(build):
    # resnet20: three stages of three blocks; dimensions increase in layer2[0] and layer3[0].
    increases = [False, False, False, True, False, False, True, False, False]
    a = shortcuts(build("resnet20"))
    b = shortcuts(build("resnet20", shortcut="B"))
    c = shortcuts(build("resnet20", shortcut="C"))
    assert [isinstance(s, ZeroPadShortcut) for s in a] == increases
    assert [s is not None for s in a] == increases
    assert [isinstance(s, nn.Sequential) for s in b] == increases
    assert [s is not None for s in b] == increases
    assert all(isinstance(s, nn.Sequential) for s in c)
    assert all(s is None for s in shortcuts(build("plain20")))
    assert not any(m.residual for m in build("plain20").modules() if isinstance(m, BasicBlock))


def test_zero_pad_shortcut_subsamples_then_appends_zero_channels():
    x = torch.randn(2, 16, 9, 8)
    y = ZeroPadShortcut(stride=2, extra_channels=16)(x)
    assert y.shape == (2, 32, 5, 4)
    torch.testing.assert_close(y[:, :16], x[:, :, ::2, ::2])
    assert (y[:, 16:] == 0).all()


def test_plain_and_residual_nets_differ_only_by_the_shortcuts(build):
    """Option A is parameter-free, so plain20's weights load into resnet20; adding x changes y."""
    plain = build("plain20")
    resnet = create_model("resnet20").eval()
    resnet.load_state_dict(plain.state_dict(), strict=True)
    image = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert not torch.allclose(plain(image), resnet(image))
        # Same branch F(x) = bn2(conv2(relu(bn1(conv1(x))))); plain: relu(F(x)), residual: relu(F(x) + x).
        block = plain.layer1[0]
        features = plain.relu(plain.bn1(plain.conv1(image)))
        branch = block.bn2(block.conv2(block.relu(block.bn1(block.conv1(features)))))
        torch.testing.assert_close(block(features), torch.relu(branch))
        torch.testing.assert_close(resnet.layer1[0](features), torch.relu(branch + features))


# --- initialisation ----------------------------------------------------------------------------


def test_he_initialisation_and_torchvision_fc(build):
    model = build("resnet50")
    conv = model.layer3[0].conv2  # 256 -> 256, 3x3: fan_out = 256 * 9
    expected_std = math.sqrt(2.0 / (conv.out_channels * 9))
    assert conv.weight.std().item() == pytest.approx(expected_std, rel=0.02)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert (m.weight == 1).all()
            assert (m.bias == 0).all()
    # nn.Linear's default: uniform(+-1/sqrt(fan_in)), as torchvision leaves it.
    bound = 1 / math.sqrt(model.fc.in_features)
    assert model.fc.weight.abs().max().item() <= bound
    assert model.fc.weight.abs().max().item() > 0.9 * bound


@pytest.mark.parametrize(("name", "last_bn"), [("resnet18", "bn2"), ("resnet50", "bn3")])
def test_zero_init_residual_zeros_the_last_gamma_of_each_branch(build, name, last_bn):
    model = build(name, zero_init_residual=True)
    blocks = [m for m in model.modules() if isinstance(m, BasicBlock | Bottleneck)]
    for block in blocks:
        for bn_name in ("bn1", "bn2", "bn3"):
            if hasattr(block, bn_name):
                expected = 0.0 if bn_name == last_bn else 1.0
                assert (getattr(block, bn_name).weight == expected).all(), bn_name
        if block.downsample is not None:
            assert (block.downsample[1].weight == 1).all()
    assert (model.bn1.weight == 1).all()
    default = build(name)
    assert all(
        (getattr(b, last_bn).weight == 1).all()
        for b in default.modules()
        if isinstance(b, BasicBlock | Bottleneck)
    )


def test_zero_init_residual_makes_every_block_start_as_its_shortcut(build):
    model = build("resnet20", zero_init_residual=True)
    features = torch.relu(torch.randn(2, 16, 32, 32))  # block inputs follow a ReLU
    with torch.no_grad():
        torch.testing.assert_close(model.layer1(features), features)
        expected = torch.nn.functional.pad(features[:, :, ::2, ::2], (0, 0, 0, 0, 0, 16))
        torch.testing.assert_close(model.layer2(features), expected)


# --- v1 and v1.5 -------------------------------------------------------------------------------


def test_v1_strides_the_first_1x1_and_v15_the_3x3_with_the_same_keys(build):
    v1 = build("resnet50")
    v15 = build("resnet50", stride_in_3x3=True)
    for layer in ("layer2", "layer3", "layer4"):
        first_v1, first_v15 = getattr(v1, layer)[0], getattr(v15, layer)[0]
        assert (first_v1.conv1.stride, first_v1.conv2.stride) == ((2, 2), (1, 1))
        assert (first_v15.conv1.stride, first_v15.conv2.stride) == ((1, 1), (2, 2))
        assert first_v1.downsample[0].stride == first_v15.downsample[0].stride == (2, 2)
    shapes_v1 = {key: value.shape for key, value in v1.state_dict().items()}
    shapes_v15 = {key: value.shape for key, value in v15.state_dict().items()}
    assert shapes_v1 == shapes_v15
    # Basic blocks always stride their first 3x3: the option changes nothing there.
    assert build("resnet18").layer2[0].conv1.stride == (2, 2)
    assert build("resnet18", stride_in_3x3=True).layer2[0].conv1.stride == (2, 2)


# --- torchvision interchange -------------------------------------------------------------------


@pytest.mark.parametrize("name", IMAGENET)
def test_weights_move_both_ways_between_ours_and_torchvision(name):
    generator = torch.Generator().manual_seed(0)
    image = torch.randn(2, 3, 64, 64, generator=generator)
    theirs = getattr(torchvision.models, name)(weights=None).eval()
    ours = create_model(name, stride_in_3x3=True).eval()  # v1.5, as torchvision
    paper = create_model(name).eval()  # v1: stride on the bottleneck's first 1x1
    with torch.no_grad():
        # torchvision -> ours: strict load, same outputs.
        randomize_batchnorm(theirs, generator)
        ours.load_state_dict(theirs.state_dict(), strict=True)
        expected = theirs(image)
        assert (ours(image) - expected).abs().max().item() <= 1e-5
        # Same weights in v1 give other outputs wherever a bottleneck strides.
        paper.load_state_dict(theirs.state_dict(), strict=True)
        same = (paper(image) - expected).abs().max().item() <= 1e-5
        assert same == (name in ("resnet18", "resnet34"))

        # ours (v1, fresh weights) -> torchvision: strict load, every tensor arrives unchanged.
        paper = create_model(name).eval()
        randomize_batchnorm(paper, generator)
        theirs.load_state_dict(paper.state_dict(), strict=True)
        received = theirs.state_dict()
        for key, value in paper.state_dict().items():
            assert torch.equal(received[key], value), key
        # ours (v1.5) -> torchvision: same outputs.
        ours.load_state_dict(paper.state_dict(), strict=True)
        theirs.load_state_dict(ours.state_dict(), strict=True)
        assert (ours(image) - theirs(image)).abs().max().item() <= 1e-5
