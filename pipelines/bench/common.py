"""Pieces every benchmark shares: the error type and the ratio line format."""

from __future__ import annotations

import os


class BenchError(ValueError):
    """A bad command-line value; the message is one line naming the value and the fix."""


def ratio_line(name: str, baseline: str, ratio: float) -> str:
    """The line tests and readers look for: ``ratio NAME/BASELINE: 1.23x``."""
    return f"ratio {name}/{baseline}: {ratio:.2f}x"


def target_line(name: str, baseline: str, target: float, ratio: float) -> str:
    """``target NAME/BASELINE >= 0.9x: met (0.95x)``."""
    verdict = "met" if ratio >= target else "missed"
    return f"target {name}/{baseline} >= {target:g}x: {verdict} ({ratio:.2f}x)"


def print_machine() -> None:
    """``machine: 2 CPUs, load average 0.9``: what else was running bears on every figure."""
    if hasattr(os, "getloadavg"):
        print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}", flush=True)
