"""Weight EMA (torchvision's ``--model-ema``): an exponential moving average of the weights,
kept with torch's ``AveragedModel`` as torchvision's reference scripts keep it, validated beside
the raw weights (``val_ema/*`` metrics), carried in checkpoints, and the final model of a run
that keeps one (pipelines.job.final_model)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from pipelines.config import JobConfig
from pipelines.job.extension import Extension
from resnet_core.checkpoint import bare_model

if TYPE_CHECKING:
    from pipelines.job.runner import TrainLoopRunner

EMA_KEY = "ema"  # the extension's state in checkpoints; its "weights" are the bare net's


def result_weights(config: JobConfig, state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The weights a checkpoint's ``state`` stands for: the EMA's when the run keeps one
    (torchvision's recipe ships them), else the trained net's. The final model and resnet-eval
    both read them here."""
    return state["extra"][EMA_KEY]["weights"] if config.train.ema else state["model"]


def ema_decay(config: JobConfig) -> float:
    """The decay per EMA update: torchvision's rule (references/classification/train.py), which
    states ``train.ema_decay`` per image and adjusts it to the images between two updates
    (global batch × ema_steps) and the run's epochs."""
    t = config.train
    adjust = t.global_batch * t.ema_steps / t.epochs
    return 1.0 - min(1.0, (1.0 - t.ema_decay) * adjust)


class EmaExtension(Extension):
    """Every ``train.ema_steps`` steps the average takes in the current weights (weights and BN
    buffers, as torchvision); during the learning-rate warm-up it restarts from them, as
    torchvision's does. At each validation the averaged net is validated too."""

    key = EMA_KEY

    def __init__(self) -> None:
        self.ema: AveragedModel | None = None  # built on the worker (setup)

    def setup(self, runner: TrainLoopRunner) -> None:
        decay = ema_decay(runner.config)
        self.ema = AveragedModel(
            bare_model(runner.training.model),
            multi_avg_fn=get_ema_multi_avg_fn(decay),
            use_buffers=True,
        )

    def after_step(self, runner: TrainLoopRunner, result: Any) -> None:
        if runner.step % runner.config.train.ema_steps:
            return
        self.ema.update_parameters(bare_model(runner.training.model))
        if runner.epoch < runner.config.schedule.warmup_epochs:
            self.ema.n_averaged.fill_(0)  # the next update copies the weights

    def on_report(self, runner: TrainLoopRunner, metrics: dict[str, Any]) -> None:
        if "val/top1" not in metrics:
            return
        scored = runner.evaluate(self.ema.module)
        metrics.update({f"val_ema/{k.split('/', 1)[1]}": v for k, v in scored.items()})

    def state_dict(self) -> dict[str, Any]:
        return {"weights": self.ema.module.state_dict(), "n_averaged": self.ema.n_averaged}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.ema.module.load_state_dict(state["weights"])
        self.ema.n_averaged.copy_(torch.as_tensor(state["n_averaged"]))
