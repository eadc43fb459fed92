"""The summary plugin: its FastAPI app against real published runs, with FastAPI's TestClient."""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import quote

import pytest


@pytest.fixture(scope="module")
def published(demo_pool, tmp_path_factory, airflow_db) -> Path:
    """A real published run (test profile) under the run base, as the DAG would leave it."""
    import os

    from sieve_tasks.runner import run_all
    from sieve_tasks.settings import Settings

    run = Path(os.environ["SIEVE_RUN_BASE"]) / "plugin-test-run"
    run_all(demo_pool, str(run), Settings(profile="test"), progress=False)
    return run


@pytest.fixture
def plugin_module(airflow_db):
    import sieve_summary_plugin

    return sieve_summary_plugin


@pytest.fixture
def client(plugin_module):
    from fastapi.testclient import TestClient

    app = plugin_module.app
    app.dependency_overrides[app.state.access_dependency] = lambda: None  # an authorised user
    try:
        yield TestClient(app)
    finally:
        app.dependency_overrides.clear()


def test_plugin_registers_app_views_and_is_loaded_by_airflow(plugin_module):
    plugin = plugin_module.SieveSummaryPlugin
    assert plugin.fastapi_apps[0]["url_prefix"] == "/sieve"
    destinations = {v["destination"]: v["href"] for v in plugin.external_views}
    assert destinations == {"nav": "/sieve/", "dag_run": "/sieve/dag-runs/{DAG_ID}/{RUN_ID}"}

    from airflow import plugins_manager

    names = [p.name for p in plugins_manager._get_plugins()[0]]
    assert "sieve_summary" in names, plugins_manager._get_plugins()[1]


def test_summary_json_matches_the_file(client, published):
    response = client.get("/api/run", params={"uri": str(published)})
    assert response.status_code == 200
    body = response.json()
    assert body["summary"] == json.loads((published / "manifest" / "summary.json").read_text())


def test_summary_page_shows_counts_reasons_thresholds_models_timings_manifest(client, published):
    summary = json.loads((published / "manifest" / "summary.json").read_text())
    page = client.get("/run", params={"uri": str(published)})
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    text = page.text
    assert "<th>read</th><td class='n'>17</td>" in text
    assert "<th>kept</th><td class='n'>4</td>" in text
    assert "<th>undecodable_image</th><td class='n'>1</td>" in text  # failure reason with its count
    assert f"{summary['kept_fraction_of_unique']:.2%}" in text
    assert f"{summary['thresholds']['threshold']:.6g}" in text
    assert "test:tiny-blip" in text and "sentence-transformers/all-MiniLM-L6-v2" in text
    assert str(published / "manifest" / "subset.npy") in text
    assert "Timings" in text and "aggregate" in text
    assert "TEST PROFILE" in text  # the warning of a test-profile run


def test_index_lists_published_runs(client, published):
    page = client.get("/")
    assert page.status_code == 200
    assert f"run?uri={quote(str(published), safe='')}" in page.text


def test_errors_are_clean(client, tmp_path):
    assert client.get("/run", params={"uri": str(tmp_path)}).status_code == 404  # not published
    assert client.get("/run", params={"uri": "relative/run"}).status_code == 400
    assert client.get("/api/run", params={"uri": "http://169.254.169.254/latest"}).status_code == 400  # no SSRF
    assert client.get("/run").status_code == 422
    (tmp_path / "manifest").mkdir()
    (tmp_path / "manifest" / "summary.json").write_text('{"not": "a summary"}')
    assert client.get("/api/run", params={"uri": str(tmp_path)}).status_code == 502


def test_html_is_escaped(client, tmp_path):
    (tmp_path / "manifest").mkdir()
    (tmp_path / "manifest" / "summary.json").write_text(json.dumps(
        {"counts": {"read": 1}, "failed_by_reason": {"<script>alert(1)</script>": 1}}))
    page = client.get("/run", params={"uri": str(tmp_path)})
    assert page.status_code == 200
    assert "<script>alert(1)</script>" not in page.text and "&lt;script&gt;" in page.text


def test_routes_need_an_authenticated_user(plugin_module, published):
    from fastapi.testclient import TestClient

    response = TestClient(plugin_module.app).get("/api/run", params={"uri": str(published)})
    assert response.status_code == 401


@pytest.mark.slow
def test_dag_run_view_follows_the_dag_runs_xcom(client, demo_pool, tmp_path):
    """The DAG-run tab: dag.test() a curation run, then open /dag-runs/<dag>/<run> for it."""
    from tests.dags.dagrun_helpers import run_dag

    run = tmp_path / "run"
    dagrun = run_dag("sieve_curation", {"input": demo_pool, "run": str(run), "profile": "test"})
    assert dagrun.state == "success"
    page = client.get(f"/dag-runs/sieve_curation/{quote(dagrun.run_id, safe='')}")
    assert page.status_code == 200, page.text
    assert str(run) in page.text and "<th>kept</th><td class='n'>4</td>" in page.text
    assert client.get("/dag-runs/sieve_curation/no-such-run").status_code == 404


@pytest.mark.slow
def test_summary_page_shows_caption_cache_hits(client, demo_pool, tmp_path):
    """A second run over the same photos with the same --caption-cache: every caption came from the cache."""
    from sieve_tasks.runner import run_all
    from sieve_tasks.settings import Settings

    settings = Settings(profile="test", caption_cache=str(tmp_path / "cache"))
    run_all(demo_pool, str(tmp_path / "first"), settings, progress=False)
    run_all(demo_pool, str(tmp_path / "second"), settings, progress=False)
    text = client.get("/run", params={"uri": str(tmp_path / "second")}).text
    assert "<h2>Caption cache</h2>" in text
    assert "<th>hits</th><td class='n'>16</td>" in text and "<th>misses</th><td class='n'>0</td>" in text
    assert "<th>hit rate</th><td class='n'>100.0%</td>" in text
    first = client.get("/run", params={"uri": str(tmp_path / "first")}).text
    assert "<th>hits</th><td class='n'>0</td>" in first and "<th>misses</th><td class='n'>16</td>" in first
