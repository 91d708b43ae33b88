"""An S3 endpoint on loopback that misbehaves the way S3 does under load: moto's server with a
WSGI layer in front that answers reads with ``503 SlowDown`` once and slows the rest down."""

from __future__ import annotations

import threading
import time

from moto.moto_server.threaded_moto_server import ThreadedMotoServer
from moto.moto_server.werkzeug_app import (
    DomainDispatcherApplication,
    MotoRequestHandler,
    create_backend_app,
)
from werkzeug.serving import make_server

# What S3 answers when a prefix gets more requests than it can serve (clients back off, retry).
SLOW_DOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message></Error>"
)


class Throttle:
    """WSGI middleware: while on, the first GET of each (object, byte range) whose key ends in
    ``suffix`` gets 503 SlowDown, and every later one waits ``delay_s`` before moto serves it.
    Counts both, so a test can show the faults happened."""

    def __init__(self, app) -> None:
        self.app = app
        self.suffix: str | None = None
        self.delay_s = 0.0
        self.throttled = 0
        self.slowed = 0
        self._seen: set[tuple[str, str]] = set()
        self._lock = threading.Lock()

    def on(self, suffix: str, delay_s: float) -> None:
        with self._lock:
            self.suffix, self.delay_s = suffix, delay_s
            self.throttled = self.slowed = 0
            self._seen.clear()

    def off(self) -> None:
        self.suffix = None

    def __call__(self, environ, start_response):
        path, suffix = environ.get("PATH_INFO", ""), self.suffix
        if suffix and environ["REQUEST_METHOD"] == "GET" and path.endswith(suffix):
            request = (path, environ.get("HTTP_RANGE", ""))
            with self._lock:
                first = request not in self._seen
                self._seen.add(request)
                self.throttled += first
                self.slowed += not first
            if first:
                length = str(len(SLOW_DOWN))
                start_response(
                    "503 Slow Down",
                    [("Content-Type", "application/xml"), ("Content-Length", length)],
                )
                return [SLOW_DOWN]
            time.sleep(self.delay_s)
        return self.app(environ, start_response)


class FaultyMotoServer(ThreadedMotoServer):
    """moto's threaded server with a :class:`Throttle` in front (off until ``throttle.on``)."""

    def __init__(self, ip_address: str, port: int) -> None:
        super().__init__(ip_address=ip_address, port=port, verbose=False)
        self.throttle = Throttle(DomainDispatcherApplication(create_backend_app))

    def _server_entry(self) -> None:  # ThreadedMotoServer's, with the middleware as the app
        self._server = make_server(
            self._ip_address, self._port, self.throttle, True, request_handler=MotoRequestHandler
        )
        self._server_ready_event.set()
        self._server.serve_forever()
