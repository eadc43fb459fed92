"""Runs stages over shards in one process: what the CLI, the Airflow tasks and worker pods call."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from tqdm import tqdm

from sieve_tasks.pool import register_pool, select_shards
from sieve_tasks.report.health import HealthRules
from sieve_tasks.settings import Settings
from sieve_tasks.shards import Shard
from sieve_tasks.stages.aggregate import aggregate
from sieve_tasks.stages.base import ShardStage
from sieve_tasks.stages.caption import CaptionStage
from sieve_tasks.stages.embed import EmbedStage
from sieve_tasks.stages.publish import publish
from sieve_tasks.stages.score import ScoreStage
from sieve_tasks.tables import check_sources

log = logging.getLogger(__name__)

SHARD_STAGES: dict[str, type[ShardStage]] = {"caption": CaptionStage, "embed": EmbedStage, "score": ScoreStage}


def run_shard_stage(name: str, input_spec: str, run: str, settings: Settings, shard_ids: list[str] | None = None,
                    progress: bool = False) -> list[dict[str, Any]]:
    """Run one per-shard stage over the named shards (all by default); returns their completion markers."""
    shards = select_shards(register_pool(input_spec, run), shard_ids)
    stage = SHARD_STAGES[name](run, settings)
    if not isinstance(stage, CaptionStage):
        return [stage.run_shard(shard) for shard in tqdm(shards, desc=name, unit="shard", disable=not progress)]
    return [marker for _, marker in caption_shards(stage, tqdm(shards, desc=name, unit="shard", disable=not progress))]


def caption_shards(stage: CaptionStage, shards: Iterable[Shard]) -> Iterator[tuple[Shard, dict[str, Any]]]:
    """Caption shards in order, each next shard's images read and decoded while the one before is captioned."""
    shards = list(shards)
    try:
        for index, shard in enumerate(shards):
            if index + 1 < len(shards):
                stage.prefetch(shards[index + 1])
            yield shard, stage.run_shard(shard)
    finally:
        stage.close()


def run_all(input_spec: str, run: str, settings: Settings, progress: bool = True,
            rules: HealthRules | None = None) -> dict[str, Any]:
    """caption → embed → score over every shard, then aggregate and publish (with the health ``rules``); resumes
    where it stopped. Shards are pipelined: while the image pass (caption stage) of one shard keeps the
    accelerator busy, a second thread runs the text side (embed, score) of the shard before it."""
    check_sources(settings)
    shards = select_shards(register_pool(input_spec, run), None)
    caption, embed, score = CaptionStage(run, settings), EmbedStage(run, settings), ScoreStage(run, settings)
    with ThreadPoolExecutor(1, thread_name_prefix="text-side") as text_side, \
            tqdm(total=len(shards), desc="shards", unit="shard", disable=not progress) as bar:
        pending: Future | None = None
        for shard, _ in caption_shards(caption, shards):
            if pending is not None:
                pending.result()  # at most one shard waits for its text side: memory stays bounded
            pending = text_side.submit(_text_side, embed, score, shard, bar)
        if pending is not None:
            pending.result()
    aggregate(run, settings)
    return publish(run, rules)


def _text_side(embed: EmbedStage, score: ScoreStage, shard: Shard, bar: tqdm) -> None:
    embed.run_shard(shard)
    score.run_shard(shard)
    bar.update()
