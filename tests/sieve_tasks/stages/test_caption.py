"""The caption stage with its CUDA helpers — CLIP's alt-text tokenizer and the tar reader in processes of their own —
writes what it writes without them."""

from __future__ import annotations

import pyarrow.parquet as pq

from sieve_tasks.encoders import ClipEncoder
from sieve_tasks.models import Device
from sieve_tasks.pool import register_pool
from sieve_tasks.runner import caption_shards
from sieve_tasks.settings import Settings
from sieve_tasks.stages.caption import CaptionStage
from sieve_tasks.test_models import TINY_CLIP


def test_worker_processes_give_the_inline_captions_table(sample_pool, tmp_path, monkeypatch):
    settings = Settings(profile="test")
    tables = []
    for processes in (0, 1):
        run = str(tmp_path / f"run{processes}")
        clip = ClipEncoder(TINY_CLIP, Device.choose("cpu"), settings.embed_batch_size, processes)
        stage = CaptionStage(run, settings, clip=clip)
        make_pass = stage.image_pass

        def image_pass(make_pass=make_pass, processes=processes):
            images = make_pass()
            images.reader_process = bool(processes)
            return images

        monkeypatch.setattr(stage, "image_pass", image_pass)
        for _ in caption_shards(stage, register_pool(sample_pool, run)):
            pass
        assert clip._tokenizing is None  # the stage's close() stopped the processes
        tables.append(pq.read_table(f"{run}/captions").sort_by([("shard", "ascending"), ("position", "ascending")]))
    inline, pooled = tables
    assert inline.column("clip_score").null_count < inline.num_rows
    assert "failed" in inline.column("status").to_pylist()
    assert pooled.equals(inline)
