"""Shared fixtures: an offline environment, the demo pool, and one test-profile run of it."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test may reach a model hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def sieve_cache(tmp_path_factory):
    """Tiny test models are built once per session into a private cache."""
    path = os.environ.get("SIEVE_TEST_CACHE") or str(tmp_path_factory.mktemp("sieve-cache"))
    os.environ["SIEVE_CACHE"] = path
    return path


@pytest.fixture(scope="session")
def sample_pool(tmp_path_factory) -> str:
    from sieve_tasks.sample_pool import make_sample_pool

    pool = tmp_path_factory.mktemp("pool")
    make_sample_pool(str(pool))
    return str(pool)


@pytest.fixture(scope="session")
def test_profile_run(sample_pool, tmp_path_factory) -> str:
    """``sieve run`` of the demo pool with the test profile, done once for the session."""
    from sieve_tasks.cli import main

    run = str(tmp_path_factory.mktemp("runs") / "demo")
    assert main(["run", sample_pool, run, "--profile", "test", "--no-progress"]) == 0
    return run


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible server (moto) on 127.0.0.1, with the standard AWS variables pointing at it."""
    import shutil
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = shutil.which("moto_server", path=os.path.dirname(sys.executable)) or shutil.which("moto_server")
    process = subprocess.Popen([server, "-H", "127.0.0.1", "-p", str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            urllib.request.urlopen(endpoint, timeout=1)
            break
        except OSError:
            time.sleep(0.1)
    saved = {k: os.environ.get(k) for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                            "AWS_DEFAULT_REGION")}
    os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="test",
                      AWS_DEFAULT_REGION="us-east-1")
    import boto3

    boto3.client("s3").create_bucket(Bucket="sieve-test")
    yield endpoint
    process.terminate()
    process.wait(10)
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
