"""The tar reader process gives what reading in process gives, errors included."""

from __future__ import annotations

from pathlib import Path

import pytest

from sieve_tasks import tar_reader
from sieve_tasks.pool import register_pool
from sieve_tasks.shards import Shard, read_samples
from sieve_tasks.tar_reader import samples_in_process


def test_the_tar_reader_process_gives_what_reading_in_process_gives(sample_pool, tmp_path):
    """Every sample, its bytes and its reason, in order — a truncated tar's last sample too."""
    shards = register_pool(sample_pool, str(tmp_path / "run"))
    data = Path(shards[0].tar_uri).read_bytes()
    (tmp_path / "00000009.tar").write_bytes(data[: len(data) // 2 + 100])
    truncated = Shard("00000009", str(tmp_path / "00000009.tar"))
    for shard in [*shards, truncated]:
        expected = list(read_samples(shard))
        assert list(samples_in_process(shard)) == expected
    assert expected[-1].reason == "truncated_tar"


def test_a_spare_reader_is_taken_by_the_next_read_and_replaced_until_stopped(sample_pool, tmp_path):
    """While kept, a reader started ahead of need serves each read (the same samples) and the next one starts; a
    spare that died is replaced by a fresh reader; once stopped, none waits; a spare whose caller goes ends."""
    shard = register_pool(sample_pool, str(tmp_path / "run"))[0]
    expected = list(read_samples(shard))
    tar_reader.keep_spare_reader()
    try:
        for _ in range(2):
            spare, = (reader.process for reader in tar_reader._spare)
            assert list(samples_in_process(shard)) == expected
            assert spare.returncode == 0  # it read the shard
            replacement, = (reader.process for reader in tar_reader._spare)
            assert replacement is not spare and replacement.poll() is None
        replacement.kill()
        replacement.wait()
        assert list(samples_in_process(shard)) == expected
    finally:
        tar_reader.stop_spare_reader()
    assert not tar_reader._spare and replacement.poll() is not None
    assert list(samples_in_process(shard)) == expected and not tar_reader._spare
    spare = tar_reader._spawn()
    spare.process.stdin.close()
    assert spare.process.wait(timeout=60) == 0
    spare.stop()


def test_a_reader_that_dies_is_an_error_with_its_last_words(sample_pool, tmp_path, monkeypatch):
    dying = tmp_path / "dying-python"
    dying.write_text("#!/bin/sh\necho 'MemoryError: killed' >&2\nexit 3\n")
    dying.chmod(0o755)
    monkeypatch.setattr(tar_reader.sys, "executable", str(dying))
    shard = register_pool(sample_pool, str(tmp_path / "run"))[0]
    with pytest.raises(RuntimeError, match=r"ended without finishing the shard \(exit code 3\): MemoryError: killed"):
        list(samples_in_process(shard))


def test_what_the_reader_prints_does_not_reach_the_samples(sample_pool, tmp_path, monkeypatch):
    """A library that prints on stdout as the reader starts (here a sitecustomize) leaves the samples intact."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text("print('hello from an import that prints')\n")
    monkeypatch.setenv("PYTHONPATH", str(site))
    shard = register_pool(sample_pool, str(tmp_path / "run"))[0]
    expected = list(read_samples(shard))
    assert len(expected) > 1 and list(samples_in_process(shard)) == expected


def test_a_stream_that_breaks_off_is_an_error_whatever_the_exit_status(sample_pool, tmp_path, monkeypatch):
    """The caller's side of the stream breaking off (the reader then ends with status 0, its pipe closed) is an
    error, not a shorter shard."""
    real = tar_reader.pa.ipc.open_stream

    def breaking(source):  # the stream's first record batch, then a break
        yield next(iter(real(source)))
        raise tar_reader.pa.ArrowInvalid("stream broke off")

    monkeypatch.setattr(tar_reader.pa.ipc, "open_stream", breaking)
    shard = register_pool(sample_pool, str(tmp_path / "run"))[0]
    with pytest.raises(RuntimeError, match="came from the reader broken off"):
        list(samples_in_process(shard))


def test_a_read_error_is_raised_in_the_consumer(tmp_path):
    with pytest.raises(FileNotFoundError):
        list(samples_in_process(Shard("00000000", str(tmp_path / "00000000.tar"))))


def test_the_reader_gets_the_callers_storage_options(s3_server, monkeypatch):
    """Credentials given in code (not in the environment) reach the reader through its stdin."""
    import fsspec

    from sieve_tasks import storage
    from sieve_tasks.sample_pool import make_sample_pool

    fsspec.filesystem("s3").invalidate_cache()
    make_sample_pool("s3://sieve-test/reader-pool")
    for name in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    options = {"endpoint_url": s3_server, "key": "test", "secret": "test"}
    with storage.storage_options("s3", options):
        shard = Shard("00000000", "s3://sieve-test/reader-pool/00000000.tar")
        expected = list(read_samples(shard))
        assert len(expected) > 1 and list(samples_in_process(shard)) == expected
