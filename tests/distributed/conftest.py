"""A distributed Airflow (PostgreSQL, Redis, moto S3, CeleryExecutor, two workers) started by
``scripts/distributed`` on 127.0.0.1 for the module that asks for it, and stopped afterwards."""

from __future__ import annotations

import pytest

from tests.distributed.cluster import start_cluster, stop_cluster


@pytest.fixture(scope="module")
def cpu_and_gpu_workers(tmp_path_factory):
    """One worker on the default queue, one on the ``gpu`` queue (local mode's caption and embed)."""
    root = tmp_path_factory.mktemp("distributed")
    try:
        yield start_cluster(root, "default", "gpu")
    finally:
        stop_cluster(root)
