"""Live Airflow: api-server + scheduler + dag-processor on 127.0.0.1 (PostgreSQL, LocalExecutor). Trigger
sieve_curation through the REST API, wait for it, then read the plugin's pages over HTTP and in headless
Chromium (Debian's package, driven by Playwright), logged in through Airflow's login form."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from urllib.parse import quote

import pytest

from scripts import distributed
from tests.dags.airflow_env import DAGS, PLUGINS, VENV_BIN

pytestmark = pytest.mark.slow
PASSWORD = "sieve-test-password"
RUN_TIMEOUT_S = 420
ARTIFACTS = Path(os.environ.get("SIEVE_TEST_ARTIFACTS") or Path(__file__).resolve().parents[2] / "test-artifacts")
CHROMIUM = os.environ.get("SIEVE_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
# as the machine's browser probe starts it: no sandbox as root, and no calls home on a closed network
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def live_airflow(tmp_path_factory):
    """A fresh AIRFLOW_HOME and database of its own; every process it starts is stopped afterwards.

    PostgreSQL, as deployments have it: with SQLite, `airflow backfill create` beside a busy scheduler could lose
    the database lock while creating its runs; Airflow then deletes the runs it had made, under the scheduler,
    whose loop failed on them and left the retried backfill's runs queued (a flake of the backfill test)."""
    home = tmp_path_factory.mktemp("live-airflow")
    servers = distributed.Cluster(home)
    try:
        yield from _live_airflow(home, servers.start_postgres())
    finally:
        servers.stop()


def _live_airflow(home: Path, database: str):
    """The Airflow processes of :func:`live_airflow` over ``database`` (host:port of its PostgreSQL)."""
    import httpx

    port = free_port()
    (home / "passwords.json").write_text(json.dumps({"admin": PASSWORD}))
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")},  # e.g. a sourced scripts/airflow-env
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"postgresql+psycopg2://airflow@{database}/airflow",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(DAGS), os.environ.get("PYTHONPATH")])),
        "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(PLUGINS),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        "AIRFLOW__CORE__PARALLELISM": "2",
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(home / "passwords.json"),
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{port}/execution/",
        "AIRFLOW__API__BASE_URL": f"http://127.0.0.1:{port}",
        "AIRFLOW__API__PORT": str(port),
        "AIRFLOW__API__HOST": "127.0.0.1",
        "AIRFLOW__API_AUTH__JWT_SECRET": "sieve-live-test-secret-0123456789abcdef",
        "AIRFLOW__API__SECRET_KEY": "sieve-live-test-key",
        "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "1",
        "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
        "SIEVE_RUN_BASE": str(home / "sieve-runs"),
        "SIEVE_TEST_AIRFLOW_HOME": str(home),
    }
    airflow = str(VENV_BIN / "airflow")
    processes: list[tuple[subprocess.Popen, Path]] = []
    try:
        subprocess.run([airflow, "db", "migrate"], env=env, check=True, capture_output=True)
        for command in (["api-server", "--port", str(port), "--host", "127.0.0.1"], ["scheduler"],
                        ["dag-processor"]):
            log = home / f"{command[0]}.log"
            handle = open(log, "w")
            processes.append((subprocess.Popen([airflow, *command], env=env, stdout=handle,
                                               stderr=subprocess.STDOUT, start_new_session=True), log))
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{base}/api/v2/monitor/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            dead = [p.args for p, _ in processes if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                pytest.fail(f"Airflow did not come up (exited: {dead}):\n" + tail_logs(processes))
            time.sleep(1)
        token = httpx.post(f"{base}/auth/token", json={"username": "admin", "password": PASSWORD},
                           timeout=10).json()["access_token"]
        yield {"base": base, "token": token, "home": home, "env": env, "logs": lambda: tail_logs(processes)}
    finally:
        for process, _ in processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process, _ in processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)


def tail_logs(processes) -> str:
    return "\n".join(f"--- {log.name}\n" + "".join(log.read_text(errors="replace").splitlines(True)[-40:])
                     for _, log in processes)


