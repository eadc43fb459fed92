"""The same pool through sieve_curation on 1 vs 2 Celery workers (scripts/distributed: PostgreSQL, Redis,
moto S3, CeleryExecutor), input and run on s3://, test profile.

    .venv/bin/python benchmarks/distributed_bench.py [--shards 4]

Each worker listens to both queues (default and gpu) with one task slot. Prints, per setup: the DAG run's
wall time, the sum of its task instances' durations, the mean queue latency (queued → running), the mean
duration of ``choose_mode`` (a task that does nothing: the fixed cost of one task instance) and the per-shard
stage times (caption, embed, score task durations).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.distributed.cluster import Cluster, start_cluster, stop_cluster  # noqa: E402

BOTH_QUEUES = "default,gpu"


def seconds_between(start: str | None, end: str | None) -> float:
    return (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds() if start and end else 0.0


def measure(cluster: Cluster, pool: str) -> dict[str, float]:
    bucket = cluster.state["s3"]["bucket"]
    cluster.upload(pool, f"s3://{bucket}/pool")
    run_id = cluster.trigger("sieve_curation", {"input": f"s3://{bucket}/pool", "run": f"s3://{bucket}/runs/bench",
                                                "profile": "test", "aws_conn_id": cluster.state["s3"]["connection_id"]})
    if cluster.wait("sieve_curation", run_id, timeout_s=1800) != "success":
        raise RuntimeError("benchmark run failed:\n" + cluster.logs())
    run = cluster.api.get(f"/api/v2/dags/sieve_curation/dagRuns/{run_id}").json()
    tis = [t for t in cluster.task_instances("sieve_curation", run_id) if t["state"] == "success"]
    by_task = lambda name: [t["duration"] for t in tis if t["task_id"] == name]  # noqa: E731
    return {
        "wall_s": seconds_between(run["start_date"], run["end_date"]),
        "task_seconds": sum(t["duration"] for t in tis),
        "queue_latency_s": statistics.mean(seconds_between(t["queued_when"], t["start_date"]) for t in tis),
        "noop_task_s": statistics.mean(by_task("choose_mode")),
        "caption_s": statistics.mean(by_task("local_batch.caption")),
        "embed_s": statistics.mean(by_task("local_batch.embed")),
        "score_s": statistics.mean(by_task("local_batch.score")),
        "workers": len({t["hostname"] for t in tis}),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, default=4)
    args = parser.parse_args()
    from sieve_tasks.sample_pool import make_sample_pool

    work = Path(tempfile.mkdtemp(prefix="sieve-distbench-"))
    pool = str(work / "pool")
    make_sample_pool(pool, shards=args.shards)
    results = {}
    for workers in (1, 2):
        root = work / f"workers-{workers}"
        try:
            results[workers] = measure(start_cluster(root, *[BOTH_QUEUES] * workers), pool)
        finally:
            stop_cluster(root)
        print(f"{workers} worker(s): " + ", ".join(f"{k} {v:.1f}" for k, v in results[workers].items()), flush=True)
    one, two = results[1]["wall_s"], results[2]["wall_s"]
    print(f"pool: {args.shards} shards, test profile; wall time 1 → 2 workers: {one:.1f} s → {two:.1f} s "
          f"({one / two:.2f}×)")


if __name__ == "__main__":
    main()
