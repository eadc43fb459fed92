"""Airflow test environment for the DAG tests: configured before anything imports airflow."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import airflow_env  # noqa: E402

AIRFLOW_HOME = airflow_env.configure()


@pytest.fixture(scope="session")
def airflow_db() -> Path:
    """A migrated metadata DB (SQLite) in the session's throw-away AIRFLOW_HOME."""
    airflow_env.migrate()
    from airflow import settings

    settings.configure_orm()
    return AIRFLOW_HOME


@pytest.fixture(scope="session")
def dagbag(airflow_db):
    """dags/ parsed the way the dag processor parses the dags-folder bundle."""
    from airflow.dag_processing.dagbag import BundleDagBag

    return BundleDagBag(dag_folder=str(airflow_env.DAGS), bundle_path=airflow_env.DAGS, bundle_name="dags-folder")


@pytest.fixture(scope="session")
def demo_pool(tmp_path_factory) -> str:
    """The demo pool: 2 shards, 17 samples, one undecodable JPEG."""
    from sieve_tasks.sample_pool import make_sample_pool

    out = tmp_path_factory.mktemp("pool")
    make_sample_pool(str(out))
    return str(out)