@pytest.fixture(scope="module")
def curated(live_airflow, demo_pool):
    """One sieve_curation run of the demo pool, triggered through the REST API and finished."""
    import httpx

    base, logs = live_airflow["base"], live_airflow["logs"]
    api = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {live_airflow['token']}"}, timeout=30)

    deadline = time.monotonic() + 120  # the dag-processor has to parse dags/ first
    while api.get("/api/v2/dags/sieve_curation").status_code != 200:
        assert time.monotonic() < deadline, "sieve_curation never appeared:\n" + logs()
        time.sleep(2)
    # the trigger form's validation also guards the REST API
    bad = api.post("/api/v2/dags/sieve_curation/dagRuns", json={"logical_date": None, "conf": {"score": "median"}})
    assert bad.status_code == 400, bad.text

    run_dir = live_airflow["home"] / "runs" / "live"
    created = api.post("/api/v2/dags/sieve_curation/dagRuns", json={
        "logical_date": None, "conf": {"input": demo_pool, "run": str(run_dir), "profile": "test"}})
    assert created.status_code == 200, created.text
    run_id = created.json()["dag_run_id"]

    deadline = time.monotonic() + RUN_TIMEOUT_S
    while (state := api.get(f"/api/v2/dags/sieve_curation/dagRuns/{quote(run_id, safe='')}").json()["state"]) \
            not in ("success", "failed"):
        assert time.monotonic() < deadline, f"run still {state}:\n" + logs()
        time.sleep(3)
    tis = api.get(f"/api/v2/dags/sieve_curation/dagRuns/{quote(run_id, safe='')}/taskInstances").json()
    assert state == "success", json.dumps([(t["task_id"], t["map_index"], t["state"]) for t in
                                           tis["task_instances"]]) + "\n" + logs()
    return {"api": api, "run_id": run_id, "run_dir": run_dir, "task_instances": tis}


def publish_link(api, run_id: str) -> str:
    links = api.get(f"/api/v2/dags/sieve_curation/dagRuns/{quote(run_id, safe='')}/taskInstances/publish/links")
    assert links.status_code == 200, links.text
    return links.json()["extra_links"]["SIEVE summary"]


def test_trigger_by_rest_api_and_read_the_summary_over_http(live_airflow, curated):
    import httpx

    base, api, run_id, run_dir = live_airflow["base"], curated["api"], curated["run_id"], curated["run_dir"]
    plugins = api.get("/api/v2/plugins").json()["plugins"]
    ours = [p for p in plugins if p["name"] == "sieve_summary"]
    assert ours and {v["destination"] for v in ours[0]["external_views"]} == {"nav", "dag_run"}
    tis = curated["task_instances"]
    named = {(t["task_id"], t["rendered_map_index"]) for t in tis["task_instances"]
             if t["task_id"] == "local_batch.caption"}
    assert named == {("local_batch.caption", "00000000"), ("local_batch.caption", "00000001")}
    assert (run_dir / "manifest" / "subset.npy").exists()

    # the publish task's extra link opens the DAG run's report tab inside the UI; the plugin serves the report
    assert publish_link(api, run_id) == f"{base}/dags/sieve_curation/runs/{quote(run_id, safe='')}/plugin/sieve-run-summary"
    page = api.get(f"{base}/sieve/run?uri={quote(str(run_dir), safe='')}")
    assert page.status_code == 200 and "<th>kept</th><td class='n'>4</td>" in page.text

    # the DAG-run tab and the index, over HTTP, with the UI's cookie instead of a bearer token
    cookie_client = httpx.Client(base_url=base, cookies={"_token": live_airflow["token"]}, timeout=30)
    tab = cookie_client.get(f"/sieve/dag-runs/sieve_curation/{quote(run_id, safe='')}")
    assert tab.status_code == 200 and str(run_dir) in tab.text
    summary = api.get("/sieve/api/run", params={"uri": str(run_dir)}).json()["summary"]
    assert summary == json.loads((run_dir / "manifest" / "summary.json").read_text())
    assert summary["health"]["verdict"] == "healthy"  # a manual run may use the test profile
    assert httpx.get(f"{base}/sieve/api/run", params={"uri": str(run_dir)}).status_code == 401


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium on this machine (scripts/setup installs Debian's "
                                             "chromium where apt-get can; or set SIEVE_CHROMIUM)")
