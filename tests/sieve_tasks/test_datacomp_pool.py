"""A pool laid out as DataComp's download_upstream.py leaves it: shard parquets holding only uid + key, and a separate
``metadata/`` (several parquet files, rows in an order unrelated to the shards, rows for failed downloads too).
Selections are checked against DataComp's own rule and an independent numpy computation."""

from __future__ import annotations

import io
import json
import os
import stat

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sieve_tasks.cli import main
from tests.shardmaker import ShardBuilder, photo_jpeg

PHOTOS = ["astronaut", "coffee", "chelsea", "rocket", "camera", "cat"]
ENGLISH = "The quick brown fox jumps over the lazy dog near the river bank"


@pytest.fixture(scope="module")
def datacomp_pool(tmp_path_factory):
    """2 shards × 6 samples (one image undecodable) + 8 uids whose download failed; metadata in 3 shuffled files."""
    root = tmp_path_factory.mktemp("datacomp")
    shards, rng = root / "shards", np.random.default_rng(11)
    shards.mkdir()
    pool_uids = []
    for shard in range(2):
        builder, rows = ShardBuilder(), []
        for index, name in enumerate(PHOTOS):
            key = f"{shard:05d}{index:04d}"
            image = b"\xff\xd8 not a jpeg" if (shard, index) == (1, 2) else photo_jpeg(name, 64)
            uid = builder.sample(key, text=f"{ENGLISH} {name}", image=image)
            rows.append({"uid": uid, "key": key})
            pool_uids.append(uid)
        builder.write(shards / f"{shard:08d}.tar")
        pq.write_table(pa.Table.from_pylist(rows), shards / f"{shard:08d}.parquet")  # only uid + key, as img2dataset
    failed = [f"{0xfeed0000 + i:032x}" for i in range(8)]
    uids = pool_uids + failed
    clip_l14 = np.round(rng.uniform(0.1, 0.4, len(uids)), 2).astype(np.float32)  # ties
    table = pa.table({
        "uid": uids, "url": [f"https://example.com/{u}.jpg" for u in uids],
        "text": [f"{ENGLISH} {i}" if i % 3 else "Un gato durmiendo en el sofá de la casa" for i in range(len(uids))],
        "original_width": [300 if i % 4 else 120 for i in range(len(uids))],
        "original_height": [300] * len(uids),
        "clip_b32_similarity_score": pa.array(rng.uniform(0.1, 0.4, len(uids)).astype(np.float32)),
        "clip_l14_similarity_score": pa.array(clip_l14),
    })
    order = rng.permutation(len(uids))
    metadata = root / "metadata"
    metadata.mkdir()
    for part, chunk in enumerate(np.array_split(order, 3)):
        pq.write_table(table.take(pa.array(chunk)), metadata / f"{part:016x}.parquet")
        np.savez(metadata / f"{part:016x}.npz", b32_img=np.zeros((1, 2)))  # DataComp's embeddings live beside them
    run = root / "run"
    assert main(["run", str(shards), str(run), "--profile", "test", "--metadata", str(metadata),
                 "--clip-from-metadata", "l14", "--score", "clip", "--fraction", "0.5", "--population", "metadata",
                 "--no-progress"]) == 0
    return {"shards": shards, "metadata": metadata, "run": run, "table": table, "pool_uids": pool_uids,
            "failed": failed}


def reselect(run, *options: str) -> dict:
    assert main(["aggregate", str(run), *options]) == 0
    assert main(["publish", str(run)]) == 0
    return json.loads((run / "manifest" / "summary.json").read_text())


def datacomp_subset_bytes(uids: list[str], values: np.ndarray, fraction: float) -> bytes:
    """baselines/apply_filter.py's clip_score filter: N = every metadata row, threshold = descending sort at
    int(N·fraction), keep >=, uid halves sorted and np.save'd."""
    n = int(len(values) * fraction)
    threshold = -np.sort(-values)[n]
    kept = np.array([(int(u[:16], 16), int(u[16:32], 16)) for u, v in zip(uids, values) if v >= threshold],
                    np.dtype("u8,u8"))
    kept.sort()
    buffer = io.BytesIO()
    np.save(buffer, kept)
    return buffer.getvalue()


