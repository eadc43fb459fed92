"""The report's histogram: kept bars green right of the threshold, dropped ones grey left of it, same bytes for
the same input."""

from __future__ import annotations

import base64
import io
import subprocess
import sys

import numpy as np
from PIL import Image

from sieve_tasks.report.plots import COLOURS, histogram_png

HISTOGRAM = {"low": 0.0, "width": 0.1, "counts": [3, 8, 5, 9, 4, 7, 6, 2, 9, 5]}


def _pixels(uri: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))).convert("RGB"))


def _columns(pixels: np.ndarray, colour: str, tall: int = 1) -> np.ndarray:
    """The x positions holding at least ``tall`` pixels of exactly this colour."""
    rgb = np.array([int(colour[i : i + 2], 16) for i in (1, 3, 5)])
    return np.nonzero((pixels == rgb).all(-1).sum(0) >= tall)[0]


def test_kept_bars_are_green_right_of_the_threshold_and_dropped_ones_grey_left_of_it():
    uri = histogram_png("fused", HISTOGRAM, 0.5)
    pixels = _pixels(uri)
    kept, dropped = _columns(pixels, COLOURS["kept"]), _columns(pixels, COLOURS["dropped"])
    line = _columns(pixels, COLOURS["line"], tall=100)  # the threshold, not its short legend entry
    assert len(kept) > 100 and len(dropped) > 100 and len(line)
    assert dropped.max() < kept.min()  # grey bars left, green right
    assert dropped.max() <= line.min() and line.max() <= kept.min() + 2  # the red line between them
    # ten bars of equal width: the grey part and the green part are each about half of the plotted width
    assert 0.8 < len(dropped) / len(kept) < 1.25
    assert histogram_png("fused", HISTOGRAM, 0.5) == uri  # same input, same bytes


def test_without_a_threshold_every_bar_is_grey():
    pixels = _pixels(histogram_png("clip", HISTOGRAM, None))
    assert len(_columns(pixels, COLOURS["kept"])) == 0 and len(_columns(pixels, COLOURS["line"])) == 0
    assert len(_columns(pixels, COLOURS["dropped"])) > 200


def test_a_per_shard_task_does_not_import_matplotlib():
    """The stages' runner imports the report's package (health rules) in every per-shard task process; matplotlib
    (~0.5 s to import) loads only when a plot is drawn."""
    code = ("import sys, sieve_tasks.runner, sieve_tasks.report; assert 'matplotlib' not in sys.modules; "
            "from sieve_tasks.report.plots import histogram_png; histogram_png('sieve', "
            f"{HISTOGRAM!r}, 0.5); assert 'matplotlib' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)
