"""sieve run's pipelining: the text side in a process of its own gives what the thread gives; a captioned shard is
written while the next one is captioned."""

from __future__ import annotations

import threading
import time

import pyarrow.parquet as pq
import pytest

from sieve_tasks import storage
from sieve_tasks.runner import caption_shards, run_all
from sieve_tasks.settings import Settings
from sieve_tasks.shards import Shard


def test_text_side_in_its_own_process_equals_the_thread(sample_pool, test_profile_run, tmp_path):
    run = str(tmp_path / "run")
    summary = run_all(sample_pool, run, Settings(profile="test"), progress=False, text_process=True)
    assert summary["counts"]["read"] == 17
    for name in ("subset.npy", "kept.parquet"):
        assert (tmp_path / "run" / "manifest" / name).read_bytes() == \
            open(f"{test_profile_run}/manifest/{name}", "rb").read(), name
    ours = pq.read_table(f"{run}/scores").sort_by("position").to_pylist()
    reference = pq.read_table(f"{test_profile_run}/scores").sort_by("position").to_pylist()
    assert ours == reference


class _PipelinedStage:
    """Stands in for the caption stage in ``caption_shards``: logs what happens when, and each shard's write
    records the storage options it ran with."""

    def __init__(self, fail_computing: str | None = None, fail_writing: str | None = None):
        self.events: list[str] = []
        self.computing = threading.Event()  # set while a later shard is being computed
        self.fail_computing, self.fail_writing = fail_computing, fail_writing
        self.options: dict[str, object] = {}

    def compute_shards(self, shards):
        for shard in shards:
            self.events.append(f"compute {shard.shard_id}")
            if shard.shard_id != "0":
                self.computing.set()
            if shard.shard_id == self.fail_computing:
                raise RuntimeError(f"captioning {shard.shard_id} failed")
            yield shard, lambda shard=shard: self._write(shard)

    def _write(self, shard):
        if shard.shard_id == "0":  # the first shard's write waits until the next shard is being computed
            assert self.computing.wait(timeout=30), "the write held up the next shard's captioning"
        if shard.shard_id == self.fail_writing:
            raise OSError(f"writing {shard.shard_id} failed")
        self.options[shard.shard_id] = storage.options_snapshot()
        self.events.append(f"written {shard.shard_id}")
        return {"shard": shard.shard_id}

    def close(self) -> None:
        self.events.append("closed")


def _shards(count: int) -> list[Shard]:
    return [Shard(str(i), f"/pool/{i}.tar", "{}") for i in range(count)]


def test_caption_shards_writes_a_shard_while_the_next_is_captioned():
    stage = _PipelinedStage()
    with storage.storage_options("s3", {"endpoint_url": "http://127.0.0.1:1"}):
        done = [(shard.shard_id, marker) for shard, marker in caption_shards(stage, _shards(3))]
    assert done == [(str(i), {"shard": str(i)}) for i in range(3)]
    assert stage.events.index("compute 1") < stage.events.index("written 0")
    assert stage.events[-1] == "closed"
    assert all(options == {"s3": {"endpoint_url": "http://127.0.0.1:1"}} for options in stage.options.values())


def test_caption_shards_writes_the_shard_before_a_failed_one_and_raises():
    stage = _PipelinedStage(fail_computing="1")
    with pytest.raises(RuntimeError, match="captioning 1 failed"):
        list(caption_shards(stage, _shards(3)))
    assert "written 0" in stage.events and "compute 2" not in stage.events and stage.events[-1] == "closed"


def test_caption_shards_raises_a_failed_write():
    stage = _PipelinedStage(fail_writing="1")
    yielded = []
    with pytest.raises(OSError, match="writing 1 failed"):
        for shard, _ in caption_shards(stage, _shards(3)):
            yielded.append(shard.shard_id)
    assert yielded == ["0"] and stage.events[-1] == "closed"



