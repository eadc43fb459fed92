"""``sieve run`` end to end on the make-sample pool with the test profile."""

import json
import os
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

from sieve_tasks.cli import main


def _summary(run):
    return json.loads(open(os.path.join(run, "manifest", "summary.json")).read())


def test_run_writes_every_output(test_profile_run):
    for stage in ("captions", "embeddings", "scores"):
        for shard in ("00000000", "00000001"):
            assert os.path.exists(os.path.join(test_profile_run, stage, f"{shard}.parquet"))
            assert os.path.exists(os.path.join(test_profile_run, stage, "_done", f"{shard}.json"))
    for name in ("shards.json", "thresholds.json", "manifest/subset.npy", "manifest/kept.parquet",
                 "manifest/summary.json", "manifest/_SUCCESS"):
        assert os.path.exists(os.path.join(test_profile_run, name)), name


def test_summary_counts_add_up_and_say_test_profile(test_profile_run):
    summary = _summary(test_profile_run)
    counts = summary["counts"]
    assert counts == {"read": 17, "scored": 16, "failed": 1, "duplicates": 0, "kept": counts["kept"],
                      "expected": 17, "expected_unknown_shards": 0, "missing_from_tar": 0}
    assert counts["read"] == counts["scored"] + counts["failed"]
    assert summary["failed_by_reason"] == {"undecodable_image": 1}
    assert summary["profile"] == "test" and "TEST PROFILE" in summary["warning"]
    assert summary["models"]["captioner"] == "test:tiny-blip"
    assert summary["models"]["text_encoder"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert set(summary["timings_seconds"]) == {"caption", "embed", "score", "aggregate"}
    assert summary["captioning"]["captioned"] == 16


def test_kept_set_follows_the_fraction_rule(test_profile_run):
    scores = pq.read_table(os.path.join(test_profile_run, "scores")).to_pylist()
    ok = [r for r in scores if r["status"] == "ok"]
    values = np.array([r["sieve_score"] for r in ok])
    n = int(len(values) * 0.2)
    threshold = -np.sort(-values)[n]
    expected = [r["uid"] for r in ok if r["sieve_score"] >= threshold]  # pool order (shard, position)
    kept = pq.read_table(os.path.join(test_profile_run, "manifest", "kept.parquet")).column("uid").to_pylist()
    assert kept == expected
    assert _summary(test_profile_run)["thresholds"]["threshold"] == pytest.approx(threshold)


def test_subset_npy_is_datacomp_format(test_profile_run):
    subset = np.load(os.path.join(test_profile_run, "manifest", "subset.npy"))
    assert subset.dtype == np.dtype([("f0", "<u8"), ("f1", "<u8")])
    assert np.array_equal(subset, np.sort(subset))
    kept = pq.read_table(os.path.join(test_profile_run, "manifest", "kept.parquet")).column("uid").to_pylist()
    decoded = [f"{int(a):016x}{int(b):016x}" for a, b in subset]
    assert decoded == sorted(kept)
    # DataComp's resharder looks uids up with np.searchsorted
    for uid in kept:
        key = np.array([(int(uid[:16], 16), int(uid[16:], 16))], np.dtype("u8,u8"))
        assert subset[np.searchsorted(subset, key)[0]] == key[0]


def test_captions_are_eight_per_image_with_prompt_stripped(test_profile_run):
    captions = pq.read_table(os.path.join(test_profile_run, "captions")).to_pylist()
    ok = [r for r in captions if r["status"] == "ok"]
    assert all(len(r["captions"]) == 8 for r in ok)
    assert not any(c.startswith("a picture of") for r in ok for c in r["captions"])


def test_rerun_skips_everything_and_republish_is_byte_identical(test_profile_run, sample_pool, capsys):
    manifest = os.path.join(test_profile_run, "manifest")
    before = _files(manifest)
    assert main(["caption", sample_pool, test_profile_run, "--profile", "test"]) == 0
    assert capsys.readouterr().out.count("skipped (complete)") == 2
    assert main(["run", sample_pool, test_profile_run, "--profile", "test", "--no-progress"]) == 0
    assert main(["publish", test_profile_run]) == 0
    assert _files(manifest) == before


def _files(directory):
    """Every file of a directory, by name (the ``_tmp`` staging folder is not part of the output)."""
    return {name: open(os.path.join(directory, name), "rb").read() for name in os.listdir(directory)
            if os.path.isfile(os.path.join(directory, name))}


def test_captioning_is_reproducible_for_a_seed(test_profile_run, sample_pool, tmp_path):
    run = str(tmp_path / "again")
    assert main(["caption", sample_pool, run, "--profile", "test", "--shards", "00000001"]) == 0
    again = pq.read_table(os.path.join(run, "captions", "00000001.parquet")).column("captions").to_pylist()
    first = pq.read_table(os.path.join(test_profile_run, "captions", "00000001.parquet")).column("captions").to_pylist()
    assert again == first


def test_cli_errors_are_clear(sample_pool, tmp_path, capsys):
    assert main(["run", str(tmp_path / "nothing"), str(tmp_path / "r"), "--profile", "test"]) == 2
    assert f"input location does not exist: {tmp_path / 'nothing'}" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["run", str(tmp_path / "empty"), str(tmp_path / "r"), "--profile", "test"]) == 2
    assert "no .tar shards" in capsys.readouterr().err
    assert main(["run", sample_pool, str(tmp_path / "r"), "--score", "fused", "--weights", "sieve=0.7,clip=0.7"]) == 2
    assert "must sum to 1.0" in capsys.readouterr().err
    assert main(["run", sample_pool, str(tmp_path / "r"), "--score", "clip", "--clip", "none"]) == 2
    assert "needs CLIP" in capsys.readouterr().err


