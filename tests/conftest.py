"""Shared fixtures: a real, authenticated SeaweedFS S3 server on loopback for the whole session."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from s3server import S3Server, WeedNotFoundError, find_weed

# Variables that would send S3 traffic elsewhere or supply other credentials than the fixture's.
_FOREIGN_AWS_VARS = (
    "AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE", "AWS_DEFAULT_REGION", "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI",
)


def _weed_or_fail() -> str:
    try:
        return find_weed()
    except WeedNotFoundError as exc:
        message = f"the S3 tests are required and need SeaweedFS: {exc}"
    pytest.fail(message, pytrace=False)  # outside `except`: no chained traceback noise


@pytest.fixture(scope="session")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A started server with bucket `s3.bucket`; its credentials/endpoint are in os.environ meanwhile.

    Fails (never skips) without `weed`: the S3 tests are part of the required suite.
    """
    weed = _weed_or_fail()
    workdir = tmp_path_factory.mktemp("seaweedfs")
    server = S3Server(weed, workdir)
    mp = pytest.MonkeyPatch()
    try:
        # Environment first: the readiness probe in start() must not go through an HTTP(S)_PROXY either.
        for name in _FOREIGN_AWS_VARS:
            mp.delenv(name, raising=False)
        # No ~/.aws files either: they could carry endpoints, profiles or credential processes.
        mp.setenv("AWS_CONFIG_FILE", str(workdir / "no-aws-config"))
        mp.setenv("AWS_SHARED_CREDENTIALS_FILE", str(workdir / "no-aws-credentials"))
        # An HTTP(S)_PROXY in the environment must not capture loopback traffic.
        for var in ("NO_PROXY", "no_proxy"):
            mp.setenv(var, ",".join(filter(None, ["127.0.0.1", "localhost", os.environ.get(var)])))
        for name, value in server.env.items():
            mp.setenv(name, value)
        server.start()
        yield server
    finally:
        mp.undo()
        server.close()
