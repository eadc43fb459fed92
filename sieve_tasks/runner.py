"""Runs stages over shards in one process: what the CLI, the Airflow tasks and worker pods call."""

from __future__ import annotations

import logging
from typing import Any

from tqdm import tqdm

from sieve_tasks.pool import register_pool, select_shards
from sieve_tasks.report.health import HealthRules
from sieve_tasks.settings import Settings
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
    return [stage.run_shard(shard) for shard in tqdm(shards, desc=name, unit="shard", disable=not progress)]


def run_all(input_spec: str, run: str, settings: Settings, progress: bool = True,
            rules: HealthRules | None = None) -> dict[str, Any]:
    """caption → embed → score over every shard, then aggregate and publish (with the health ``rules``); resumes
    where it stopped."""
    check_sources(settings)
    for name in SHARD_STAGES:
        run_shard_stage(name, input_spec, run, settings, progress=progress)
    aggregate(run, settings)
    return publish(run, rules)
