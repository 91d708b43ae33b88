"""Training checkpoints that never execute pickled code.

A checkpoint is a directory, so Ray Train can persist it as-is::

    <dir>/state.safetensors   every tensor of the state tree, keyed by its path ("model/conv1.weight")
    <dir>/checkpoint.json     everything else: the tree's structure and plain values, the format
                              version, the byte size and sha256 of state.safetensors, library versions

checkpoint.json is written last, so its presence marks a finished save; the whole directory is
written under a temporary name next to the target and renamed into place. Loading checks the
format version, the size and sha256 of state.safetensors and its header before any tensor is read,
and reports every problem as one-line `CheckpointError`.

The state tree holds dicts (str or int keys; optimizer state dicts use int keys), lists, tuples,
tensors, numpy arrays, str, int (any size: numpy's PCG64 state has 128-bit ints), float (nan and
inf included), bool and None; all of them come back with the same types and values.

Typical use on the rank that writes checkpoints::

    state = training_state(model, optimizer, scheduler, scaler, epoch=e, step=s, batches_in_epoch=0)
    save_checkpoint(directory, state)
    ...
    fields = restore_training_state(load_checkpoint(directory), model, optimizer, scheduler, scaler)
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import random
import shutil
import tempfile
import uuid
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import safetensors
import safetensors.torch
import torch
from torch import Tensor, nn

__all__ = [
    "CheckpointError",
    "capture_rng_state",
    "latest_valid_checkpoint",
    "load_checkpoint",
    "load_weights",
    "restore_rng_state",
    "restore_training_state",
    "save_checkpoint",
    "save_weights",
    "strip_wrapper_prefixes",
    "training_state",
]

FORMAT_NAME = "resnet-ray-checkpoint"
FORMAT_VERSION = 1
TENSORS_FILE = "state.safetensors"
METADATA_FILE = "checkpoint.json"

# Integers beyond +-2**53 lose precision in many JSON readers (JavaScript, jq), so they are
# written as decimal strings under a "$int" tag.
_JSON_EXACT_INT = 2**53

# Bytes per element of the safetensors dtypes whose size is a whole number of bytes.
_SAFETENSORS_ITEMSIZE = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "F8_E8M0": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "C64": 8,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}

_ROLLBACK = "use the previous checkpoint"


class CheckpointError(ValueError):
    """A checkpoint cannot be written or read; the message names the file and the problem."""


# --------------------------------------------------------------------------------------------
# Tree <-> (JSON, tensors)
#
# JSON objects are str-keyed dicts, except a one-key object whose key starts with "$", which is a
# tag: {"$tensor": key}, {"$ndarray": key}, {"$tuple": [...]}, {"$int": "decimal"},
# {"$float": "nan" | "inf" | "-inf"}, {"$dict": [[key, value], ...]}. Dicts with an int key or a
# key starting with "$" use the "$dict" form, so a user dict is never mistaken for a tag.
# --------------------------------------------------------------------------------------------


def _path_name(path: tuple[str, ...]) -> str:
    return "/".join(path) or "<root>"


def _encode_int(value: int) -> int | dict[str, str]:
    if -_JSON_EXACT_INT < value < _JSON_EXACT_INT:
        return value
    return {"$int": str(value)}


def _storage_copy(tensor: Tensor, where: str) -> Tensor:
    """A contiguous CPU copy that shares memory with nothing (safetensors refuses shared storage)."""
    if tensor.layout != torch.strided:
        raise TypeError(
            f"cannot store the {tensor.layout} tensor at {where} in a checkpoint: "
            "only dense tensors are stored; call .to_dense() first"
        )
    return tensor.detach().to("cpu", copy=True, memory_format=torch.contiguous_format)


def _add_tensor(tensors: dict[str, Tensor], path: tuple[str, ...], tensor: Tensor) -> str:
    key = "/".join(path) or "tensor"
    # Distinct paths can print the same ({0: ..., "0": ...}); a suffix keeps keys unique.
    unique, n = key, 1
    while unique in tensors:
        unique, n = f"{key}#{n}", n + 1
    tensors[unique] = _storage_copy(tensor, _path_name(path))
    return unique


def _encode(value: Any, path: tuple[str, ...], tensors: dict[str, Tensor]) -> Any:
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, int):
        return _encode_int(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else {"$float": repr(value)}
    if isinstance(value, np.generic):  # numpy scalars are stored as their Python value
        return _encode(value.item(), path, tensors)
    if isinstance(value, Tensor):
        return {"$tensor": _add_tensor(tensors, path, value)}
    if isinstance(value, np.ndarray):
        try:
            tensor = torch.from_numpy(np.ascontiguousarray(value))
        except TypeError as error:
            raise TypeError(
                f"cannot store the numpy array at {_path_name(path)} in a checkpoint: {error}; "
                "convert it to a numeric dtype in native byte order"
            ) from error
        return {"$ndarray": _add_tensor(tensors, path, tensor)}
    if isinstance(value, Mapping):
        keys = list(value)
        for key in keys:
            if isinstance(key, bool) or not isinstance(key, str | int):
                raise TypeError(
                    f"cannot store the dict key {key!r} ({type(key).__name__}) at "
                    f"{_path_name(path)} in a checkpoint: keys must be str or int"
                )
        children = {key: _encode(value[key], (*path, str(key)), tensors) for key in keys}
        if all(isinstance(key, str) and not key.startswith("$") for key in keys):
            return children
        return {
            "$dict": [[_encode_int(k) if isinstance(k, int) else k, v] for k, v in children.items()]
        }
    if isinstance(value, tuple):
        return {"$tuple": [_encode(v, (*path, str(i)), tensors) for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(v, (*path, str(i)), tensors) for i, v in enumerate(value)]
    raise TypeError(
        f"cannot store {type(value).__name__} at {_path_name(path)} in a checkpoint: only dicts, "
        "lists, tuples, tensors, numpy arrays, str, int, float, bool and None are stored; convert "
        "it first (a dataclass with dataclasses.asdict)"
    )


class _Decoder:
    """Rebuilds the state tree from checkpoint.json's "state" and the loaded tensors."""

    def __init__(self, tensors: dict[str, Tensor], map_location: torch.device, json_path: Path):
        self.tensors = tensors
        self.map_location = map_location
        self.json_path = json_path

    def fail(self, where: str, problem: str) -> CheckpointError:
        return CheckpointError(
            f"checkpoint {self.json_path} has an invalid state entry at {where}: {problem} — "
            f"the file was edited or corrupted; {_ROLLBACK}"
        )

    def tensor(self, key: Any, where: str) -> Tensor:
        if not isinstance(key, str) or key not in self.tensors:
            raise CheckpointError(
                f"checkpoint {self.json_path} refers to tensor {key!r} (at {where}) that "
                f"{TENSORS_FILE} does not contain — the two files come from different saves; "
                f"{_ROLLBACK}"
            )
        return self.tensors[key]

    def key(self, node: Any, where: str) -> str | int:
        if isinstance(node, str) or (isinstance(node, int) and not isinstance(node, bool)):
            return node
        if isinstance(node, dict) and list(node) == ["$int"]:
            return self.decode(node, where)
        raise self.fail(where, f"dict key {node!r} is neither str nor int")

    def decode(self, node: Any, where: str) -> Any:
        if isinstance(node, list):
            return [self.decode(v, f"{where}/{i}") for i, v in enumerate(node)]
        if not isinstance(node, dict):
            return node  # None, bool, int, float, str
        if len(node) != 1 or not next(iter(node)).startswith("$"):
            return {k: self.decode(v, f"{where}/{k}") for k, v in node.items()}
        ((tag, payload),) = node.items()
        if tag == "$tensor":
            return self.tensor(payload, where).to(self.map_location)
        if tag == "$ndarray":
            return self.tensor(payload, where).numpy()
        if tag == "$tuple" and isinstance(payload, list):
            return tuple(self.decode(v, f"{where}/{i}") for i, v in enumerate(payload))
        if tag == "$int" and isinstance(payload, str):
            try:
                return int(payload)
            except ValueError:
                raise self.fail(where, f"{payload!r} is not an integer") from None
        if tag == "$float" and payload in ("nan", "inf", "-inf"):
            return float(payload)
        if tag == "$dict" and isinstance(payload, list):
            result = {}
            for item in payload:
                if not (isinstance(item, list) and len(item) == 2):
                    raise self.fail(where, f"dict item {item!r} is not a [key, value] pair")
                key = self.key(item[0], where)
                result[key] = self.decode(item[1], f"{where}/{key}")
            return result
        raise self.fail(where, f"unknown or malformed tag {tag!r}")


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    """Makes renames and new entries in `path` durable (POSIX; directories cannot be opened on Windows)."""
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _write_tensor_file(
    tensors: dict[str, Tensor], path: Path, metadata: dict[str, str] | None, target: Path
) -> None:
    """Writes and fsyncs a safetensors file; a failed write names `target` (what the user asked for)."""
    try:
        safetensors.torch.save_file(tensors, path, metadata=metadata)
    except Exception as error:  # safetensors reports I/O failures as its own error type
        message = " ".join(str(error).split())
        raise CheckpointError(
            f"cannot write {target}: {message} — free disk space or fix permissions; whatever "
            f"was at {target} before is unchanged"
        ) from None
    _fsync_file(path)


