"""Airflow 3 plugin: SIEVE run reports inside the Airflow UI, served by the API server under ``/sieve``.

* ``/sieve/``                           every run under the run base (Variable ``sieve_run_base`` / env
                                         ``SIEVE_RUN_BASE`` / ``$AIRFLOW_HOME/sieve-runs``), published or not, newest
                                         first, with its DAG run, verdict and counts, and the daily refilter's trend;
                                         a "SIEVE runs" nav entry
* ``/sieve/run?uri=RUN``                the run's ``manifest/report.html``, or where an unpublished run stands
* ``/sieve/api/run?uri=RUN``            the published summary as JSON
* ``/sieve/dag-runs/{dag_id}/{run_id}`` the same for a DAG run (its run directory is the XCom ``run`` of
                                         ``list_shards``), with its log folder; a "SIEVE report" tab on every DAG run
                                         (where the publish task's "SIEVE summary" link leads)

Every route needs an authenticated Airflow user allowed to read DAG runs (JWT bearer token or the UI's
session cookie). Run directories are read through ``sieve_tasks.storage``, only from local paths or object
stores (never http, so a URI cannot make the server fetch arbitrary URLs). Reports are served with a
Content-Security-Policy that allows no script and no remote content.
"""

from __future__ import annotations

import html
import os
from typing import Any
from urllib.parse import quote

from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse

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
    """Run directories one or two levels under ``base`` (those with ``shards.json``), newest first, with their
    published summary when there is one."""
    from sieve_tasks import storage

    fs, root = storage.filesystem(base)
    found = []
    for pattern in ("*/shards.json", "*/*/shards.json"):
        try:
            found += fs.glob(f"{root.rstrip('/')}/{pattern}")
        except (OSError, ValueError):
            continue
    runs = []
    for path in found:
        run_path = path[: -len("/shards.json")]
        run = run_path if storage.is_local(base) else fs.unstrip_protocol(run_path)
        try:
            started = fs.info(path)
            summary_file = storage.join(run, "manifest", "summary.json")
            summary = storage.read_json(summary_file) if storage.exists(summary_file) else None
        except (OSError, ValueError):
            continue
        mtime = started.get("mtime") or started.get("LastModified") or 0
        runs.append({"run": run, "summary": summary, "started": mtime.timestamp() if hasattr(mtime, "timestamp")
                     else float(mtime)})
    runs.sort(key=lambda r: r["started"], reverse=True)
    return runs[:limit]


def dag_runs_by_dir() -> dict[str, tuple[str, str]]:
    """Run directory → (dag_id, run_id) of the DAG run that planned it, for the latest 1000 planned runs."""
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        rows = session.execute(select(XComModel.dag_id, XComModel.run_id, XComModel.value)
                               .where(XComModel.task_id == PLAN_TASK, XComModel.key == "run", XComModel.map_index == -1)
                               .order_by(XComModel.timestamp.desc()).limit(1000)).all()
    found: dict[str, tuple[str, str]] = {}
    for row in rows:
        found.setdefault(str(XComModel.deserialize_value(row)).rstrip("/"), (row.dag_id, row.run_id))
    return found


def dag_run_dir(dag_id: str, run_id: str) -> str | None:
    """The run directory a DAG run planned (XCom ``run`` of ``list_shards``), from the metadata DB."""
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    with create_session() as session:
        row = session.scalars(XComModel.get_many(run_id=run_id, dag_ids=dag_id, task_ids=PLAN_TASK, key="run",
                                                 map_indexes=-1, limit=1)).first()
        return XComModel.deserialize_value(row) if row is not None else None


# ------------------------------------------------------------------------------------------- rendering
#: No script, no remote content: a report is data rendered as text and data-URI images.
REPORT_HEADERS = {"Content-Security-Policy": "default-src 'none'; img-src data:; style-src 'unsafe-inline'; "
                                            "frame-ancestors 'self'"}
