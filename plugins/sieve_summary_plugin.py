"""Airflow 3 plugin: a SIEVE run's summary (counts, failure reasons, thresholds, kept fraction, models,
settings, timings, manifest location) served by the API server under ``/sieve``.

* ``/sieve/``                           runs under the run base (Variable ``sieve_run_base`` / env ``SIEVE_RUN_BASE``
                                         / ``$AIRFLOW_HOME/sieve-runs``), newest first; a "SIEVE runs" nav entry
* ``/sieve/run?uri=RUN``                one run's summary page (what the publish task's "SIEVE summary" link opens)
* ``/sieve/api/run?uri=RUN``            the same summary as JSON
* ``/sieve/dag-runs/{dag_id}/{run_id}`` the summary of a DAG run (its run directory is the XCom ``run`` of
                                         ``list_shards``); a "SIEVE summary" tab on every DAG run

Every route needs an authenticated Airflow user allowed to read DAG runs (JWT bearer token or the UI's
session cookie). Only ``RUN/manifest/summary.json`` is ever read, through ``sieve_tasks.storage``, and only
from local paths or object stores (never http, so a URI cannot make the server fetch arbitrary URLs).
"""

from __future__ import annotations

import html
import json
import os
from typing import Any
from urllib.parse import quote

from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import HTMLResponse

from airflow.plugins_manager import AirflowPlugin

RUN_BASE_VARIABLE = "sieve_run_base"
PLAN_TASK = "list_shards"
ALLOWED_SCHEMES = ("s3://", "gs://", "gcs://", "az://", "abfs://", "file://")


# ----------------------------------------------------------------------------------------------- access
def _auth_dependency():
    from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity
    from airflow.api_fastapi.core_api.security import requires_access_dag

    return requires_access_dag(method="GET", access_entity=DagAccessEntity.RUN)


# --------------------------------------------------------------------------------------------- reading
def check_uri(uri: str) -> str:
    uri = uri.strip()
    if not uri:
        raise HTTPException(status_code=400, detail="give ?uri=RUN (a run directory)")
    if "://" in uri and not uri.startswith(ALLOWED_SCHEMES):
        raise HTTPException(status_code=400, detail=f"unsupported URI scheme in {uri!r}")
    if "://" not in uri and not os.path.isabs(uri):
        raise HTTPException(status_code=400, detail="a local run directory must be an absolute path")
    return uri.rstrip("/") if uri != "/" else uri


def read_summary(run: str) -> dict[str, Any]:
    from sieve_tasks import storage

    uri = storage.join(run, "manifest", "summary.json")
    try:
        if not storage.exists(uri):
            raise HTTPException(status_code=404, detail=f"no published summary at {uri} (not published yet?)")
        summary = storage.read_json(uri)
    except HTTPException:
        raise
    except (OSError, ValueError) as exc:
        raise HTTPException(status_code=502, detail=f"cannot read {uri}: {exc}") from exc
    if not isinstance(summary, dict) or "counts" not in summary:
        raise HTTPException(status_code=502, detail=f"{uri} is not a SIEVE summary")
    return summary


def run_base() -> str:
    try:
        from airflow.models.variable import Variable

        variable = Variable.get(RUN_BASE_VARIABLE, default_var=None)
    except Exception:  # no metadata DB in reach: fall back to the environment
        variable = None
    if variable:
        return str(variable).rstrip("/")
    if os.environ.get("SIEVE_RUN_BASE"):
        return os.environ["SIEVE_RUN_BASE"].rstrip("/")
    return os.path.join(os.environ.get("AIRFLOW_HOME") or os.path.expanduser("~/airflow"), "sieve-runs")


def list_runs(base: str, limit: int = 200) -> list[dict[str, Any]]:
    """Run directories one or two levels under ``base`` that have a published summary, newest first."""
    from sieve_tasks import storage

    fs, root = storage.filesystem(base)
    found = []
    for pattern in ("*/manifest/summary.json", "*/*/manifest/summary.json"):
        try:
            found += fs.glob(f"{root.rstrip('/')}/{pattern}")
        except (OSError, ValueError):
            continue
    runs = []
    for path in found:
        run_path = path[: -len("/manifest/summary.json")]
        run = run_path if storage.is_local(base) else fs.unstrip_protocol(run_path)
        try:
            info = fs.info(path)
            summary = storage.read_json(storage.join(run, "manifest", "summary.json"))
        except (OSError, ValueError):
            continue
        mtime = info.get("mtime") or info.get("LastModified") or 0
        runs.append({"run": run, "summary": summary, "mtime": mtime.timestamp() if hasattr(mtime, "timestamp")
                     else float(mtime)})
    runs.sort(key=lambda r: r["mtime"], reverse=True)
    return runs[:limit]


