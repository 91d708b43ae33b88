"""Where shards live: a local path or ``s3://bucket/prefix``, behind one pyarrow filesystem.

Every command that reads or writes a dataset goes through ``resolve(uri)``, which returns a
``pyarrow.fs.FileSystem`` and the path inside it. S3 settings come from the standard AWS
environment: credentials from ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, a profile or an IAM
role; a custom endpoint (MinIO, Ceph, moto) from ``--s3-endpoint`` or ``AWS_ENDPOINT_URL_S3`` /
``AWS_ENDPOINT_URL``; the region from ``AWS_REGION`` / ``AWS_DEFAULT_REGION`` (else looked up
from the bucket). Credentials are never part of a URI we accept, print or store.

Writes are atomic: a local file is written under a temporary name and renamed into place; an S3
object becomes visible only once its upload completes, so a reader never sees half a file.
"""

from __future__ import annotations

import functools
import os
import re
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import pyarrow.fs as pafs

__all__ = [
    "StorageError",
    "absolute_uri",
    "check_readable",
    "check_writable",
    "exists",
    "fs_path",
    "is_s3",
    "join",
    "list_files",
    "read_bytes",
    "redact",
    "resolve",
    "s3_endpoint_from_env",
    "write_bytes",
]


class StorageError(ValueError):
    """A location that cannot be used; the message is one line naming the value and the fix."""


def is_s3(uri: str) -> bool:
    """True for ``s3://`` URIs (the only object store supported)."""
    return uri.startswith("s3://")


# ``scheme://user:password@`` anywhere in a text (a URI, or an error message quoting one).
_USERINFO = re.compile(r"\b([a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s]*@")


def redact(text: str) -> str:
    """``text`` with the user info of every URI in it removed (``s3://key:secret@bucket`` ->
    ``s3://bucket``): safe to print, log or store. The one redaction every command uses, on
    locations and on error messages that may quote them."""
    return _USERINFO.sub(r"\1", text)


def absolute_uri(uri: str) -> str:
    """Canonical form of a dataset location, resolved on the driver before tasks see it.

    Local paths become absolute (``~`` expanded, relative to the current directory), so a Ray task
    on any node gets the same path; S3 URIs lose trailing slashes.
    """
    if is_s3(uri):
        _split_s3(uri)
        return uri.rstrip("/")
    if "://" in uri:
        raise StorageError(
            f"unsupported location {redact(uri)!r} — use a local path or s3://bucket/prefix"
        )
    return str(Path(uri).expanduser().resolve())


def join(uri: str, *parts: str) -> str:
    """``uri`` with ``parts`` appended using ``/`` (valid for local paths and S3 alike)."""
    return "/".join([uri.rstrip("/"), *(p.strip("/") for p in parts)])


def fs_path(uri: str) -> str:
    """The path of ``uri`` inside its pyarrow filesystem: ``bucket/key`` for S3, else absolute."""
    if is_s3(uri):
        bucket, key = _split_s3(uri)
        return f"{bucket}/{key}" if key else bucket
    return absolute_uri(uri)


