"""The checkpoint format: exact round trips, bitwise resume, clear errors, atomic saves, no pickle."""

import json
import os
import pickle
import random
import resource
import signal
import socket
import warnings

import numpy as np
import pytest
import safetensors
import torch
import torch.distributed as dist
from torch import nn

from resnet_core.checkpoint import (
    CheckpointError,
    capture_rng_state,
    latest_valid_checkpoint,
    load_checkpoint,
    load_weights,
    restore_rng_state,
    restore_training_state,
    save_checkpoint,
    save_weights,
    training_state,
)


def small_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, bias=False),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Dropout(0.3),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 5),
    )


def make_training_objects(seed: int):
    torch.manual_seed(seed)
    model = small_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=2)
    return model, optimizer, scheduler, scaler


def train_step(model, optimizer, scheduler, scaler) -> None:
    """One step whose data, dropout and a jitter all draw from the global generators."""
    images = torch.randn(6, 3, 8, 8)
    labels = torch.randint(0, 5, (6,))
    jitter = 1.0 + 0.01 * random.random() + 0.01 * float(np.random.rand())
    loss = nn.functional.cross_entropy(model(images), labels) * jitter
    optimizer.zero_grad()
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    scheduler.step()


def all_tensors(model, optimizer) -> dict[str, torch.Tensor]:
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    for index, state in optimizer.state_dict()["state"].items():
        tensors[f"momentum.{index}"] = state["momentum_buffer"]
    return tensors


def test_resume_is_bitwise_identical_to_continuing(tmp_path):
    model, optimizer, scheduler, scaler = make_training_objects(seed=0)
    for _ in range(3):
        train_step(model, optimizer, scheduler, scaler)
    config = {"optim": {"lr": 0.1, "betas": (0.9, 0.999)}, "model": "tiny"}
    state = training_state(
        model, optimizer, scheduler, scaler, epoch=1, step=3, batches_in_epoch=1, config=config
    )
    save_checkpoint(tmp_path / "ckpt", state)
    train_step(model, optimizer, scheduler, scaler)  # the original run continues

    fresh = make_training_objects(seed=1)
    assert not torch.equal(fresh[0][0].weight, model[0].weight)
    fields = restore_training_state(load_checkpoint(tmp_path / "ckpt"), *fresh)
    train_step(*fresh)  # the resumed run takes the same step

    expected, actual = all_tensors(model, optimizer), all_tensors(fresh[0], fresh[1])
    assert expected.keys() == actual.keys()
    for key in expected:
        assert torch.equal(expected[key], actual[key]), key
    assert fresh[2].get_last_lr() == scheduler.get_last_lr()
    assert fresh[3].get_scale() == scaler.get_scale()
    assert fields == {
        "epoch": 1,
        "step": 3,
        "batches_in_epoch": 1,
        "config": config,
        "extra": None,
    }
    assert isinstance(fields["config"]["optim"]["betas"], tuple)


def test_lambda_lr_scheduler_round_trips(tmp_path):
    model = small_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 0.9**epoch)
    for _ in range(3):
        optimizer.step()
        scheduler.step()
    save_checkpoint(tmp_path / "c", {"scheduler": scheduler.state_dict()})

    fresh_optimizer = torch.optim.SGD(small_model().parameters(), lr=0.2, momentum=0.9)
    fresh = torch.optim.lr_scheduler.LambdaLR(fresh_optimizer, lambda epoch: 0.9**epoch)
    fresh.load_state_dict(load_checkpoint(tmp_path / "c")["scheduler"])
    fresh.step()
    scheduler.step()
    assert fresh.last_epoch == scheduler.last_epoch == 4
    assert fresh.get_last_lr() == scheduler.get_last_lr()


