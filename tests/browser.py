"""Headless Chromium for the UI tests, driven over the DevTools protocol on a pipe (Chromium's
``--remote-debugging-pipe``: JSON messages ending in NUL on its file descriptors 3 and 4), so
the tests need no driver and no Python package beyond the standard library; and ``mlflow ui``
on a free loopback port (:class:`MlflowUi`) for it to open.

The browser is the system's ``chromium`` (Debian's package: ``apt-get install -y chromium``);
:func:`find_chromium` returns None where it is missing. Nothing is downloaded.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any


def find_chromium() -> str | None:
    """The system Chromium's path (Debian's ``chromium``), or None."""
    return shutil.which("chromium")


class BrowserError(RuntimeError):
    """Chromium answered a command with an error, exited, or a page never showed its text."""


class Browser:
    """One headless Chromium with one page (a tab), sized ``width`` x ``height`` CSS pixels.

    ``--no-sandbox``: Chromium refuses its sandbox when run as root (CI runs as root). The
    profile lives in ``profile_dir``: a fresh one has no remembered UI settings.
    """

    def __init__(self, chromium: str, profile_dir: Path, width: int = 1440, height: int = 900):
        # exec: Chromium replaces the shell; its fd 3 reads our stdin, fd 4 writes our stdout.
        self._process = subprocess.Popen(
            [
                "sh", "-c", 'exec "$0" "$@" 3<&0 4>&1 0</dev/null 1>/dev/null', chromium,
                "--headless", "--no-sandbox", "--disable-gpu", "--remote-debugging-pipe",
                "--no-first-run", "--no-default-browser-check", "--disable-extensions",
                f"--user-data-dir={profile_dir}", f"--window-size={width},{height}",
                "about:blank",
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        self._next_id = 0
        self._buffer = b""
        target = self._send("Target.createTarget", {"url": "about:blank"})["targetId"]
        attached = self._send("Target.attachToTarget", {"targetId": target, "flatten": True})
        self._session = attached["sessionId"]
        metrics = {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False}
        self.command("Emulation.setDeviceMetricsOverride", metrics)
        self.command("Page.enable")

    def _send(self, method: str, params: dict | None = None, session: str | None = None) -> Any:
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        self._process.stdin.write(json.dumps(message).encode() + b"\0")
        self._process.stdin.flush()
        while True:  # events and other answers come in between: skip them
            reply = self._read()
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise BrowserError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    def _read(self) -> dict:
        while b"\0" not in self._buffer:
            chunk = self._process.stdout.read1(1 << 20)
            if not chunk:
                raise BrowserError(f"Chromium exited (status {self._process.poll()})")
            self._buffer += chunk
        message, _, self._buffer = self._buffer.partition(b"\0")
        return json.loads(message)

    def command(self, method: str, params: dict | None = None) -> Any:
        """A DevTools command to the page; its result."""
        return self._send(method, params, self._session)

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (awaited when a promise)."""
        result = self.command(
            "Runtime.evaluate",
            {"expression": expression, "returnByValue": True, "awaitPromise": True},
        )
        if "exceptionDetails" in result:
            raise BrowserError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def open(self, url: str) -> None:
        self.command("Page.navigate", {"url": url})

    def text(self) -> str:
        """The page's visible text."""
        return self.evaluate("document.body ? document.body.innerText : ''") or ""

    def wait_for_text(self, *needles: str, timeout_s: float = 60.0) -> str:
        """The page's text once it holds every needle; BrowserError naming the missing ones and
        ending with the text it had after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while True:
            text = self.text()
            missing = [n for n in needles if n not in text]
            if not missing:
                return text
            if time.monotonic() > deadline:
                raise BrowserError(f"after {timeout_s:.0f} s the page lacks {missing}:\n{text}")
            time.sleep(0.25)

    def click(self, selector: str, text: str | None = None) -> None:
        """Click the first element matching the CSS ``selector`` (whose text is ``text``)."""
        found = self.evaluate(
            f"""(() => {{
                const all = [...document.querySelectorAll({json.dumps(selector)})];
                const hit = all.find(e => {json.dumps(text)} === null
                    || e.innerText.trim() === {json.dumps(text)});
                if (hit) hit.click();
                return Boolean(hit);
            }})()"""
        )
        if not found:
            raise BrowserError(f"nothing to click: {selector} {text or ''}\n{self.text()}")

    def screenshot(self, path: Path) -> Path:
        """A PNG of the page's viewport."""
        data = self.command("Page.captureScreenshot", {"format": "png"})["data"]
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        with contextlib.suppress(BrowserError, OSError):  # it may exit before it answers
            self._send("Browser.close")
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()


class MlflowUi:
    """``mlflow ui`` as the commands print it (:func:`pipelines.tracking.ui_command`), on a free
    loopback port with one worker, started on entry (it takes seconds: do other work, then
    :meth:`wait_until_up`) and stopped on exit, with every process it started."""

    def __init__(self, command: str, log_dir: Path) -> None:
        from pipelines.job.session import free_loopback_port

        port = free_loopback_port()
        words = shlex.split(command)
        words[words.index("--port") + 1] = str(port)
        self.url = f"http://127.0.0.1:{port}"
        self._words = [*words, "--host", "127.0.0.1", "--workers", "1"]
        self._log = log_dir / "mlflow-ui.log"
        self._cwd = log_dir

    def __enter__(self) -> MlflowUi:
        with self._log.open("w") as log:
            # Its own process group: the server's workers are stopped with it.
            self._process = subprocess.Popen(
                self._words,
                cwd=self._cwd,
                # Without MLflow's job runner (GenAI jobs): one process less, and no store
                # folder of it left in /dev/shm after the server stops.
                env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self

    def wait_until_up(self, timeout_s: float = 180.0) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=5) as answer:
                    if answer.status == 200:
                        return
            except OSError:
                pass
            if self._process.poll() is not None or time.monotonic() > deadline:
                raise BrowserError(f"mlflow ui did not start:\n{self._log.read_text()[-3000:]}")
            time.sleep(0.5)

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self._process.pid, signal.SIGTERM)
        try:
            self._process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._process.pid, signal.SIGKILL)
            self._process.wait()