def s3_endpoint_from_env() -> str | None:
    """The custom S3 endpoint named by the environment, or None for AWS itself."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def resolve(uri: str, *, s3_endpoint: str | None = None) -> tuple[pafs.FileSystem, str]:
    """The filesystem holding ``uri`` and the path of ``uri`` inside it.

    ``s3_endpoint`` (e.g. ``http://minio:9000``) overrides the environment's endpoint.
    """
    if not is_s3(uri):
        return pafs.LocalFileSystem(), fs_path(uri)
    bucket, _ = _split_s3(uri)
    endpoint = s3_endpoint or s3_endpoint_from_env()
    return _s3_filesystem(endpoint, _s3_region(bucket, endpoint)), fs_path(uri)


def exists(fs: pafs.FileSystem, path: str) -> bool:
    """True when ``path`` is an existing file."""
    return fs.get_file_info(path).type == pafs.FileType.File


def read_bytes(fs: pafs.FileSystem, path: str) -> bytes:
    """The whole content of the file at ``path`` (as stored: a ``.gz`` file stays gzipped)."""
    with fs.open_input_stream(path, compression=None) as f:  # pyarrow would gunzip by name
        return f.read()


def write_bytes(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically, replacing any existing file.

    Local: written to a temporary sibling, then renamed (atomic on POSIX filesystems).
    S3: one object upload, visible only once complete. No directory markers are created on S3.
    """
    if isinstance(fs, pafs.LocalFileSystem):
        parent = path.rpartition("/")[0]
        fs.create_dir(parent, recursive=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        try:
            with fs.open_output_stream(tmp, compression=None) as f:
                f.write(data)
            fs.move(tmp, path)
        finally:
            if fs.get_file_info(tmp).type != pafs.FileType.NotFound:
                fs.delete_file(tmp)
        return
    with fs.open_output_stream(path, compression=None) as f:  # pyarrow would gzip by name
        f.write(data)


def list_files(fs: pafs.FileSystem, path: str) -> list[str]:
    """Paths of all files under the directory (or S3 prefix) ``path``, sorted; [] when absent."""
    selector = pafs.FileSelector(path.rstrip("/"), recursive=True, allow_not_found=True)
    return sorted(i.path for i in fs.get_file_info(selector) if i.type == pafs.FileType.File)


def check_readable(uri: str, *, s3_endpoint: str | None = None) -> None:
    """Fail fast, with one line, unless ``uri`` can be read (a local file/folder or an S3 bucket)."""
    if is_s3(uri):
        _check_bucket(uri, s3_endpoint)
        return
    path = Path(absolute_uri(uri))
    if not path.exists():
        raise StorageError(f"{path} does not exist — check the path")
    mode = os.R_OK | os.X_OK if path.is_dir() else os.R_OK
    if not os.access(path, mode):
        raise StorageError(f"{path} is not readable by this user — fix its permissions")


def check_writable(uri: str, *, s3_endpoint: str | None = None) -> None:
    """Fail fast, with one line, unless files can be written under ``uri``. Creates nothing.

    S3: credentials must be present and the bucket reachable (``HeadBucket``). Local: ``uri`` must
    be a writable folder, or not exist yet below a writable folder.
    """
    if is_s3(uri):
        _check_bucket(uri, s3_endpoint)
        return
    path = Path(absolute_uri(uri))
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise StorageError(f"{existing} is a file, not a folder — choose another output location")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise StorageError(f"{existing} is not writable by this user — choose another location")


def _split_s3(uri: str) -> tuple[str, str]:
    parts = urlsplit(uri)
    if "@" in parts.netloc:
        raise StorageError(
            f"credentials in {redact(uri)!r} are not accepted — remove them from the URI and use "
            "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, a profile or an IAM role"
        )
    if not parts.netloc:
        raise StorageError(f"{uri!r} names no bucket — use s3://bucket/prefix")
    return parts.netloc, parts.path.strip("/")


@functools.lru_cache(maxsize=16)
def _s3_filesystem(endpoint: str | None, region: str) -> pafs.S3FileSystem:
    # One instance per (endpoint, region) and process: a Ray worker reuses its connection pool
    # across the shards it writes.
    return pafs.S3FileSystem(endpoint_override=endpoint, region=region)


def _s3_region(bucket: str, endpoint: str | None) -> str:
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        return region
    if endpoint:
        # S3-compatible servers ignore the region but the request signature needs one.
        return "us-east-1"
    return _aws_bucket_region(bucket)


@functools.lru_cache(maxsize=64)
def _aws_bucket_region(bucket: str) -> str:
    try:
        return pafs.resolve_s3_region(bucket)
    except OSError as e:
        raise StorageError(
            f"cannot find the region of bucket {bucket!r} ({e}) — set AWS_REGION"
        ) from None


def _check_bucket(uri: str, s3_endpoint: str | None) -> None:
    import boto3
    import botocore.config
    import botocore.exceptions

    bucket, _ = _split_s3(uri)
    endpoint = s3_endpoint or s3_endpoint_from_env()
    # A fresh session: boto3's default session caches credentials from its first use.
    session = boto3.session.Session()
    if session.get_credentials() is None:
        raise StorageError(
            f"no AWS credentials found for {uri} — set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE, or attach an IAM role)"
        )
    client = session.client(
        "s3",
        endpoint_url=endpoint,
        region_name=os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION"),
        config=botocore.config.Config(
            connect_timeout=5, read_timeout=15, retries={"max_attempts": 2}
        ),
    )
    where = f" at {redact(endpoint)}" if endpoint else ""
    try:
        client.head_bucket(Bucket=bucket)
    except botocore.exceptions.ClientError as e:
        code = str(e.response.get("Error", {}).get("Code", ""))
        if code in ("404", "NoSuchBucket"):
            raise StorageError(
                f"bucket {bucket!r} does not exist{where} — create it or fix the URI {uri}"
            ) from None
        if code in ("403", "AccessDenied"):
            raise StorageError(
                f"access denied to bucket {bucket!r}{where} — check the credentials' permissions"
            ) from None
        raise StorageError(f"cannot use bucket {bucket!r}{where}: {e}") from None
    except botocore.exceptions.BotoCoreError as e:
        raise StorageError(
            f"cannot reach S3 for {uri}{where}: {e} — check --s3-endpoint / AWS_ENDPOINT_URL"
        ) from None
