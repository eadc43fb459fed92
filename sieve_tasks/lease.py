"""A lease on a run directory, so two different runs never write one ``RUN`` at once.

``RUN/_lease.json`` holds ``owner`` and ``expires_at``. A writer whose owner differs is refused while the
lease is alive; once it expired (its holder died and stopped renewing it), or at once when the holder was
a process of this host that no longer exists, anyone may take it over and resume the run. The holder renews it in a background thread. Tasks of one Airflow run share an owner (the
run id), so they hold the lease together. Object stores offer no compare-and-swap here: two writers
starting within the same second can both win, which the re-read after writing narrows but cannot close.
"""

from __future__ import annotations

import getpass
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from sieve_tasks import storage

DEFAULT_TTL_SECONDS = 600


class LeaseHeld(RuntimeError):
    """Another owner holds a live lease on the run."""


def default_owner() -> str:
    return os.environ.get("SIEVE_LEASE_OWNER") or f"{getpass.getuser()}@{socket.gethostname()}:{os.getpid()}"


def lease_uri(run: str) -> str:
    return storage.join(run, "_lease.json")


def acquire(run: str, owner: str, ttl: float = DEFAULT_TTL_SECONDS) -> bool:
    """Take or renew the lease; True when this call created it. Raises :class:`LeaseHeld`."""
    uri = lease_uri(run)
    now = time.time()
    created = True
    if storage.exists(uri):
        current = storage.read_json(uri)
        if current["owner"] != owner and current["expires_at"] > now and not _holder_died_here(current["owner"]):
            raise LeaseHeld(
                f"run {run} is being written by {current['owner']!r} (lease expires in "
                f"{current['expires_at'] - now:.0f} s, {uri}); wait for it, or use another run directory"
            )
        created = current["owner"] != owner
    storage.write_json_atomic(uri, {"owner": owner, "acquired_at": now, "expires_at": now + ttl})
    if storage.read_json(uri)["owner"] != owner:
        raise LeaseHeld(f"run {run}: another writer took the lease at the same moment; try again")
    return created


def _holder_died_here(owner: str) -> bool:
    """True when the holder is a process of this host that no longer exists (a crashed ``sieve`` run)."""
    host_and_pid = owner.rpartition("@")[2]
    host, _, pid = host_and_pid.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def release(run: str, owner: str) -> None:
    uri = lease_uri(run)
    if storage.exists(uri) and storage.read_json(uri)["owner"] == owner:
        fs, path = storage.filesystem(uri)
        fs.rm_file(path)


@contextmanager
def hold(run: str, owner: str | None = None, ttl: float = DEFAULT_TTL_SECONDS, release_at_end: bool = True
         ) -> Iterator[str]:
    """Hold the lease for the duration of the block, renewing it every ``ttl / 4`` seconds.

    A lease shared by many processes (an explicit owner such as an Airflow run id) is not released
    when one of them ends, or its siblings would lose it: pass ``release_at_end=False``; the run's last
    step (publish) releases it, or it expires.
    """
    owner = owner or default_owner()
    acquire(run, owner, ttl)
    stop = threading.Event()

    def renew() -> None:
        while not stop.wait(ttl / 4):
            try:
                acquire(run, owner, ttl)
            except Exception:  # a renewal that fails leaves the lease to expire; the work itself goes on
                pass

    thread = threading.Thread(target=renew, name="sieve-lease", daemon=True)
    thread.start()
    try:
        yield owner
    finally:
        stop.set()
        thread.join()
        if release_at_end:
            release(run, owner)
