"""Who hears about a ``warning`` health verdict: the notifiers the publish task calls (a ``failed`` verdict
fails the task, so the DAG's ``on_failure_callback`` applies). Any Airflow notifier fits, e.g. the Slack
provider's (``pip install apache-airflow-providers-slack``)::

    from airflow.providers.slack.notifications.slack import SlackNotifier

    HEALTH_WARNING_NOTIFIERS = [SlackNotifier(
        slack_conn_id="slack", channel="#data-curation",
        text="SIEVE {{ dag.dag_id }} {{ run_id }}: {{ sieve_health.verdict }} - {{ sieve_report_url }}")]

Templates see the task context plus ``sieve_health`` (verdict, findings, rules) and ``sieve_report_url``.
"""

from __future__ import annotations

from typing import Any

HEALTH_WARNING_NOTIFIERS: list[Any] = []
