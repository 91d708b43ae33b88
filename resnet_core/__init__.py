"""resnet_core: the pure-PyTorch heart of resnet-ray.

The ResNet v1 family (He et al., CVPR 2016) and everything a training loop needs around it —
transforms, evaluation protocols, optimizer and schedules, metrics, the checkpoint format. It never
imports Ray or MLflow, so it runs and tests on any laptop.
"""

__all__ = ["create_model", "is_cifar_model", "model_names"]


def __getattr__(name: str):
    # Loaded on first use: the decode processes import resnet_core.cpu_transforms and .jpeg
    # without torch, which the models need.
    if name in __all__:
        from resnet_core import models

        return getattr(models, name)
    raise AttributeError(f"module 'resnet_core' has no attribute {name!r}")
