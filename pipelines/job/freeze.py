"""Fine-tuning with a frozen backbone for the first ``train.freeze_backbone_epochs`` epochs:
only the classifier learns while the new head settles, then everything trains.

Frozen here means the backbone's weights and its BatchNorm statistics do not change: its
optimizer groups run at learning rate 0 (``lr_scale``, see resnet_core.optim.set_lr) and its
BatchNorm layers stay in eval mode. Gradients are still computed: switching ``requires_grad``
under DDP would leave the unfrozen parameters out of its gradient all-reduce.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from pipelines.job.extension import Extension
from resnet_core.checkpoint import bare_model
from resnet_core.pretrained import HEAD_MODULE

if TYPE_CHECKING:
    from pipelines.job.runner import TrainLoopRunner


class FreezeBackbone(Extension):
    """Before each step: backbone groups at ``lr_scale`` 0 and its BatchNorm in eval mode while
    the epoch is frozen, ``lr_scale`` 1 after. Runs before the schedule sets the step's rate."""

    def before_step(self, runner: TrainLoopRunner) -> None:
        frozen = runner.epoch < runner.config.train.freeze_backbone_epochs
        for group in runner.training.optimizer.param_groups:
            if group.get("backbone"):
                group["lr_scale"] = 0.0 if frozen else 1.0
        if frozen:  # the runner puts the model in train mode at each epoch and after validation
            for name, module in bare_model(runner.training.model).named_modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm) and not name.startswith(
                    HEAD_MODULE
                ):
                    module.eval()
