"""Write the Ray cluster's authentication token, kept in AWS Secrets Manager, to a file only its
owner can read. Every node of ``cluster/aws.yaml`` runs it at setup with its instance role (no
keys on the node), so `ray start` finds the token at Ray's default path:

    python -m cluster.fetch_token --secret-id resnet-ray/ray-auth-token --region us-west-2 \\
        --out ~/.ray/auth_token

The token never reaches stdout, stderr, the command line or the environment; errors name the
secret, never its value. The file is written atomically (temp + rename) with mode 0600 in a 0700
folder. Exit status: 0 written, 2 the secret cannot be read or is not a usable token.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

# `ray get-auth-token --generate` makes 32 hex characters; shorter secrets are guessable.
MIN_TOKEN_CHARS = 32


class TokenError(RuntimeError):
    """The secret is missing, unreadable or unusable; the message never holds its value."""


def fetch_token(secret_id: str, region: str) -> str:
    """The secret's string value, checked to be one line of at least 32 non-space characters.

    A trailing newline (as ``echo`` leaves) is dropped. Credentials and endpoint come from the
    standard AWS chain (instance role on the cluster; ``AWS_ENDPOINT_URL`` for a test server).
    """
    import boto3
    import botocore.exceptions

    client = boto3.session.Session().client("secretsmanager", region_name=region)
    try:
        response = client.get_secret_value(SecretId=secret_id)
    except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as e:
        code = getattr(e, "response", {}).get("Error", {}).get("Code", type(e).__name__)
        raise TokenError(
            f"cannot read secret {secret_id!r} in {region} ({code}): check that it exists and "
            "that this node's IAM role may call secretsmanager:GetSecretValue on it"
        ) from None
    token = response.get("SecretString")
    if token is None:
        raise TokenError(f"secret {secret_id!r} holds binary data; store the token as a string")
    token = token.removesuffix("\n")
    if len(token) < MIN_TOKEN_CHARS or any(c.isspace() for c in token):
        raise TokenError(
            f"secret {secret_id!r} is not a usable token (one line, at least {MIN_TOKEN_CHARS} "
            "characters, no spaces): store the output of `openssl rand -hex 32`"
        )
    return token


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically: mode 0600, parent folder created with mode 0700."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)  # created 0600
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cluster.fetch_token",
        description="Write the Ray auth token from AWS Secrets Manager to a private file.",
    )
    parser.add_argument("--secret-id", required=True, help="secret name or ARN")
    parser.add_argument("--region", required=True, help="AWS region of the secret")
    parser.add_argument("--out", required=True, type=Path, help="e.g. ~/.ray/auth_token")
    args = parser.parse_args(argv)
    out = args.out.expanduser()
    try:
        write_private(out, fetch_token(args.secret_id, args.region))
    except (TokenError, OSError) as e:
        print(f"cluster.fetch_token: {e}", file=sys.stderr)
        return 2
    print(f"cluster.fetch_token: wrote the token of {args.secret_id!r} to {out} (mode 0600)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
