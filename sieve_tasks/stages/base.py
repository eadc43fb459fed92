"""The shared shape of a per-shard stage: skip finished work, time it, write atomically, mark done."""

from __future__ import annotations

import functools
import json
import logging
import time
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable
from typing import Any

import pyarrow as pa

from sieve_tasks import storage
from sieve_tasks.settings import Settings, fingerprint
from sieve_tasks.shards import Shard

log = logging.getLogger(__name__)

FINGERPRINT_KEY = b"sieve.fingerprint"  # parquet metadata: the fingerprint the data was computed under


class InconsistentRun(RuntimeError):
    """Outputs that do not belong together (an input replaced mid-run, a write interrupted before its marker)."""


def marker_uri(run: str, stage: str, shard_id: str) -> str:
    return storage.join(run, stage, "_done", f"{shard_id}.json")


COMMANDS = {"captions": "caption", "embeddings": "embed", "scores": "score"}  # each per-shard stage's command
UPSTREAMS = {"embeddings": "captions", "scores": "embeddings"}  # the stage each per-shard stage reads


def check_one_result(markers: dict[str, list[dict[str, Any]]], identities: dict[str, str] | None = None) -> None:
    """Raise :class:`InconsistentRun` unless the per-shard stages' markers (by stage, in shard order) make one
    result: each stage ran with one set of settings over every shard, each shard's embeddings and scores were
    computed from the outputs the run holds now, and (given the pool's ``identities``, by shard) from the tars the
    pool records now (a stage run again on a shard, on a few shards with other settings, or a tar replaced, without
    the stages after it would otherwise publish a mixed pool)."""
    for stage, done in markers.items():
        for marker in done:
            recorded = (identities or {}).get(marker["shard"])
            if recorded and marker.get("input", recorded) != recorded:
                raise InconsistentRun(f"shard {marker['shard']}: its {stage} were computed from its tar before it was "
                                      "replaced (the pool records another one now): run `sieve run` (or caption, "
                                      "embed and score) again for it")
        by_settings: dict[str, list[str]] = {}
        for marker in done:
            by_settings.setdefault(json.dumps(marker["settings"], sort_keys=True), []).append(marker["shard"])
        if len(by_settings) > 1:
            (first, shards), (other, others) = list(by_settings.items())[:2]
            first, other = json.loads(first), json.loads(other)
            differ = "; ".join(f"{key}: {first.get(key)!r} on {shards[0]}, {other.get(key)!r} on {others[0]}"
                               for key in sorted({*first, *other}) if first.get(key) != other.get(key))
            raise InconsistentRun(f"the {stage} of some shards were made with other settings ({differ}): run "
                                  f"`sieve {COMMANDS[stage]}` again over every shard with one set of settings, and "
                                  "the stages after it")
    for stage, upstream in UPSTREAMS.items():
        for marker, source in zip(markers.get(stage, []), markers.get(upstream, [])):
            if marker.get("upstream", source["fingerprint"]) != source["fingerprint"]:  # older markers do not say
                raise InconsistentRun(f"shard {marker['shard']}: its {stage} were computed from other {upstream} than "
                                      f"the run holds now (`sieve {COMMANDS[upstream]}` ran again since): run "
                                      f"`sieve {COMMANDS[stage]}` again for it")


def output_uri(run: str, stage: str, shard_id: str) -> str:
    return storage.join(run, stage, f"{shard_id}.parquet")


def parquet_fingerprint(uri: str) -> str | None:
    """The fingerprint stored in a stage output's parquet metadata (its footer only is read)."""
    import pyarrow.parquet as pq

    with storage.naming("reading", uri):
        fs, path = storage.filesystem(uri)
        metadata = pq.read_schema(path, filesystem=fs).metadata or {}
    value = metadata.get(FINGERPRINT_KEY)
    return value.decode() if value is not None else None


def read_stage_output(run: str, stage: str, shard: Shard, columns: list[str] | None = None) -> pa.Table:
    """A finished stage's table for ``shard`` (only ``columns``, if given), proven to be the data its completion
    marker describes."""
    marker = marker_uri(run, stage, shard.shard_id)
    try:
        done = storage.read_json(marker)
    except FileNotFoundError:
        raise InconsistentRun(f"shard {shard.shard_id}: the {stage} stage has not completed ({marker} missing)"
                              ) from None
    uri = output_uri(run, stage, shard.shard_id)
    table = storage.read_parquet(uri, columns)
    found = (table.schema.metadata or {}).get(FINGERPRINT_KEY, b"").decode()
    if found != done["fingerprint"]:
        raise InconsistentRun(f"{uri} was written under fingerprint {found or 'none'} but its marker says "
                              f"{done['fingerprint']} (a write was interrupted): re-run the {stage} stage")
    return table