def _check_safetensors_header(path: Path) -> None:
    """Checks that the header parses and that every tensor lies inside the file.

    safetensors checks this too, but names neither the file nor the fix; a file that passes here
    only fails inside safetensors for reasons this check does not know about (new dtypes).
    """
    size = path.stat().st_size

    def bad(problem: str) -> CheckpointError:
        return CheckpointError(
            f"checkpoint {path} has a bad safetensors header: {problem} — the file is corrupt; "
            f"{_ROLLBACK}"
        )

    if size < 8:
        raise bad(f"the file has {size} bytes, fewer than the 8-byte header length")
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        if header_len > size - 8:
            raise bad(
                f"header length {header_len} bytes points beyond the end of the file ({size} bytes)"
            )
        raw = f.read(header_len)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise bad(f"the header is not valid JSON ({error})") from None
    if not isinstance(header, dict):
        raise bad("the header is not a JSON object")
    data_len = size - 8 - header_len
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
            numel = math.prod(shape)
        except (TypeError, KeyError, ValueError):
            raise bad(f"entry {name!r} lacks a dtype, shape or [begin, end] data_offsets") from None
        if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end):
            raise bad(f"tensor {name!r} has invalid data_offsets {[begin, end]}")
        if end > data_len:
            raise bad(
                f"tensor {name!r} ends at byte {end} of the data section, beyond its end "
                f"({data_len} bytes)"
            )
        itemsize = _SAFETENSORS_ITEMSIZE.get(dtype)
        if itemsize is not None and end - begin != numel * itemsize:
            raise bad(
                f"tensor {name!r} ({dtype}, shape {shape}) needs {numel * itemsize} bytes but "
                f"data_offsets span {end - begin}"
            )


