"""sieve_curation on a distributed Airflow: PostgreSQL, Redis, an S3 server and Celery workers that share
nothing else (own names, homes, scratch directories, model caches). Input and run on s3://, credentials from
the Airflow connection only."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.slow
RUN_TIMEOUT_S = 600
GPU_TASKS = {"local_batch.caption", "local_batch.embed"}


@pytest.fixture(scope="module")
def s3_pool(cpu_and_gpu_workers, sample_pool) -> str:
    """The demo pool (the one ``test_profile_run`` ran) copied to the setup's bucket."""
    uri = f"s3://{cpu_and_gpu_workers.state['s3']['bucket']}/pool"
    cpu_and_gpu_workers.upload(sample_pool, uri)
    return uri


def test_curation_over_rest_on_two_celery_workers_equals_sieve_run(cpu_and_gpu_workers, s3_pool, test_profile_run):
    from pathlib import Path

    cluster = cpu_and_gpu_workers
    run = f"s3://{cluster.state['s3']['bucket']}/runs/celery"
    run_id = cluster.trigger("sieve_curation", {"input": s3_pool, "run": run, "profile": "test",
                                                "aws_conn_id": cluster.state["s3"]["connection_id"]})
    state = cluster.wait("sieve_curation", run_id, RUN_TIMEOUT_S)
    tis = [t for t in cluster.task_instances("sieve_curation", run_id) if t["state"] != "skipped"]
    placed = json.dumps([(t["task_id"], t["map_index"], t["state"], t["hostname"], t["queue"]) for t in tis])
    assert state == "success", placed + "\n" + cluster.logs()

    # every task ran on a worker of its queue: caption and embed on the gpu workers, the rest on the other
    hosts = {queue: {w["hostname"] for w in cluster.state["workers"] if w["queues"] == [queue]}
             for queue in ("default", "gpu")}
    for ti in tis:
        queue = "gpu" if ti["task_id"] in GPU_TASKS else "default"
        assert ti["queue"] == queue and ti["hostname"] in hosts[queue], placed
    assert len({ti["hostname"] for ti in tis}) >= 2 and "sieve-worker-1" in {ti["hostname"] for ti in tis}
    assert sum(ti["task_id"] in GPU_TASKS for ti in tis) == 4  # 2 shards × caption, embed

    manifest = Path(test_profile_run) / "manifest"
    for name in ("subset.npy", "kept.parquet"):
        assert cluster.read(f"{run}/manifest/{name}") == (manifest / name).read_bytes(), name
    # the gpu workers loaded the models into caches of their own, not a shared one
    gpu_homes = [Path(w["home"]) for w in cluster.state["workers"] if w["hostname"] in
                 {ti["hostname"] for ti in tis if ti["task_id"] in GPU_TASKS}]
    assert gpu_homes and all(any((home / "cache").iterdir()) for home in gpu_homes)


def test_a_worker_killed_during_caption_is_retried_on_the_survivor(cpu_and_gpu_workers, s3_pool, test_profile_run):
    """SIGKILL a gpu worker (and the task it runs) mid-caption: the scheduler finds the task without heartbeat,
    retries it, the other gpu worker runs it, and the manifest is byte-identical, nothing counted twice."""
    import os
    import signal
    import time
    from pathlib import Path

    cluster = cpu_and_gpu_workers
    run = f"s3://{cluster.state['s3']['bucket']}/runs/killed"
    run_id = cluster.trigger("sieve_curation", {"input": s3_pool, "run": run, "profile": "test",
                                                "aws_conn_id": cluster.state["s3"]["connection_id"]})
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while not (running := [t for t in cluster.task_instances("sieve_curation", run_id)
                            if t["task_id"] == "local_batch.caption" and t["state"] == "running" and t["hostname"]]):
        assert time.monotonic() < deadline and cluster.run_state("sieve_curation", run_id) in ("queued", "running")
        time.sleep(0.5)
    victim = running[0]
    os.killpg(cluster.worker(victim["hostname"])["pid"], signal.SIGKILL)  # the worker, its task, all of it

    assert cluster.wait("sieve_curation", run_id, RUN_TIMEOUT_S) == "success", cluster.logs()
    tries = cluster.tries("sieve_curation", run_id, "local_batch.caption", victim["map_index"])
    assert [t["hostname"] for t in tries][0] == victim["hostname"] and len(tries) >= 2, tries
    survivor = tries[-1]
    assert survivor["state"] == "success" and survivor["hostname"] != victim["hostname"], tries
    assert cluster.worker(survivor["hostname"])["queues"] == ["gpu"]

    reference = Path(test_profile_run) / "manifest"
    for name in ("subset.npy", "kept.parquet"):
        assert cluster.read(f"{run}/manifest/{name}") == (reference / name).read_bytes(), name
    counts = json.loads(cluster.read(f"{run}/manifest/summary.json"))["counts"]
    assert counts == json.loads((reference / "summary.json").read_text())["counts"]  # no sample twice


def test_the_s3_server_restarted_mid_run_keeps_its_data_and_the_run_succeeds(cpu_and_gpu_workers, s3_pool,
                                                                             test_profile_run):
    """Once the first shard is captioned, the S3 server stops and starts again (its data replayed): requests in
    between fail, botocore and Airflow retry them, and the run ends as if nothing had happened."""
    import time
    from pathlib import Path

    from tests.distributed.cluster import restart_s3

    cluster = cpu_and_gpu_workers
    run = f"s3://{cluster.state['s3']['bucket']}/runs/s3-restart"
    run_id = cluster.trigger("sieve_curation", {"input": s3_pool, "run": run, "profile": "test",
                                                "aws_conn_id": cluster.state["s3"]["connection_id"]})
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while not any(t["task_id"] == "local_batch.caption" and t["state"] == "success"
                  for t in cluster.task_instances("sieve_curation", run_id)):
        assert time.monotonic() < deadline and cluster.run_state("sieve_curation", run_id) in ("queued", "running")
        time.sleep(0.5)
    restart_s3(cluster.root)
    assert cluster.read(f"{run}/shards.json")  # written before the restart, still there

    state = cluster.wait("sieve_curation", run_id, RUN_TIMEOUT_S)
    assert state == "success", json.dumps([(t["task_id"], t["map_index"], t["state"], t["try_number"])
                                            for t in cluster.task_instances("sieve_curation", run_id)])
    reference = Path(test_profile_run) / "manifest"
    for name in ("subset.npy", "kept.parquet"):
        assert cluster.read(f"{run}/manifest/{name}") == (reference / name).read_bytes(), name
