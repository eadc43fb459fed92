"""Transient S3 faults are retried with backoff; a permanent error names the object and the cause."""

import os

import fsspec
import pytest

from sieve_tasks import storage
from sieve_tasks.cli import main
from sieve_tasks.sample_pool import make_sample_pool
from tests.faulty_proxy import FaultyProxy

pytestmark = pytest.mark.slow


@pytest.fixture
def through(s3_server, monkeypatch):
    """Point the AWS endpoint at a fault-injecting proxy in front of the S3 server."""

    def use(proxy: FaultyProxy) -> FaultyProxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        fsspec.filesystem("s3").clear_instance_cache()
        return proxy

    yield use
    fsspec.filesystem("s3").clear_instance_cache()


def test_transient_faults_are_retried_and_results_unchanged(s3_server, through, test_profile_run):
    make_sample_pool("s3://sieve-test/faulty-pool")
    faults = ["slowdown", "internal", "reset", "stall"]
    with through(FaultyProxy(s3_server, faults=faults, every=6, stall_seconds=2.0)) as proxy:
        fsspec.config.conf["s3"]["config_kwargs"]["read_timeout"] = 1  # a stall becomes a timeout quickly
        try:
            code = main(["run", "s3://sieve-test/faulty-pool", "s3://sieve-test/runs/faulty", "--profile", "test",
                         "--no-progress"])
        finally:
            fsspec.config.conf["s3"]["config_kwargs"]["read_timeout"] = storage.S3_DEFAULTS["config_kwargs"]["read_timeout"]
        assert code == 0
        assert set(proxy.injected) == set(faults) and sum(proxy.injected.values()) >= 8, proxy.injected
        subset = storage.read_bytes("s3://sieve-test/runs/faulty/manifest/subset.npy")
        print("faults injected:", dict(proxy.injected), "of", proxy.requests, "requests")
    assert subset == open(os.path.join(test_profile_run, "manifest", "subset.npy"), "rb").read()


def test_permanent_error_fails_with_object_and_cause(s3_server, through, capsys):
    make_sample_pool("s3://sieve-test/denied-pool")
    with through(FaultyProxy(s3_server, deny="denied-pool/00000001.tar")):
        code = main(["caption", "s3://sieve-test/denied-pool", "s3://sieve-test/runs/denied", "--profile", "test"])
    err = capsys.readouterr().err
    assert code == 2
    assert "sieve-test/denied-pool/00000001.tar" in err and ("Forbidden" in err or "Access Denied" in err), err
    summary_missing = not storage.exists("s3://sieve-test/runs/denied/captions/_done/00000001.json")
    assert summary_missing
