"""The same pipeline on a real S3-compatible server (moto on 127.0.0.1): same results as local files."""

import os

import boto3
import fsspec
import pytest

from sieve_tasks import storage
from sieve_tasks.cli import main
from sieve_tasks.sample_pool import make_sample_pool
from sieve_tasks.test_models import TINY_BLIP, TINY_CLIP, tiny_model_dir

pytestmark = pytest.mark.slow


def _upload_dir(local, uri):
    fs, path = storage.filesystem(uri)
    for name in os.listdir(local):
        if not name.startswith("."):
            fs.put_file(os.path.join(local, name), f"{path}/{name}")


def test_s3_run_equals_local_run(s3_server, test_profile_run):
    fsspec.filesystem("s3").invalidate_cache()
    make_sample_pool("s3://sieve-test/pool")
    assert main(["run", "s3://sieve-test/pool", "s3://sieve-test/runs/demo", "--profile", "test", "--no-progress"]) == 0
    for name in ("subset.npy", "kept.parquet", "summary.json"):
        remote = storage.read_bytes(f"s3://sieve-test/runs/demo/manifest/{name}")
        local = open(os.path.join(test_profile_run, "manifest", name), "rb").read()
        if name == "summary.json":  # differs only in where the manifest lives and in timings
            import json

            remote, local = json.loads(remote), json.loads(local)
            for doc in (remote, local):
                doc.pop("manifest"), doc.pop("timings_seconds")
        assert remote == local, name
    keys = [o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket="sieve-test", Prefix="runs/demo/")["Contents"]]
    assert not [k for k in keys if "tmp" in k], "no temporary objects may remain"


def test_models_load_from_an_s3_model_store(s3_server, sample_pool, tmp_path):
    _upload_dir(tiny_model_dir(TINY_BLIP), "s3://sieve-test/models/blip")
    _upload_dir(tiny_model_dir(TINY_CLIP), "s3://sieve-test/models/clip")
    run = tmp_path / "run"
    assert main(["run", sample_pool, str(run), "--captioner", "s3://sieve-test/models/blip",
                 "--clip", "s3://sieve-test/models/clip", "--no-progress"]) == 0
    import json

    summary = json.loads((run / "manifest" / "summary.json").read_text())
    assert summary["models"]["captioner"] == "s3://sieve-test/models/blip"
    assert summary["counts"]["scored"] == 16


def test_missing_model_store_is_a_clear_error(s3_server, sample_pool, tmp_path, capsys):
    assert main(["caption", sample_pool, str(tmp_path / "r"), "--captioner", "s3://sieve-test/models/absent"]) == 2
    assert ("captioner s3://sieve-test/models/absent is not available: s3://sieve-test/models/absent does not exist"
            in capsys.readouterr().err)