def test_console_script_is_installed():
    result = subprocess.run([os.path.join(os.path.dirname(sys.executable), "sieve"), "--help"],
                            capture_output=True, text=True)
    assert result.returncode == 0 and "make-sample" in result.stdout


def test_clip_from_datacomp_metadata_needs_no_clip_model(sample_pool, tmp_path, monkeypatch):
    """With --clip-from-metadata the shard parquet's clip_b32_similarity_score is the CLIP score."""
    import shutil

    import pyarrow as pa

    pool = tmp_path / "pool"
    shutil.copytree(sample_pool, pool)
    for shard in ("00000000", "00000001"):
        table = pq.read_table(pool / f"{shard}.parquet")
        scores = [0.1 + 0.01 * i for i in range(table.num_rows)]
        pq.write_table(table.append_column("clip_b32_similarity_score", pa.array(scores)), pool / f"{shard}.parquet")
    run = tmp_path / "run"

    def no_clip(*args, **kwargs):
        raise AssertionError("CLIP must not be loaded when its scores come from the metadata")

    monkeypatch.setattr("sieve_tasks.encoders.ClipEncoder.__init__", no_clip)
    assert main(["run", str(pool), str(run), "--profile", "test", "--clip-from-metadata", "b32", "--score", "clip",
                 "--no-progress"]) == 0
    metadata = {r["uid"]: r["clip_b32_similarity_score"]
                for s in ("00000000", "00000001") for r in pq.read_table(pool / f"{s}.parquet").to_pylist()}
    scored = [r for r in pq.read_table(run / "scores").to_pylist() if r["status"] == "ok"]
    assert scored and all(r["clip_score"] == metadata[r["uid"]] for r in scored)
    assert _summary(str(run))["thresholds"]["score"] == "clip"


def test_int8_run_is_recorded_and_recomputes_the_model_stages(test_profile_run, sample_pool, tmp_path):
    """--int8 is part of the caption and embed fingerprints: an fp32 run's shards are not reused for it."""
    import shutil

    run = str(tmp_path / "run")
    shutil.copytree(test_profile_run, run)
    assert main(["run", sample_pool, run, "--profile", "test", "--fraction", "0.3", "--int8", "--no-progress"]) == 0
    summary = _summary(run)
    assert summary["settings"]["captions"]["int8"] is True and summary["settings"]["embeddings"]["int8"] is True
    fp32 = pq.read_table(os.path.join(test_profile_run, "embeddings", "00000000.parquet")).column(
        "caption_embeddings").to_pylist()
    int8 = pq.read_table(os.path.join(run, "embeddings", "00000000.parquet")).column("caption_embeddings").to_pylist()
    assert fp32 != int8


def test_int8_is_fingerprinted_only_when_on():
    """Runs written before --int8 existed keep their fingerprints: the option is left out while off."""
    from sieve_tasks.settings import CAPTION_SETTINGS, EMBED_SETTINGS, Settings

    for names in (CAPTION_SETTINGS, EMBED_SETTINGS):
        assert "int8" not in Settings().fingerprinted(names)
        assert Settings(int8=True).fingerprinted(names)["int8"] is True
    with pytest.raises(ValueError, match="--int8"):
        Settings(int8=True, dtype="bf16")


@pytest.mark.parametrize("shards", ["", ","])
def test_an_empty_shard_list_is_refused_not_taken_for_every_shard(sample_pool, tmp_path, capsys, shards):
    assert main(["caption", sample_pool, str(tmp_path / "run"), "--profile", "test", "--shards", shards]) == 2
    assert "--shards names no shard" in capsys.readouterr().err
    assert not (tmp_path / "run" / "captions").exists()


def test_a_sample_pool_needs_a_shard(tmp_path, capsys):
    assert main(["make-sample", str(tmp_path / "pool"), "--shards", "0"]) == 2
    assert "at least one shard" in capsys.readouterr().err
