"""A distributed Airflow (PostgreSQL, Redis, moto S3, CeleryExecutor, three workers) started by
``scripts/distributed`` on 127.0.0.1 for the module that asks for it, and stopped afterwards."""

from __future__ import annotations

import pytest

from tests.distributed.cluster import start_cluster, stop_cluster

#: a dead worker's task is failed after 45 s without heartbeat (not 300) and retried after 5 s (not minutes)
FAST_RECOVERY = ("--heartbeat-timeout", "45", "--retry-delay", "5")


@pytest.fixture(scope="module")
def cpu_and_gpu_workers(tmp_path_factory):
    """sieve-worker-1 on the default queue; sieve-worker-2 and -3 on the ``gpu`` queue (local mode's caption
    and embed), so one of those can die and the other take over."""
    root = tmp_path_factory.mktemp("distributed")
    try:
        yield start_cluster(root, "default", "gpu", "gpu", options=FAST_RECOVERY)
    finally:
        stop_cluster(root)
