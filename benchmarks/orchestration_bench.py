"""Orchestration overhead: `sieve_curation` through `airflow dags test` vs `sieve run` on the same shards.

    .venv/bin/python benchmarks/orchestration_bench.py [--shards 4 --repeats 2]

Both run the test profile on a `make-sample` pool in fresh run directories, as separate processes (model
loading included in both). Prints both wall times, the DAG's extra time per task instance, and what
that fixed cost is as a share of a mapped task's work at a realistic shard size (10,000 samples), using
the per-sample stage time measured by `sieve run` itself.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(REPO, ".venv", "bin")


def timed(command: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{command[:3]} failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}")
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="sieve-orchbench-")
    home = os.path.join(work, "airflow_home")
    env = dict(os.environ, AIRFLOW_HOME=home, AIRFLOW__CORE__DAGS_FOLDER=os.path.join(REPO, "dags"),
               AIRFLOW__CORE__PLUGINS_FOLDER=os.path.join(REPO, "plugins"), AIRFLOW__CORE__LOAD_EXAMPLES="False",
               AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=f"sqlite:///{home}/airflow.db", HF_HUB_OFFLINE="1",
               SIEVE_CACHE=os.path.join(work, "cache"), PYTHONPATH=os.path.join(REPO, "dags"),
               PATH=BIN + os.pathsep + os.environ["PATH"])
    subprocess.run([os.path.join(BIN, "airflow"), "db", "migrate"], env=env, check=True, capture_output=True)
    pool = os.path.join(work, "pool")
    subprocess.run([os.path.join(BIN, "sieve"), "make-sample", pool, "--shards", str(args.shards)], env=env,
                   check=True, capture_output=True)
    cli, dag = [], []
    for i in range(args.repeats):
        run = os.path.join(work, f"cli-{i}")
        cli.append(timed([os.path.join(BIN, "sieve"), "run", pool, run, "--profile", "test", "--no-progress"], env))
        conf = json.dumps({"input": pool, "run": os.path.join(work, f"dag-{i}"), "profile": "test"})
        dag.append(timed([os.path.join(BIN, "airflow"), "dags", "test", "sieve_curation", "-c", conf], env))
    summary = json.load(open(os.path.join(work, "cli-0", "manifest", "summary.json")))
    samples = summary["counts"]["read"]
    stage_seconds = sum(summary["timings_seconds"][k] for k in ("caption", "embed", "score"))
    # instances: list_shards, choose_mode, 3 local stages per shard, 3 skipped pod tasks, aggregate, publish
    instances = 2 + 3 * args.shards + 3 + 2
    cli_s, dag_s = statistics.median(cli), statistics.median(dag)
    per_task = (dag_s - cli_s) / instances
    per_sample = stage_seconds / samples
    realistic = per_sample * 10_000 / 3  # one stage of one 10,000-sample shard
    print(f"pool: {args.shards} shards, {samples} samples; test profile; medians of {args.repeats}")
    print(f"sieve run: {cli_s:.1f} s   airflow dags test: {dag_s:.1f} s   ratio {dag_s / cli_s:.2f}x")
    print(f"fixed cost per task instance: {per_task:.2f} s ({instances} instances)")
    print(f"stage work at 10,000 samples/shard (test-profile models, {per_sample * 1000:.0f} ms/sample over 3 "
          f"stages): {realistic:.0f} s per task -> overhead {100 * per_task / (per_task + realistic):.2f} %")
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
