"""The grids' score bands: whatever the distribution and threshold, the bands hold each side's highest and
lowest rows (checked against a full sort), so one scan with the bands as filter picks what four sorts would."""

from __future__ import annotations

import numpy as np
import pytest

from sieve_tasks.report.samples import score_bands
from sieve_tasks.stages.aggregate import HISTOGRAM_BINS, report_histogram


@pytest.mark.parametrize("seed", range(6))
def test_bands_hold_the_extremes_of_both_sides(seed):
    rng = np.random.default_rng(seed)
    scores = np.round(rng.beta(2, 5, int(rng.integers(5, 5000))) * 2 - 1, int(rng.integers(2, 6)))  # ties too
    fine = np.minimum(np.floor((scores + 1.0) * (HISTOGRAM_BINS / 2)).astype(int), HISTOGRAM_BINS - 1)
    histogram = report_histogram({"score": "sieve"}, np.bincount(fine, minlength=HISTOGRAM_BINS))
    needed = 32
    for threshold in (scores.min() - 0.1, float(np.quantile(scores, 0.8)), float(np.median(scores)), scores.max(),
                      scores.max() + 0.1):
        bands = score_bands(histogram, threshold, needed)
        kept, dropped = np.sort(scores[scores >= threshold]), np.sort(scores[scores < threshold])
        wanted = (kept[-needed:], kept[:needed], dropped[-needed:], dropped[:needed])  # GRIDS order
        for (low, high), rows, side in zip(bands, wanted, (kept, kept, dropped, dropped)):
            inside = side[(side >= low) & (side <= high)]
            assert np.isin(rows, inside).all(), (seed, threshold, low, high)
        if len(scores) > 2000 and kept.size > 500 and dropped.size > 500:  # the bands do narrow a large pool
            assert bands[0][0] > threshold and bands[3][1] < threshold


def test_without_a_histogram_every_row_qualifies():
    assert score_bands(None, 0.5, 32) == [(-np.inf, np.inf)] * 4


def test_no_thumbnails_from_a_tar_replaced_since_it_was_scored(sample_pool, tmp_path):
    """Its images at the scored positions may be others: the grid says "no image" rather than show them."""
    import types

    from sieve_tasks.pool import register_pool
    from sieve_tasks.report.samples import SampleGrids
    from sieve_tasks.shards import Shard

    shard = register_pool(sample_pool, str(tmp_path / "run"))[0]
    picked = [{"shard": shard.shard_id, "position": 0}, {"shard": shard.shard_id, "position": 1}]
    as_scored = types.SimpleNamespace(shards={shard.shard_id: shard})
    assert len(SampleGrids._thumbnails(as_scored, picked)) == 2
    replaced = types.SimpleNamespace(shards={shard.shard_id: Shard(shard.shard_id, shard.tar_uri, '{"size": 1}')})
    assert SampleGrids._thumbnails(replaced, picked) == {}
