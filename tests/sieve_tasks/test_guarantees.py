"""What a green run guarantees (README "Guarantees"): every expected sample accounted for, no stale or mixed
output, one writer per run, errors that name their cause. Each test reproduces a way runs used to lie."""

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading

import pyarrow.parquet as pq
import pytest

from sieve_tasks import lease, storage
from sieve_tasks.cli import main
from sieve_tasks.sample_pool import make_sample_pool

pytestmark = pytest.mark.slow

TEST_RUN = ["--profile", "test", "--no-progress"]


def _summary(run) -> dict:
    return json.loads(open(os.path.join(run, "manifest", "summary.json")).read())


def _same_manifest(run, reference) -> None:
    for name in ("subset.npy", "kept.parquet"):
        assert open(os.path.join(run, "manifest", name), "rb").read() == \
            open(os.path.join(reference, "manifest", name), "rb").read(), name
    for part in ("captions", "scores"):
        assert pq.read_table(os.path.join(run, part)).equals(pq.read_table(os.path.join(reference, part))), part


@pytest.fixture
def pool_copy(sample_pool, tmp_path):
    pool = tmp_path / "pool"
    shutil.copytree(sample_pool, pool)
    return pool


# 1. Silent loss ---------------------------------------------------------------------------------------------

def test_a_truncated_shard_accounts_for_every_sample_its_sidecar_lists(pool_copy, tmp_path, capsys):
    os.truncate(pool_copy / "00000001.tar", 5000)  # 9 samples listed; the first is cut, 8 are gone
    run = tmp_path / "run"
    assert main(["run", str(pool_copy), str(run), *TEST_RUN]) == 3  # published, with the verdict "failed"
    assert _summary(run)["health"]["verdict"] == "failed" and not (run / "manifest" / "_SUCCESS").exists()
    counts, reasons = _summary(run)["counts"], _summary(run)["failed_by_reason"]
    assert counts["read"] == 17 and counts["expected"] == 17 and counts["expected_unknown_shards"] == 0
    assert reasons == {"missing_from_tar": 8, "truncated_tar": 1}
    missing = [r for r in pq.read_table(run / "captions" / "00000001.parquet").to_pylist()
               if r["reason"] == "missing_from_tar"]
    listed = pq.read_table(pool_copy / "00000001.parquet").to_pylist()
    assert {(r["key"], r["uid"], r["url"]) for r in missing} == {(x["key"], x["uid"], x["url"]) for x in listed[1:]}


def test_without_sidecars_the_expected_count_is_unknown(pool_copy, tmp_path, capsys):
    for sidecar in glob.glob(str(pool_copy / "*.parquet")) + glob.glob(str(pool_copy / "*_stats.json")):
        os.unlink(sidecar)
    run = tmp_path / "run"
    assert main(["run", str(pool_copy), str(run), *TEST_RUN]) == 0
    counts = _summary(run)["counts"]
    assert counts["expected"] is None and counts["expected_unknown_shards"] == 2
    assert "expected: unknown for 2 shards" in capsys.readouterr().out


def test_stats_json_alone_gives_the_count(pool_copy, tmp_path):
    os.unlink(pool_copy / "00000000.parquet")
    run = tmp_path / "run"
    assert main(["caption", str(pool_copy), str(run), "--profile", "test", "--shards", "00000000"]) == 0
    marker = json.loads((run / "captions" / "_done" / "00000000.json").read_text())
    assert (marker["expected"], marker["expected_source"]) == (8, "stats")


# 2. Input changed -------------------------------------------------------------------------------------------

def _replace_last_shard(pool, tmp_path) -> None:
    """The last shard re-downloaded without its corrupt sample: same id and path, other content."""
    other = tmp_path / "redownload"
    make_sample_pool(str(other), with_bad_sample=False)
    for name in ("00000001.tar", "00000001.parquet", "00000001_stats.json"):
        shutil.copyfile(other / name, pool / name)


def test_a_fixed_shard_is_recomputed_not_skipped(pool_copy, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["run", str(pool_copy), str(run), *TEST_RUN]) == 0
    assert _summary(run)["counts"]["failed"] == 1
    _replace_last_shard(pool_copy, tmp_path)
    capsys.readouterr()
    assert main(["caption", str(pool_copy), str(run), "--profile", "test"]) == 0
    out = capsys.readouterr().out
    assert "caption 00000000: 8 ok, 0 failed, skipped (complete)" in out
    assert "caption 00000001: 8 ok, 0 failed, skipped" not in out and "caption 00000001: 8 ok, 0 failed" in out


def test_a_tar_swapped_between_stages_is_never_mixed(pool_copy, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["caption", str(pool_copy), str(run), "--profile", "test"]) == 0
    _replace_last_shard(pool_copy, tmp_path)
    assert main(["embed", str(pool_copy), str(run), "--profile", "test", "--shards", "00000001"]) == 2
    assert "00000001.tar changed since the captions stage read it" in capsys.readouterr().err
    assert main(["run", str(pool_copy), str(run), *TEST_RUN]) == 0
    fresh = tmp_path / "fresh"
    assert main(["run", str(pool_copy), str(fresh), *TEST_RUN]) == 0
    _same_manifest(run, fresh)