def _stand_in_run(monkeypatch, text_side_of, count: int, between=lambda index: None
                  ) -> tuple[list[str], threading.Event]:
    """``run_all`` patched to run over ``count`` stand-in shards: its caption stage logs each shard it yields
    (``between(i)`` runs before shard i) and sets the returned event when done; ``text_side_of`` replaces the text
    side (in a thread); aggregate and publish log."""
    from types import SimpleNamespace

    import torch

    from sieve_tasks import runner
    from sieve_tasks.stages import caption

    events: list[str] = []
    captioning_done = threading.Event()

    def captioned(stage, shards):
        for index, shard in enumerate(shards):
            between(index)
            events.append(f"captioned {shard.shard_id}")
            yield shard, {}
        captioning_done.set()

    monkeypatch.setattr(runner, "check_sources", lambda settings: None)
    monkeypatch.setattr(runner, "register_pool", lambda spec, run: _shards(count))
    monkeypatch.setattr(caption, "CaptionStage", lambda run, settings: SimpleNamespace(torch_device=torch.device("cpu")))
    monkeypatch.setattr(runner, "caption_shards", captioned)
    monkeypatch.setattr(runner, "text_side_of", text_side_of)
    monkeypatch.setattr(runner, "aggregate", lambda run, settings: events.append("aggregated"))
    monkeypatch.setattr(runner, "publish", lambda run, rules: events.append("published") or {})
    return events, captioning_done


def test_captioning_goes_on_while_the_text_side_loads(monkeypatch):
    """On CUDA the text side's process takes seconds to start and load its encoder: the caption stage must not wait
    for it after the first shard (the device would idle). Here the load ends only once every shard is captioned."""
    done: list[str] = []

    def text_side_of(run, settings, shard, options):
        if shard is None:
            done.append("loaded" if captioning_done.wait(timeout=10) else "load timed out")
        else:
            done.append(f"text {shard.shard_id}")

    events, captioning_done = _stand_in_run(monkeypatch, text_side_of, 4)
    run_all("pool", "run", Settings(), progress=False, text_process=False)
    assert done == ["loaded", "text 0", "text 1", "text 2", "text 3"]
    assert events == [f"captioned {i}" for i in range(4)] + ["aggregated", "published"]


def test_a_failed_text_side_stops_the_run_and_its_queued_shards(monkeypatch):
    """Shard 0's text side fails once shards 1–6 are queued behind it: the run raises that error when shard 6 is
    captioned, captions no more shards, and the queued text sides are cancelled (at most the one already started
    runs)."""
    queued, failed = threading.Event(), threading.Event()
    started: list[str] = []

    def text_side_of(run, settings, shard, options):
        if shard is not None and shard.shard_id == "0":
            assert queued.wait(timeout=10)
            failed.set()
            raise ValueError("embedding shard 0 failed")
        if shard is not None:
            started.append(shard.shard_id)
            time.sleep(0.3)

    def between(index):
        if index == 6:
            queued.set()
            assert failed.wait(timeout=10)
            time.sleep(0.05)  # the failure reaches its future

    events, _ = _stand_in_run(monkeypatch, text_side_of, 40, between)
    with pytest.raises(ValueError, match="embedding shard 0 failed"):
        run_all("pool", "run", Settings(), progress=False, text_process=False)
    assert events == [f"captioned {i}" for i in range(7)]
    assert started in ([], ["1"])


def test_a_score_task_does_not_import_torch(sample_pool, test_profile_run, tmp_path):
    """Score tasks (Airflow workers without an accelerator) import the runner; the caption stage, and with it
    torch (~2 s), loads only where shards are captioned. The scores are the run's own."""
    import shutil
    import subprocess
    import sys

    run = tmp_path / "run"
    shutil.copytree(test_profile_run, run, ignore=shutil.ignore_patterns("scores", "manifest"))
    code = ("import sys; from sieve_tasks.runner import run_shard_stage; from sieve_tasks.settings import Settings; "
            f"markers = run_shard_stage('score', {sample_pool!r}, {str(run)!r}, Settings(profile='test')); "
            "assert not any(m['skipped'] for m in markers), markers; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)
    ours = pq.read_table(f"{run}/scores").sort_by("position").to_pylist()
    assert ours == pq.read_table(f"{test_profile_run}/scores").sort_by("position").to_pylist()
