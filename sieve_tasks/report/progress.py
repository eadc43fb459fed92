"""Where an unpublished run stands: which shards each stage has finished, what failed with which reason, whether
it is aggregated, and who holds its lease. Read from the run directory only (markers, caption files)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sieve_tasks import storage
from sieve_tasks.pool import pool_shards
from sieve_tasks.stages.aggregate import connect, thresholds_uri

STAGES = ("captions", "embeddings", "scores")
EXAMPLES_PER_REASON = 5


@dataclass
class RunProgress:
    run: str
    shards: list[str]
    done: dict[str, set[str]]
    failures: list[tuple[str, int, list[str]]] = field(default_factory=list)  # reason, samples, example keys
    aggregated: bool = False
    published: bool = False
    lease: dict[str, Any] | None = None

    @classmethod
    def load(cls, run: str) -> "RunProgress":
        """Raises FileNotFoundError when no stage has started (no ``shards.json``)."""
        shards = [s.shard_id for s in pool_shards(run)]
        done = {stage: {storage.basename(uri)[: -len(".json")]
                        for uri in storage.list_files(storage.join(run, stage, "_done"), ".json")}
                for stage in STAGES}
        lease_file = storage.join(run, "_lease.json")
        return cls(run, shards, done, failures=_failures(run, sorted(done["captions"])),
                   aggregated=storage.exists(thresholds_uri(run)),
                   published=storage.exists(storage.join(run, "manifest", "summary.json")),
                   lease=storage.read_json(lease_file) if storage.exists(lease_file) else None)

    def rows(self) -> list[tuple[str, list[bool]]]:
        """Per shard, which stages are done; unfinished shards first."""
        rows = [(s, [s in self.done[stage] for stage in STAGES]) for s in self.shards]
        return sorted(rows, key=lambda r: (all(r[1]), r[0]))


def _failures(run: str, captioned: list[str]) -> list[tuple[str, int, list[str]]]:
    """Failed samples by reason over the finished caption files (every per-sample failure is recorded there)."""
    if not captioned:
        return []
    files = [storage.join(run, "captions", f"{s}.parquet") for s in captioned]
    rows = connect(run).execute("""
        SELECT reason, count(*) AS n, list_slice(list(shard || '/' || key ORDER BY shard, position), 1, ?)
        FROM read_parquet(?) WHERE status <> 'ok' GROUP BY reason ORDER BY n DESC, reason
    """, [EXAMPLES_PER_REASON, [storage.glob_literal(f) for f in files]]).fetchall()
    return [(reason, n, examples) for reason, n, examples in rows]