def _load_tensor_file(path: Path) -> dict[str, Tensor]:
    _check_safetensors_header(path)
    try:
        return safetensors.torch.load_file(path, device="cpu")
    except Exception as error:  # safetensors raises its own error type for every defect
        message = " ".join(str(error).split())
        raise CheckpointError(
            f"checkpoint {path} cannot be read by safetensors ({message}) — the file is corrupt; "
            f"{_ROLLBACK}"
        ) from None


def _read_metadata(directory: Path) -> dict[str, Any]:
    if not directory.exists():
        raise CheckpointError(f"checkpoint {directory} does not exist — check the path")
    if not directory.is_dir():
        raise CheckpointError(
            f"checkpoint {directory} is not a directory — pass the checkpoint directory that "
            f"holds {METADATA_FILE} and {TENSORS_FILE}"
        )
    json_path = directory / METADATA_FILE
    if not json_path.is_file():
        raise CheckpointError(
            f"checkpoint {directory} has no {METADATA_FILE} — the save did not finish "
            f"({METADATA_FILE} is written last); {_ROLLBACK}"
        )
    try:
        meta = json.loads(json_path.read_bytes(), parse_constant=_reject_constant)
    except ValueError as error:  # JSONDecodeError, UnicodeDecodeError, NaN/Infinity
        raise CheckpointError(
            f"checkpoint {json_path} is not valid JSON ({error}) — the file is corrupt; {_ROLLBACK}"
        ) from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise CheckpointError(
            f"checkpoint {json_path} is not a {FORMAT_NAME} file (its format field is not "
            f"{FORMAT_NAME!r}) — pass a directory written by save_checkpoint"
        )
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {json_path} has format_version {version!r}; this resnet-ray reads "
            f"version {FORMAT_VERSION} — use the resnet-ray release that wrote it"
        )
    size, digest = meta.get("tensors_bytes"), meta.get("tensors_sha256")
    if not isinstance(size, int) or not isinstance(digest, str) or "state" not in meta:
        raise CheckpointError(
            f"checkpoint {json_path} lacks tensors_bytes, tensors_sha256 or state — the file was "
            f"edited or corrupted; {_ROLLBACK}"
        )
    return meta


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


