"""Airflow glue for the SIEVE curation DAGs: params, planning, the pod operator, the publish operator.

Kept out of the DAG files so those stay thin, and importable without torch: ``sieve_tasks`` is only
imported inside tasks, never while the scheduler parses DAG files.
"""
