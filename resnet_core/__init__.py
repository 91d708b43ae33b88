"""resnet_core: the pure-PyTorch heart of resnet-ray.

The ResNet v1 family (He et al., CVPR 2016) and everything a training loop needs around it —
transforms, evaluation protocols, optimizer and schedules, metrics, the checkpoint format. It never
imports Ray or MLflow, so it runs and tests on any laptop.
"""

from resnet_core.models import create_model, is_cifar_model, model_names

__all__ = ["create_model", "is_cifar_model", "model_names"]
