"""One throw-away Airflow installation per test session (SQLite, no examples, this repo's dags/ and plugins/).

Airflow reads its configuration when first imported, so ``configure()`` must run before any ``import
airflow``: the conftest files of tests/dags and tests/plugins call it at import time. The library tests
(tests/test_*.py) never import this module, so they do not pay for Airflow.
"""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DAGS = REPO / "dags"
PLUGINS = REPO / "plugins"
VENV_BIN = Path(sys.executable).parent


def configure() -> Path:
    """Point Airflow at a fresh home (once per process) and return it."""
    if os.environ.get("SIEVE_TEST_AIRFLOW_HOME"):
        return Path(os.environ["SIEVE_TEST_AIRFLOW_HOME"])
    if "airflow" in sys.modules:
        raise RuntimeError("airflow was imported before the test Airflow home was configured")
    home = Path(tempfile.mkdtemp(prefix="sieve-airflow-"))
    atexit.register(shutil.rmtree, home, ignore_errors=True)
    env = {
        "SIEVE_TEST_AIRFLOW_HOME": str(home),
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(PLUGINS),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home}/airflow.db",
        "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
        "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
        "SIEVE_RUN_BASE": str(home / "sieve-runs"),
    }
    if not os.environ.get("SIEVE_CACHE"):
        env["SIEVE_CACHE"] = str(home / "sieve-cache")
    os.environ.update(env)
    if str(DAGS) not in sys.path:  # what the dag processor and workers do for the dags-folder bundle
        sys.path.append(str(DAGS))
    if str(PLUGINS) not in sys.path:
        sys.path.append(str(PLUGINS))
    return home


def migrate() -> None:
    """``airflow db migrate`` into the session's SQLite file (idempotent; ~3 s)."""
    subprocess.run([str(VENV_BIN / "airflow"), "db", "migrate"], check=True, env=os.environ.copy(),
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