REFILTER_DIR = "refilter"  # where sieve_refilter writes <base>/refilter/<ds>


def _e(value: Any) -> str:
    return html.escape("—" if value is None else str(value))


def nav(prefix: str, dag_run: tuple[str, str] | None = None) -> str:
    """The way back out of a page shown in the UI's iframe (links open in the whole window)."""
    links = [f"<a target='_top' href='{_e(prefix)}/'>← All SIEVE runs</a>"]
    if dag_run:
        links.append(f"<a target='_top' href='/dags/{quote(dag_run[0], safe='')}/runs/{quote(dag_run[1], safe='')}'>"
                     f"DAG run {_e(dag_run[1])} in Airflow</a>")
    return "<nav style='margin-bottom:1rem'>" + " · ".join(links) + "</nav>"


def run_page(run: str, prefix: str, dag_run: tuple[str, str] | None = None) -> HTMLResponse:
    """The run's report.html, or the progress page of a run that has not published."""
    from sieve_tasks import storage
    from sieve_tasks.report import page, report_uri
    from sieve_tasks.report.progress import RunProgress

    try:
        if storage.exists(report_uri(run)):
            report = storage.read_bytes(report_uri(run)).decode("utf-8")
            return HTMLResponse(report.replace(page.NAV_MARK, nav(prefix, dag_run), 1), headers=REPORT_HEADERS)
        progress = RunProgress.load(run)
    except FileNotFoundError as exc:
        raise HTTPException(status_code=404, detail=f"no SIEVE run at {run}: {exc}") from exc
    except (OSError, ValueError) as exc:
        raise HTTPException(status_code=502, detail=f"cannot read {run}: {exc}") from exc
    text = page.progress_page(progress, log_folder(dag_run) if dag_run else None)
    return HTMLResponse(text.replace(page.NAV_MARK, nav(prefix, dag_run), 1), headers=REPORT_HEADERS)


def log_folder(dag_run: tuple[str, str]) -> str:
    from airflow.configuration import conf

    base = conf.get("logging", "base_log_folder", fallback="")
    return os.path.join(base, f"dag_id={dag_run[0]}", f"run_id={dag_run[1]}")


def trend_plot(runs: list[dict[str, Any]], base: str) -> str | None:
    """The daily refilter's kept fraction and mean score per day, as a PNG data URI (None without two days)."""
    from sieve_tasks import storage
    from sieve_tasks.report.plots import trend_png

    days = sorted((storage.basename(r["run"]), r["summary"]) for r in runs
                  if r["summary"] and r["run"].rstrip("/").rsplit("/", 2)[-2:-1] == [REFILTER_DIR])
    if len(days) < 2:
        return None
    return trend_png([d for d, _ in days], [s["kept_fraction_of_unique"] for _, s in days],
                     [s.get("score_mean") for _, s in days])


