"""Where a run's start-up goes: from the driver's submission to the end of the first step.

The runner marks each phase as it ends; the first report carries them as ``startup/*`` metrics
(seconds) and rank 0 prints one line. Phases: ``worker_group`` (submission to the loop starting
on the worker: Ray Train's controller, the worker processes, the process group), ``build`` (the
manifest, the model, the optimizer, DDP, the extensions' setup: the compile cache's load), ``restore`` (the checkpoint, if any), ``first_batch``
(the rest of the wait for the first batch: Ray Data's start, the first decode tasks; the
pipeline of a fresh run starts before ``build``, so the two overlap), ``first_step`` (the first
step to completion: cuDNN's algorithm search, torch.compile).
"""

from __future__ import annotations

import itertools
import time

import torch

PHASES = ("worker_group", "build", "restore", "first_batch", "first_step")


class Startup:
    """Wall-clock marks of the start-up phases (:data:`PHASES`), each set once."""

    def __init__(self, submitted_at: float | None) -> None:
        self.marks = {"submitted": submitted_at or time.time()}
        self.mark("worker_group")
        self.reported = False

    def mark(self, phase: str, device: torch.device | None = None) -> None:
        """``phase`` ends now; with a CUDA ``device``, once its queued kernels have run."""
        if phase in self.marks:
            return
        if device is not None and device.type == "cuda":
            torch.cuda.synchronize(device)  # once per run: the first step's true end
        self.marks[phase] = time.time()

    def metrics(self) -> dict[str, float]:
        """Each phase's seconds and the total, once every phase has ended (else none)."""
        if not all(phase in self.marks for phase in PHASES):
            return {}
        names = ("submitted", *PHASES)
        seconds = {
            f"startup/{phase}_s": max(self.marks[phase] - self.marks[before], 0.0)
            for before, phase in itertools.pairwise(names)
        }
        total = self.marks[PHASES[-1]] - self.marks["submitted"]
        return seconds | {"startup/total_s": total}

    def line(self, metrics: dict[str, float]) -> str:
        return f"start-up {metrics['startup/total_s']:.1f} s to the first step: {phases(metrics)}"


def phases(metrics: dict[str, float]) -> str:
    """``worker group 9.6, build 3.6, ...``: the phases of ``startup/*`` metrics, in order."""
    return ", ".join(f"{p.replace('_', ' ')} {metrics[f'startup/{p}_s']:.1f}" for p in PHASES)