def test_clip_subset_with_the_metadata_population_equals_datacomp_byte_for_byte(datacomp_pool):
    run, table = datacomp_pool["run"], datacomp_pool["table"]
    thresholds = json.loads((run / "thresholds.json").read_text())
    assert thresholds["selection"]["population"] == "metadata"
    assert thresholds["selection"]["candidates"] == table.num_rows == 20  # failed downloads and the bad image count
    assert thresholds["counts"]["failed"] == 1
    expected = datacomp_subset_bytes(table.column("uid").to_pylist(),
                                     table.column("clip_l14_similarity_score").to_numpy(), 0.5)
    assert (run / "manifest" / "subset.npy").read_bytes() == expected
    summary = json.loads((run / "manifest" / "summary.json").read_text())
    assert summary["population"] == "metadata"
    population = summary["counts"]["scored"] - summary["counts"]["duplicates"] + summary["missing_scores"]["unscored_uids"]
    assert summary["missing_scores"]["unscored_uids"] > 0  # uids of the table that no shard holds: kept too
    assert summary["kept_fraction_of_unique"] == summary["counts"]["kept"] / population <= 1
    assert summary["missing_scores"] == {"clip": 0, "unscored_uids": 9}  # 8 failed downloads + 1 undecodable image
    kept = pq.read_table(run / "manifest" / "kept.parquet").to_pylist()
    scored = [r for r in kept if r["shard"] is not None]
    assert [(r["shard"], r["key"]) for r in scored] == sorted((r["shard"], r["key"]) for r in scored)  # pool order
    assert all(r["uid"] in datacomp_pool["failed"] + datacomp_pool["pool_uids"] for r in kept)


def test_scored_population_counts_only_scored_samples(datacomp_pool):
    run, table = datacomp_pool["run"], datacomp_pool["table"]
    summary = reselect(run, "--metadata", str(datacomp_pool["metadata"]), "--clip-from-metadata", "l14",
                       "--score", "clip", "--fraction", "0.5")
    ok = [u for u in datacomp_pool["pool_uids"] if u != datacomp_pool["pool_uids"][8]]  # shard 1, index 2 failed
    values = dict(zip(table.column("uid").to_pylist(), table.column("clip_l14_similarity_score").to_numpy()))
    assert summary["thresholds"]["population"] == "scored" and summary["thresholds"]["candidates"] == len(ok) == 11
    expected = datacomp_subset_bytes(ok, np.array([values[u] for u in ok]), 0.5)
    assert (run / "manifest" / "subset.npy").read_bytes() == expected


def test_fusion_with_an_external_score_equals_numpy(datacomp_pool, tmp_path):
    run, table = datacomp_pool["run"], datacomp_pool["table"]
    rng = np.random.default_rng(3)
    listed = datacomp_pool["pool_uids"][:-1] + datacomp_pool["failed"]  # the last pool sample is not in the table
    flyt = rng.normal(0.0, 3.0, len(listed))  # any range: not a cosine
    external = tmp_path / "flyt"
    external.mkdir()
    pq.write_table(pa.table({"uid": listed[:10], "flyt_score": flyt[:10]}), external / "a.parquet")
    pq.write_table(pa.table({"uid": listed[10:], "flyt_score": flyt[10:]}), external / "b.parquet")
    summary = reselect(run, "--metadata", str(datacomp_pool["metadata"]), "--clip-from-metadata", "l14",
                       "--external-score", f"flyt={external}:flyt_score", "--score", "fused",
                       "--weights", "sieve=0.4,clip=0.3,flyt=0.3", "--fraction", "0.3")

    scores = pq.read_table(run / "scores").to_pandas()
    scores = scores[scores.status == "ok"]
    clip = dict(zip(table.column("uid").to_pylist(), table.column("clip_l14_similarity_score").to_numpy()))
    flyt_of = dict(zip(listed, flyt))
    with_all = scores[scores.uid.isin(flyt_of)]
    parts = {"sieve": scores.sieve_score.to_numpy(), "clip": np.array([clip[u] for u in scores.uid], np.float64),
             "flyt": np.array([flyt_of.get(u, np.nan) for u in scores.uid])}
    normalised = {k: (v - np.nanmin(v)) / (np.nanmax(v) - np.nanmin(v)) for k, v in parts.items()}
    fused = 0.4 * normalised["sieve"] + 0.3 * normalised["clip"] + 0.3 * normalised["flyt"]
    candidates = fused[~np.isnan(fused)]
    threshold = -np.sort(-candidates)[int(len(candidates) * 0.3)]
    expected = sorted(u for u, f in zip(scores.uid, fused) if f >= threshold - 1e-12)

    assert len(with_all) == len(candidates) == summary["thresholds"]["candidates"] == 10
    assert summary["missing_scores"] == {"clip": 0, "flyt": 1, "sieve": 0}
    assert summary["thresholds"]["threshold"] == pytest.approx(threshold, abs=1e-12)
    kept = pq.read_table(run / "manifest" / "kept.parquet")
    assert sorted(kept.column("uid").to_pylist()) == expected
    assert "score_flyt" in kept.column_names


