"""The pool a run curates: ``RUN/shards.json`` lists its shards and what identified each tar's content when it
was last listed, so aggregation can prove nothing is missing and a replaced tar is never mixed with old results."""

from __future__ import annotations

import logging

from sieve_tasks import storage
from sieve_tasks.shards import Shard, discover_shards

log = logging.getLogger(__name__)


def shards_uri(run: str) -> str:
    return storage.join(run, "shards.json")


def register_pool(input_spec: str, run: str) -> list[Shard]:
    """Discover the input's shards and record them; a run directory never mixes two different pools.

    A tar whose content changed since it was recorded (same shard, new size/mtime/ETag) is recorded anew: every
    stage's fingerprint covers it, so that shard is recomputed from its first stage."""
    shards = discover_shards(input_spec)
    listing = {"input": input_spec, "shards": {s.shard_id: s.tar_uri for s in shards},
               "identities": {s.shard_id: s.identity for s in shards}}
    uri = shards_uri(run)
    if storage.exists(uri):
        recorded = storage.read_json(uri)
        if recorded["shards"] != listing["shards"]:
            raise ValueError(
                f"run {run} was started on a different pool ({recorded['input']!r}, {len(recorded['shards'])} "
                f"shards); use a new run directory"
            )
        changed = sorted(k for k, v in listing["identities"].items() if recorded.get("identities", {}).get(k) != v)
        if changed:
            log.warning("input changed since last recorded, shards %s will be recomputed", changed[:20])
            storage.write_json_atomic(uri, listing)
    else:
        storage.write_json_atomic(uri, listing)
    return shards


def pool_shards(run: str) -> list[Shard]:
    uri = shards_uri(run)
    if not storage.exists(uri):
        raise FileNotFoundError(f"{uri} is missing: no stage has run in {run} yet")
    recorded = storage.read_json(uri)
    identities = recorded.get("identities", {})
    return [Shard(k, v, identities.get(k, "")) for k, v in sorted(recorded["shards"].items())]


def select_shards(shards: list[Shard], wanted: list[str] | None) -> list[Shard]:
    """The shards named in ``wanted`` (all when None), with a clear error for an unknown id or an empty list (a
    script's or DAG's empty batch must not become the whole pool)."""
    if wanted is None:
        return shards
    if not wanted:
        raise ValueError("--shards names no shard (leave it out for every shard)")
    by_id = {s.shard_id: s for s in shards}
    unknown = [w for w in wanted if w not in by_id]
    if unknown:
        raise ValueError(f"unknown shard ids {unknown}; the pool has {len(by_id)} shards")
    return [by_id[w] for w in wanted]
