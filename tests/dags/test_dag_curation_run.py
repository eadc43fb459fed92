"""sieve_curation, run for real with ``dag.test()`` in local mode (test profile, demo pool)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.dags.dagrun_helpers import labels, run_dag, stage_rows, states, uids, xcoms

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def reference(demo_pool, tmp_path_factory) -> Path:
    """The library's own end-to-end run of the same pool and settings."""
    from sieve_tasks.runner import run_all
    from sieve_tasks.settings import Settings

    run = tmp_path_factory.mktemp("reference") / "run"
    run_all(demo_pool, str(run), Settings(profile="test"), progress=False)
    return run


@pytest.fixture(scope="module")
def local_run(airflow_db, demo_pool, tmp_path_factory):
    run = tmp_path_factory.mktemp("dag-local") / "run"
    dagrun = run_dag("sieve_curation", {"input": demo_pool, "run": str(run), "profile": "test"})
    return dagrun, run


def test_local_mode_publishes_the_same_subset_as_run_all(local_run, reference):
    dagrun, run = local_run
    assert dagrun.state == "success", states(dagrun)
    produced = (run / "manifest" / "subset.npy").read_bytes()
    assert produced == (reference / "manifest" / "subset.npy").read_bytes()
    assert (run / "manifest" / "_SUCCESS").exists()
    import json

    ours, theirs = (json.loads((r / "manifest" / "summary.json").read_text()) for r in (run, reference))
    assert ours["counts"] == theirs["counts"] == {**theirs["counts"], "read": 17, "failed": 1}
    assert ours["thresholds"] == theirs["thresholds"]
    assert stage_rows(run) == stage_rows(reference)


def test_mapped_instances_are_labelled_with_shard_ids(local_run):
    dagrun, _ = local_run
    for task_id in ("local_batch.caption", "local_batch.embed", "local_batch.score"):
        assert labels(dagrun, task_id) == ["00000000", "00000001"]
    got = states(dagrun)
    assert got[("choose_mode", -1)] == "success"
    assert {got[(t, -1)] for t in ("pod_batch.caption", "pod_batch.embed", "pod_batch.score")} == {"skipped"}
    assert xcoms(dagrun, "list_shards") == [[["00000000"], ["00000001"]]]
    plan = xcoms(dagrun, "list_shards", "plan")[0]
    assert plan["mode"] == "local" and plan["shards"] == 2 and plan["settings"]["profile"] == "test"


def test_publish_updates_the_manifest_asset_and_links_the_summary(local_run):
    from airflow.models.asset import AssetEvent, AssetModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    dagrun, run = local_run
    with create_session() as session:
        events = session.scalars(select(AssetEvent).join(AssetModel, AssetEvent.asset_id == AssetModel.id)
                                 .where(AssetModel.name == "sieve-manifest",
                                        AssetEvent.source_run_id == dagrun.run_id)).all()
        assert len(events) == 1
        assert events[0].extra["run"] == str(run)
        assert events[0].extra["subset"] == str(run / "manifest" / "subset.npy")
        assert events[0].extra["kept"] == 4
    assert not (run / "_lease.json").exists()
    from urllib.parse import quote

    link = xcoms(dagrun, "publish", "_link_SieveSummaryLink")  # the DAG run's report tab, inside the UI
    assert link == [f"/dags/sieve_curation/runs/{quote(dagrun.run_id, safe='')}/plugin/sieve-run-summary"]
    assert xcoms(dagrun, "list_shards", "run") == [str(run)]


def test_rerunning_neither_duplicates_nor_loses_rows(local_run, demo_pool):
    """A second run into the same directory skips every finished shard; overwrite recomputes the same rows."""
    _, run = local_run
    before, subset = stage_rows(run), (run / "manifest" / "subset.npy").read_bytes()
    before_uids = {stage: uids(run, stage) for stage in ("captions", "embeddings", "scores")}

    again = run_dag("sieve_curation", {"input": demo_pool, "run": str(run), "profile": "test"})
    assert again.state == "success", states(again)
    for task_id in ("local_batch.caption", "local_batch.embed", "local_batch.score"):
        markers = [m for batch in xcoms(again, task_id) for m in batch]
        assert [m["shard"] for m in markers] == ["00000000", "00000001"]
        assert all(m["skipped"] for m in markers), markers
    assert stage_rows(run) == before
    assert (run / "manifest" / "subset.npy").read_bytes() == subset

    # overwrite: every stage recomputes, in one task of two shards this time; same rows, same subset
    forced = run_dag("sieve_curation", {"input": demo_pool, "run": str(run), "profile": "test", "overwrite": True,
                                        "shards_per_task": 2})
    assert forced.state == "success", states(forced)
    assert labels(forced, "local_batch.caption") == ["00000000..00000001 (2 shards)"]
    markers = [m for batch in xcoms(forced, "local_batch.score") for m in batch]
    assert [m["skipped"] for m in markers] == [False, False]
    assert stage_rows(run) == before
    assert {stage: uids(run, stage) for stage in before_uids} == before_uids
    assert (run / "manifest" / "subset.npy").read_bytes() == subset


@pytest.mark.parametrize("conf", [{"fraction": 0.5, "threshold": 0.1}, {"int8": True, "mode": "kubernetes"},
                                  {"profile": "default"}, {"input": "/nonexistent/sieve-pool/"}],
                         ids=["conflicting-selection", "int8-on-gpu-pods", "models-not-offline", "missing-input"])
def test_bad_settings_fail_fast_without_retries(airflow_db, demo_pool, tmp_path, conf):
    dagrun = run_dag("sieve_curation", {"input": demo_pool, "run": str(tmp_path / "run"), "profile": "test", **conf})
    assert dagrun.state == "failed"
    got = states(dagrun)
    assert got[("list_shards", -1)] == "failed"
    assert got[("publish", -1)] == "upstream_failed"
    assert not (tmp_path / "run" / "shards.json").exists()


def test_a_nan_in_the_trigger_conf_is_refused_before_the_run_starts(airflow_db, demo_pool, tmp_path):
    from airflow.sdk.definitions.param import ParamValidationError

    with pytest.raises(ParamValidationError):
        run_dag("sieve_curation", {"input": demo_pool, "run": str(tmp_path / "run"), "profile": "test",
                                   "threshold": float("nan")})
    assert not (tmp_path / "run").exists()


def test_a_run_directory_leased_by_someone_else_is_not_touched(airflow_db, demo_pool, tmp_path):
    """Another writer (a CLI run, another DAG run) holds RUN's lease: list_shards fails, nothing is written."""
    import json
    import time

    run = tmp_path / "run"
    run.mkdir()
    (run / "_lease.json").write_text(json.dumps({"owner": "alice@elsewhere:1", "acquired_at": time.time(),
                                                  "expires_at": time.time() + 600}))
    dagrun = run_dag("sieve_curation", {"input": demo_pool, "run": str(run), "profile": "test"})
    assert dagrun.state == "failed"
    assert states(dagrun)[("list_shards", -1)] == "failed"
    assert sorted(p.name for p in run.iterdir()) == ["_lease.json"]