def test_upper_case_uids_in_metadata_and_score_tables(datacomp_pool, tmp_path):
    run, table = datacomp_pool["run"], datacomp_pool["table"]
    upper = tmp_path / "metadata"
    upper.mkdir()
    pq.write_table(table.set_column(0, "uid", pa.array([u.upper() for u in table.column("uid").to_pylist()])),
                   upper / "all.parquet")
    reselect(run, "--metadata", str(upper), "--clip-from-metadata", "l14", "--score", "clip", "--fraction", "0.5",
             "--population", "metadata")
    expected = datacomp_subset_bytes(table.column("uid").to_pylist(),
                                     table.column("clip_l14_similarity_score").to_numpy(), 0.5)
    assert (run / "manifest" / "subset.npy").read_bytes() == expected
    assert all(u == u.lower() for u in pq.read_table(run / "manifest" / "kept.parquet").column("uid").to_pylist())


def test_upper_case_uids_in_the_shard_sidecar(tmp_path):
    """--clip-from-metadata without --metadata reads the parquet beside each tar, whatever the uids' case."""
    pool, builder = tmp_path / "pool", ShardBuilder()
    pool.mkdir()
    rows = []
    for index, name in enumerate(PHOTOS[:4]):
        uid = builder.sample(f"0000000{index}", text=f"{ENGLISH} {name}", image=photo_jpeg(name, 64))
        rows.append({"uid": uid.upper(), "key": f"0000000{index}", "clip_b32_similarity_score": 0.1 * (index + 1)})
    builder.write(pool / "00000000.tar")
    pq.write_table(pa.Table.from_pylist(rows), pool / "00000000.parquet")
    run = tmp_path / "run"
    assert main(["run", str(pool), str(run), "--profile", "test", "--clip-from-metadata", "b32", "--score", "clip",
                 "--fraction", "0.5", "--no-progress"]) == 0
    kept = pq.read_table(run / "manifest" / "kept.parquet").column("uid").to_pylist()
    assert kept == [row["uid"].lower() for row in rows[1:]]  # n = int(4 * 0.5) = 2: keep >= the third best, 0.2


def test_basic_filter_reads_the_metadata_columns(datacomp_pool):
    run, table = datacomp_pool["run"], datacomp_pool["table"]
    reselect(run, "--metadata", str(datacomp_pool["metadata"]), "--clip-from-metadata", "l14", "--score", "clip",
             "--threshold", "-1", "--basic-filter", "--population", "metadata")
    # DataComp's basic filter on the metadata rows: English (every third text is Spanish), > 2 words, > 5 chars,
    # shorter side >= 200 (every fourth is 120 wide), aspect <= 3
    expected = sorted(u for i, u in enumerate(table.column("uid").to_pylist()) if i % 3 and i % 4)
    kept = pq.read_table(run / "manifest" / "kept.parquet").column("uid").to_pylist()
    assert sorted(kept) == expected


def test_a_uid_listed_twice_in_a_score_table_is_refused(datacomp_pool, tmp_path, capsys):
    uid = datacomp_pool["pool_uids"][0]
    pq.write_table(pa.table({"uid": [uid, uid.upper()], "s": [0.1, 0.2]}), tmp_path / "twice.parquet")
    assert main(["aggregate", str(datacomp_pool["run"]), "--external-score", f"x={tmp_path / 'twice.parquet'}:s",
                 "--score", "x"]) == 2
    assert "listed 2 times" in capsys.readouterr().err


def test_duplicates_are_published_for_the_resharder(tmp_path):
    pool, builder = tmp_path / "pool", ShardBuilder()
    pool.mkdir()
    uid = builder.sample("000000000", text=ENGLISH, image=photo_jpeg("astronaut", 64))
    builder.sample("000000001", text=ENGLISH, image=photo_jpeg("coffee", 64), meta={"uid": uid.upper(), "key": "x"})
    builder.sample("000000002", text=ENGLISH, image=photo_jpeg("cat", 64))
    builder.write(pool / "00000000.tar")
    run = tmp_path / "run"
    assert main(["run", str(pool), str(run), "--profile", "test", "--threshold", "-1", "--no-progress"]) == 0
    summary = json.loads((run / "manifest" / "summary.json").read_text())
    assert summary["counts"]["duplicates"] == 1 and summary["counts"]["kept"] == 2
    assert summary["duplicates"]["uids"] == 1 and "resharder copies every sample" in summary["duplicates"]["note"]
    rows = pq.read_table(run / "manifest" / "duplicates.parquet").to_pylist()
    assert [(r["uid"], r["shard"], r["key"], r["occurrence"]) for r in rows] == [
        (uid, "00000000", "000000000", 1), (uid, "00000000", "000000001", 2)]


