import os

import pytest

from sieve_tasks import storage
from sieve_tasks.shards import discover_shards


def test_brace_expansion():
    assert storage.expand_braces("p/{00000000..00000002}.tar") == ["p/00000000.tar", "p/00000001.tar", "p/00000002.tar"]
    assert storage.expand_braces("{a,b}/{1..2}.tar") == ["a/1.tar", "a/2.tar", "b/1.tar", "b/2.tar"]
    with pytest.raises(ValueError, match="unbalanced"):
        storage.expand_braces("p/{0..1.tar")


def test_atomic_write_leaves_no_temporaries(tmp_path):
    target = tmp_path / "sub" / "x.json"
    storage.write_json_atomic(str(target), {"b": 1, "a": 2})
    assert target.read_text() == '{\n  "a": 2,\n  "b": 1\n}\n'
    assert sorted(os.listdir(target.parent)) == ["_tmp", "x.json"] and os.listdir(target.parent / "_tmp") == []
    assert oct(target.stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def test_failed_staging_publishes_nothing(tmp_path):
    target = tmp_path / "out.bin"
    with pytest.raises(RuntimeError):
        with storage.LocalStaging(str(target)) as staged:
            open(staged.path, "wb").write(b"partial")
            raise RuntimeError("crash while writing")
    assert os.listdir(tmp_path) == ["_tmp"] and os.listdir(tmp_path / "_tmp") == []


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def test_discover_shards_by_dir_glob_and_braces(sample_pool):
    by_dir = discover_shards(sample_pool)
    assert [s.shard_id for s in by_dir] == ["00000000", "00000001"]
    assert discover_shards(f"{sample_pool}/*.tar") == by_dir
    assert discover_shards(f"{sample_pool}/{{00000000..00000001}}.tar") == by_dir
    assert [s.shard_id for s in discover_shards(f"{sample_pool}/00000001.tar")] == ["00000001"]


def test_discover_shards_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no .tar shards"):
        discover_shards(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        discover_shards(str(tmp_path / "00000007.tar"))
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "00000000.tar").write_bytes(b"")
    (tmp_path / "b" / "00000000.tar").write_bytes(b"")
    with pytest.raises(ValueError, match="share the id"):
        discover_shards(f"{tmp_path}/a {tmp_path}/b")


def test_concurrent_contexts_each_see_their_own_storage_options():
    """Two tasks of one worker (threads) with different credentials, inside their blocks at the same time."""
    import threading

    environment = dict(os.environ)
    both_inside = threading.Barrier(2)
    seen: dict[str, dict] = {}

    def task(name: str) -> None:
        with storage.storage_options("s3", {"key": f"key-{name}", "secret": f"secret-{name}",
                                            "endpoint_url": f"http://{name}.invalid"}):
            both_inside.wait(timeout=10)
            fs, path = storage.filesystem("s3://bucket/run/x.json")
            seen[name] = {"options": storage.current_options("s3"), "key": fs.key,
                          "endpoint": fs.client_kwargs.get("endpoint_url") or fs.endpoint_url, "path": path}
            both_inside.wait(timeout=10)
        seen[name + "-after"] = storage.current_options("s3")

    threads = [threading.Thread(target=task, args=(name,)) for name in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for name in ("a", "b"):
        assert seen[name]["options"]["key"] == seen[name]["key"] == f"key-{name}"
        assert seen[name]["endpoint"] == f"http://{name}.invalid"
        assert seen[name]["path"] == "bucket/run/x.json"
        assert seen[name + "-after"] == {}
    assert dict(os.environ) == environment  # nothing went through the process environment
    assert storage.current_options("s3") == {}


def test_storage_options_reach_a_real_server_without_the_environment(s3_server, monkeypatch):
    storage.write_bytes_atomic("s3://sieve-test/options/x.bin", b"payload")
    options = {"key": "test", "secret": "test", "endpoint_url": s3_server,
               "client_kwargs": {"region_name": "us-east-1"}}
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # the environment leads nowhere
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "wrong")
    with storage.storage_options("s3", options):
        assert storage.read_bytes("s3://sieve-test/options/x.bin") == b"payload"
        with storage.open_file("s3://sieve-test/options/x.bin") as handle:
            assert handle.read() == b"payload"


def test_pool_threads_see_the_options_only_when_carried():
    from concurrent.futures import ThreadPoolExecutor

    with storage.storage_options("s3", {"key": "task-key"}), ThreadPoolExecutor(2) as pool:
        carried = list(pool.map(storage.carrying_options(lambda _: storage.current_options("s3")), range(4)))
        bare = list(pool.map(lambda _: storage.current_options("s3"), range(4)))
    assert carried == [{"key": "task-key"}] * 4
    assert bare == [{}] * 4  # why the cache readers carry them


def test_a_refused_conditional_write_is_told_from_the_error_response_not_its_text():
    """A connection error whose URL holds "412" (a run id with microseconds) is no lost race; S3's answers are."""
    from botocore.exceptions import ClientError

    def refused(code: str, status: int) -> OSError:
        answer = ClientError({"Error": {"Code": code, "Message": "At least one of the pre-conditions did not hold"},
                              "ResponseMetadata": {"HTTPStatusCode": status}}, "PutObject")
        error = OSError(22, "At least one of the pre-conditions did not hold")
        error.__cause__ = answer  # as s3fs translates botocore's error
        return error

    url = "http://minio:9000/bucket/runs/manual__2026-01-05T10_41_23.412345_00_00/_lease.json"
    assert not storage._is_precondition_failure(ConnectionError(f'Could not connect to the endpoint URL: "{url}"'))
    assert storage._is_precondition_failure(refused("PreconditionFailed", 412))
    assert storage._is_precondition_failure(refused("ConditionalRequestConflict", 409))
    assert not storage._is_precondition_failure(refused("SlowDown", 503))
