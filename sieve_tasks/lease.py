"""A lease on a run directory, so two different runs never write one ``RUN`` at once.

``RUN/_lease.json`` holds ``owner`` and ``expires_at``. A writer whose owner differs is refused while the
lease is alive; once it expired (its holder died and stopped renewing it), or at once when the holder was
a process of this host that no longer exists, anyone may take it over and resume the run. The holder renews it
in a background thread. Tasks of one Airflow run share an owner (the run id), so they hold the lease together.

Every change is a conditional write (:func:`storage.write_if`): create only if absent, replace only if unchanged
since read (``If-None-Match: *`` / ``If-Match`` on S3, ``flock`` locally), so of two writers starting at the same
instant exactly one wins. A store that ignores conditional writes is detected once per bucket and gets the older
write-then-re-read check, with a warning that it cannot be exact.
"""

import contextvars
import getpass
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

from sieve_tasks import storage

DEFAULT_TTL_SECONDS = 600
log = logging.getLogger(__name__)


class LeaseHeld(RuntimeError):
    """Another owner holds a live lease on the run."""


def default_owner() -> str:
    return os.environ.get("SIEVE_LEASE_OWNER") or f"{getpass.getuser()}@{socket.gethostname()}:{os.getpid()}"


def lease_uri(run: str) -> str:
    return storage.join(run, "_lease.json")


def acquire(run: str, owner: str, ttl: float = DEFAULT_TTL_SECONDS) -> bool:
    """Take or renew the lease; True when this call took it (new or from another owner). Raises :class:`LeaseHeld`."""
    uri = lease_uri(run)
    exact = _conditional_writes_work(run)
    for _ in range(5):
        now = time.time()
        record = json.dumps({"owner": owner, "acquired_at": now, "expires_at": now + ttl}).encode()
        try:
            storage.write_if(uri, record, None)
            return _confirmed(uri, owner, exact, created=True)
        except storage.PreconditionFailed:
            pass
        try:
            data, version = storage.read_versioned(uri)
        except FileNotFoundError:
            continue  # released in between: try to create it again
        current = json.loads(data)
        if current["owner"] != owner and current["expires_at"] > now and not _holder_died_here(current["owner"]):
            raise LeaseHeld(
                f"run {run} is being written by {current['owner']!r} (lease expires in "
                f"{current['expires_at'] - now:.0f} s, {uri}); wait for it, or use another run directory"
            )
        try:
            storage.write_if(uri, record, version)
            return _confirmed(uri, owner, exact, created=current["owner"] != owner)
        except storage.PreconditionFailed:
            continue  # another writer changed it since we read it: look again
    raise LeaseHeld(f"run {run}: other writers keep taking the lease at the same moment; try again")


def _confirmed(uri: str, owner: str, exact: bool, created: bool) -> bool:
    if not exact:  # best effort on stores without conditional writes: let a racing write land, then look
        time.sleep(0.5)
        if json.loads(storage.read_bytes(uri))["owner"] != owner:
            raise LeaseHeld(f"{uri}: another writer took the lease at the same moment; try again")
    return created


_CONDITIONAL_WRITES: dict[tuple[str | None, str], bool] = {}


def _conditional_writes_work(run: str) -> bool:
    """Whether the run's store refuses a second ``If-None-Match: *`` create (probed once per bucket)."""
    if storage.is_local(run):
        return True
    # per endpoint and bucket: tasks of one worker may use different object stores
    bucket = (storage.current_options("s3").get("endpoint_url"), storage.filesystem(run)[1].split("/", 1)[0])
    if bucket not in _CONDITIONAL_WRITES:
        probe = storage.join(run, f"_lease.probe-{uuid.uuid4().hex}")
        storage.write_if(probe, b"1", None)
        try:
            storage.write_if(probe, b"2", None)
            _CONDITIONAL_WRITES[bucket] = False
            log.warning("bucket %s (endpoint %s) ignores conditional writes: the run lease falls back to "
                        "write-then-check, which two writers starting within the same second can both pass",
                        bucket[1], bucket[0] or "default")
        except storage.PreconditionFailed:
            _CONDITIONAL_WRITES[bucket] = True
        finally:
            storage.remove(probe)
    return _CONDITIONAL_WRITES[bucket]


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
    try:
        data, _ = storage.read_versioned(uri)
    except FileNotFoundError:
        return
    if json.loads(data)["owner"] == owner:
        storage.remove(uri)


@contextmanager
def hold(run: str, owner: str | None = None, ttl: float = DEFAULT_TTL_SECONDS, release_at_end: bool = True
         ) -> Iterator[str]:
    """Hold the lease for the duration of the block, renewing it every ``ttl / 4`` seconds. A holder whose lease
    was taken by another owner (it expired: renewals failed for ``ttl``) raises :class:`LeaseHeld` when the block
    ends, instead of ending as if its writes were the run's only ones.

    A lease shared by many processes (an explicit owner such as an Airflow run id) is not released
    when one of them ends, or its siblings would lose it: pass ``release_at_end=False``; the run's last
    step (publish) releases it, or it expires. When the block fails, a failure to release is logged and the
    block's own error is the one raised.
    """
    owner = owner or default_owner()
    acquire(run, owner, ttl)
    stop = threading.Event()
    lost: list[LeaseHeld] = []

    def renew() -> None:
        while not stop.wait(ttl / 4):
            try:
                acquire(run, owner, ttl)
            except LeaseHeld as exc:  # another writer took it after it expired
                log.error("lost the lease on %s: %s", run, exc)
                lost.append(exc)
                return
            except Exception:  # a renewal that fails leaves the lease to expire; the work itself goes on
                log.warning("renewing the lease on %s failed", run, exc_info=True)

    # the block's storage options (credentials) go with the renewal thread
    thread = threading.Thread(target=contextvars.copy_context().run, args=(renew,), name="sieve-lease", daemon=True)
    thread.start()
    failed = True
    try:
        yield owner
        failed = False
    finally:
        stop.set()
        thread.join()
        if release_at_end:
            try:
                release(run, owner)
            except Exception:
                if not failed:
                    raise
                log.warning("releasing the lease on %s failed (the run's own error follows)", run, exc_info=True)
        if lost and not failed:
            raise LeaseHeld(f"run {run}: the lease was lost while this block wrote ({lost[0]}); its outputs may be "
                            "mixed with another writer's: check that run, then run this again")
