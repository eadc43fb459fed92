"""The report plugin: its FastAPI app against real published and unpublished runs, with FastAPI's TestClient."""

from __future__ import annotations

import json
import re
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
    from sieve_airflow.pipeline import REPORT_VIEW_ROUTE  # where the publish task's link leads

    assert [v["url_route"] for v in plugin.external_views if v["destination"] == "dag_run"] == [REPORT_VIEW_ROUTE]

    from airflow import plugins_manager

    names = [p.name for p in plugins_manager._get_plugins()[0]]
    assert "sieve_summary" in names, plugins_manager._get_plugins()[1]


def test_summary_json_matches_the_file(client, published):
    response = client.get("/api/run", params={"uri": str(published)})
    assert response.status_code == 200
    body = response.json()
    assert body["summary"] == json.loads((published / "manifest" / "summary.json").read_text())


def test_run_page_serves_the_report_with_a_way_back_and_no_script(client, published):
    summary = json.loads((published / "manifest" / "summary.json").read_text())
    page = client.get("/run", params={"uri": str(published)})
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert page.headers["content-security-policy"].startswith("default-src 'none'; img-src data:")
    text = page.text
    assert "<th>read</th><td class='n'>17</td>" in text and "<th>kept</th><td class='n'>4</td>" in text
    assert "<td>undecodable_image</td><td class='n'>1</td>" in text  # failure reason with its count
    assert f"{summary['kept_fraction_of_unique']:.2%}" in text and "id='verdict'>healthy<" in text
    assert "test:tiny-blip" in text and str(published / "manifest" / "subset.npy") in text
    assert "TEST PROFILE" in text  # the warning of a test-profile run
    assert "<a target='_top' href='/'>← All SIEVE runs</a>" in text
    assert text.startswith((published / "manifest" / "report.html").read_text()[:40])


def test_an_unpublished_run_gets_a_page_of_where_it_stands(client, published, tmp_path):
    import shutil

    run = tmp_path / "unpublished"
    shutil.copytree(published, run)
    shutil.rmtree(run / "manifest")
    (run / "scores" / "_done" / "00000001.json").unlink()
    page = client.get("/run", params={"uri": str(run)})
    assert page.status_code == 200, page.text
    assert "id='state'>aggregated, not published<" in page.text
    assert "<th>scores done</th><td class='n'>1 of 2</td>" in page.text
    assert re.search(r"<td>undecodable_image</td><td class='n'>1</td><td>0000000[01]/\d{9}</td>", page.text)
    assert "<tr><td>00000001</td><td>done</td><td>done</td><td>—</td></tr>" in page.text  # unfinished first


def test_index_lists_every_run_with_verdict_and_the_refilter_trend(client, published):
    import os
    import shutil

    base = Path(os.environ["SIEVE_RUN_BASE"])
    for day in ("2026-01-01", "2026-01-02"):
        if not (base / "refilter" / day).exists():
            shutil.copytree(published, base / "refilter" / day)
    shutil.copytree(published, base / "not-yet", dirs_exist_ok=True)
    shutil.rmtree(base / "not-yet" / "manifest")
    page = client.get("/")
    assert page.status_code == 200
    rows = {m[0]: m[1] for m in re.findall(r"<a href='/run\?uri=([^']+)'>.*?<span class='verdict [^']*'>([^<]+)<",
                                           page.text)}
    assert rows[quote(str(published), safe="")] == "healthy"
    assert rows[quote(str(base / "not-yet"), safe="")] == "not published"
    assert rows[quote(str(base / "refilter" / "2026-01-02"), safe="")] == "healthy"
    assert re.search(r"<img class='trend' alt='[^']+' src='data:image/png;base64,", page.text)


def test_errors_are_clean_and_escaped(client, tmp_path):
    missing = client.get("/run", params={"uri": str(tmp_path / "<script>alert(1)</script>")})
    assert missing.status_code == 404 and missing.headers["content-type"].startswith("text/html")
    assert "<script>alert(1)" not in missing.text and "&lt;script&gt;" in missing.text
    assert client.get("/run", params={"uri": "relative/run"}).status_code == 400
    assert client.get("/api/run", params={"uri": "http://169.254.169.254/latest"}).status_code == 400  # no SSRF
    assert client.get("/run").status_code == 422
    (tmp_path / "manifest").mkdir()
    (tmp_path / "manifest" / "summary.json").write_text('{"not": "a summary"}')
    bad = client.get("/api/run", params={"uri": str(tmp_path)})
    assert bad.status_code == 502 and "not a SIEVE summary" in bad.json()["detail"]


def test_routes_need_an_authenticated_user(plugin_module, published):
    from fastapi.testclient import TestClient

    response = TestClient(plugin_module.app).get("/api/run", params={"uri": str(published)})
    assert response.status_code == 401


@pytest.mark.slow
def test_dag_run_view_follows_the_dag_runs_xcom(client, plugin_module, demo_pool, tmp_path):
    """The DAG-run tab: dag.test() a curation run, then open /dag-runs/<dag>/<run> for it."""
    from tests.dags.dagrun_helpers import run_dag

    run = tmp_path / "run"
    dagrun = run_dag("sieve_curation", {"input": demo_pool, "run": str(run), "profile": "test"})
    assert dagrun.state == "success"
    page = client.get(f"/dag-runs/sieve_curation/{quote(dagrun.run_id, safe='')}")
    assert page.status_code == 200, page.text
    assert str(run) in page.text and "<th>kept</th><td class='n'>4</td>" in page.text
    assert f"href='/dags/sieve_curation/runs/{quote(dagrun.run_id, safe='')}'" in page.text  # the way back
    assert plugin_module.dag_runs_by_dir()[str(run)] == ("sieve_curation", dagrun.run_id)  # the index's links
    missing = client.get("/dag-runs/sieve_curation/no-such-run")
    assert missing.status_code == 404 and "has not planned a SIEVE run yet" in missing.text
    assert missing.headers["content-type"].startswith("text/html")


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
