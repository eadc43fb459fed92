"""The health verdict of a published run: ``healthy``, ``warning`` or ``failed``, with the rules that fired.

Evaluated at publish from the run's own facts (failure rate, read vs expected per shard, profile) and from
other runs (drift of the kept fraction and of the selected score's distribution from the reference run and
from the last runs beside this one). A ``failed`` run gets no ``_SUCCESS`` and fails the Airflow publish task
before its Asset event; a ``warning`` publishes and notifies.
"""

from __future__ import annotations

import dataclasses
import posixpath
import statistics
from dataclasses import dataclass
from typing import Any

import numpy as np

from sieve_tasks import storage

LEVELS = ("healthy", "warning", "failed")


@dataclass(frozen=True)
class HealthRules:
    """Limits of the health rules (``--health-rules`` / the DAG param ``health_rules``, as JSON)."""

    failure_rate_warning: float = 0.10  # failed / read above this: warning
    failure_rate_failed: float = 0.30  # ... and above this: failed
    missing_failed: float = 0.0  # samples not read / expected (over shards that say) above this: failed
    kept_fraction_drift: float = 0.10  # |kept fraction - baseline's| above this: warning
    score_drift: float = 0.25  # largest CDF gap of the selected score vs the baseline's above this: warning
    history_runs: int = 7  # how many earlier runs beside this one form the history baseline
    reference_run: str | None = None  # a run to compare with (default: the run the thresholds came from)
    test_profile_when_scheduled: str = "warning"  # level of a test-profile run in a scheduled DAG run

    def __post_init__(self) -> None:
        if self.test_profile_when_scheduled not in LEVELS:
            raise ValueError(f"test_profile_when_scheduled must be one of {list(LEVELS)}")
        if self.history_runs < 0:
            raise ValueError("history_runs must be at least 0")

    @classmethod
    def from_mapping(cls, values: dict[str, Any] | None) -> "HealthRules":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values or {}) - names)
        if unknown:
            raise ValueError(f"unknown health rules {unknown}; known: {sorted(names)}")
        return cls(**(values or {}))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Baseline:
    """A published run to compare with: its kept fraction and the histogram of its selected score."""

    run: str
    kept_fraction: float
    histogram: dict[str, Any] | None

    @classmethod
    def load(cls, run: str) -> "Baseline | None":
        try:
            summary = storage.read_json(storage.join(run, "manifest", "summary.json"))
            thresholds = storage.read_json(storage.join(run, "thresholds.json"))
        except (OSError, ValueError):  # not published (yet), or unreadable: no baseline
            return None
        score = (summary.get("thresholds") or {}).get("score")
        return cls(run, summary["kept_fraction_of_unique"], (thresholds.get("histograms") or {}).get(score))


def history_runs(run: str, limit: int) -> list[str]:
    """Published runs beside ``run`` (same parent directory) whose names sort before it, nearest first: the
    earlier days of the daily refilter, the earlier DAG runs of a DAG (run ids start with the run type and
    date)."""
    if limit == 0:
        return []
    parent, name = posixpath.split(run.rstrip("/"))
    parent = parent or "."
    fs, root = storage.filesystem(parent)
    try:
        found = fs.glob(f"{root.rstrip('/')}/*/manifest/summary.json")
    except (OSError, ValueError):
        return []
    names = sorted({p.split("/")[-3] for p in found if p.split("/")[-3] < name}, reverse=True)
    return [storage.join(parent, n) for n in names[:limit]]


@dataclass(frozen=True)
class Finding:
    rule: str
    level: str
    message: str


