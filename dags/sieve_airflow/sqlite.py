"""Connection arguments for the embedded default (SQLite metadata DB shared by several Airflow processes).

SQLite allows one writer at a time; without a busy timeout, a CLI command such as ``airflow backfill
create`` fails with "database is locked" whenever the scheduler is writing. Point
``AIRFLOW__DATABASE__SQL_ALCHEMY_CONNECT_ARGS`` at ``sieve_airflow.sqlite.CONNECT_ARGS`` to wait instead.
"""

CONNECT_ARGS = {"timeout": 60}