def _verify_tensor_file(path: Path, expected_size: int, expected_sha256: str) -> None:
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} is missing — {_ROLLBACK}")
    size = path.stat().st_size
    if size < expected_size:
        raise CheckpointError(
            f"checkpoint {path} is truncated: {size} bytes, expected {expected_size} — the write "
            f"was interrupted; {_ROLLBACK}"
        )
    if size > expected_size:
        raise CheckpointError(
            f"checkpoint {path} has {size} bytes, expected {expected_size} — the file was "
            f"modified after the save; {_ROLLBACK}"
        )
    digest = _sha256(path)
    if digest != expected_sha256:
        raise CheckpointError(
            f"checkpoint {path} fails its sha256 check (got {digest}, expected "
            f"{expected_sha256}) — the file is corrupt or was modified; {_ROLLBACK}"
        )


def _check_replaceable(target: Path) -> None:
    """Refuses to replace anything that save_checkpoint did not write."""
    if not target.exists():
        return
    if not target.is_dir():
        raise CheckpointError(
            f"cannot save a checkpoint to {target}: it exists and is not a directory — "
            "choose a new path"
        )
    foreign = sorted(
        p.name for p in target.iterdir() if p.name not in (TENSORS_FILE, METADATA_FILE)
    )
    if foreign:
        raise CheckpointError(
            f"cannot save a checkpoint to {target}: it holds files a checkpoint does not "
            f"({', '.join(foreign[:3])}) and would be replaced — choose a new path"
        )


def _move_into_place(staged: Path, target: Path) -> None:
    """Renames `staged` to `target`; an existing target is renamed aside first, then deleted.

    Between the two renames (microseconds) the previous checkpoint lives on as
    `.<name>.old-<hex>` next to the target.
    """
    if not target.exists():
        os.rename(staged, target)
        _fsync_dir(target.parent)
        return
    aside = target.parent / f".{target.name}.old-{uuid.uuid4().hex}"
    os.rename(target, aside)
    try:
        os.rename(staged, target)
    except BaseException:
        os.rename(aside, target)
        raise
    _fsync_dir(target.parent)
    shutil.rmtree(aside)


def _library_versions() -> dict[str, str]:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "safetensors": safetensors.__version__,
    }


# --------------------------------------------------------------------------------------------
# Public API: state trees
# --------------------------------------------------------------------------------------------


def save_checkpoint(directory: str | Path, state: Mapping[str, Any]) -> Path:
    """Writes `state` as a checkpoint directory at `directory`, atomically; returns its path.

    The directory is written under a temporary name next to `directory` (files fsynced,
    checkpoint.json last) and renamed into place. An existing checkpoint at `directory` is
    replaced; a directory holding anything else is refused. If the save fails or the process
    dies, the previous checkpoint at `directory` is untouched.
    """
    target = Path(directory)
    if not isinstance(state, Mapping):
        raise TypeError(f"checkpoint state must be a mapping, got {type(state).__name__}")
    tensors: dict[str, Tensor] = {}
    tree = _encode(state, (), tensors)  # fails on an unstorable value before touching the disk
    _check_replaceable(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staged = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        tensors_path = staged / TENSORS_FILE
        _write_tensor_file(tensors, tensors_path, {"format": FORMAT_NAME}, target)
        meta = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "tensors_file": TENSORS_FILE,
            "tensors_bytes": tensors_path.stat().st_size,
            "tensors_sha256": _sha256(tensors_path),
            "num_tensors": len(tensors),
            "versions": _library_versions(),
            "state": tree,
        }
        json_path = staged / METADATA_FILE
        json_path.write_text(json.dumps(meta, allow_nan=False), encoding="utf-8")
        _fsync_file(json_path)
        _fsync_dir(staged)
        _move_into_place(staged, target)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    return target


