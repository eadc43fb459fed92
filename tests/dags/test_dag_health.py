"""The publish task and the health verdict, with ``dag.test()``: a truncated shard fails publish before any
Asset event; a warning publishes and calls the configured notifier with the verdict in its template."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from tests.dags.dagrun_helpers import load_dag, states

pytestmark = pytest.mark.slow


def manifest_events(run_id: str) -> list:
    from airflow.models.asset import AssetEvent, AssetModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        return session.scalars(select(AssetEvent).join(AssetModel, AssetEvent.asset_id == AssetModel.id)
                               .where(AssetModel.name == "sieve-manifest", AssetEvent.source_run_id == run_id)).all()


def test_a_failed_verdict_fails_publish_and_emits_no_asset_event(airflow_db, demo_pool, tmp_path):
    pool = tmp_path / "pool"
    shutil.copytree(demo_pool, pool)
    os.truncate(pool / "00000001.tar", (pool / "00000001.tar").stat().st_size // 2)
    run = tmp_path / "run"
    dagrun = load_dag("sieve_curation").test(run_conf={
        "input": str(pool), "run": str(run), "profile": "test", "health_rules": {"failure_rate_failed": 0.06}})
    assert dagrun.state == "failed"
    got = states(dagrun)
    assert got[("aggregate", -1)] == "success" and got[("publish", -1)] == "failed"
    assert manifest_events(dagrun.run_id) == []
    assert json.loads((run / "manifest" / "summary.json").read_text())["health"]["verdict"] == "failed"
    assert (run / "manifest" / "report.html").exists() and not (run / "manifest" / "_SUCCESS").exists()


def test_a_warning_publishes_and_notifies(airflow_db, demo_pool, tmp_path):
    from airflow.sdk import BaseNotifier

    heard = tmp_path / "notified.txt"

    class FileNotifier(BaseNotifier):
        """A real notifier: its template is rendered with the task context, then it writes the message."""

        template_fields = ("message",)

        def __init__(self, message: str):
            super().__init__()
            self.message = message

        def notify(self, context):
            heard.write_text(self.message)

    dag = load_dag("sieve_curation")
    dag.get_task("publish").on_warning_callback = [
        FileNotifier("{{ sieve_health.verdict }} {{ sieve_health.findings[0].rule }} {{ sieve_report_url }}")]
    run = tmp_path / "run"
    dagrun = dag.test(run_conf={"input": demo_pool, "run": str(run), "profile": "test",
                                "health_rules": {"failure_rate_warning": 0.01}})
    assert dagrun.state == "success", states(dagrun)
    assert heard.read_text().startswith("warning failure_rate /sieve/run?uri=")
    health = json.loads((run / "manifest" / "summary.json").read_text())["health"]
    assert [f["rule"] for f in health["findings"] if f["level"] == "warning"] == ["failure_rate"]  # manual run
    events = manifest_events(dagrun.run_id)
    assert len(events) == 1 and events[0].extra["verdict"] == "warning"
    assert (run / "manifest" / "_SUCCESS").exists()


def test_unknown_health_rules_fail_planning(airflow_db, demo_pool, tmp_path):
    dagrun = load_dag("sieve_curation").test(run_conf={"input": demo_pool, "run": str(tmp_path / "run"),
                                                       "profile": "test", "health_rules": {"failure": 0.5}})
    assert dagrun.state == "failed" and states(dagrun)[("list_shards", -1)] == "failed"