def render_index(base: str, runs: list[dict[str, Any]], dag_runs: dict[str, tuple[str, str]], prefix: str) -> str:
    from datetime import datetime, timezone

    from sieve_tasks.report import page

    rows = []
    for item in runs:
        s, link = item["summary"] or {}, f"{prefix}/run?uri={quote(item['run'], safe='')}"
        counts, dag_run = s.get("counts") or {}, dag_runs.get(item["run"].rstrip("/"))
        verdict = (s.get("health") or {}).get("verdict") or ("not published" if not s else "—")
        fraction = s.get("kept_fraction_of_unique")
        started = datetime.fromtimestamp(item["started"], timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        dag_cell = (f"<a target='_top' href='/dags/{quote(dag_run[0], safe='')}/runs/{quote(dag_run[1], safe='')}'>"
                    f"{_e(dag_run[0])} / {_e(dag_run[1])}</a>") if dag_run else "—"
        rows.append(f"<tr><td><a href='{_e(link)}'>{_e(item['run'])}</a></td><td>{_e(started)}</td><td>{dag_cell}</td>"
                    f"<td><span class='verdict {_e(verdict)}'>{_e(verdict)}</span></td>"
                    f"<td class='n'>{_e(counts.get('read'))}</td><td class='n'>{_e(counts.get('kept'))}</td>"
                    f"<td class='n'>{_e(f'{fraction:.1%}' if isinstance(fraction, (int, float)) else None)}</td></tr>")
    table = ("<table id='runs'><tr><th>run</th><th>started</th><th>DAG run</th><th>verdict</th><th>read</th>"
             "<th>kept</th><th>kept fraction</th></tr>" + "".join(rows) + "</table>") if rows else "<p>No runs yet.</p>"
    trend = trend_plot(runs, base)
    plot = (f"<h2>Daily refilter</h2><img class='trend' alt='kept fraction and mean score per day' src='{trend}'>"
            if trend else "")
    return page.page("SIEVE runs", f"<h1>SIEVE runs</h1><p>under <code>{_e(base)}</code>, newest first</p>"
                                   f"{table}{plot}").replace(page.NAV_MARK, "", 1)


# ------------------------------------------------------------------------------------------------- app
def create_app() -> FastAPI:
    app = FastAPI(title="SIEVE run reports", description=__doc__)
    app.state.access_dependency = _auth_dependency()  # tests override it via app.dependency_overrides
    access = [Depends(app.state.access_dependency)]

    def prefix(request: Request) -> str:
        return request.scope.get("root_path", "").rstrip("/")

    @app.exception_handler(HTTPException)
    def error_page(request: Request, exc: HTTPException):
        """JSON for the API, a readable page everywhere else (these pages open in the UI's iframe)."""
        if request.url.path.startswith(f"{prefix(request)}/api/"):
            return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)
        from sieve_tasks.report import page

        body = f"<h1>SIEVE</h1><p id='problem'>{_e(exc.detail)}</p>"
        return HTMLResponse(page.page("SIEVE", body).replace(page.NAV_MARK, nav(prefix(request)), 1),
                            status_code=exc.status_code, headers=exc.headers)

    @app.get("/", response_class=HTMLResponse, dependencies=access)
    def index(request: Request) -> str:
        base = run_base()
        return render_index(base, list_runs(base), dag_runs_by_dir(), prefix(request))

    @app.get("/run", response_class=HTMLResponse, dependencies=access)
    def run_view(request: Request, uri: str = Query(..., description="run directory")) -> HTMLResponse:
        run = check_uri(uri)
        return run_page(run, prefix(request), dag_runs_by_dir().get(run))

    @app.get("/api/run", dependencies=access)
    def run_json(uri: str = Query(..., description="run directory")) -> dict[str, Any]:
        run = check_uri(uri)
        return {"run": run, "summary": read_summary(run)}

    @app.get("/dag-runs/{dag_id}/{run_id}", response_class=HTMLResponse, dependencies=access)
    def dag_run_view(request: Request, dag_id: str, run_id: str) -> HTMLResponse:
        run = dag_run_dir(dag_id, run_id)
        if run is None:
            raise HTTPException(status_code=404, detail=f"DAG run {dag_id} / {run_id} has not planned a SIEVE run "
                                                        f"yet: its list_shards task has not succeeded")
        return run_page(check_uri(run), prefix(request), (dag_id, run_id))

    return app


app = create_app()


class SieveSummaryPlugin(AirflowPlugin):
    name = "sieve_summary"
    fastapi_apps = [{"app": app, "url_prefix": "/sieve", "name": "SIEVE run reports"}]
    external_views = [
        {"name": "SIEVE runs", "href": "/sieve/", "destination": "nav", "category": "browse",
         "url_route": "sieve-runs"},
        {"name": "SIEVE report", "href": "/sieve/dag-runs/{DAG_ID}/{RUN_ID}", "destination": "dag_run",
         "url_route": "sieve-run-summary"},
    ]