class HealthCheck:
    """Evaluates every rule for one run; :meth:`verdict` is the worst level found."""

    def __init__(self, rules: HealthRules, scheduled: bool = False):
        self.rules = rules
        self.scheduled = scheduled

    def verdict(self, summary: dict[str, Any], shards: list[dict[str, Any]], histograms: dict[str, Any],
                reference: Baseline | None, history: list[Baseline]) -> dict[str, Any]:
        findings = [*self._failures(summary), *self._missing(shards), *self._profile(summary)]
        histogram = histograms.get((summary.get("thresholds") or {}).get("score"))
        if reference is not None:
            findings += self._drift("reference", [reference], summary, histogram)
        if history:
            findings += self._drift("history", history, summary, histogram)
        worst = max((LEVELS.index(f.level) for f in findings), default=0)
        return {
            "verdict": LEVELS[worst],
            "findings": [dataclasses.asdict(f) for f in sorted(findings, key=lambda f: -LEVELS.index(f.level))],
            "compared_with": {"reference": reference.run if reference else None,
                              "history": [b.run for b in history]},
            "rules": self.rules.to_dict(),
        }

    def _failures(self, summary: dict[str, Any]) -> list[Finding]:
        counts = summary["counts"]
        rate = counts["failed"] / counts["read"] if counts["read"] else 0.0
        text = f"{counts['failed']} of {counts['read']} samples failed ({rate:.1%})"
        if rate > self.rules.failure_rate_failed:
            return [Finding("failure_rate", "failed", f"{text} > {self.rules.failure_rate_failed:.1%}")]
        if rate > self.rules.failure_rate_warning:
            return [Finding("failure_rate", "warning", f"{text} > {self.rules.failure_rate_warning:.1%}")]
        return [Finding("failure_rate", "healthy", text)]

    def _missing(self, shards: list[dict[str, Any]]) -> list[Finding]:
        known = [s for s in shards if isinstance(s.get("expected"), int)]
        if not known:
            return [Finding("read_vs_expected", "healthy", "expected unknown (no shard parquet / _stats.json)")]
        expected = sum(s["expected"] for s in known)
        missing = sum(max(s["expected"] - s["read"], 0) for s in known)
        short = [s["shard"] for s in known if s["read"] < s["expected"]]
        text = f"read {expected - missing} of {expected} expected samples in {len(known)} shards"
        if expected and missing / expected > self.rules.missing_failed:
            return [Finding("read_vs_expected", "failed", f"{text}; short: {', '.join(short[:10])}"
                            + (" …" if len(short) > 10 else ""))]
        return [Finding("read_vs_expected", "healthy", text)]

    def _profile(self, summary: dict[str, Any]) -> list[Finding]:
        if summary.get("profile") == "test" and self.scheduled:
            return [Finding("test_profile", self.rules.test_profile_when_scheduled,
                            "a scheduled DAG run used the test profile (random models)")]
        return []

    def _drift(self, name: str, baselines: list[Baseline], summary: dict[str, Any],
               histogram: dict[str, Any] | None) -> list[Finding]:
        findings = []
        kept = summary["kept_fraction_of_unique"]
        usual = statistics.median(b.kept_fraction for b in baselines)
        gap = abs(kept - usual)
        which = baselines[0].run if name == "reference" else f"median of the last {len(baselines)} runs"
        text = f"kept fraction {kept:.1%} vs {usual:.1%} ({which})"
        level = "warning" if gap > self.rules.kept_fraction_drift else "healthy"
        findings.append(Finding(f"kept_fraction_drift_{name}", level,
                                text + (f": off by {gap:.1%} > {self.rules.kept_fraction_drift:.1%}"
                                        if level == "warning" else "")))
        others = [b.histogram for b in baselines if b.histogram]
        if histogram and histogram["counts"] and others:
            distance = max(cdf_distance(histogram, other) for other in others)
            level = "warning" if distance > self.rules.score_drift else "healthy"
            findings.append(Finding(f"score_drift_{name}", level,
                                    f"score distribution vs {which}: largest CDF gap {distance:.2f}"
                                    + (f" > {self.rules.score_drift:.2f}" if level == "warning" else "")))
        return findings


def cdf_distance(a: dict[str, Any], b: dict[str, Any]) -> float:
    """Kolmogorov-Smirnov distance between two thresholds.json histograms of one score, whatever their bins (an
    external score's histogram spans its own pool's min/max, so its width differs between runs): each CDF is read
    at every bin edge of both, linear within a bin."""
    if not a["counts"] or not b["counts"]:
        return 0.0

    def edges_and_cdf(histogram: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        counts = np.asarray(histogram["counts"], float)
        edges = histogram["low"] + histogram["width"] * np.arange(len(counts) + 1)
        return edges, np.concatenate(([0.0], np.cumsum(counts) / counts.sum()))

    (edges_a, cdf_a), (edges_b, cdf_b) = edges_and_cdf(a), edges_and_cdf(b)
    points = np.union1d(edges_a, edges_b)
    return float(np.max(np.abs(np.interp(points, edges_a, cdf_a) - np.interp(points, edges_b, cdf_b))))


def histogram_mean(histogram: dict[str, Any] | None) -> float | None:
    """Mean of a thresholds.json histogram (bin centres: within half a bin, 0.004, of the exact mean)."""
    if not histogram or not histogram["counts"]:
        return None
    counts = np.asarray(histogram["counts"], float)
    centres = histogram["low"] + histogram["width"] * (np.arange(len(counts)) + 0.5)
    return float((counts * centres).sum() / counts.sum())


def assess(run: str, summary: dict[str, Any], histograms: dict[str, Any], shards: list[dict[str, Any]],
           rules: HealthRules, scheduled: bool = False) -> dict[str, Any]:
    """The verdict of a run about to be published, against its reference run and the runs beside it."""
    reference_run = rules.reference_run or (summary.get("thresholds") or {}).get("reference_run")
    reference = Baseline.load(reference_run) if reference_run else None
    history = [b for b in map(Baseline.load, history_runs(run, rules.history_runs)) if b is not None]
    return HealthCheck(rules, scheduled).verdict(summary, shards, histograms, reference, history)
