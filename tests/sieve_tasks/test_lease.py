import subprocess
import sys
import time

import pytest

from sieve_tasks import lease
from sieve_tasks.cli import main


def test_second_writer_is_refused_with_owner_and_expiry(tmp_path, sample_pool, capsys):
    run = str(tmp_path / "run")
    lease.acquire(run, "team-a@host-1:42", ttl=300)
    assert main(["caption", sample_pool, run, "--profile", "test", "--lease-owner", "team-b"]) == 2
    err = capsys.readouterr().err
    assert "being written by 'team-a@host-1:42'" in err and "expires in" in err
    assert not (tmp_path / "run" / "captions").exists()


def test_same_owner_reenters_and_release_removes_the_lease(tmp_path):
    run = str(tmp_path / "run")
    assert lease.acquire(run, "airflow:run-1") is True
    assert lease.acquire(run, "airflow:run-1") is False  # another task of the same Airflow run
    lease.release(run, "airflow:run-1")
    assert not (tmp_path / "run" / "_lease.json").exists()


def test_expired_lease_can_be_taken_over_to_resume(tmp_path):
    run = str(tmp_path / "run")
    lease.acquire(run, "crashed-pod", ttl=0.2)
    with pytest.raises(lease.LeaseHeld):
        lease.acquire(run, "resumer")
    time.sleep(0.3)
    assert lease.acquire(run, "resumer") is True


def test_dead_process_on_this_host_does_not_block_a_resume(tmp_path):
    import socket

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    run = str(tmp_path / "run")
    lease.acquire(run, f"me@{socket.gethostname()}:{dead.pid}", ttl=300)
    assert lease.acquire(run, "me-again") is True


def test_hold_renews_and_releases(tmp_path):
    run = str(tmp_path / "run")
    with lease.hold(run, "holder", ttl=0.4):
        time.sleep(0.6)  # longer than the ttl: only renewals keep it alive
        with pytest.raises(lease.LeaseHeld):
            lease.acquire(run, "intruder", ttl=0.4)
    assert not (tmp_path / "run" / "_lease.json").exists()


def test_renewals_use_the_storage_options_of_the_block(tmp_path, monkeypatch):
    """The renewal thread writes with the credentials of the task that holds the lease, not the environment's."""
    from sieve_tasks import storage

    renewed_with = []
    acquire = lease.acquire

    def recording_acquire(run, owner, ttl=lease.DEFAULT_TTL_SECONDS):
        renewed_with.append(storage.current_options("s3"))
        return acquire(run, owner, ttl)

    monkeypatch.setattr(lease, "acquire", recording_acquire)
    with storage.storage_options("s3", {"key": "task-key"}), lease.hold(str(tmp_path / "run"), "holder", ttl=0.2):
        time.sleep(0.3)
    assert len(renewed_with) >= 2 and all(options == {"key": "task-key"} for options in renewed_with)


def test_a_holder_whose_lease_was_taken_fails_when_its_block_ends(tmp_path):
    """Renewals that failed for a whole ttl let the lease expire and another writer take it: the holder must not end
    as if its writes were the run's only ones (nor release the taker's lease)."""
    import json

    run = str(tmp_path / "run")
    with pytest.raises(lease.LeaseHeld, match="the lease was lost while this block wrote"):
        with lease.hold(run, "holder", ttl=0.4):
            taken = {"owner": "taker", "acquired_at": time.time(), "expires_at": time.time() + 60}
            (tmp_path / "run" / "_lease.json").write_text(json.dumps(taken))
            time.sleep(0.3)
    assert json.loads((tmp_path / "run" / "_lease.json").read_text())["owner"] == "taker"


def test_a_run_with_a_shared_owner_releases_the_lease_when_it_has_published(tmp_path, sample_pool):
    """`sieve run` ends with publish, the step that releases a shared owner's lease."""
    run = str(tmp_path / "run")
    assert main(["run", sample_pool, run, "--profile", "test", "--no-progress", "--lease-owner", "me"]) == 0
    assert not (tmp_path / "run" / "_lease.json").exists()
    assert main(["caption", sample_pool, run, "--profile", "test", "--lease-owner", "another"]) == 0