def test_outputs_are_readable_by_others_under_umask_022(datacomp_pool, tmp_path):
    from sieve_tasks.sample_pool import make_sample_pool

    previous = os.umask(0o022)
    try:
        make_sample_pool(str(tmp_path / "demo"))
        reselect(datacomp_pool["run"], "--metadata", str(datacomp_pool["metadata"]), "--clip-from-metadata", "l14",
                 "--score", "clip", "--fraction", "0.2", "--basic-filter")
    finally:
        os.umask(previous)
    written = [tmp_path / "demo" / n for n in os.listdir(tmp_path / "demo")]
    written += [datacomp_pool["run"] / n for n in ("thresholds.json", "tables/metadata.parquet")]
    written += [datacomp_pool["run"] / "manifest" / n for n in os.listdir(datacomp_pool["run"] / "manifest")]
    written = [p for p in written if p.is_file()]  # the _tmp/ staging folders are directories
    assert {p.name for p in written} >= {"00000000.tar", "00000000_stats.json", "summary.json", "_SUCCESS", "metadata.parquet",
                                         "subset.npy", "kept.parquet", "duplicates.parquet"}
    assert {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in written} == {p.name: "0o644" for p in written}


@pytest.mark.slow
def test_metadata_and_score_tables_on_s3(datacomp_pool, s3_server, tmp_path):
    import fsspec

    from sieve_tasks import storage

    fsspec.filesystem("s3").invalidate_cache()
    run, table = datacomp_pool["run"], datacomp_pool["table"]
    fs, _ = storage.filesystem("s3://sieve-test/datacomp/metadata")
    for name in os.listdir(datacomp_pool["metadata"]):
        fs.put_file(str(datacomp_pool["metadata"] / name), f"sieve-test/datacomp/metadata/{name}")
    pq.write_table(table.select(["uid", "clip_b32_similarity_score"]), tmp_path / "b32.parquet")
    fs.put_file(str(tmp_path / "b32.parquet"), "sieve-test/datacomp/scores/b32.parquet")
    reselect(run, "--metadata", "s3://sieve-test/datacomp/metadata/", "--clip-from-metadata", "l14", "--score", "clip",
             "--fraction", "0.5", "--population", "metadata",
             "--external-score", "b32=s3://sieve-test/datacomp/scores/:clip_b32_similarity_score")
    expected = datacomp_subset_bytes(table.column("uid").to_pylist(),
                                     table.column("clip_l14_similarity_score").to_numpy(), 0.5)
    assert (run / "manifest" / "subset.npy").read_bytes() == expected
    summary = reselect(run, "--metadata", "s3://sieve-test/datacomp/metadata/", "--score", "b32", "--fraction", "0.5",
                       "--population", "metadata",
                       "--external-score", "b32=s3://sieve-test/datacomp/scores/:clip_b32_similarity_score")
    assert summary["tables"]["external_b32"] == {"rows": 20, "invalid_uids": 0, "non_finite_scores": 0}
    expected = datacomp_subset_bytes(table.column("uid").to_pylist(),
                                     table.column("clip_b32_similarity_score").to_numpy(), 0.5)
    assert (run / "manifest" / "subset.npy").read_bytes() == expected


def test_invalid_uids_and_nan_scores_in_a_score_table_are_counted_and_skipped(datacomp_pool, tmp_path):
    listed = datacomp_pool["pool_uids"][:4]
    pq.write_table(pa.table({"uid": listed + ["not-a-uid", None, datacomp_pool["pool_uids"][4]],
                             "s": [0.1, 0.2, 0.3, 0.4, 9.0, 9.0, float("nan")]}), tmp_path / "s.parquet")
    summary = reselect(datacomp_pool["run"], "--external-score", f"x={tmp_path / 's.parquet'}:s", "--score", "x",
                       "--threshold", "0.2")
    assert summary["tables"]["external_x"] == {"rows": 7, "invalid_uids": 2, "non_finite_scores": 1}
    assert summary["missing_scores"] == {"x": 11 - 4}  # the NaN one and the samples the table lacks
    kept = pq.read_table(datacomp_pool["run"] / "manifest" / "kept.parquet").column("uid").to_pylist()
    assert kept == listed[1:]
