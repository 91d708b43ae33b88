"""The extension points of the training loop (:class:`Extension`): what a feature overrides to
plug into :class:`pipelines.job.runner.TrainLoopRunner` without touching the loop body."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipelines.job.runner import TrainLoopRunner
    from resnet_core.step import StepResult


class Extension:
    """A feature of the training loop, called by the runner at named points; override what it
    needs. ``key``: where its state lives in checkpoints (None: it has none). Instances travel
    to the workers with the loop's config (they must pickle), so heavy state is built in
    :meth:`setup`, on the worker."""

    key: str | None = None

    def setup(self, runner: TrainLoopRunner) -> None:
        """Once, after the model and optimizer exist and before the checkpoint is restored."""

    def before_step(self, runner: TrainLoopRunner) -> None:
        """Before each training step (``runner.step`` steps done so far)."""

    def after_step(self, runner: TrainLoopRunner, result: StepResult) -> None:
        """After each optimizer step, with the step's loss, logits and labels (on the device)."""

    def on_report(self, runner: TrainLoopRunner, metrics: dict[str, Any]) -> None:
        """Before every report, on every rank, with the metrics reduced over ranks; may add
        metrics. Epoch-end reports carry the epoch's training and (when due) validation
        metrics."""

    def teardown(self, runner: TrainLoopRunner) -> None:
        """Once, when the run ends (also on an error): stop what :meth:`setup` started."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (the runner has restored the model)."""