def load_checkpoint(directory: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Reads a checkpoint written by `save_checkpoint`; tensors are placed on `map_location`.

    Raises `CheckpointError` (one line: the file, what is wrong, what to do) when the directory or
    checkpoint.json is missing, checkpoint.json does not parse or has an unknown format version,
    state.safetensors has the wrong size or sha256 or a bad header, or a referenced tensor is
    absent. numpy arrays come back as numpy arrays, whatever `map_location` says.
    """
    directory = Path(directory)
    meta = _read_metadata(directory)
    tensors_path = directory / TENSORS_FILE  # fixed name: never a path taken from the JSON
    _verify_tensor_file(tensors_path, meta["tensors_bytes"], meta["tensors_sha256"])
    tensors = _load_tensor_file(tensors_path)
    decoder = _Decoder(tensors, torch.device(map_location), directory / METADATA_FILE)
    state = decoder.decode(meta["state"], "<root>")
    if not isinstance(state, dict):
        raise decoder.fail("<root>", f"the state is a {type(state).__name__}, not a dict")
    return state


def latest_valid_checkpoint(
    candidates: Sequence[Any],
    map_location: str | torch.device = "cpu",
    *,
    load: Callable[[Any], dict] | None = None,
) -> tuple[Any, dict]:
    """Loads the first loadable checkpoint of `candidates`, which are ordered newest first.

    `load` reads one candidate (default: `load_checkpoint` of a local directory); a storage
    error (OSError) counts as unloadable too. Each checkpoint that fails to load is skipped with
    a warning that names it and the reason; `CheckpointError` lists every reason when none loads.
    """
    reasons = []
    for candidate in candidates:
        try:
            if load is None:
                return Path(candidate), load_checkpoint(candidate, map_location)
            return candidate, load(candidate)
        except (CheckpointError, OSError) as error:
            warnings.warn(
                f"skipping checkpoint {candidate}, trying the previous one: {error}", stacklevel=2
            )
            reasons.append(f"{candidate}: {error}")
    if not reasons:
        raise CheckpointError("no checkpoint candidates given — pass at least one directory")
    raise CheckpointError(
        f"none of the {len(reasons)} checkpoints loads: {'; '.join(reasons)} — start from scratch "
        "or repair the storage"
    )


# --------------------------------------------------------------------------------------------
# Public API: random number generators
# --------------------------------------------------------------------------------------------


def capture_rng_state() -> dict[str, Any]:
    """The state of Python's `random`, numpy's global generator, torch's CPU generator and every
    visible CUDA device's generator, as a tree `save_checkpoint` stores exactly."""
    numpy_state = np.random.get_state(legacy=False)
    return {
        "python": random.getstate(),
        "numpy": {
            "bit_generator": numpy_state["bit_generator"],
            "state": {
                "key": numpy_state["state"]["key"].tolist(),
                "pos": int(numpy_state["state"]["pos"]),
            },
            "has_gauss": int(numpy_state["has_gauss"]),
            "gauss": float(numpy_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Restores generators captured by `capture_rng_state`.

    CUDA states are restored for the devices present now (the first min(saved, visible) devices);
    resuming on a machine without CUDA skips them.
    """
    missing = [name for name in ("python", "numpy", "torch", "cuda") if name not in state]
    if missing:
        raise CheckpointError(
            f"RNG state lacks {missing} — pass the dict that capture_rng_state() returned"
        )
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy_state = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": numpy_state["bit_generator"],
            "state": {
                "key": np.asarray(numpy_state["state"]["key"], dtype=np.uint32),
                "pos": numpy_state["state"]["pos"],
            },
            "has_gauss": numpy_state["has_gauss"],
            "gauss": numpy_state["gauss"],
        }
    )
    torch.set_rng_state(state["torch"].cpu())
    if state["cuda"] and torch.cuda.is_available():
        for device, cuda_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state.cpu(), device)


# --------------------------------------------------------------------------------------------
# Public API: training state
# --------------------------------------------------------------------------------------------

# Wrappers whose state-dict keys carry a prefix: DistributedDataParallel / DataParallel
# ("module.") and torch.compile's OptimizedModule ("_orig_mod."), in any nesting.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def bare_model(model: nn.Module) -> nn.Module:
    """The model inside DDP / DataParallel wrappers, whose state-dict keys are the plain ones
    (``conv1.weight``), so checkpoints load into an unwrapped net. (The job never wraps the
    model in ``torch.compile``: the training step compiles its own forward around it.)"""
    while isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
        model = model.module
    return model


def strip_wrapper_prefixes(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Bare-model keys for a state dict saved from a wrapped model ("module.conv1.weight",
    "_orig_mod.module.conv1.weight")."""
    state = dict(state_dict)
    while state and (
        prefix := next((p for p in _WRAPPER_PREFIXES if all(k.startswith(p) for k in state)), None)
    ):
        state = {key.removeprefix(prefix): value for key, value in state.items()}
    return state


def training_state(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    scaler: torch.amp.GradScaler | None = None,
    *,
    epoch: int,
    step: int,
    batches_in_epoch: int,
    config: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Everything one process needs to continue training bitwise-identically, as a state tree.

    epoch: the epoch the next batch belongs to (0-based). step: optimizer steps taken so far.
    batches_in_epoch: batches of `epoch` already trained on (0 at an epoch boundary).
    config: the run's configuration (plain values). extra: anything else the caller restores.
    The model's keys are the bare model's (see :func:`bare_model`). The RNG states of this
    process are included. Tensors are live references: save before the next optimizer step.
    """
    return {
        "model": bare_model(model).state_dict(),
        "optimizer": None if optimizer is None else optimizer.state_dict(),
        "scheduler": None if scheduler is None else scheduler.state_dict(),
        "scaler": None if scaler is None else scaler.state_dict(),
        "rng": capture_rng_state(),
        "epoch": epoch,
        "step": step,
        "batches_in_epoch": batches_in_epoch,
        "config": None if config is None else dict(config),
        "extra": None if extra is None else dict(extra),
    }


def restore_training_state(
    state: Mapping[str, Any],
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    scaler: torch.amp.GradScaler | None = None,
) -> dict[str, Any]:
    """Loads a `training_state` tree into the given objects and restores the RNG states.

    `model` may be wrapped in DDP or bare; weights saved with wrappers' prefixes (DDP's,
    torch.compile's) load too. Returns the remaining fields: epoch, step, batches_in_epoch, config, extra.
    """
    bare = bare_model(model)
    try:
        bare.load_state_dict(strip_wrapper_prefixes(state["model"]))
    except RuntimeError as error:
        message = " ".join(str(error).split())
        raise CheckpointError(
            f"checkpoint model weights do not fit {type(bare).__name__}: {message} — build the "
            "model from the config stored in the checkpoint"
        ) from None
    for name, target in (("optimizer", optimizer), ("scheduler", scheduler), ("scaler", scaler)):
        if target is None:
            continue
        if state.get(name) is None:
            raise CheckpointError(
                f"checkpoint has no {name} state to load into {type(target).__name__} — pass "
                f"{name}=None to restore without it"
            )
        target.load_state_dict(state[name])
    if state.get("rng") is not None:
        restore_rng_state(state["rng"])
    return {name: state[name] for name in ("epoch", "step", "batches_in_epoch", "config", "extra")}


# --------------------------------------------------------------------------------------------
# Public API: final weights
# --------------------------------------------------------------------------------------------


def save_weights(
    path: str | Path,
    model_or_state_dict: nn.Module | Mapping[str, Tensor],
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Writes a model's weights (bare-model keys) as one safetensors file, atomically.

    `metadata` (str to str) lands in the safetensors header, readable with `safetensors.safe_open`.
    """
    path = Path(path)
    if isinstance(model_or_state_dict, nn.Module):
        state_dict = bare_model(model_or_state_dict).state_dict()
    else:
        state_dict = strip_wrapper_prefixes(model_or_state_dict)
    tensors = {}
    for key, value in state_dict.items():
        if not isinstance(value, Tensor):
            raise TypeError(
                f"weights entry {key!r} is a {type(value).__name__}, not a tensor — pass a model "
                "or a state dict of tensors"
            )
        tensors[key] = _storage_copy(value, key)
    metadata = dict(metadata or {})
    bad = {k: v for k, v in metadata.items() if not (isinstance(k, str) and isinstance(v, str))}
    if bad:
        raise TypeError(f"weights metadata must map str to str, got {bad!r} — convert with str()")
    path.parent.mkdir(parents=True, exist_ok=True)
    staged = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex}"
    try:
        _write_tensor_file(tensors, staged, metadata or None, path)
        os.replace(staged, path)
        _fsync_dir(path.parent)
    except BaseException:
        staged.unlink(missing_ok=True)
        raise
    return path


def load_weights(path: str | Path) -> dict[str, Tensor]:
    """Reads a file written by `save_weights` into CPU tensors; a bad file raises CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file {path} does not exist — check the path")
    return _load_tensor_file(path)
