"""sieve run's pipelining: the text side in a process of its own gives what the thread gives."""

from __future__ import annotations

import pyarrow.parquet as pq

from sieve_tasks.runner import run_all
from sieve_tasks.settings import Settings


def test_text_side_in_its_own_process_equals_the_thread(sample_pool, test_profile_run, tmp_path):
    run = str(tmp_path / "run")
    summary = run_all(sample_pool, run, Settings(profile="test"), progress=False, text_process=True)
    assert summary["counts"]["read"] == 17
    for name in ("subset.npy", "kept.parquet"):
        assert (tmp_path / "run" / "manifest" / name).read_bytes() == \
            open(f"{test_profile_run}/manifest/{name}", "rb").read(), name
    ours = pq.read_table(f"{run}/scores").sort_by("position").to_pylist()
    reference = pq.read_table(f"{test_profile_run}/scores").sort_by("position").to_pylist()
    assert ours == reference
