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
