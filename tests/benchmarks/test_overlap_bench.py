"""CI dry run of benchmarks/overlap_bench.py: a small shard, every ratio's figures printed (no speed goal here)."""

from __future__ import annotations

import importlib
import re
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
RATIO_LINE = re.compile(r"model (\S+)x data: model ([\d.]+) s, end to end ([\d.]+) s -> overlap efficiency ([\d.]+) "
                        r"\(repeats ([\d.]+)-([\d.]+)\)")


@pytest.mark.slow
def test_small_run_prints_each_ratio_with_the_stand_in_launched(capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    overlap_bench = importlib.import_module("overlap_bench")
    switch_interval = sys.getswitchinterval()
    try:
        assert overlap_bench.main(["--samples", "48", "--batch", "8", "--repeats", "2", "--workers", "2"]) == 0
    finally:
        sys.setswitchinterval(switch_interval)  # the benchmark sets `sieve run`'s, process-wide
    out = capsys.readouterr().out
    assert "48 photos in 1 shards, batch 8 (6 batches)" in out
    assert re.search(r"image pass alone: [\d.]+ s, \d+ img/s \(median of the 6 runs above", out), out
    figures = {ratio: tuple(map(float, rest)) for ratio, *rest in RATIO_LINE.findall(out)}
    assert list(figures) == ["0.5", "1", "2"], out
    for ratio, (model, total, efficiency, low, high) in figures.items():
        # the stand-in ran on every batch of the stage: its sleeps are part of the end-to-end time
        assert model > 0 and total >= model, (ratio, out)
        assert 0 < low <= efficiency <= high, (ratio, out)
    assert figures["2"][0] > figures["0.5"][0]  # the stand-in's cost follows the ratio
    for ratio in ("1", "2"):  # the model takes at least the data time, and the end to end holds all of its sleeps
        assert figures[ratio][4] <= 1.0, (ratio, out)
    worst = float(re.search(r"overlap efficiency \(worst of the ratios\): ([\d.]+)", out).group(1))
    assert worst == min(efficiency for _, _, efficiency, _, _ in figures.values())
