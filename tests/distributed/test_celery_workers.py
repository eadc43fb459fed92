"""sieve_curation on a distributed Airflow: PostgreSQL, Redis, an S3 server and two Celery workers that share
nothing else (own names, homes, scratch directories, model caches). Input and run on s3://, credentials from
the Airflow connection only."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.slow
RUN_TIMEOUT_S = 600
GPU_TASKS = {"local_batch.caption", "local_batch.embed"}


def test_curation_over_rest_on_two_celery_workers_equals_sieve_run(cpu_and_gpu_workers, sample_pool,
                                                                    test_profile_run):
    from pathlib import Path

    cluster = cpu_and_gpu_workers
    bucket = cluster.state["s3"]["bucket"]
    cluster.upload(sample_pool, f"s3://{bucket}/pool")
    run = f"s3://{bucket}/runs/celery"
    run_id = cluster.trigger("sieve_curation", {"input": f"s3://{bucket}/pool", "run": run, "profile": "test",
                                                "aws_conn_id": cluster.state["s3"]["connection_id"]})
    state = cluster.wait("sieve_curation", run_id, RUN_TIMEOUT_S)
    tis = [t for t in cluster.task_instances("sieve_curation", run_id) if t["state"] != "skipped"]
    placed = json.dumps([(t["task_id"], t["map_index"], t["state"], t["hostname"], t["queue"]) for t in tis])
    assert state == "success", placed + "\n" + cluster.logs()

    # every task ran on the worker of its queue: caption and embed on the gpu worker, the rest on the other
    workers = {w["queues"][0]: w["hostname"] for w in cluster.state["workers"]}
    for ti in tis:
        queue = "gpu" if ti["task_id"] in GPU_TASKS else "default"
        assert (ti["queue"], ti["hostname"]) == (queue, workers[queue]), placed
    assert {ti["hostname"] for ti in tis} == {"sieve-worker-1", "sieve-worker-2"}
    assert sum(ti["task_id"] in GPU_TASKS for ti in tis) == 4  # 2 shards × caption, embed

    manifest = Path(test_profile_run) / "manifest"
    for name in ("subset.npy", "kept.parquet"):
        assert cluster.read(f"{run}/manifest/{name}") == (manifest / name).read_bytes(), name
    # each worker loaded the models into its own cache, not a shared one
    gpu_home = Path(next(w["home"] for w in cluster.state["workers"] if w["queues"] == ["gpu"]))
    assert any((gpu_home / "cache").iterdir())
