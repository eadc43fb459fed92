"""Sample grids for the report: top kept, just above and just below the threshold, lowest dropped; each with
its alt-text, best caption, scores and a small JPEG thumbnail cut from the shard at publish time."""

from __future__ import annotations

import base64
import io
import logging
import math
from dataclasses import dataclass
from typing import Any

import duckdb
import pyarrow as pa

from sieve_tasks import image_pass, storage
from sieve_tasks.shards import DEFAULT_MAX_PIXELS, SampleError, Shard
from sieve_tasks.stages.aggregate import candidate_filter, score_expression

log = logging.getLogger(__name__)
PER_GRID = 8
THUMBNAIL_PX = 128  # longest side; ~4 KB of JPEG each, so 32 samples stay near 200 KB of base64
THUMBNAIL_QUALITY = 70
# (title, side of the threshold, order of the score), in the order shown; the extremes are picked first, so a
# small pool's borderline grids hold what the extremes left
GRIDS = (("Top kept", ">=", "DESC"), ("Just above the threshold (kept)", ">=", "ASC"),
         ("Just below the threshold (dropped)", "<", "DESC"), ("Lowest dropped", "<", "ASC"))
PICK_ORDER = (0, 3, 1, 2)
NEEDED = 4 * PER_GRID  # rows picked per grid: enough after the other grids took theirs


@dataclass
class Grid:
    title: str
    samples: list[dict[str, Any]]


class SampleGrids:
    """Picks the grids' samples in one scan of the scores, then reads only those samples' alt-texts and images:
    each shard involved is streamed until its last picked sample (at most ``4 × PER_GRID`` shards in all)."""

    def __init__(self, con: duckdb.DuckDBPyConnection, run: str, shards: list[Shard], selection: dict[str, Any],
                 histogram: dict[str, Any] | None):
        self.con, self.run, self.selection, self.histogram = con, run, selection, histogram
        self.shards = {s.shard_id: s for s in shards}

    def grids(self) -> list[Grid]:
        bands = score_bands(self.histogram, self.selection["threshold"], NEEDED)
        ranked = [self._rank(side, order, band) for (_, side, order), band in zip(GRIDS, bands)]
        details = self._details({uid for uids in ranked for uid, _ in uids})
        grids: list[Grid | None] = [None] * len(GRIDS)
        seen: set[tuple[int, int]] = set()
        for index in PICK_ORDER:
            uids = [uid for uid, _ in ranked[index] if uid not in seen][:PER_GRID]
            seen.update(uids)
            grids[index] = Grid(GRIDS[index][0], [{**details[uid], "score": score} for uid, score in ranked[index]
                                                  if uid in uids])
        picked = [r for g in grids for r in g.samples]
        if picked:
            texts = self._alt_texts(picked)
            thumbnails = self._thumbnails(picked)
            for row in picked:
                key = (row["shard"], row["position"])
                row["text"], row["thumbnail"] = texts.get(key), thumbnails.get(key)
        return grids

    def _rank(self, side: str, order: str, band: tuple[float, float]) -> list[tuple[tuple[int, int], float]]:
        """The uids and scores of NEEDED rows of one side of the threshold in ``order`` (ties by uid). Only the
        uid halves and the scores are read, and only rows within ``band`` (:func:`score_bands`) are sorted. Rows come
        from ``selectable`` (joined tables' scores included), samples of the pool only (they have images)."""
        expression, params = score_expression(self.selection)
        query = f"""
            SELECT uid_hi, uid_lo, score FROM (
                SELECT uid_hi, uid_lo, {expression} AS score FROM selectable
                WHERE shard IS NOT NULL AND {candidate_filter(self.selection)})
            WHERE score {side} ? AND score BETWEEN ? AND ?
            ORDER BY score {order}, uid_hi, uid_lo LIMIT ?
        """
        rows = self.con.execute(query, params + [self.selection["threshold"], *band, NEEDED]).fetchall()
        return [((hi, lo), score) for hi, lo, score in rows]

    def _details(self, uids: set[tuple[int, int]]) -> dict[tuple[int, int], dict[str, Any]]:
        """Where the picked samples are and what they scored, in one join on their uids."""
        if not uids:
            return {}
        picked = sorted(uids)
        self.con.register("report_uids", pa.table({"uid_hi": pa.array([u[0] for u in picked], pa.uint64()),
                                                    "uid_lo": pa.array([u[1] for u in picked], pa.uint64())}))
        relation = self.con.execute("""
            SELECT uid_hi, uid_lo, shard, position, key, url, best_caption, sieve_score, clip_score
            FROM unique_ok WHERE uid_hi IN (SELECT uid_hi FROM report_uids)
        """)  # a semi-join on the first half lets DuckDB skip the other columns of every other row
        names = [d[0] for d in relation.description]
        rows = [dict(zip(names, row)) for row in relation.fetchall()]
        self.con.unregister("report_uids")
        found = {(r.pop("uid_hi"), r.pop("uid_lo")): r for r in rows}
        return {uid: found[uid] for uid in picked}

    def _alt_texts(self, picked: list[dict[str, Any]]) -> dict[tuple[str, int], str]:
        files = [f for f in sorted({storage.join(self.run, "captions", f"{r['shard']}.parquet") for r in picked})
                 if storage.exists(f)]
        if not files:
            return {}
        wanted = pa.table({"shard": [r["shard"] for r in picked], "position": [r["position"] for r in picked]})
        self.con.register("report_wanted", wanted)
        rows = self.con.execute("SELECT c.shard, c.position, c.text FROM read_parquet(?) c "
                                "JOIN report_wanted w ON c.shard = w.shard AND c.position = w.position",
                                [[storage.glob_literal(f) for f in files]]).fetchall()
        self.con.unregister("report_wanted")
        return {(shard, position): text for shard, position, text in rows}

    def _thumbnails(self, picked: list[dict[str, Any]]) -> dict[tuple[str, int], str]:
        thumbnails: dict[tuple[str, int], str] = {}
        for shard_id in sorted({r["shard"] for r in picked}):
            wanted = {r["position"] for r in picked if r["shard"] == shard_id}
            shard = self.shards[shard_id]
            try:
                if shard.identity and shard.current_identity() != shard.identity:
                    log.warning("no thumbnails from shard %s: %s was replaced since it was scored", shard_id,
                                shard.tar_uri)  # its images at these positions are others
                    continue
                for position, image in image_pass.image_bytes(shard, wanted).items():
                    thumbnails[(shard_id, position)] = thumbnail_uri(image)
            except OSError as exc:  # the input moved or expired since captioning: the grid says "no image"
                log.warning("no thumbnails from shard %s: %s", shard_id, exc)
        return thumbnails