def test_exotic_values_round_trip_exactly(tmp_path):
    pcg_state = np.random.default_rng(1234).bit_generator.state
    state = {
        "int_keys": {0: "zero", 7: [1, 2], -3: None, 2**70: "big key"},
        "str_and_int_zero": {"0": torch.ones(2), 0: torch.zeros(2)},
        "tuples": (1, (2.5, "x"), ()),
        "big": [2**127 + 1, -(2**64), 2**53, 2**53 - 1],
        "pcg64": pcg_state,
        "python_random": random.getstate(),
        "floats": [float("nan"), float("inf"), float("-inf"), 0.1, -0.0, 1e308],
        "dollar": {"$tensor": "not a tag", "$x": 1},
        "plain": [True, False, None, "", "ü"],
        "numpy": np.arange(6, dtype=np.int16).reshape(2, 3),
        "bf16": torch.linspace(0, 1, 5, dtype=torch.bfloat16),
        "scalar": torch.tensor(3.5),
        "empty": torch.empty(0, 4),
        "bool_tensor": torch.tensor([True, False]),
    }
    save_checkpoint(tmp_path / "c", state)
    loaded = load_checkpoint(tmp_path / "c")

    assert loaded["int_keys"] == state["int_keys"]
    assert [type(k) for k in loaded["int_keys"]] == [int, int, int, int]
    assert torch.equal(loaded["str_and_int_zero"]["0"], torch.ones(2))
    assert torch.equal(loaded["str_and_int_zero"][0], torch.zeros(2))
    assert loaded["tuples"] == (1, (2.5, "x"), ())
    assert loaded["big"] == state["big"]
    assert loaded["pcg64"] == pcg_state
    assert loaded["python_random"] == random.getstate()
    assert np.random.Generator(np.random.PCG64()).bit_generator.state != pcg_state
    generator = np.random.Generator(np.random.PCG64())
    generator.bit_generator.state = loaded["pcg64"]
    assert generator.integers(2**62) == np.random.default_rng(1234).integers(2**62)
    assert np.isnan(loaded["floats"][0])
    assert loaded["floats"][1:] == state["floats"][1:]
    assert str(loaded["floats"][4]) == "-0.0"
    assert loaded["dollar"] == state["dollar"]
    assert loaded["plain"] == state["plain"]
    assert isinstance(loaded["numpy"], np.ndarray)
    assert loaded["numpy"].dtype == np.int16
    assert np.array_equal(loaded["numpy"], state["numpy"])
    for key in ("bf16", "scalar", "empty", "bool_tensor"):
        assert loaded[key].dtype == state[key].dtype
        assert torch.equal(loaded[key], state[key])


def test_shared_and_strided_tensors_are_saved(tmp_path):
    base = torch.arange(12.0).reshape(3, 4)
    state = {"base": base, "view": base[:, 1], "transposed": base.t(), "same": base}
    save_checkpoint(tmp_path / "c", state)
    loaded = load_checkpoint(tmp_path / "c")
    for key, value in state.items():
        assert torch.equal(loaded[key], value)
        assert loaded[key].is_contiguous()


def test_unstorable_value_is_refused_with_its_path(tmp_path):
    with pytest.raises(TypeError, match=r"cannot store set at config/tags"):
        save_checkpoint(tmp_path / "c", {"config": {"tags": {"a"}}})
    with pytest.raises(TypeError, match=r"dict key \(1, 2\)"):
        save_checkpoint(tmp_path / "c", {"x": {(1, 2): 3}})
    assert not (tmp_path / "c").exists()
    assert list(tmp_path.iterdir()) == []


def test_rng_state_round_trips_through_a_checkpoint(tmp_path):
    random.seed(3)
    np.random.seed(3)
    torch.manual_seed(3)
    np.random.standard_normal()  # leaves a cached gaussian in numpy's legacy state
    save_checkpoint(tmp_path / "rng", {"rng": capture_rng_state()})
    expected = (random.random(), np.random.standard_normal(), np.random.rand(), torch.rand(3))

    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    restore_rng_state(load_checkpoint(tmp_path / "rng")["rng"])
    actual = (random.random(), np.random.standard_normal(), np.random.rand(), torch.rand(3))
    assert actual[:3] == expected[:3]
    assert torch.equal(actual[3], expected[3])


