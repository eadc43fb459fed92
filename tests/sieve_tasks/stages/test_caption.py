"""The caption stage with CLIP's alt-text tokenizer in worker processes (as on CUDA) writes what it writes inline."""

from __future__ import annotations

import pyarrow.parquet as pq

from sieve_tasks.encoders import ClipEncoder
from sieve_tasks.models import Device
from sieve_tasks.pool import register_pool
from sieve_tasks.runner import caption_shards
from sieve_tasks.settings import Settings
from sieve_tasks.stages.caption import CaptionStage
from sieve_tasks.test_models import TINY_CLIP


def test_clip_tokenizer_processes_give_the_inline_captions_table(sample_pool, tmp_path):
    settings = Settings(profile="test")
    tables = []
    for processes in (0, 1):
        run = str(tmp_path / f"run{processes}")
        clip = ClipEncoder(TINY_CLIP, Device.choose("cpu"), settings.embed_batch_size, processes)
        stage = CaptionStage(run, settings, clip=clip)
        for _ in caption_shards(stage, register_pool(sample_pool, run)):
            pass
        assert clip._tokenizing is None  # the stage's close() stopped the processes
        tables.append(pq.read_table(f"{run}/captions").sort_by([("shard", "ascending"), ("position", "ascending")]))
    inline, pooled = tables
    assert inline.column("clip_score").null_count < inline.num_rows
    assert pooled.equals(inline)
