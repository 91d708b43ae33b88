"""Commands run as users run them, for tests: ``python -m pipelines.<command>`` subprocesses whose
output is read line by line, and the processes they start found by an environment marker.

Every process a test starts carries ``RESNET_RAY_TEST=<marker>`` (and its children inherit it),
so what is left behind (a local Ray of a killed driver) is found and stopped by reading
/proc/<pid>/environ, never by process name: other Ray instances on this machine are left alone.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests import clusters
from tests.clusters import marked_pids, signal_and_wait

PYTHON = sys.executable
MARKER = "RESNET_RAY_TEST"


def marked(marker: str) -> set[int]:
    """PIDs of live processes whose environment holds RESNET_RAY_TEST=<marker>."""
    return marked_pids(marker, MARKER)


def stop_marked(marker: str, grace_s: float = 10.0) -> None:
    """SIGTERM every process carrying the marker, then SIGKILL what is left after the grace."""
    signal_and_wait(lambda: marked(marker), signal.SIGTERM, wait_s=grace_s)
    signal_and_wait(lambda: marked(marker), signal.SIGKILL, wait_s=5.0)


def base_env(marker: str, **extra: str) -> dict[str, str]:
    """This environment without Ray settings (:func:`tests.clusters.base_env`), with the marker
    and ``extra``."""
    env = clusters.base_env(drop=MARKER)
    env.update({MARKER: marker}, **extra)
    return env


class Driver:
    """A running ``python -m pipelines.<command>`` (default: train), its output collected line
    by line."""

    def __init__(
        self, args: list[str], env: dict[str, str], cwd: Path, command: str = "train"
    ) -> None:
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self.process = subprocess.Popen(
            [PYTHON, "-m", f"pipelines.{command}", *args],
            env=env,
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.stderr = ""
        self._threads = [
            threading.Thread(target=self._read_stdout, daemon=True),
            threading.Thread(target=self._read_stderr, daemon=True),
        ]
        for t in self._threads:
            t.start()

    def _read_stdout(self) -> None:
        for line in self.process.stdout:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()

    def _read_stderr(self) -> None:
        self.stderr = self.process.stderr.read()

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_for(self, pattern: str, timeout: float = 240) -> re.Match:
        """The first stdout match of ``pattern``; fails if the driver exits or time runs out."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        seen = 0
        with self._changed:
            while True:
                for line in self.lines[seen:]:
                    if match := regex.search(line):
                        return match
                seen = len(self.lines)
                if self.process.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"no line matching {pattern!r}:\n{self.output}\n{self.stderr}")
                self._changed.wait(timeout=1.0)

    def finish(self, timeout: float = 420) -> int:
        try:
            status = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            pytest.fail(f"the command did not finish in {timeout} s:\n{self.output}")
        for t in self._threads:
            t.join(timeout=10)
        return status