def test_checkpoint_involves_no_pickle(tmp_path, monkeypatch):
    model, optimizer, scheduler, scaler = make_training_objects(seed=0)
    train_step(model, optimizer, scheduler, scaler)
    state = training_state(model, optimizer, scheduler, scaler, epoch=0, step=1, batches_in_epoch=1)
    directory = save_checkpoint(tmp_path / "c", state)
    assert sorted(p.name for p in directory.iterdir()) == ["checkpoint.json", "state.safetensors"]

    def forbidden(*args, **kwargs):
        raise AssertionError("a checkpoint load reached pickle")

    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "Unpickler", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    loaded = load_checkpoint(directory)
    assert torch.equal(loaded["model"]["0.weight"], model[0].weight)

    def strict_constant(name):
        raise ValueError(name)

    meta = json.loads((directory / "checkpoint.json").read_text(), parse_constant=strict_constant)
    assert meta["format_version"] == 1
    assert meta["versions"]["torch"] == torch.__version__
    with safetensors.safe_open(directory / "state.safetensors", framework="pt") as f:
        keys = set(f.keys())
    assert "model/0.weight" in keys
    assert "optimizer/state/0/momentum_buffer" in keys
    assert "rng/torch" in keys


# ------------------------------------------------------------------------------------------
# Damaged checkpoints
# ------------------------------------------------------------------------------------------


@pytest.fixture
def saved(tmp_path):
    model, optimizer, scheduler, scaler = make_training_objects(seed=0)
    train_step(model, optimizer, scheduler, scaler)
    state = training_state(model, optimizer, epoch=0, step=1, batches_in_epoch=1)
    return save_checkpoint(tmp_path / "ckpt", state)


def test_flipped_byte_fails_the_sha256_check(saved):
    tensors = saved / "state.safetensors"
    data = bytearray(tensors.read_bytes())
    data[-3] ^= 0x01
    tensors.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="fails its sha256 check") as info:
        load_checkpoint(saved)
    assert str(tensors) in str(info.value)
    assert "use the previous checkpoint" in str(info.value)
    assert "\n" not in str(info.value)


def test_truncated_tensor_file_is_reported_with_sizes(saved):
    tensors = saved / "state.safetensors"
    size = tensors.stat().st_size
    os.truncate(tensors, size // 2)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(saved)
    assert str(info.value).startswith(f"checkpoint {tensors} is truncated: {size // 2} bytes")
    assert f"expected {size}" in str(info.value)
    assert "interrupted" in str(info.value)


def test_missing_checkpoint_json_means_unfinished_save(saved):
    (saved / "checkpoint.json").unlink()
    with pytest.raises(CheckpointError, match=r"has no checkpoint\.json — the save did not finish"):
        load_checkpoint(saved)


def test_garbled_checkpoint_json(saved):
    json_path = saved / "checkpoint.json"
    json_path.write_bytes(json_path.read_bytes()[:40] + b"\xff\x00garbage")
    with pytest.raises(CheckpointError, match=r"checkpoint\.json is not valid JSON") as info:
        load_checkpoint(saved)
    assert str(json_path) in str(info.value)


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nowhere")


def test_newer_format_version_is_refused(saved):
    json_path = saved / "checkpoint.json"
    meta = json.loads(json_path.read_text())
    meta["format_version"] = 2
    json_path.write_text(json.dumps(meta))
    with pytest.raises(
        CheckpointError, match="has format_version 2; this resnet-ray reads version 1"
    ):
        load_checkpoint(saved)


def test_dangling_tensor_reference(saved):
    json_path = saved / "checkpoint.json"
    meta = json.loads(json_path.read_text())
    meta["state"]["epoch"] = {"$tensor": "no/such/tensor"}
    json_path.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="refers to tensor 'no/such/tensor'"):
        load_checkpoint(saved)


def rewrite_tensor_file(directory, data: bytes) -> None:
    """Replaces state.safetensors and updates checkpoint.json's size and sha256 to match, so only
    the safetensors header check stands between the bad file and torch."""
    import hashlib

    (directory / "state.safetensors").write_bytes(data)
    json_path = directory / "checkpoint.json"
    meta = json.loads(json_path.read_text())
    meta["tensors_bytes"] = len(data)
    meta["tensors_sha256"] = hashlib.sha256(data).hexdigest()
    json_path.write_text(json.dumps(meta))


