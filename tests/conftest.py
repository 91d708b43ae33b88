# Shared pytest fixtures. Other test files may add fixtures here; keep them real (a local Ray, an
# S3 server on loopback), small, and torn down after use.
from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from pipelines.job.session import free_loopback_port
from tests.clusters import STORE_BYTES

if TYPE_CHECKING:
    from tests.s3_faults import FaultyMotoServer, Throttle


@pytest.fixture(scope="session", autouse=True)
def ray_temp_dir() -> Iterator[Path]:
    """Ray's temp dir for everything this pytest process starts (RAY_TMPDIR, inherited by the
    commands it runs): the session folders and logs of every Ray the tests start land there,
    not in /tmp/ray, and go with it. A short path: Ray's Unix sockets live below it."""
    root = Path(tempfile.mkdtemp(prefix="rr-", dir="/tmp"))
    with pytest.MonkeyPatch.context() as env:
        env.setenv("RAY_TMPDIR", str(root))
        yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def ray_local() -> Iterator[None]:
    """A local Ray (2 CPUs, no token auth) shared by one test module, started the commands' way
    (``ray_session``: dashboard on loopback for Ray Train's state queries), shut down after.

    Ray workers inherit the environment of the moment Ray starts: request fixtures that set
    environment variables for workers (such as ``s3_server``) before this one.
    """
    from pipelines.job.session import ray_session

    with pytest.MonkeyPatch.context() as env:
        env.setenv("RAY_AUTH_MODE", "disabled")
        with ray_session(num_cpus=2, object_store_memory=STORE_BYTES):
            yield


@pytest.fixture(scope="module")
def mlflow_uri(tmp_path_factory) -> Iterator[str]:
    """A SQLite MLflow store of one test module, as MLFLOW_TRACKING_URI while the module runs
    (modules whose commands get the store otherwise define their own ``mlflow_uri``)."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MLFLOW_TRACKING_URI", uri)
        yield uri


@pytest.fixture(scope="module")
def s3_moto() -> Iterator[FaultyMotoServer]:
    """A real S3 endpoint on loopback (moto's threaded server, with a throttle that is off until
    a test turns it on: ``s3_throttle``).

    While it runs, the environment holds dummy credentials, region us-east-1 and
    ``AWS_ENDPOINT_URL`` pointing at it (restored afterwards); shared AWS config files are
    hidden and the EC2 metadata lookup is off, so nothing reaches a real AWS account.
    """
    from tests.s3_faults import FaultyMotoServer  # moto loads in the modules that use S3 only

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    port = free_loopback_port()
    server = FaultyMotoServer("127.0.0.1", port)
    server.start()
    with pytest.MonkeyPatch.context() as env:
        for name in (
            "AWS_PROFILE",
            "AWS_SESSION_TOKEN",
            "AWS_ENDPOINT_URL_S3",
            "AWS_DEFAULT_REGION",
        ):
            env.delenv(name, raising=False)
        env.setenv("AWS_ACCESS_KEY_ID", "testing")
        env.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        env.setenv("AWS_REGION", "us-east-1")
        env.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
        env.setenv("AWS_EC2_METADATA_DISABLED", "true")
        env.setenv("AWS_CONFIG_FILE", "/nonexistent/aws-config")
        env.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/aws-credentials")
        try:
            yield server
        finally:
            server.stop()


@pytest.fixture(scope="module")
def s3_server(s3_moto) -> str:
    """The URL of the module's S3 endpoint on loopback (see ``s3_moto``)."""
    host, port = s3_moto.get_host_and_port()
    return f"http://{host}:{port}"


@pytest.fixture
def s3_throttle(s3_moto) -> Iterator[Throttle]:
    """The S3 endpoint's throttle (``on(suffix, delay_s)``), turned off after the test."""
    yield s3_moto.throttle
    s3_moto.throttle.off()
