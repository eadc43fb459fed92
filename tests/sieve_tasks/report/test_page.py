"""The page renders data as text: hostile alt-texts, captions and keys are escaped; optional facts show when
present (the caption cache of summary.json's ``captioning``)."""

from __future__ import annotations

from sieve_tasks.report import page
from sieve_tasks.report.samples import Grid


def test_alt_texts_captions_and_keys_are_escaped():
    hostile = {"shard": "00000000", "position": 0, "key": "<img src=x onerror=alert(1)>", "thumbnail": None,
               "text": "<script>alert(1)</script>", "best_caption": "a \"quoted\" <b>caption</b>",
               "score": 0.5, "sieve_score": 0.5, "clip_score": None}
    html = page.grids_section([Grid("Top kept", [hostile])])
    assert "<script>" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "<img src=x" not in html and "<b>caption" not in html


def test_the_caption_cache_is_shown_when_the_summary_has_it():
    base = {"captioning": {"captioned": 16}, "models": {}, "timings_seconds": {}, "manifest": {}, "settings": {}}
    assert "Caption cache" not in page.details_section(base)
    cached = {**base, "captioning": {"captioned": 4, "cache": {"hits": 12, "misses": 4, "seconds_saved": 3.5,
                                                               "errors": 0}}}
    html = page.details_section(cached)
    assert "<h2>Caption cache</h2>" in html and "<th>hits</th><td class='n'>12</td>" in html
