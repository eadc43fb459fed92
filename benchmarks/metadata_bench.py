"""``--metadata`` join + aggregate + publish vs DataComp's pandas way, on a synthetic DataComp-layout pool.

    .venv/bin/python benchmarks/metadata_bench.py --rows 20000000

Generates, with DuckDB: ``metadata/*.parquet`` (uid, clip_l14_similarity_score as float32, one row per uid, in an
order unrelated to the shards) and the run's ``scores/*.parquet`` for the first 90 % of those uids (the rest are
downloads that failed). Then times, each in its own process so that peak RSS is its own:
(a) DataComp's way (baselines/apply_filter.py's clip_score filter, re-implemented with its pandas calls, one
worker): load the score column of every metadata file, full sort for the threshold, a second pass collecting uids
in a Python loop, sort, np.save;
(b) ours: ``aggregate --metadata --clip-from-metadata l14 --score clip --population metadata`` + ``publish``.
Prints wall time, peak RSS, the ratios and whether both subset.npy files are byte-identical.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

from aggregate_bench import measure  # a sibling script: benchmarks/ is on the path when run as one

HERE = os.path.dirname(os.path.abspath(__file__))
KEY = "clip_l14_similarity_score"


def generate(work: str, rows: int, metadata_files: int, score_files: int) -> None:
    import duckdb

    sys.path.insert(0, HERE)
    from aggregate_bench import generate as generate_scores

    generate_scores(os.path.join(work, "run"), int(rows * 0.9), score_files)  # uid = md5(i), i < 90 % of rows
    metadata = os.path.join(work, "metadata")
    os.makedirs(metadata, exist_ok=True)
    con = duckdb.connect()
    con.execute("SET enable_progress_bar = false")
    per_file = -(-rows // metadata_files)
    for part in range(metadata_files):
        con.execute(f"""
            COPY (SELECT md5(i::VARCHAR) AS uid, ((hash(i * 13 + 5) % 1000003) / 1000003.0 * 0.4)::FLOAT AS {KEY}
                  FROM range({rows}) t(i) WHERE hash(i) % {metadata_files} = {part}
                  ORDER BY hash(i * 31))
            TO '{os.path.join(metadata, f"{part:016x}.parquet")}' (FORMAT parquet, COMPRESSION zstd)
        """)
    print(f"metadata: {rows:,} rows in {metadata_files} files (~{per_file:,} each)")


def datacomp_way(work: str, fraction: float, out: str) -> None:
    """baselines/apply_filter.py: get_threshold (load the column of every file, sort) + load_uids_with_clip_score."""
    import numpy as np
    import pandas as pd

    metadata = os.path.join(work, "metadata")
    paths = sorted(os.path.join(metadata, f) for f in os.listdir(metadata) if ".parquet" in f)
    df = pd.concat([pd.read_parquet(p, columns=[KEY]) for p in paths])
    n = int(len(df) * fraction)
    threshold = -np.sort(-df[KEY].values)[n]
    del df
    parts = []
    for p in paths:
        df = pd.read_parquet(p, columns=["uid", KEY])
        parts.append(np.array([(int(uid[:16], 16), int(uid[16:32], 16)) for uid in df[df[KEY] >= threshold]["uid"].values],
                              np.dtype("u8,u8")))
    uids = np.concatenate(parts)
    uids.sort()
    np.save(out, uids)


def ours(work: str, fraction: float, out: str) -> None:
    from sieve_tasks.settings import Settings
    from sieve_tasks.stages.aggregate import aggregate
    from sieve_tasks.stages.publish import publish

    run = os.path.join(work, "run")
    aggregate(run, Settings(metadata=os.path.join(work, "metadata"), clip_from_metadata="l14", score="clip",
                            population="metadata", fraction=fraction, clip="none", overwrite=True))
    publish(run)
    shutil.copyfile(os.path.join(run, "manifest", "subset.npy"), out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=20_000_000, help="metadata rows (90 %% of them are scored)")
    parser.add_argument("--metadata-files", type=int, default=64)
    parser.add_argument("--score-files", type=int, default=400)
    parser.add_argument("--fraction", type=float, default=0.3)
    parser.add_argument("--workdir", default=None, help="where to generate (default: a temporary directory)")
    args = parser.parse_args()

    work = args.workdir or tempfile.mkdtemp(prefix="sieve-metabench-")
    if not os.path.exists(os.path.join(work, "metadata")):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {HERE!r}); import metadata_bench as b; "
                        f"b.generate({work!r}, {args.rows}, {args.metadata_files}, {args.score_files})"], check=True)
        print(f"generated in {time.perf_counter() - started:.1f} s")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB")
    results = {}
    for which in ("datacomp_way", "ours"):
        results[which] = measure(which, work, args.fraction, os.path.join(work, f"{which}.npy"), "metadata_bench")
        print(f"{which:>13}: {results[which]['seconds']:8.1f} s   peak RSS {results[which]['peak_rss_gb']:.2f} GB")
    base, mine = results["datacomp_way"], results["ours"]
    same = open(os.path.join(work, "datacomp_way.npy"), "rb").read() == open(os.path.join(work, "ours.npy"), "rb").read()
    print(f"speed-up {base['seconds'] / mine['seconds']:.2f}x   memory {mine['peak_rss_gb'] / base['peak_rss_gb']:.2f} "
          f"of baseline   identical subset.npy: {same}")
    if not args.workdir:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