# 3. Data and marker never disagree; _SUCCESS never describes another manifest ------------------------------

KILL_AFTER_RENAME = """
import os, signal, sys
original, seen = os.replace, [0]
def replace(src, dst, *args, **kwargs):
    original(src, dst, *args, **kwargs)
    if sys.argv[1] in str(dst):
        seen[0] += 1
        if seen[0] == int(sys.argv[2]):
            os.kill(os.getpid(), signal.SIGKILL)  # renamed into place, its marker not written yet
os.replace = replace
from sieve_tasks.cli import main
sys.exit(main(sys.argv[3:]))
"""


def _killed_after_rename(match: str, nth: int, args: list[str]) -> None:
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(KILL_AFTER_RENAME), match, str(nth), *args],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]


@pytest.mark.parametrize("written, other", [
    ("/captions/00000000.parquet", ["--seed", "7"]),
    ("/embeddings/00000000.parquet", ["--mask-mode", "word"]),
    ("/scores/00000000.parquet", ["--mask-phrases", "long"]),
    ("/thresholds.json", ["--fraction", "0.5"]),
], ids=["captions", "embeddings", "scores", "aggregate"])
def test_change_a_setting_kill_after_rename_change_back(written, other, sample_pool, test_profile_run, tmp_path):
    """An output renamed into place under another setting, killed before its marker: going back to the first
    setting recomputes it (the marker matches, the data does not) and equals the uninterrupted run."""
    run = tmp_path / "run"
    shutil.copytree(test_profile_run, run)
    _killed_after_rename(written, 1, ["run", sample_pool, str(run), *TEST_RUN, "--overwrite", *other])
    assert main(["run", sample_pool, str(run), *TEST_RUN]) == 0
    _same_manifest(run, test_profile_run)


