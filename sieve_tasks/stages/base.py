"""The shared shape of a per-shard stage: skip finished work, time it, write atomically, mark done."""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from collections import Counter
from typing import Any

import pyarrow as pa

from sieve_tasks import storage
from sieve_tasks.settings import Settings, fingerprint
from sieve_tasks.shards import Shard

log = logging.getLogger(__name__)


def marker_uri(run: str, stage: str, shard_id: str) -> str:
    return storage.join(run, stage, "_done", f"{shard_id}.json")


class ShardStage(ABC):
    """One unit of work per shard: ``run_shard`` reads the shard (and upstream outputs), writes
    ``RUN/<name>/<shard>.parquet`` then the completion marker ``RUN/<name>/_done/<shard>.json`` (under a
    ``_`` folder, which parquet dataset readers skip, so ``RUN/<name>/`` reads as one table).

    A shard whose marker exists with the same fingerprint (this stage's settings plus the upstream
    marker's fingerprint) is skipped, so reruns and Airflow retries never redo or duplicate work.
    """

    name: str
    upstream: str | None = None
    settings_names: tuple[str, ...]  # the settings that change this stage's output

    def __init__(self, run: str, settings: Settings):
        self.run = run
        self.settings = settings

    def stage_settings(self) -> dict[str, Any]:
        return self.settings.fingerprinted(self.settings_names)

    @abstractmethod
    def process(self, shard: Shard) -> tuple[pa.Table, dict[str, Any]]:
        """Compute the shard's output table and extra facts for its marker."""

    def output_uri(self, shard_id: str) -> str:
        return storage.join(self.run, self.name, f"{shard_id}.parquet")

    def marker_uri(self, shard_id: str) -> str:
        return marker_uri(self.run, self.name, shard_id)

    def fingerprint(self, shard_id: str) -> str:
        upstream = None
        if self.upstream is not None:
            marker = marker_uri(self.run, self.upstream, shard_id)
            try:
                upstream = storage.read_json(marker)["fingerprint"]
            except FileNotFoundError:
                raise RuntimeError(f"shard {shard_id}: the {self.upstream} stage has not completed ({marker} missing)"
                                   ) from None
        return fingerprint({"stage": self.name, "settings": self.stage_settings(), "upstream": upstream})

    def completed(self, shard_id: str, expected: str) -> dict[str, Any] | None:
        try:
            done = storage.read_json(self.marker_uri(shard_id))
        except FileNotFoundError:
            return None
        if done.get("fingerprint") != expected:
            log.info("%s %s: settings changed since the last run, recomputing", self.name, shard_id)
            return None
        if not storage.exists(self.output_uri(shard_id)):
            return None
        return done

    def run_shard(self, shard: Shard) -> dict[str, Any]:
        expected = self.fingerprint(shard.shard_id)
        if not self.settings.overwrite:
            done = self.completed(shard.shard_id, expected)
            if done is not None:
                log.info("%s %s: already complete, skipped", self.name, shard.shard_id)
                return {**done, "skipped": True}
        started = time.perf_counter()
        table, facts = self.process(shard)
        table = table.sort_by("position")
        storage.write_parquet_atomic(
            self.output_uri(shard.shard_id), table, {"sieve.fingerprint": expected, "sieve.stage": self.name}
        )
        statuses = Counter(table.column("status").to_pylist())
        marker = {
            "stage": self.name,
            "shard": shard.shard_id,
            "fingerprint": expected,
            "settings": self.stage_settings(),
            "rows": table.num_rows,
            "ok": statuses.get("ok", 0),
            "failed": statuses.get("failed", 0),
            "seconds": round(time.perf_counter() - started, 3),
            **facts,
        }
        storage.write_json_atomic(self.marker_uri(shard.shard_id), marker)
        return {**marker, "skipped": False}

