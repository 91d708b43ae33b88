"""The start-up split (pipelines.job.startup): phases in order, each once, summing to the total."""

import time

import pytest
import torch

from pipelines.job.startup import PHASES, Startup


def test_the_start_up_split_comes_once_every_phase_has_ended():
    startup = Startup(submitted_at=time.time() - 2.0)  # submitted 2 s before the loop started
    for phase in PHASES[1:-1]:
        assert startup.metrics() == {}
        startup.mark(phase)
    startup.mark("first_step", torch.device("cpu"))
    first = dict(startup.marks)
    startup.mark("first_step")  # later steps leave the marks alone
    assert startup.marks == first
    metrics = startup.metrics()
    assert metrics["startup/worker_group_s"] == pytest.approx(2.0, abs=0.5)
    assert sum(metrics[f"startup/{p}_s"] for p in PHASES) == pytest.approx(
        metrics["startup/total_s"]
    )
    assert startup.line(metrics).startswith(f"start-up {metrics['startup/total_s']:.1f} s")
