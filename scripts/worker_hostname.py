"""``[core] hostname_callable`` for the workers that ``scripts/distributed`` starts on one machine.

Each worker has its own name (``SIEVE_WORKER_HOSTNAME``), which Airflow records in the task instances it
runs, as separate machines would record theirs; without it, the machine's own name.
"""

import os
import socket


def hostname() -> str:
    return os.environ.get("SIEVE_WORKER_HOSTNAME") or socket.getfqdn()
