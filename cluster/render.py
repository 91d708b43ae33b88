"""Fill in the site values of a cluster config: ``${AWS_ACCOUNT_ID}``, ``${AWS_REGION}`` and
``${BUCKET}``, read from the environment, so the files in this folder hold no account-specific
value and no placeholder survives into a running cluster.

    export AWS_ACCOUNT_ID=123456789012 AWS_REGION=us-west-2 BUCKET=my-resnet-bucket
    python -m cluster.render cluster/aws.yaml > ~/resnet-ray-aws.yaml && ray up ~/resnet-ray-aws.yaml
    python -m cluster.render cluster/kuberay/raycluster.yaml | kubectl apply -f -

Only these three names are replaced; every other ``$`` (shell variables in launcher commands,
``$(VAR)`` in Kubernetes args) is left alone. Exit status: 0 written to stdout, 2 a value is
missing or malformed, or the file names a ``${...}`` this tool does not know (one line on stderr).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

# name → (what it is, the pattern a valid value matches)
SITE_VALUES: dict[str, tuple[str, str]] = {
    "AWS_ACCOUNT_ID": ("12-digit AWS account id", r"\d{12}"),
    "AWS_REGION": ("AWS region, e.g. us-west-2", r"[a-z]{2}(-[a-z]+)+-\d"),
    # S3 bucket naming rules: 3-63 lowercase letters, digits, dots, hyphens.
    "BUCKET": ("S3 bucket name (no s3:// prefix)", r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]"),
}
REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


class RenderError(ValueError):
    """A missing or malformed site value, or an unknown ``${...}``; one line with the fix."""


def referenced_names(text: str) -> set[str]:
    """Every ``${NAME}`` in ``text``."""
    return set(REFERENCE.findall(text))


def render(text: str, values: Mapping[str, str]) -> str:
    """``text`` with each ``${NAME}`` of :data:`SITE_VALUES` replaced by ``values[NAME]``."""
    unknown = sorted(referenced_names(text) - set(SITE_VALUES))
    if unknown:
        raise RenderError(
            f"${{{unknown[0]}}} is not a site value; only {', '.join(SITE_VALUES)} are filled in"
        )
    for name in sorted(referenced_names(text)):
        what, pattern = SITE_VALUES[name]
        value = values.get(name, "")
        if not value:
            raise RenderError(f"{name} is not set: export {name}=<{what}>")
        if not re.fullmatch(pattern, value):
            raise RenderError(f"{name}={value!r} is not a valid {what}")
    return REFERENCE.sub(lambda m: values[m.group(1)], text)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cluster.render",
        description="Print a cluster config with ${AWS_ACCOUNT_ID}, ${AWS_REGION} and ${BUCKET} "
        "filled in from the environment.",
    )
    parser.add_argument("path", type=Path, help="a file under cluster/")
    args = parser.parse_args(argv)
    try:
        text = args.path.read_text()
        sys.stdout.write(render(text, os.environ))
    except (OSError, RenderError) as e:
        print(f"cluster.render: {args.path}: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
