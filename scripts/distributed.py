"""A distributed Airflow on this machine, from packages, everything bound to 127.0.0.1.

PostgreSQL (metadata DB, initdb into DIR), Redis (Celery broker), an S3 server (moto; the Airflow connection
``sieve_s3`` points at it, bucket ``sieve``), Airflow's api-server, scheduler and dag-processor with the
CeleryExecutor, and Celery workers that share nothing else: each has its own name (recorded in the task
instances it runs), AIRFLOW_HOME, scratch directory (TMPDIR) and SIEVE_CACHE. local mode's caption and embed
tasks go to the accelerator queue (``--gpu-queue``, default ``gpu``), the rest to ``default``; each
``--worker QUEUES`` starts one worker listening to those queues.

    scripts/distributed up [--dir DIR] [--worker default --worker gpu] [--foreground]
    scripts/distributed down [--dir DIR]
    scripts/distributed restart-s3 [--dir DIR]

``up`` returns once every server answers and every worker is ready, leaving ``DIR/cluster.json`` (URLs, admin
password, processes, workers); ``down`` stops what it lists and removes the database; ``restart-s3`` stops
the S3 server and starts it again with its data. ``--foreground`` stays until Ctrl-C, then stops everything.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from json.decoder import WHITESPACE
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
STATE = "cluster.json"
BUCKET = "sieve"
CONNECTION_ID = "sieve_s3"
ADMIN_PASSWORD = "sieve-admin"
S3_KEYS = {"login": "sieve", "password": "sieve-secret"}  # what moto accepts; a real store's keys go here
READY_TIMEOUT_S = 300


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def postgres_tool(name: str) -> str:
    """A PostgreSQL server binary: on PATH, else Debian's /usr/lib/postgresql/<version>/bin."""
    found = shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None)
    if not found:
        raise SystemExit(f"{name} not found: install PostgreSQL (Debian: apt-get install postgresql)")
    return found


