"""Initial weights for fine-tuning: a local state dict, or torchvision's published weights
loaded through torchvision's own weights API and download cache (``torch.hub.get_dir()``).

Sources: ``torchvision:<Weights enum>.<name>`` (``torchvision:ResNet50_Weights.IMAGENET1K_V2``),
a ``.safetensors`` file, or a ``.pt``/``.pth`` state dict (read with ``weights_only=True``: no
pickled code runs; a ``{"state_dict": ...}`` or ``{"model": ...}`` wrapper is unwrapped).
torchvision's ResNet keys are this project's (``conv1``, ``layer1.0.conv1``, ``fc``); its
ResNet-50/101/152 are v1.5 (``model.stride_in_3x3=true``).
"""

from __future__ import annotations

from pathlib import Path
from urllib.error import URLError
from urllib.parse import urlsplit

import torch
from torch import Tensor, nn

from resnet_core.checkpoint import CheckpointError, load_weights, strip_wrapper_prefixes

TORCHVISION = "torchvision:"
HEAD_MODULE = "fc"  # the classifier of every ResNet in resnet_core.models
HEAD = (f"{HEAD_MODULE}.weight", f"{HEAD_MODULE}.bias")


class InitWeightsError(ValueError):
    """Initial weights cannot be read or do not fit the model; the message says how to fix it."""


def load_init_weights(source: str) -> dict[str, Tensor]:
    """The state dict named by ``source`` (see the module docstring), on the CPU."""
    if source.startswith(TORCHVISION):
        return _torchvision_weights(source.removeprefix(TORCHVISION))
    path = Path(source).expanduser()
    if not path.is_file():
        raise InitWeightsError(
            f"init weights {source!r}: no such file; pass a .safetensors or .pt state dict, or "
            "torchvision:<weights>, e.g. torchvision:ResNet50_Weights.IMAGENET1K_V2"
        )
    if path.suffix == ".safetensors":
        try:
            return strip_wrapper_prefixes(load_weights(path))
        except CheckpointError as e:
            raise InitWeightsError(f"init weights {source!r}: {e}") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling refused, truncated file, not a torch file
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        message = f"init weights {source!r} do not load as a state dict: {first}"
        raise InitWeightsError(message) from None
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise InitWeightsError(f"init weights {source!r} hold no state dict of tensors")
    return strip_wrapper_prefixes(state)


def _torchvision_weights(name: str) -> dict[str, Tensor]:
    from torchvision.models import get_weight

    try:
        weights = get_weight(name)
    except (ValueError, KeyError, AttributeError):
        raise InitWeightsError(
            f"torchvision weights {name!r} are unknown; use an enum value such as "
            "ResNet50_Weights.IMAGENET1K_V2 or ResNet18_Weights.IMAGENET1K_V1"
        ) from None
    cached = Path(torch.hub.get_dir(), "checkpoints", Path(urlsplit(weights.url).path).name)
    try:
        return weights.get_state_dict(progress=False, check_hash=True)
    except (URLError, OSError) as e:
        raise InitWeightsError(
            f"cannot download torchvision weights {name} from {weights.url} ({e}); on a machine "
            f"without internet, put that file at {cached} (TORCH_HOME moves the cache)"
        ) from None


def apply_init(model: nn.Module, weights: dict[str, Tensor], *, reset_head: bool) -> None:
    """Load ``weights`` into ``model``: all of them, or all but the classifier (``fc``) with
    ``reset_head``, which keeps the model's fresh head (another number of classes)."""
    if reset_head:
        weights = {k: v for k, v in weights.items() if k not in HEAD}
    own = model.state_dict()
    wrong = [
        f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}"
        for k, v in weights.items()
        if k in own and v.shape != own[k].shape
    ]
    if wrong:
        fix = (
            "pass --reset-head to train a new classifier for this dataset's classes"
            if all(w.startswith(HEAD) for w in wrong)
            else "pick the model these weights were trained for (model.name, model.shortcut)"
        )
        raise InitWeightsError(f"init weights do not fit the model ({wrong[0]}); {fix}")
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [k for k in missing if not (reset_head and k in HEAD)]
    if missing or unexpected:
        raise InitWeightsError(
            f"init weights do not fit the model: missing {missing[:3]}, unexpected "
            f"{unexpected[:3]}; pick the model these weights were trained for"
        )
