"""Start, drive and stop a distributed Airflow made by ``scripts/distributed`` (tests and benchmarks)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "distributed.py"


class Cluster:
    """What ``DIR/cluster.json`` says, plus a REST client and the S3 options of the setup's connection."""

    def __init__(self, root: Path):
        self.root = root
        self.state: dict[str, Any] = json.loads((root / "cluster.json").read_text())
        import httpx

        api = self.state["api"]
        token = httpx.post(f"{api['url']}/auth/token", json={"username": api["username"], "password": api["password"]},
                           timeout=30).json()["access_token"]
        self.api = httpx.Client(base_url=api["url"], headers={"Authorization": f"Bearer {token}"}, timeout=30)
        s3 = self.state["s3"]
        self.s3_options = {"key": s3["key"], "secret": s3["secret"], "endpoint_url": s3["endpoint"],
                           "client_kwargs": {"region_name": s3["region"]}}

    def upload(self, local_dir: str, uri: str) -> None:
        from sieve_tasks import storage

        with storage.storage_options("s3", self.s3_options):
            fs, path = storage.filesystem(uri)
            fs.put(f"{local_dir}/", path, recursive=True)

    def read(self, uri: str) -> bytes:
        from sieve_tasks import storage

        with storage.storage_options("s3", self.s3_options):
            return storage.read_bytes(uri)

    def logs(self) -> str:
        return "\n".join(f"--- {p['name']}\n" + "".join(Path(p["log"]).read_text(errors="replace")
                                                           .splitlines(True)[-40:]) for p in self.state["processes"])

    def trigger(self, dag_id: str, conf: dict[str, Any]) -> str:
        deadline = time.monotonic() + 180  # the dag-processor parses dags/ first
        while self.api.get(f"/api/v2/dags/{dag_id}").status_code != 200:
            assert time.monotonic() < deadline, f"{dag_id} never appeared:\n" + self.logs()
            time.sleep(2)
        created = self.api.post(f"/api/v2/dags/{dag_id}/dagRuns", json={"logical_date": None, "conf": conf})
        assert created.status_code == 200, created.text
        return created.json()["dag_run_id"]

    def wait(self, dag_id: str, run_id: str, timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        while (state := self.run_state(dag_id, run_id)) not in ("success", "failed"):
            assert time.monotonic() < deadline, (f"run still {state}: {self.task_instances(dag_id, run_id)}\n"
                                                 + self.logs())
            time.sleep(3)
        return state

    def run_state(self, dag_id: str, run_id: str) -> str:
        return self.api.get(f"/api/v2/dags/{dag_id}/dagRuns/{run_id}").json()["state"]

    def worker(self, hostname: str) -> dict[str, Any]:
        return next(w for w in self.state["workers"] if w["hostname"] == hostname)

    def task_instances(self, dag_id: str, run_id: str) -> list[dict[str, Any]]:
        return self.api.get(f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances").json()["task_instances"]

    def tries(self, dag_id: str, run_id: str, task_id: str, map_index: int) -> list[dict[str, Any]]:
        """Every try of one task instance, oldest first (each with the hostname it ran on)."""
        url = f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/{map_index}/tries"
        return sorted(self.api.get(url).json()["task_instances"], key=lambda t: t["try_number"])


def start_cluster(root: Path, *workers: str, options: tuple[str, ...] = ()) -> Cluster:
    """``scripts/distributed up`` with one worker per ``workers`` entry (its queues) and extra ``options``."""
    argv = [sys.executable, str(SCRIPT), "up", "--dir", str(root), *options]
    for queues in workers:
        argv += ["--worker", queues]
    started = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert started.returncode == 0, started.stdout + started.stderr
    return Cluster(root)


def restart_s3(root: Path) -> None:
    """``scripts/distributed restart-s3``: the S3 server stopped and started again with its data."""
    restarted = subprocess.run([sys.executable, str(SCRIPT), "restart-s3", "--dir", str(root)], capture_output=True,
                               text=True, timeout=300)
    assert restarted.returncode == 0, restarted.stdout + restarted.stderr


def stop_cluster(root: Path) -> None:
    stopped = subprocess.run([sys.executable, str(SCRIPT), "down", "--dir", str(root)], capture_output=True,
                             text=True, timeout=300)
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
