"""Sample grids for the report: top kept, just above and just below the threshold, lowest dropped; each with
its alt-text, best caption, scores and a small JPEG thumbnail cut from the shard at publish time."""

from __future__ import annotations

import base64
import io
import logging
from dataclasses import dataclass
from typing import Any

import duckdb
import pyarrow as pa

from sieve_tasks import storage
from sieve_tasks.shards import SampleError, Shard, decode_image, read_samples
from sieve_tasks.stages.aggregate import candidate_filter, score_expression

log = logging.getLogger(__name__)
PER_GRID = 8
THUMBNAIL_PX = 128  # longest side; ~4 KB of JPEG each, so 32 samples stay near 200 KB of base64
THUMBNAIL_QUALITY = 70
# (title, rows above (>=) or below (<) the threshold, order of the selection score), in the order shown; the
# extremes are picked first, so a small pool's borderline grids hold what the extremes left
GRIDS = (("Top kept", ">=", "DESC"), ("Just above the threshold (kept)", ">=", "ASC"),
         ("Just below the threshold (dropped)", "<", "DESC"), ("Lowest dropped", "<", "ASC"))
PICK_ORDER = (0, 3, 1, 2)


@dataclass
class Grid:
    title: str
    samples: list[dict[str, Any]]


class SampleGrids:
    """Picks the grids' samples with four top-k queries over the scores, then reads only those samples'
    alt-texts and images: each shard involved is streamed until its last picked sample (at most
    ``4 × PER_GRID`` shards in all)."""

    def __init__(self, con: duckdb.DuckDBPyConnection, run: str, shards: list[Shard], selection: dict[str, Any]):
        self.con, self.run, self.selection = con, run, selection
        self.shards = {s.shard_id: s for s in shards}

    def grids(self) -> list[Grid]:
        grids: list[Grid | None] = [None] * len(GRIDS)
        seen: set[tuple[str, int]] = set()
        for index in PICK_ORDER:
            title, side, order = GRIDS[index]
            rows = [r for r in self._pick(side, order) if (r["shard"], r["position"]) not in seen][:PER_GRID]
            seen.update((r["shard"], r["position"]) for r in rows)
            grids[index] = Grid(title, rows)
        picked = [r for g in grids for r in g.samples]
        if picked:
            texts = self._alt_texts(picked)
            thumbnails = self._thumbnails(picked)
            for row in picked:
                key = (row["shard"], row["position"])
                row["text"], row["thumbnail"] = texts.get(key), thumbnails.get(key)
        return grids

    def _pick(self, side: str, order: str) -> list[dict[str, Any]]:
        expression, params = score_expression(self.selection)
        query = f"""
            SELECT shard, position, key, url, best_caption, sieve_score, clip_score, {expression} AS score
            FROM unique_ok WHERE {candidate_filter(self.selection)} AND ({expression}) {side} ?
            ORDER BY score {order}, shard, position LIMIT ?
        """
        relation = self.con.execute(query, params + params + [self.selection["threshold"], 4 * PER_GRID])
        names = [d[0] for d in relation.description]
        return [dict(zip(names, row)) for row in relation.fetchall()]

    def _alt_texts(self, picked: list[dict[str, Any]]) -> dict[tuple[str, int], str]:
        files = [f for f in sorted({storage.join(self.run, "captions", f"{r['shard']}.parquet") for r in picked})
                 if storage.exists(f)]
        if not files:
            return {}
        wanted = pa.table({"shard": [r["shard"] for r in picked], "position": [r["position"] for r in picked]})
        self.con.register("report_wanted", wanted)
        rows = self.con.execute("SELECT c.shard, c.position, c.text FROM read_parquet(?) c "
                                "JOIN report_wanted w ON c.shard = w.shard AND c.position = w.position",
                                [files]).fetchall()
        self.con.unregister("report_wanted")
        return {(shard, position): text for shard, position, text in rows}

    def _thumbnails(self, picked: list[dict[str, Any]]) -> dict[tuple[str, int], str]:
        thumbnails: dict[tuple[str, int], str] = {}
        for shard_id in sorted({r["shard"] for r in picked}):
            wanted = {r["position"] for r in picked if r["shard"] == shard_id}
            try:
                for sample in read_samples(self.shards[shard_id]):
                    if sample.position in wanted and sample.image:
                        thumbnails[(shard_id, sample.position)] = thumbnail_uri(sample.image)
                        wanted.discard(sample.position)
                    if not wanted or sample.position > max(wanted):
                        break
            except OSError as exc:  # the input moved or expired since captioning: the grid says "no image"
                log.warning("no thumbnails from shard %s: %s", shard_id, exc)
        return thumbnails


def thumbnail_uri(image: bytes) -> str | None:
    """A JPEG data URI of at most THUMBNAIL_PX on the longest side (None when the image does not decode)."""
    try:
        picture = decode_image(image)
    except SampleError:
        return None
    picture.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
    out = io.BytesIO()
    picture.save(out, format="JPEG", quality=THUMBNAIL_QUALITY, optimize=True)
    return "data:image/jpeg;base64," + base64.b64encode(out.getvalue()).decode("ascii")