def test_the_report_renders_inside_the_airflow_ui_in_a_real_browser(live_airflow, curated):
    """Log in through Airflow's form, open the DAG run's "SIEVE report" tab: the report's histogram and
    thumbnails load (natural sizes > 0) in the UI's iframe, nothing logs a console error; screenshots are kept."""
    from playwright.sync_api import sync_playwright

    base, run_id = live_airflow["base"], curated["run_id"]
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    errors: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            context = browser.new_context(viewport={"width": 1400, "height": 1000})
            page = context.new_page()
            page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.goto(f"{base}/auth/login")
            page.get_by_label("Username").fill("admin")
            page.get_by_label("Password").fill(PASSWORD)
            page.get_by_role("button", name="Sign in").click()
            page.wait_for_url(re.compile(r"^(?!.*/auth/login).*$"))

            page.goto(publish_link(curated["api"], run_id))  # the publish task's "SIEVE summary" link
            page.wait_for_selector("iframe", timeout=60_000)
            report = page.frame_locator("iframe").first
            report.locator("#verdict").wait_for(timeout=60_000)
            frame = next(f for f in page.frames if "/sieve/dag-runs/" in f.url)
            frame.wait_for_load_state("load")
            sizes = frame.eval_on_selector_all("img.histogram, img.thumb",
                                               "els => els.map(e => [e.className, e.complete, e.naturalWidth])")
            page.screenshot(path=str(ARTIFACTS / "report-in-airflow.png"))
            report_page = context.new_page()  # the report alone, whole, for the README
            report_page.set_viewport_size({"width": 1280, "height": 900})
            report_page.goto(f"{base}/sieve/dag-runs/sieve_curation/{quote(run_id, safe='')}")
            report_page.screenshot(path=str(ARTIFACTS / "report.png"), full_page=True)
            report_page.close()
        finally:
            browser.close()
    histograms = [s for s in sizes if s[0] == "histogram"]
    thumbs = [s for s in sizes if s[0] == "thumb"]
    assert histograms and all(complete and width > 0 for _, complete, width in histograms), sizes
    assert len(thumbs) == 16 and all(complete and width > 0 for _, complete, width in thumbs), sizes
    assert errors == []
    assert (ARTIFACTS / "report-in-airflow.png").stat().st_size > 10_000


def test_backfill_create_of_two_days_one_empty(live_airflow, demo_pool, tmp_path):
    """`airflow backfill create` over two days of sieve_refilter: the day with shards succeeds and keeps the
    reference run's bar; the empty day ends with its tasks skipped, not failed."""
    import shutil

    import httpx

    from sieve_tasks.runner import run_all
    from sieve_tasks.settings import Settings

    base, logs = live_airflow["base"], live_airflow["logs"]
    api = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {live_airflow['token']}"}, timeout=30)
    reference = tmp_path / "reference"
    run_all(demo_pool, str(reference), Settings(profile="test"), progress=False)
    crawl = tmp_path / "crawls"
    shutil.copytree(demo_pool, crawl / "crawl" / "2026-01-01")
    (crawl / "crawl" / "2026-01-02").mkdir(parents=True)

    deadline = time.monotonic() + 120
    while api.get("/api/v2/dags/sieve_refilter").status_code != 200:
        assert time.monotonic() < deadline, "sieve_refilter never appeared:\n" + logs()
        time.sleep(2)
    # created paused (no crawl base configured yet); configured here by the conf, so unpaused as the runbook says
    assert api.get("/api/v2/dags/sieve_refilter").json()["is_paused"] is True
    assert api.patch("/api/v2/dags/sieve_refilter", json={"is_paused": False}).status_code == 200
    conf = {"crawl_base": str(crawl), "thresholds_from": str(reference), "profile": "test"}
    created = subprocess.run([str(VENV_BIN / "airflow"), "backfill", "create", "--dag-id", "sieve_refilter",
                              "--from-date", "2026-01-01", "--to-date", "2026-01-02", "--dag-run-conf",
                              json.dumps(conf)], env=live_airflow["env"], capture_output=True, text=True)
    assert created.returncode == 0, created.stdout + created.stderr

    deadline = time.monotonic() + RUN_TIMEOUT_S
    while True:
        runs = [r for r in api.get("/api/v2/dags/sieve_refilter/dagRuns").json()["dag_runs"]
                if r["run_type"] == "backfill"]
        if len(runs) == 2 and all(r["state"] in ("success", "failed") for r in runs):
            break
        assert time.monotonic() < deadline, f"backfill still running: {runs}\n" + logs()
        time.sleep(3)
    by_day = {r["logical_date"][:10]: r for r in runs}
    assert {day: r["state"] for day, r in by_day.items()} == {"2026-01-01": "success", "2026-01-02": "success"}

    def task_states(run):
        tis = api.get(f"/api/v2/dags/sieve_refilter/dagRuns/{quote(run['dag_run_id'], safe='')}/taskInstances")
        return {t["task_id"]: t["state"] for t in tis.json()["task_instances"]}

    full, empty = task_states(by_day["2026-01-01"]), task_states(by_day["2026-01-02"])
    assert full["publish"] == "success", full
    assert set(empty.values()) == {"skipped"}, empty
    # a backfill is not a manual run: the test profile there is a warning (published all the same)
    day = json.loads((live_airflow["home"] / "sieve-runs" / "refilter" / "2026-01-01" / "manifest" / "summary.json")
                     .read_text())
    assert day["health"]["verdict"] == "warning" and day["health"]["findings"][0]["rule"] == "test_profile"
