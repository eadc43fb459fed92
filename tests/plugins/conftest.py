"""The plugin tests share the DAG tests' throw-away Airflow home (configured before airflow is imported)."""

from __future__ import annotations

from tests.dags import airflow_env
from tests.dags.conftest import airflow_db, demo_pool  # noqa: F401  (session fixtures, reused)

AIRFLOW_HOME = airflow_env.configure()