def score_bands(histogram: dict[str, Any] | None, threshold: float, needed: int) -> list[tuple[float, float]]:
    """Per grid (in GRIDS order), a score range that holds the ``needed`` rows it wants on its side of
    ``threshold``, per the aggregate's histogram of the candidates: the top of the kept side, the bottom of the
    kept side, the top of the dropped side, the bottom of the dropped side. Each range is one bin wider than its
    count needs, so float rounding at bin edges cannot matter; open-ended without a histogram."""
    everything = (-math.inf, math.inf)
    if not histogram or not histogram["counts"]:
        return [everything] * 4
    counts, low, width = histogram["counts"], histogram["low"], histogram["width"]
    last = len(counts) - 1
    cut = min(max(int((threshold - low) // width), 0), last)  # the bin holding the threshold

    def edge(i: int) -> float:  # left edge of bin i; open-ended past the first and the last bin
        return -math.inf if i <= 0 else math.inf if i > last else low + i * width

    def first_holding(bins: range) -> int | None:
        """The bin at which ``bins``, walked in order, have held ``needed`` rows (None: they never do)."""
        total = 0
        for i in bins:
            total += counts[i]
            if total >= needed:
                return i
        return None

    # only bins two away from the threshold's are counted: wholly on their side, whatever the rounding
    top, above = first_holding(range(last, cut + 1, -1)), first_holding(range(cut + 2, last + 1))
    below, bottom = first_holding(range(cut - 2, -1, -1)), first_holding(range(0, cut - 1))
    return [(-math.inf if top is None else edge(top - 1), math.inf),
            (-math.inf, math.inf if above is None else edge(above + 2)),
            (-math.inf if below is None else edge(below - 1), math.inf),
            (-math.inf, math.inf if bottom is None else edge(bottom + 2))]


def thumbnail_uri(image: bytes) -> str | None:
    """A JPEG data URI of at most THUMBNAIL_PX on the longest side (None when the image does not decode)."""
    try:
        picture = image_pass.decode(image, DEFAULT_MAX_PIXELS)
    except SampleError:
        return None
    picture.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
    out = io.BytesIO()
    picture.save(out, format="JPEG", quality=THUMBNAIL_QUALITY, optimize=True)
    return "data:image/jpeg;base64," + base64.b64encode(out.getvalue()).decode("ascii")