def as_postgres_user(argv: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: run its tools as the ``postgres`` user then."""
    return ["runuser", "-u", "postgres", "--", *argv] if os.geteuid() == 0 else argv


def run(argv: list[str], env: dict[str, str] | None = None) -> None:
    """Run a setup command; on failure, stop with its output."""
    done = subprocess.run(argv, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{' '.join(argv)} failed ({done.returncode}):\n{(done.stdout + done.stderr)[-3000:]}")


def wait_for(what: str, ready, process: dict[str, Any] | None = None, timeout: float = READY_TIMEOUT_S) -> None:
    """Until ``ready()``; fails at once when the ``process`` it waits for has exited."""
    deadline = time.monotonic() + timeout
    while not ready():
        if process and not alive(process["pid"]):
            raise SystemExit(f"{what} exited; its log {process['log']} ends:\n" + tail(process["log"]))
        if time.monotonic() > deadline:
            raise SystemExit(f"{what} not ready after {timeout:.0f} s")
        time.sleep(0.5)


def tail(path: str, lines: int = 30) -> str:
    return "".join(Path(path).read_text(errors="replace").splitlines(True)[-lines:])


def answers(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=2)
        return True
    except urllib.error.HTTPError:
        return True  # it answered
    except OSError:
        return False


class Cluster:
    """The servers and workers of one distributed setup, recorded in ``DIR/cluster.json``."""

    def __init__(self, root: Path):
        self.root = root
        self.state: dict[str, Any] = {"processes": [], "workers": []}

    def save(self) -> None:
        (self.root / STATE).write_text(json.dumps(self.state, indent=2))

    def spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> dict[str, Any]:
        log = self.root / "logs" / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as out:
            process = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                       start_new_session=True, cwd=self.root)
        record = {"name": name, "pid": process.pid, "log": str(log)}
        self.state["processes"].append(record)
        self.save()
        return record

    def start_postgres(self) -> str:
        port = free_port()
        data = Path(tempfile.mkdtemp(prefix="sieve-pg-"))  # outside DIR: the postgres user must reach it
        if os.geteuid() == 0:
            shutil.chown(data, "postgres", "postgres")
        self.state["postgres"] = {"data": str(data), "port": port}
        self.save()
        run(as_postgres_user([postgres_tool("initdb"), "-D", str(data / "db"), "-U", "airflow", "--auth=trust",
                              "-E", "UTF8", "--no-sync"]))
        run(as_postgres_user([postgres_tool("pg_ctl"), "-D", str(data / "db"), "-l", str(data / "server.log"), "-w",
                              "-o", f"-c listen_addresses=127.0.0.1 -p {port} -k {data} -c fsync=off", "start"]))
        run([postgres_tool("createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "airflow", "airflow"])
        return f"127.0.0.1:{port}"

    def start_redis(self) -> str:
        port = free_port()
        (self.root / "redis").mkdir(exist_ok=True)
        redis = self.spawn("redis", [shutil.which("redis-server") or "redis-server", "--bind", "127.0.0.1",
                                     "--port", str(port), "--save", "", "--appendonly", "no",
                                     "--dir", str(self.root / "redis")])
        wait_for("redis", lambda: _connects(port), redis)
        return f"redis://127.0.0.1:{port}/0"

    def start_s3(self) -> str:
        port = free_port()
        endpoint = self.run_s3(port)
        import boto3

        boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=S3_KEYS["login"],
                     aws_secret_access_key=S3_KEYS["password"], region_name="us-east-1").create_bucket(Bucket=BUCKET)
        self.state["s3"] = {"endpoint": endpoint, "port": port, "bucket": BUCKET, "key": S3_KEYS["login"],
                            "secret": S3_KEYS["password"], "region": "us-east-1", "connection_id": CONNECTION_ID}
        self.save()
        return endpoint

    def run_s3(self, port: int) -> str:
        """moto on ``port``, every request appended to ``DIR/s3-requests.jsonl`` (moto's recorder): moto keeps
        objects in memory, and that log is what lets a restarted server get them back."""
        endpoint = f"http://127.0.0.1:{port}"
        env = {**os.environ, "MOTO_ENABLE_RECORDING": "1",
               "MOTO_RECORDER_FILEPATH": str(self.root / "s3-requests.jsonl")}
        server = self.spawn("s3", [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)], env)
        wait_for("s3", lambda: answers(endpoint), server)
        return endpoint

    def restart_s3(self) -> None:
        """Stop the S3 server and start it again on its port with its data (the recorded requests replayed)."""
        record = next(p for p in self.state["processes"] if p["name"] == "s3")
        stop_session(record["pid"])
        self.state["processes"].remove(record)
        repair_request_log(self.root / "s3-requests.jsonl")
        endpoint = self.run_s3(self.state["s3"]["port"])
        urllib.request.urlopen(urllib.request.Request(f"{endpoint}/moto-api/recorder/replay-recording", method="POST"),
                               timeout=300)

    def airflow_env(self, database: str, broker: str, s3: str, api_port: int, options: argparse.Namespace
                    ) -> dict[str, str]:
        """What every Airflow process of the setup shares; the AWS keys only through the connection."""
        (self.root / "passwords.json").write_text(json.dumps({"admin": ADMIN_PASSWORD}))
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "AIRFLOW_", "AIRFLOW__"))}
        connection = {"conn_type": "aws", **S3_KEYS, "extra": {"endpoint_url": s3, "region_name": "us-east-1"}}
        env.update({
            "AIRFLOW_HOME": str(self.root / "airflow"),
            "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"postgresql+psycopg2://airflow@{database}/airflow",
            "AIRFLOW__CELERY__BROKER_URL": broker,
            "AIRFLOW__CELERY__RESULT_BACKEND": f"db+postgresql+psycopg2://airflow@{database}/airflow",
            "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
            "AIRFLOW__CORE__HOSTNAME_CALLABLE": "worker_hostname.hostname",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(self.root / "passwords.json"),
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{api_port}/execution/",
            "AIRFLOW__API__BASE_URL": f"http://127.0.0.1:{api_port}",
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__API__PORT": str(api_port),
            "AIRFLOW__API_AUTH__JWT_SECRET": os.urandom(24).hex(),
            "AIRFLOW__API__SECRET_KEY": os.urandom(24).hex(),
            "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "1",
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
            f"AIRFLOW_CONN_{CONNECTION_ID.upper()}": json.dumps(connection),
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "dags"), str(REPO / "scripts"), str(REPO),
                                                        os.environ.get("PYTHONPATH")])),
            "SIEVE_GPU_QUEUE": options.gpu_queue,
            "SIEVE_RUN_BASE": f"s3://{BUCKET}/runs",
        })
        if options.heartbeat_timeout:  # how soon a task whose worker died is failed (and retried)
            env["AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT"] = str(options.heartbeat_timeout)
        if options.retry_delay is not None:
            env["SIEVE_RETRY_DELAY_SECONDS"] = str(options.retry_delay)
        return env

    def start_airflow(self, env: dict[str, str], api_port: int) -> None:
        airflow = str(BIN / "airflow")
        run([airflow, "db", "migrate"], env=env)
        api = self.spawn("api-server", [airflow, "api-server", "--host", "127.0.0.1", "--port", str(api_port)], env)
        self.spawn("scheduler", [airflow, "scheduler"], env)
        self.spawn("dag-processor", [airflow, "dag-processor"], env)
        base = f"http://127.0.0.1:{api_port}"
        wait_for("api-server", lambda: answers(f"{base}/api/v2/monitor/health"), api)
        self.state["api"] = {"url": base, "username": "admin", "password": ADMIN_PASSWORD}
        self.save()

    def start_worker(self, index: int, queues: str, concurrency: int, env: dict[str, str]) -> None:
        """A Celery worker with its own name, home, scratch directory and model cache."""
        name = f"sieve-worker-{index}"
        home = self.root / name
        for sub in ("home", "tmp", "cache"):
            (home / sub).mkdir(parents=True, exist_ok=True)
        worker_env = {**env, "AIRFLOW_HOME": str(home / "home"), "TMPDIR": str(home / "tmp"),
                      "SIEVE_CACHE": str(home / "cache"), "SIEVE_WORKER_HOSTNAME": name}
        # no log server: it would bind every interface (task logs stay in the worker's home)
        record = self.spawn(name, [str(BIN / "airflow"), "celery", "worker", "--queues", queues, "--concurrency",
                                   str(concurrency), "--celery-hostname", f"{name}@127.0.0.1", "--skip-serve-logs",
                                   "--without-mingle", "--without-gossip"], worker_env)
        self.state["workers"].append({"name": name, "hostname": name, "queues": queues.split(","),
                                      "pid": record["pid"], "log": record["log"], "home": str(home)})
        self.save()

    def wait_for_workers(self) -> None:
        for worker in self.state["workers"]:
            wait_for(worker["name"], lambda w=worker: " ready." in Path(w["log"]).read_text(errors="replace"), worker)

    def stop(self) -> None:
        """Every process (newest first, its whole session: a worker's running tasks too), then PostgreSQL."""
        for record in reversed(self.state["processes"]):
            stop_session(record["pid"])
        postgres = self.state.get("postgres")
        if postgres and Path(postgres["data"], "db", "postmaster.pid").exists():
            subprocess.run(as_postgres_user([postgres_tool("pg_ctl"), "-D", str(Path(postgres["data"], "db")),
                                             "-m", "fast", "-w", "stop"]), capture_output=True)
        if postgres:
            shutil.rmtree(postgres["data"], ignore_errors=True)


def repair_request_log(path: Path) -> None:
    """One request per line again: moto's recorder appends from concurrent threads without a lock, so two
    records can share a line (``{A}{B}``), and a record cut by the stop is dropped."""
    text, decoder, records, position = path.read_text(), json.JSONDecoder(), [], 0
    while (position := WHITESPACE.match(text, position).end()) < len(text):
        try:
            record, position = decoder.raw_decode(text, position)
        except json.JSONDecodeError:
            break  # the last record, cut short
        records.append(record)
    path.write_text("".join(json.dumps(record) + "\n" for record in records))


def _connects(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False


def stop_session(pid: int, grace_s: float = 30) -> None:
    """SIGTERM to the process group ``pid`` leads, SIGKILL to what is left after ``grace_s``."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10)):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait_s
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if not alive(pid):
            try:
                os.killpg(pid, signal.SIGKILL)  # children that outlived their leader
            except ProcessLookupError:
                pass
            return


def up(root: Path, options: argparse.Namespace) -> Cluster:
    root.mkdir(parents=True, exist_ok=True)
    if (root / STATE).exists():
        raise SystemExit(f"{root / STATE} exists: run 'down --dir {root}' first")
    cluster = Cluster(root)
    try:
        database = cluster.start_postgres()
        broker = cluster.start_redis()
        s3 = cluster.start_s3()
        api_port = free_port()
        env = cluster.airflow_env(database, broker, s3, api_port, options)
        cluster.start_airflow(env, api_port)
        for index, queues in enumerate(options.worker or ["default", options.gpu_queue], 1):
            cluster.start_worker(index, queues, options.concurrency, env)
        cluster.wait_for_workers()
    except BaseException:
        cluster.stop()
        (root / STATE).unlink(missing_ok=True)
        raise
    return cluster


def load(root: Path) -> Cluster | None:
    state_file = root / STATE
    if not state_file.exists():
        return None
    cluster = Cluster(root)
    cluster.state = json.loads(state_file.read_text())
    return cluster


def down(root: Path) -> None:
    if cluster := load(root):
        cluster.stop()
        (root / STATE).unlink()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["up", "down", "restart-s3"])
    parser.add_argument("--dir", type=Path, default=REPO / "distributed", help="state, logs, worker homes")
    parser.add_argument("--worker", action="append", metavar="QUEUES",
                        help="one worker listening to these comma-separated queues (default: default, gpu)")
    parser.add_argument("--gpu-queue", default="gpu", help="queue of local mode's caption and embed tasks")
    parser.add_argument("--concurrency", type=int, default=1, help="task slots per worker")
    parser.add_argument("--heartbeat-timeout", type=int, help="seconds without a heartbeat before a running "
                        "task is failed ([scheduler] task_instance_heartbeat_timeout; Airflow's default: 300)")
    parser.add_argument("--retry-delay", type=float, help="seconds before a failed task's first retry "
                        "(the DAGs' default: minutes)")
    parser.add_argument("--foreground", action="store_true", help="stay until Ctrl-C, then stop everything")
    args = parser.parse_args(argv)
    root = args.dir.resolve()
    if args.command == "down":
        down(root)
        return 0
    if args.command == "restart-s3":
        if not (cluster := load(root)):
            raise SystemExit(f"no setup in {root}")
        cluster.restart_s3()
        cluster.save()
        return 0
    cluster = up(root, args)
    api = cluster.state["api"]
    print(f"Airflow {api['url']} (admin / {api['password']}), S3 {cluster.state['s3']['endpoint']} bucket "
          f"{BUCKET} (connection {CONNECTION_ID}), workers: "
          + ", ".join(f"{w['name']} [{','.join(w['queues'])}]" for w in cluster.state["workers"])
          + f"\nstate and logs in {root}; stop with: scripts/distributed down --dir {root}", flush=True)
    if args.foreground:
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        try:
            signal.pause()
        except (KeyboardInterrupt, SystemExit):
            pass
        finally:
            down(root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
