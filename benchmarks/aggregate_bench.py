"""Aggregate + publish at pool scale vs DataComp's method, on synthetic score files.

    .venv/bin/python benchmarks/aggregate_bench.py --rows 100000000 --files 1000

Generates RUN/scores/*.parquet (unique uids, SIEVE and CLIP scores) with DuckDB, then times, each in its
own process so peak RSS is its own: (a) DataComp's way — pandas loads the score column of every file, a
full sort gives the threshold, a second pass collects uids in a Python loop, np.save; (b) our
`aggregate` + `publish`. Prints wall time, peak RSS, ratios, and whether both subset files are identical.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def generate(run: str, rows: int, files: int) -> None:
    import duckdb
    import pyarrow.parquet as pq

    from sieve_tasks import storage
    from sieve_tasks.stages.base import marker_uri

    scores = os.path.join(run, "scores")
    staging = os.path.join(run, "staging")
    os.makedirs(scores, exist_ok=True)
    per_file = -(-rows // files)
    con = duckdb.connect()
    con.execute("SET enable_progress_bar = false")
    con.execute(f"""
        COPY (
            SELECT md5(i::VARCHAR) AS uid, ('0x' || substr(md5(i::VARCHAR), 1, 16))::UBIGINT AS uid_hi,
                   ('0x' || substr(md5(i::VARCHAR), 17, 16))::UBIGINT AS uid_lo, printf('%08d', i // {per_file}) AS shard,
                   printf('%09d', i) AS key, (i % {per_file})::BIGINT AS position, NULL::VARCHAR AS url,
                   'ok' AS status, NULL::VARCHAR AS reason,
                   ((hash(i) % 1000003) / 1000003.0)::DOUBLE AS sieve_score,
                   ((hash(i * 7 + 1) % 1000003) / 1000003.0 * 0.4)::DOUBLE AS clip_score,
                   NULL::DOUBLE AS sieve_mean, NULL::VARCHAR AS best_caption, TRUE AS passes_basic_filter
            FROM range({rows}) t(i)
        ) TO '{staging}' (FORMAT parquet, PARTITION_BY (shard), WRITE_PARTITION_COLUMNS true, COMPRESSION zstd)
    """)
    shards = {}
    for part in sorted(os.listdir(staging)):
        shard = part.split("=", 1)[1]
        (data,) = os.listdir(os.path.join(staging, part))
        os.replace(os.path.join(staging, part, data), os.path.join(scores, f"{shard}.parquet"))
        rows_here = pq.read_metadata(os.path.join(scores, f"{shard}.parquet")).num_rows
        counts = {"shard": shard, "rows": rows_here, "ok": rows_here, "failed": 0}
        storage.write_json_atomic(marker_uri(run, "scores", shard), {"fingerprint": shard, "seconds": 0.0,
                                                                     "settings": {}, **counts})
        for stage in ("captions", "embeddings"):
            storage.write_json_atomic(marker_uri(run, stage, shard), {
                "fingerprint": shard, "seconds": 0.0, **counts,
                "settings": {"captioner": "synthetic", "captions": None, "text_encoder": "synthetic",
                             "clip": "synthetic", "clip_from_metadata": None}})
        shards[shard] = f"synthetic/{shard}.tar"
    shutil.rmtree(staging)
    storage.write_json_atomic(os.path.join(run, "shards.json"), {"input": "synthetic", "shards": shards})


def datacomp_way(run: str, fraction: float, out: str) -> None:
    """DataComp's baselines: load the score column, sort, then collect the uids above it in Python."""
    import numpy as np
    import pandas as pd

    files = sorted(os.path.join(run, "scores", f) for f in os.listdir(os.path.join(run, "scores"))
                   if f.endswith(".parquet"))
    scores = np.concatenate([pd.read_parquet(f, columns=["sieve_score"])["sieve_score"].to_numpy() for f in files])
    n = int(len(scores) * fraction)
    threshold = -np.sort(-scores)[n]
    del scores
    uids = []
    for f in files:
        df = pd.read_parquet(f, columns=["uid", "sieve_score"])
        for uid in df["uid"][df["sieve_score"] >= threshold]:
            uids.append((int(uid[:16], 16), int(uid[16:32], 16)))
    subset = np.array(uids, np.dtype("u8,u8"))
    subset.sort()
    np.save(out, subset)


def ours(run: str, fraction: float, out: str) -> None:
    from sieve_tasks.settings import Settings
    from sieve_tasks.stages.aggregate import aggregate
    from sieve_tasks.stages.publish import publish

    aggregate(run, Settings(fraction=fraction, clip="none", overwrite=True))
    publish(run)
    shutil.copyfile(os.path.join(run, "manifest", "subset.npy"), out)


def measure(which: str, run: str, fraction: float, out: str, module: str = "aggregate_bench") -> dict:
    """Time ``module.which(run, fraction, out)`` in a fresh process: seconds and peak resident memory."""
    code = (f"import sys, time, json, resource; sys.path.insert(0, {HERE!r}); import {module} as b; "
            f"t = time.perf_counter(); b.{which}({run!r}, {fraction!r}, {out!r}); "
            "print(json.dumps({'seconds': time.perf_counter() - t, "
            "'peak_rss_gb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-3000:])
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=20_000_000)
    parser.add_argument("--files", type=int, default=1000)
    parser.add_argument("--fraction", type=float, default=0.2)
    parser.add_argument("--repeats", type=int, default=1, help="runs of each method (the median is reported)")
    parser.add_argument("--workdir", default=None, help="where to generate (default: a temporary directory)")
    parser.add_argument("--skip-baseline", action="store_true")
    args = parser.parse_args()
    import numpy as np

    work = args.workdir or tempfile.mkdtemp(prefix="sieve-aggbench-")
    run = os.path.join(work, "run")
    if not os.path.exists(os.path.join(run, "shards.json")):
        started = time.perf_counter()
        # in a child process: Linux keeps a process's peak RSS across exec, so the measuring children must
        # be started from a parent that never held the generated data
        subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {HERE!r}); import aggregate_bench as b; "
                        f"b.generate({run!r}, {args.rows}, {args.files})"], check=True)
        print(f"generated {args.rows:,} rows in {args.files} files in {time.perf_counter() - started:.1f} s")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB")
    results = {}
    methods = ["ours"] if args.skip_baseline else ["datacomp_way", "ours"]
    for which in methods:
        runs = [measure(which, run, args.fraction, os.path.join(work, f"{which}.npy")) for _ in range(args.repeats)]
        results[which] = {k: float(np.median([r[k] for r in runs])) for k in ("seconds", "peak_rss_gb")}
        print(f"{which:>13}: {results[which]['seconds']:8.1f} s   peak RSS {results[which]['peak_rss_gb']:.2f} GB")
    if not args.skip_baseline:
        base, mine = results["datacomp_way"], results["ours"]
        same = open(os.path.join(work, "datacomp_way.npy"), "rb").read() == open(os.path.join(work, "ours.npy"), "rb").read()
        print(f"speed-up {base['seconds'] / mine['seconds']:.1f}x   memory {mine['peak_rss_gb'] / base['peak_rss_gb']:.2f} "
              f"of baseline   identical subset.npy: {same}")
    if not args.workdir:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