class ShardStage(ABC):
    """One unit of work per shard: ``run_shard`` reads the shard (and upstream outputs), writes
    ``RUN/<name>/<shard>.parquet`` then the completion marker ``RUN/<name>/_done/<shard>.json`` (under a
    ``_`` folder, which parquet dataset readers skip, so ``RUN/<name>/`` reads as one table).

    The fingerprint covers this stage's settings, the upstream marker's fingerprint and the input tar's
    identity. A shard whose marker and output both carry the expected fingerprint is skipped, so reruns and
    Airflow retries never redo or duplicate work, and a replaced tar or changed setting is always recomputed.
    """

    name: str
    settings_names: tuple[str, ...]  # the settings that change this stage's output

    def __init__(self, run: str, settings: Settings):
        self.run = run
        self.settings = settings
        self._upstream_used: dict[str, str | None] = {}  # by shard: the upstream marker's fingerprint, for ours

    @property
    def upstream(self) -> str | None:
        """The stage whose output this one reads (:data:`UPSTREAMS`)."""
        return UPSTREAMS.get(self.name)

    def stage_settings(self) -> dict[str, Any]:
        return self.settings.fingerprinted(self.settings_names)

    @abstractmethod
    def process(self, shard: Shard) -> tuple[pa.Table, dict[str, Any]]:
        """Compute the shard's output table and extra facts for its marker."""

    def output_uri(self, shard_id: str) -> str:
        return output_uri(self.run, self.name, shard_id)

    def marker_uri(self, shard_id: str) -> str:
        return marker_uri(self.run, self.name, shard_id)

    def read_upstream(self, stage: str, shard: Shard, columns: list[str] | None = None) -> pa.Table:
        return read_stage_output(self.run, stage, shard, columns)

    def _marker(self, stage: str, shard: Shard) -> dict[str, Any]:
        marker = marker_uri(self.run, stage, shard.shard_id)
        try:
            return storage.read_json(marker)
        except FileNotFoundError:
            raise InconsistentRun(f"shard {shard.shard_id}: the {stage} stage has not completed ({marker} missing)"
                                  ) from None

    def fingerprint(self, shard: Shard) -> str:
        """Also proves that the upstream output was computed from the output before it that the run holds now (the
        score stage reads the captions too: captions computed again without the embed stage would pair new captions
        with old similarities)."""
        upstream = None
        if self.upstream is not None:
            done = self._marker(self.upstream, shard)
            before = UPSTREAMS.get(self.upstream)
            if before is not None:
                check_one_result({self.upstream: [done], before: [self._marker(before, shard)]})
            if done.get("input") != shard.identity:
                raise InconsistentRun(
                    f"shard {shard.shard_id}: {shard.tar_uri} changed since the {self.upstream} stage read it "
                    f"({done.get('input')} -> {shard.identity}); re-run the caption stage (or sieve run) for it")
            upstream = done["fingerprint"]
        self._upstream_used[shard.shard_id] = upstream
        return fingerprint({"stage": self.name, "settings": self.stage_settings(), "upstream": upstream,
                            "input": shard.identity})

    def completed(self, shard_id: str, expected: str) -> dict[str, Any] | None:
        try:
            done = storage.read_json(self.marker_uri(shard_id))
        except FileNotFoundError:
            return None
        if done.get("fingerprint") != expected:
            log.info("%s %s: settings or input changed since the last run, recomputing", self.name, shard_id)
            return None
        try:
            written = parquet_fingerprint(self.output_uri(shard_id))
        except (FileNotFoundError, storage.StorageError):
            return None
        if written != expected:
            log.info("%s %s: output does not match its marker (interrupted write), recomputing", self.name, shard_id)
            return None
        return done

    def run_shard(self, shard: Shard) -> dict[str, Any]:
        """Compute the shard's output (unless it is complete) and write it; returns the marker."""
        return self.compute_shard(shard)()

    def compute_shard(self, shard: Shard) -> Callable[[], dict[str, Any]]:
        """:meth:`run_shard`'s computation; returns its write (the parquet, then the marker; it returns the marker),
        which may run in another thread while the next shard is computed."""
        expected = self.fingerprint(shard)
        done = self.finished(shard, expected)
        if done is not None:
            return lambda: done
        started = time.perf_counter()
        table, facts = self.process(shard)
        return self.write_of(shard, expected, lambda: (table, facts), time.perf_counter() - started)

    def finished(self, shard: Shard, expected: str) -> dict[str, Any] | None:
        """The marker to return for a shard whose output is complete under ``expected`` (never with --overwrite)."""
        done = None if self.settings.overwrite else self.completed(shard.shard_id, expected)
        if done is None:
            return None
        log.info("%s %s: already complete, skipped", self.name, shard.shard_id)
        return {**done, "skipped": True}

    def write_of(self, shard: Shard, expected: str, result: Callable[[], tuple[pa.Table, dict[str, Any]]],
                 seconds: float) -> Callable[[], dict[str, Any]]:
        """The write of a shard computed under ``expected`` in ``seconds``: ``result()`` gives its table and the
        marker's facts (what remains of the computation may run with the write)."""
        return functools.partial(self._write, shard, expected, result, seconds)

    def _write(self, shard: Shard, expected: str, result: Callable[[], tuple[pa.Table, dict[str, Any]]],
               seconds: float) -> dict[str, Any]:
        started = time.perf_counter()
        table, facts = result()
        for uri in (self.output_uri(shard.shard_id), self.marker_uri(shard.shard_id)):
            storage.sweep_temporaries(uri)  # what an interrupted write left
        table = table.sort_by("position")
        storage.write_parquet_atomic(
            self.output_uri(shard.shard_id), table, {FINGERPRINT_KEY.decode(): expected, "sieve.stage": self.name}
        )
        statuses = Counter(table.column("status").to_pylist())
        marker = {
            "stage": self.name,
            "shard": shard.shard_id,
            "fingerprint": expected,
            "input": shard.identity,
            "upstream": self._upstream_used.get(shard.shard_id),
            "settings": self.stage_settings(),
            "rows": table.num_rows,
            "ok": statuses.get("ok", 0),
            "failed": statuses.get("failed", 0),
            "seconds": round(seconds + time.perf_counter() - started, 3),  # computing and writing
            **facts,
        }
        storage.write_json_atomic(self.marker_uri(shard.shard_id), marker)
        return {**marker, "skipped": False}
