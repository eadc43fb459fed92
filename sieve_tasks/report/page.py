"""The report as one self-contained HTML page (inline CSS, images as data URIs, no script). Every value that
comes from the data (alt-texts, captions, keys, URLs, paths) is escaped."""

from __future__ import annotations

import html
import json
from typing import Any

from sieve_tasks.report.progress import STAGES, RunProgress
from sieve_tasks.report.samples import Grid

#: Where a server that shows the page (the Airflow plugin) puts its navigation.
NAV_MARK = "<!-- sieve:nav -->"
MAX_SHARD_ROWS = 100
STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5rem;color:#1f2937;max-width:78rem}
h1{font-size:1.4rem}h2{font-size:1.1rem;margin-top:1.6rem;border-bottom:1px solid #e5e7eb}
table{border-collapse:collapse;margin:.4rem 0}td,th{border:1px solid #e5e7eb;padding:.25rem .6rem;text-align:left;
vertical-align:top}th{background:#f9fafb}td.n{text-align:right;font-variant-numeric:tabular-nums}
.verdict{display:inline-block;padding:.3rem .8rem;border-radius:.3rem;font-weight:700;color:#fff}
.verdict.healthy{background:#16a34a}.verdict.warning{background:#d97706}.verdict.failed{background:#dc2626}
tr.warning td{background:#fef3c7}tr.failed td{background:#fee2e2}
.warn{background:#fef3c7;border:1px solid #f59e0b;padding:.6rem;margin:.8rem 0}
.grid{display:flex;flex-wrap:wrap;gap:.6rem}.card{width:11rem;border:1px solid #e5e7eb;padding:.4rem;font-size:.8rem}
.card img{display:block;max-width:128px;max-height:128px;margin:0 auto .3rem}.card .alt{font-weight:600}
.card .cap{color:#4b5563;font-style:italic}.card .sc{font-variant-numeric:tabular-nums;color:#374151}
.plots img{display:block;margin:.3rem 0}code,pre{background:#f3f4f6;padding:.1rem .3rem}pre{padding:.6rem;overflow:auto}
"""


def e(value: Any) -> str:
    return html.escape("—" if value is None else str(value))


def num(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return e(value)


def table(rows: list[tuple[str, Any]]) -> str:
    return "<table>" + "".join(f"<tr><th>{e(k)}</th><td class='n'>{num(v)}</td></tr>" for k, v in rows) + "</table>"


def cache_section(cache: dict[str, Any]) -> str:
    """The caption cache's figures (``--caption-cache``): what was reused and the captioning time it saved."""
    rate = cache.get("hit_rate")
    return "<h2>Caption cache</h2>" + table([
        ("hits", cache.get("hits")), ("misses", cache.get("misses")),
        ("hit rate", f"{rate:.1%}" if isinstance(rate, (int, float)) else None),
        ("captioning time saved (s)", cache.get("seconds_saved")), ("lookup time (s)", cache.get("lookup_seconds")),
        ("new entries written", cache.get("written")), ("unreadable cache files met", cache.get("errors")),
    ])


def page(title: str, body: str) -> str:
    return (f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{e(title)}</title>"
            f"<style>{STYLE}</style></head><body>{NAV_MARK}{body}</body></html>\n")


def verdict_section(health: dict[str, Any] | None) -> str:
    if not health:
        return "<p>No health verdict (published before verdicts existed).</p>"
    rows = "".join(f"<tr class='{e(f['level'])}'><td>{e(f['rule'])}</td><td>{e(f['level'])}</td>"
                   f"<td>{e(f['message'])}</td></tr>" for f in health["findings"])
    compared = health.get("compared_with") or {}
    history = compared.get("history") or []
    return (f"<p><span class='verdict {e(health['verdict'])}' id='verdict'>{e(health['verdict'])}</span></p>"
            f"<table><tr><th>rule</th><th>level</th><th>finding</th></tr>{rows}</table>"
            f"<p>Compared with reference <code>{e(compared.get('reference'))}</code> and {len(history)} earlier "
            f"run(s) beside this one.</p>")


def counts_section(summary: dict[str, Any], score_mean: float | None) -> str:
    counts, selection = summary["counts"], summary.get("thresholds") or {}
    kept_fraction = summary.get("kept_fraction_of_unique")
    return table([
        ("read", counts.get("read")), ("expected", counts.get("expected")), ("scored", counts.get("scored")),
        ("failed", counts.get("failed")), ("duplicates", counts.get("duplicates")), ("kept", counts.get("kept")),
        ("kept fraction of unique", f"{kept_fraction:.2%}" if isinstance(kept_fraction, (int, float)) else None),
        ("rule", selection.get("rule")), ("score", selection.get("score")), ("threshold", selection.get("threshold")),
        ("mean selected score (≈)", score_mean), ("shards", summary.get("shards")),
        ("profile", summary.get("profile")),
    ])


def histograms_section(plots: list[tuple[str, str]]) -> str:
    if not plots:
        return "<p>No histogram (this run was aggregated before thresholds.json kept one).</p>"
    return "<div class='plots'>" + "".join(
        f"<img class='histogram' alt='{e(name)} histogram' src='{uri}'>" for name, uri in plots) + "</div>"


def grids_section(grids: list[Grid]) -> str:
    parts = []
    for grid in grids:
        cards = []
        for s in grid.samples:
            image = (f"<img class='thumb' alt='{e(s['key'])}' src='{s['thumbnail']}'>" if s.get("thumbnail")
                     else "<p>(no image)</p>")
            sieve = f" · sieve {s['sieve_score']:.3f}" if s.get("sieve_score") is not None else ""
            clip = f" · clip {s['clip_score']:.3f}" if s.get("clip_score") is not None else ""
            cards.append(f"<div class='card'>{image}<div class='alt'>{e(s.get('text'))}</div>"
                         f"<div class='cap'>{e(s.get('best_caption'))}</div>"
                         f"<div class='sc'>score {s['score']:.4f}{sieve}{clip}</div>"
                         f"<div><code>{e(s['shard'])}/{e(s['key'])}</code></div></div>")
        parts.append(f"<h3>{e(grid.title)}</h3>" + (f"<div class='grid'>{''.join(cards)}</div>" if cards
                                                    else "<p>none</p>"))
    return "".join(parts)


def failures_section(examples: dict[str, list[str]], by_reason: dict[str, int]) -> str:
    if not by_reason:
        return "<p>none</p>"
    rows = "".join(f"<tr><td>{e(reason)}</td><td class='n'>{count}</td><td>{e(', '.join(examples.get(reason, [])))}"
                   f"</td></tr>" for reason, count in sorted(by_reason.items(), key=lambda kv: (-kv[1], kv[0])))
    return f"<table><tr><th>reason</th><th>samples</th><th>examples (shard/key)</th></tr>{rows}</table>"


def shards_section(rows: list[dict[str, Any]]) -> str:
    head = "".join(f"<th>{c}</th>" for c in ("shard", "read", "expected", "ok", "failed", "kept", "seconds"))
    body = "".join("<tr>" + "".join(f"<td class='n'>{num(r[c])}</td>" for c in
                                    ("shard", "read", "expected", "ok", "failed", "kept", "seconds")) + "</tr>"
                   for r in rows[:MAX_SHARD_ROWS])
    more = f"<p>… and {len(rows) - MAX_SHARD_ROWS} more shards.</p>" if len(rows) > MAX_SHARD_ROWS else ""
    return f"<p>Outliers first (failure rate, missing samples, kept fraction off the pool's).</p>" \
           f"<table id='shards'><tr>{head}</tr>{body}</table>{more}"


def details_section(summary: dict[str, Any]) -> str:
    parts = []
    captioning = dict(summary.get("captioning") or {})
    cache = captioning.pop("cache", None)
    if captioning:
        parts.append("<h2>Captioning</h2>" + table(sorted(captioning.items())))
    if isinstance(cache, dict):
        parts.append(cache_section(cache))
    parts.append("<h2>Models</h2>" + table(sorted((summary.get("models") or {}).items())))
    parts.append("<h2>Timings (seconds, summed over shards)</h2>"
                 + table(sorted((summary.get("timings_seconds") or {}).items())))
    parts.append("<h2>Manifest</h2>" + table(sorted((summary.get("manifest") or {}).items())))
    parts.append("<h2>Settings</h2><details><summary>stage settings</summary><pre>"
                 + e(json.dumps(summary.get("settings"), indent=2, sort_keys=True)) + "</pre></details>")
    return "".join(parts)


def progress_page(progress: RunProgress, log_path: str | None = None) -> str:
    """The page of a run that has not published: stages done per shard, failures, lease, where the logs are."""
    state = ("published" if progress.published else "aggregated, not published" if progress.aggregated
             else "not published")
    counts = [(f"{stage} done", f"{len(progress.done[stage])} of {len(progress.shards)}") for stage in STAGES]
    parts = [f"<h1>SIEVE run <code>{e(progress.run)}</code></h1><p id='state'>{e(state)}</p>", table(counts)]
    if progress.lease:
        parts.append(f"<p>Lease held by <code>{e(progress.lease.get('owner'))}</code> until "
                     f"{e(progress.lease.get('expires_at'))} (unix time).</p>")
    if log_path:
        parts.append(f"<p>Task logs: <code>{e(log_path)}</code></p>")
    parts.append("<h2>Failures by reason (finished caption shards)</h2>" + failures_section(
        {reason: examples for reason, _, examples in progress.failures},
        {reason: n for reason, n, _ in progress.failures}))
    head = "".join(f"<th>{stage}</th>" for stage in STAGES)
    rows = progress.rows()
    body = "".join(f"<tr><td>{e(shard)}</td>" + "".join(f"<td>{'done' if d else '—'}</td>" for d in done) + "</tr>"
                   for shard, done in rows[:MAX_SHARD_ROWS])
    more = f"<p>… and {len(rows) - MAX_SHARD_ROWS} more shards.</p>" if len(rows) > MAX_SHARD_ROWS else ""
    parts.append(f"<h2>Shards (unfinished first)</h2><table id='progress'><tr><th>shard</th>{head}</tr>{body}</table>"
                 + more)
    return page(f"SIEVE run {progress.run}", "".join(parts))