def test_header_offsets_beyond_the_file(saved):
    data = (saved / "state.safetensors").read_bytes()
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_len])
    name = next(k for k in header if k != "__metadata__")
    begin, end = header[name]["data_offsets"]
    header[name]["data_offsets"] = [begin, end + 10**6]
    new_header = json.dumps(header).encode()
    rewrite_tensor_file(
        saved, len(new_header).to_bytes(8, "little") + new_header + data[8 + header_len :]
    )
    with pytest.raises(CheckpointError, match=f"tensor '{name}' ends at byte {end + 10**6}"):
        load_checkpoint(saved)


def test_header_length_beyond_the_file(saved):
    data = (saved / "state.safetensors").read_bytes()
    rewrite_tensor_file(saved, (10**9).to_bytes(8, "little") + data[8:])
    with pytest.raises(
        CheckpointError, match="header length 1000000000 bytes points beyond the end of the file"
    ):
        load_checkpoint(saved)


# ------------------------------------------------------------------------------------------
# Atomic saves and fallback
# ------------------------------------------------------------------------------------------


def test_save_replaces_an_existing_checkpoint(tmp_path):
    save_checkpoint(tmp_path / "c", {"step": 1, "w": torch.zeros(3)})
    save_checkpoint(tmp_path / "c", {"step": 2, "w": torch.ones(3)})
    loaded = load_checkpoint(tmp_path / "c")
    assert loaded["step"] == 2
    assert torch.equal(loaded["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["c"]  # no temp or old directories left


def test_save_refuses_to_replace_a_foreign_directory(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match=r"holds files a checkpoint does not \(notes.txt\)"):
        save_checkpoint(tmp_path / "run", {"step": 1})
    assert (tmp_path / "run" / "notes.txt").read_text() == "keep me"


@pytest.mark.skipif(not hasattr(signal, "SIGXFSZ"), reason="needs POSIX file size limits")
def test_write_interrupted_by_a_full_disk_keeps_the_previous_checkpoint(tmp_path):
    save_checkpoint(tmp_path / "c", {"step": 1, "w": torch.zeros(10)})
    # A file size limit makes the kernel fail the write of the large new state.safetensors
    # part-way, as a full disk would.
    previous_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, hard))
    try:
        with pytest.raises(CheckpointError, match=r"cannot write .*/c: .*File too large"):
            save_checkpoint(tmp_path / "c", {"step": 2, "w": torch.zeros(1 << 20)})
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous_handler)
    loaded = load_checkpoint(tmp_path / "c")
    assert loaded["step"] == 1
    assert torch.equal(loaded["w"], torch.zeros(10))
    assert [p.name for p in tmp_path.iterdir()] == ["c"]


def test_killed_writer_leaves_the_previous_checkpoint_loadable(tmp_path):
    save_checkpoint(tmp_path / "c", {"step": 1})
    # What a writer killed mid-save leaves behind: its staging directory with half a tensor file.
    staged = tmp_path / ".c.tmp-killed"
    staged.mkdir()
    (staged / "state.safetensors").write_bytes(b"\x10\x00\x00")
    assert load_checkpoint(tmp_path / "c")["step"] == 1
    save_checkpoint(tmp_path / "c", {"step": 2})
    assert load_checkpoint(tmp_path / "c")["step"] == 2


def test_latest_valid_checkpoint_falls_back_with_a_warning(tmp_path):
    older = save_checkpoint(tmp_path / "step1", {"step": 1})
    newest = save_checkpoint(tmp_path / "step2", {"step": 2})
    os.truncate(newest / "state.safetensors", 4)

    with pytest.warns(UserWarning, match=r"skipping checkpoint .*step2.* is truncated"):
        path, state = latest_valid_checkpoint([newest, older])
    assert path == older
    assert state["step"] == 1

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        path, state = latest_valid_checkpoint([older, newest])
    assert (path, state["step"]) == (older, 1)

    (older / "checkpoint.json").unlink()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(CheckpointError, match="none of the 2 checkpoints loads"):
            latest_valid_checkpoint([newest, older])
    assert [str(w.message).split(",")[0] for w in caught] == [
        f"skipping checkpoint {newest}",
        f"skipping checkpoint {older}",
    ]


# ------------------------------------------------------------------------------------------
# DDP prefix and final weights
# ------------------------------------------------------------------------------------------