def dag_run_dir(dag_id: str, run_id: str) -> str | None:
    """The run directory a DAG run planned (XCom ``run`` of ``list_shards``), from the metadata DB."""
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    with create_session() as session:
        row = session.scalars(XComModel.get_many(run_id=run_id, dag_ids=dag_id, task_ids=PLAN_TASK, key="run",
                                                 map_indexes=-1, limit=1)).first()
        return XComModel.deserialize_value(row) if row is not None else None


# ------------------------------------------------------------------------------------------- rendering
STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5rem;color:#1f2937;max-width:70rem}
h1{font-size:1.4rem}h2{font-size:1.1rem;margin-top:1.6rem;border-bottom:1px solid #e5e7eb}
table{border-collapse:collapse;margin:.4rem 0}td,th{border:1px solid #e5e7eb;padding:.25rem .6rem;text-align:left}
th{background:#f9fafb}td.n{text-align:right;font-variant-numeric:tabular-nums}
.warn{background:#fef3c7;border:1px solid #f59e0b;padding:.6rem;margin:.8rem 0}
code,pre{background:#f3f4f6;padding:.1rem .3rem}pre{padding:.6rem;overflow:auto}
"""


def _e(value: Any) -> str:
    return html.escape("—" if value is None else str(value))


def _num(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return _e(value)


def _table(rows: list[tuple[str, Any]], numeric: bool = True) -> str:
    cells = "".join(f"<tr><th>{_e(k)}</th><td class='{'n' if numeric else ''}'>{_num(v)}</td></tr>" for k, v in rows)
    return f"<table>{cells}</table>"


def _page(title: str, body: str) -> str:
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{_e(title)}</title><style>{STYLE}</style>"
            f"</head><body>{body}</body></html>")


def render_summary(run: str, summary: dict[str, Any], index_url: str) -> str:
    counts = summary.get("counts", {})
    thresholds = summary.get("thresholds", {}) or {}
    parts = [f"<p><a href='{_e(index_url)}'>All SIEVE runs</a></p>", f"<h1>SIEVE run <code>{_e(run)}</code></h1>"]
    if summary.get("warning"):
        parts.append(f"<div class='warn'>{_e(summary['warning'])}</div>")
    kept_fraction = summary.get("kept_fraction_of_unique")
    parts.append("<h2>Counts</h2>" + _table([
        ("read", counts.get("read")), ("scored", counts.get("scored")), ("failed", counts.get("failed")),
        ("duplicates", counts.get("duplicates")), ("kept", counts.get("kept")),
        ("kept fraction of unique", f"{kept_fraction:.2%}" if isinstance(kept_fraction, (int, float)) else None),
        ("shards", summary.get("shards")), ("profile", summary.get("profile")),
    ]))
    reasons = summary.get("failed_by_reason") or {}
    parts.append("<h2>Failures by reason</h2>" + (_table(sorted(reasons.items())) if reasons else "<p>none</p>"))
    parts.append("<h2>Selection</h2>" + _table([
        ("rule", thresholds.get("rule")), ("score", thresholds.get("score")),
        ("threshold", thresholds.get("threshold")), ("fraction", thresholds.get("fraction")),
        ("candidates", thresholds.get("candidates")), ("weights", json.dumps(thresholds.get("weights"))),
        ("basic filter", thresholds.get("basic_filter")), ("reference run", thresholds.get("reference_run")),
    ], numeric=False))
    parts.append("<h2>Models</h2>" + _table(list((summary.get("models") or {}).items()), numeric=False))
    timings = summary.get("timings_seconds") or {}
    parts.append("<h2>Timings (seconds, summed over shards)</h2>" + _table(list(timings.items())))
    if summary.get("captioning"):
        captioning = {k: v for k, v in summary["captioning"].items() if k != "cache"}
        parts.append("<h2>Captioning</h2>" + _table(list(captioning.items())))
        parts.append(render_cache(summary["captioning"].get("cache")))
    manifest = summary.get("manifest") or {}
    parts.append("<h2>Manifest</h2>" + _table(list(manifest.items()), numeric=False))
    parts.append("<h2>Settings</h2><details><summary>stage settings</summary><pre>"
                 + _e(json.dumps(summary.get("settings"), indent=2, sort_keys=True)) + "</pre></details>")
    return _page(f"SIEVE {run}", "".join(parts))


def render_cache(cache: dict[str, Any] | None) -> str:
    """The caption cache's figures (``--caption-cache``): what was reused and the captioning time it saved."""
    if not cache:
        return ""
    rate = cache.get("hit_rate")
    return "<h2>Caption cache</h2>" + _table([
        ("hits", cache.get("hits")), ("misses", cache.get("misses")),
        ("hit rate", f"{rate:.1%}" if isinstance(rate, (int, float)) else None),
        ("captioning time saved (s)", cache.get("seconds_saved")), ("lookup time (s)", cache.get("lookup_seconds")),
        ("new entries written", cache.get("written")), ("unreadable cache files met", cache.get("errors")),
    ])


def render_index(base: str, runs: list[dict[str, Any]], prefix: str) -> str:
    rows = []
    for item in runs:
        s, link = item["summary"], f"{prefix}/run?uri={quote(item['run'], safe='')}"
        c, t = s.get("counts", {}), s.get("thresholds") or {}
        rows.append(f"<tr><td><a href='{_e(link)}'>{_e(item['run'])}</a></td><td class='n'>{_e(c.get('read'))}</td>"
                    f"<td class='n'>{_e(c.get('failed'))}</td><td class='n'>{_e(c.get('kept'))}</td>"
                    f"<td>{_e(t.get('rule'))}</td><td class='n'>{_num(t.get('threshold'))}</td>"
                    f"<td>{_e(s.get('profile'))}</td></tr>")
    table = ("<table><tr><th>run</th><th>read</th><th>failed</th><th>kept</th><th>rule</th><th>threshold</th>"
             "<th>profile</th></tr>" + "".join(rows) + "</table>") if rows else "<p>No published runs yet.</p>"
    return _page("SIEVE runs", f"<h1>SIEVE runs</h1><p>under <code>{_e(base)}</code></p>{table}")


# ------------------------------------------------------------------------------------------------- app
def create_app() -> FastAPI:
    app = FastAPI(title="SIEVE run summaries", description=__doc__)
    app.state.access_dependency = _auth_dependency()  # tests override it via app.dependency_overrides
    access = [Depends(app.state.access_dependency)]

    def prefix(request: Request) -> str:
        return request.scope.get("root_path", "").rstrip("/")

    @app.get("/", response_class=HTMLResponse, dependencies=access)
    def index(request: Request) -> str:
        base = run_base()
        return render_index(base, list_runs(base), prefix(request))

    @app.get("/run", response_class=HTMLResponse, dependencies=access)
    def run_page(request: Request, uri: str = Query(..., description="run directory")) -> str:
        run = check_uri(uri)
        return render_summary(run, read_summary(run), prefix(request) + "/")

    @app.get("/api/run", dependencies=access)
    def run_json(uri: str = Query(..., description="run directory")) -> dict[str, Any]:
        run = check_uri(uri)
        return {"run": run, "summary": read_summary(run)}

    @app.get("/dag-runs/{dag_id}/{run_id}", response_class=HTMLResponse, dependencies=access)
    def dag_run_page(request: Request, dag_id: str, run_id: str) -> str:
        run = dag_run_dir(dag_id, run_id)
        if run is None:
            raise HTTPException(status_code=404, detail=f"DAG run {dag_id}/{run_id} has not planned a SIEVE run")
        return render_summary(run, read_summary(check_uri(run)), prefix(request) + "/")

    return app


app = create_app()


class SieveSummaryPlugin(AirflowPlugin):
    name = "sieve_summary"
    fastapi_apps = [{"app": app, "url_prefix": "/sieve", "name": "SIEVE run summaries"}]
    external_views = [
        {"name": "SIEVE runs", "href": "/sieve/", "destination": "nav", "category": "browse",
         "url_route": "sieve-runs"},
        {"name": "SIEVE summary", "href": "/sieve/dag-runs/{DAG_ID}/{RUN_ID}", "destination": "dag_run",
         "url_route": "sieve-run-summary"},
    ]
