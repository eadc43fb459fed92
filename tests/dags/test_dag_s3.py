"""sieve_curation against a real S3-compatible server, with endpoint and keys from an Airflow connection."""

from __future__ import annotations

import json

import pytest

from tests.dags.dagrun_helpers import run_dag, states

pytestmark = pytest.mark.slow


def test_dag_on_s3_with_a_connection_equals_the_local_run(airflow_db, s3_server, demo_pool, test_profile_run,
                                                          monkeypatch):
    from sieve_tasks import storage
    from sieve_tasks.sample_pool import make_sample_pool

    make_sample_pool("s3://sieve-test/dag-pool")
    connection = {"conn_type": "aws", "login": "test", "password": "test",
                  "extra": {"endpoint_url": s3_server, "region_name": "us-east-1"}}
    monkeypatch.setenv("AIRFLOW_CONN_SIEVE_S3", json.dumps(connection))
    for name in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(name)  # only the connection can lead the tasks to the server
    dagrun = run_dag("sieve_curation", {"input": "s3://sieve-test/dag-pool", "run": "s3://sieve-test/runs/dag",
                                        "profile": "test", "aws_conn_id": "sieve_s3"})
    assert dagrun.state == "success", states(dagrun)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    import fsspec

    fsspec.get_filesystem_class("s3").clear_instance_cache()
    produced = storage.read_bytes("s3://sieve-test/runs/dag/manifest/subset.npy")
    assert produced == (_manifest(test_profile_run) / "subset.npy").read_bytes()


def _manifest(run):
    from pathlib import Path

    return Path(run) / "manifest"


def test_connection_credentials_stay_out_of_the_process_environment(airflow_db, monkeypatch):
    import os

    from sieve_airflow.pipeline import object_store
    from sieve_tasks import storage

    connection = {"conn_type": "aws", "login": "AKIA-A", "password": "secret-a",
                  "extra": {"endpoint_url": "http://127.0.0.1:9000", "region_name": "eu-west-1",
                            "aws_session_token": "token-a"}}
    monkeypatch.setenv("AIRFLOW_CONN_SIEVE_S3_A", json.dumps(connection))
    environment = dict(os.environ)
    with object_store("sieve_s3_a"):
        assert storage.current_options("s3") == {"key": "AKIA-A", "secret": "secret-a", "token": "token-a",
                                                 "endpoint_url": "http://127.0.0.1:9000",
                                                 "client_kwargs": {"region_name": "eu-west-1"}}
        assert dict(os.environ) == environment
    assert storage.current_options("s3") == {}