@pytest.fixture
def single_process_group():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_ddp_wrapped_models_save_and_load_bare_keys(tmp_path, single_process_group):
    torch.manual_seed(0)
    wrapped = nn.parallel.DistributedDataParallel(small_model())
    assert next(iter(wrapped.state_dict())).startswith("module.")
    save_checkpoint(tmp_path / "c", training_state(wrapped, epoch=0, step=0, batches_in_epoch=0))
    state = load_checkpoint(tmp_path / "c")
    assert set(state["model"]) == set(small_model().state_dict())

    bare = small_model()
    restore_training_state(state, bare)
    assert torch.equal(bare[0].weight, wrapped.module[0].weight)

    torch.manual_seed(1)
    rewrapped = nn.parallel.DistributedDataParallel(small_model())
    restore_training_state(state, rewrapped)
    assert torch.equal(rewrapped.module[0].weight, wrapped.module[0].weight)

    # Weights stored with the prefix (by code that saved wrapped.state_dict()) load as well.
    prefixed = {"model": wrapped.state_dict(), "epoch": 0, "step": 0, "batches_in_epoch": 0}
    save_checkpoint(tmp_path / "prefixed", {**prefixed, "config": None, "extra": None})
    other = small_model()
    restore_training_state(load_checkpoint(tmp_path / "prefixed"), other)
    assert torch.equal(other[-1].bias, wrapped.module[-1].bias)


def test_restore_into_a_different_model_names_the_mismatch(tmp_path):
    save_checkpoint(
        tmp_path / "c", training_state(small_model(), epoch=0, step=0, batches_in_epoch=0)
    )
    other = nn.Sequential(nn.Linear(2, 2))
    with pytest.raises(CheckpointError, match="checkpoint model weights do not fit Sequential"):
        restore_training_state(load_checkpoint(tmp_path / "c"), other)
    with pytest.raises(CheckpointError, match="has no optimizer state"):
        restore_training_state(
            load_checkpoint(tmp_path / "c"),
            small_model(),
            torch.optim.SGD(small_model().parameters(), lr=0.1),
        )


def test_weights_round_trip_with_metadata(tmp_path):
    model = small_model()
    path = save_weights(tmp_path / "final" / "model.safetensors", model, {"arch": "tiny"})
    loaded = load_weights(path)
    assert loaded.keys() == model.state_dict().keys()
    for key, value in model.state_dict().items():
        assert torch.equal(loaded[key], value)
    with safetensors.safe_open(path, framework="pt") as f:
        assert f.metadata() == {"arch": "tiny"}
    assert [p.name for p in path.parent.iterdir()] == ["model.safetensors"]

    fresh = small_model()
    fresh.load_state_dict(load_weights(path))
    assert torch.equal(fresh[0].weight, model[0].weight)


def test_weights_from_a_prefixed_state_dict_and_bad_files(tmp_path):
    state = {"module.w": torch.ones(2), "module.b": torch.zeros(1)}
    path = save_weights(tmp_path / "w.safetensors", state)
    assert set(load_weights(path)) == {"w", "b"}
    with pytest.raises(TypeError, match="metadata must map str to str"):
        save_weights(tmp_path / "x.safetensors", state, {"epochs": 90})

    os.truncate(path, path.stat().st_size - 2)
    with pytest.raises(CheckpointError, match=r"ends at byte \d+ of the data section"):
        load_weights(path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_weights(tmp_path / "missing.safetensors")


@pytest.mark.gpu
def test_cuda_tensors_and_generators_round_trip(tmp_path):
    torch.cuda.manual_seed_all(5)
    state = {"w": torch.randn(4, device="cuda"), "rng": capture_rng_state()}
    expected = torch.rand(3, device="cuda")
    save_checkpoint(tmp_path / "c", state)
    loaded = load_checkpoint(tmp_path / "c", map_location="cuda")
    assert loaded["w"].is_cuda
    assert torch.equal(loaded["w"], state["w"])
    assert len(loaded["rng"]["cuda"]) == torch.cuda.device_count()
    restore_rng_state(loaded["rng"])
    assert torch.equal(torch.rand(3, device="cuda"), expected)