@pytest.mark.parametrize("name", ["kept.parquet", "subset.npy", "summary.json"])
def test_a_killed_republish_never_leaves_success_describing_another_manifest(name, test_profile_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(test_profile_run, run)
    assert main(["aggregate", str(run), "--fraction", "0.5"]) == 0
    _killed_after_rename(f"/manifest/{name}", 1, ["publish", str(run)])
    assert not (run / "manifest" / "_SUCCESS").exists()
    assert main(["publish", str(run)]) == 0
    success = json.loads((run / "manifest" / "_SUCCESS").read_text())
    assert success["kept"] == _summary(run)["counts"]["kept"] == 9  # n = int(16 * 0.5) = 8: ranks 0..8 kept


def test_temporaries_are_out_of_readers_sight_and_swept(test_profile_run, sample_pool, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(test_profile_run, run)
    leftover = run / "scores" / "_tmp" / "00000000.parquet.deadbeef"
    leftover.parent.mkdir(exist_ok=True)
    leftover.write_bytes(b"PAR1 half a file")
    assert sorted(os.path.basename(p) for p in glob.glob(str(run / "scores" / "*.parquet"))) == \
        ["00000000.parquet", "00000001.parquet"]  # the README's on-call query never sees it
    assert main(["score", sample_pool, str(run), "--profile", "test", "--overwrite", "--shards", "00000000"]) == 0
    assert not leftover.exists()


# 4. Two writers at once -------------------------------------------------------------------------------------

def _race(run: str, contenders: int = 8) -> list[str]:
    barrier, winners = threading.Barrier(contenders), []

    def contend(i: int) -> None:
        barrier.wait()
        try:
            lease.acquire(run, f"writer-{i}", ttl=60)
            winners.append(f"writer-{i}")
        except lease.LeaseHeld:
            pass

    threads = [threading.Thread(target=contend, args=(i,)) for i in range(contenders)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return winners


def test_two_writers_at_the_same_instant_exactly_one_wins_locally(tmp_path):
    for attempt in range(10):
        winners = _race(str(tmp_path / f"run{attempt}"))
        assert len(winners) == 1, winners
        assert json.loads((tmp_path / f"run{attempt}" / "_lease.json").read_text())["owner"] == winners[0]


def test_two_writers_at_the_same_instant_exactly_one_wins_on_s3(s3_server):
    for attempt in range(5):
        run = f"s3://sieve-test/races/run{attempt}"
        winners = _race(run)
        assert len(winners) == 1, winners
        assert json.loads(storage.read_bytes(f"{run}/_lease.json"))["owner"] == winners[0]
    probed = {bucket: exact for (_endpoint, bucket), exact in lease._CONDITIONAL_WRITES.items()}
    assert probed["sieve-test"] is True  # moto honours If-None-Match / If-Match


# 5. Glob characters -----------------------------------------------------------------------------------------

def test_glob_characters_in_the_run_path_read_only_that_run(sample_pool, test_profile_run, tmp_path):
    shutil.copytree(test_profile_run, tmp_path / "run1")  # what 'run[12]' would match as a glob
    shutil.copytree(test_profile_run, tmp_path / "run2")
    run = tmp_path / "run[12]"
    assert main(["run", sample_pool, str(run), *TEST_RUN]) == 0
    assert _summary(run)["counts"]["read"] == 17
    _same_manifest(run, test_profile_run)


# 6. NaN / inf -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("args, message", [
    (["--threshold", "nan"], "threshold must be a finite number"),
    (["--fraction", "inf"], "fraction must be a finite number"),
    (["--score", "fused", "--weights", "sieve=nan,clip=0.5"], "finite numbers in [0, 1]"),
    (["--score", "fused", "--weights", "sieve=1.5,clip=-0.5"], "finite numbers in [0, 1]"),
])
def test_non_finite_selection_is_refused(args, message, test_profile_run, capsys):
    assert main(["aggregate", test_profile_run, *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.parametrize("args, message", [
    (["--repetition-penalty", "0"], "repetition_penalty must be above 0"),
    (["--repetition-penalty", "-1.1"], "repetition_penalty must be above 0"),
    (["--top-p", "-0.5"], "top_p must be in [0, 1]"),
    (["--top-p", "1.5"], "top_p must be in [0, 1]"),
    (["--min-length", "-4"], "min_length must be at least 0"),
    (["--max-length", "0"], "max_length must be at least 1"),
    (["--image-size", "0"], "image_size must be at least 1"),
    (["--max-length", "3"], "max_length 3 leaves no room for a caption after the prompt's 4 tokens"),
])
def test_decoding_settings_transformers_refuses_are_refused(args, message, sample_pool, tmp_path, capsys):
    """The fast decoder would decode them silently (a penalty of 0: every caption empty); transformers raises."""
    assert main(["caption", sample_pool, str(tmp_path / "run"), "--profile", "test", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.parametrize("name, value", [("threshold", float("nan")), ("threshold", float("inf")),
                                         ("fraction", float("nan")), ("weights", {"sieve": float("nan"), "clip": 0.5}),
                                         ("weights", {"sieve": float("-inf"), "clip": 0.5})])
def test_dag_params_refuse_non_finite_numbers_like_the_cli(name, value):
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "dags"))
    from airflow.sdk.definitions.param import ParamValidationError
    from sieve_airflow.params import selection_params

    param = selection_params()[name]
    with pytest.raises(ParamValidationError):
        param.resolve(value)
    assert param.resolve({"sieve": 0.25, "clip": 0.75} if name == "weights" else 0.5) is not None
    assert selection_params()[name].resolve(None if name != "weights" else {"sieve": 0.0, "clip": 1.0}) \
        == (None if name != "weights" else {"sieve": 0.0, "clip": 1.0})


# 7. Errors that name the cause ------------------------------------------------------------------------------

def test_the_runs_own_error_wins_over_a_failing_lease_release(tmp_path, monkeypatch):
    def broken_release(run, owner):
        raise storage.StorageError("releasing failed: endpoint unreachable")

    monkeypatch.setattr(lease, "release", broken_release)
    with pytest.raises(ValueError, match="the real cause"):
        with lease.hold(str(tmp_path / "run"), "me"):
            raise ValueError("the real cause")


def test_missing_bucket_and_prefix_are_named_and_fail(s3_server, capsys):
    assert main(["run", "s3://no-such-bucket/pool/", "s3://sieve-test/runs/x", *TEST_RUN]) == 2
    assert "bucket 'no-such-bucket' does not exist" in capsys.readouterr().err
    assert main(["run", "s3://sieve-test/no/such/prefix/", "s3://sieve-test/runs/x", *TEST_RUN]) == 2
    assert "input location does not exist: s3://sieve-test/no/such/prefix" in capsys.readouterr().err


def test_a_model_not_available_offline_fails_before_any_work(sample_pool, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["caption", sample_pool, str(run)]) == 2  # the default captioner: no weights on this machine
    err = capsys.readouterr().err
    assert ("captioner Salesforce/blip-image-captioning-base is not available offline: point --captioner at a "
            "local directory or s3:// model store, or use --profile test for a demo") in err
    assert not (run / "captions").exists()


class Payload:
    """Stands for any object a checkpoint could smuggle in: loading it would need pickle to run code."""


def test_a_pickled_checkpoint_is_refused_in_one_line(tmp_path):
    import torch

    from sieve_tasks.encoders import ClipEncoder
    from sieve_tasks.models import Device

    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": Payload()}, evil)
    with pytest.raises(ValueError, match=f"CLIP checkpoint {evil} refused: it holds pickled objects"):
        ClipEncoder(f"ViT-B-32:{evil}", Device.choose("cpu"), 8)
