"""Health rules on hand-made facts: read vs expected (the completion markers' optional ``expected``), the test
profile in scheduled runs, drift against a history of runs, and the rule limits' validation."""

from __future__ import annotations

import pytest

from sieve_tasks import storage
from sieve_tasks.report.health import Baseline, HealthCheck, HealthRules, cdf_distance, history_runs


def summary(read=100, failed=0, kept_fraction=0.2, profile="default"):
    return {"counts": {"read": read, "failed": failed}, "kept_fraction_of_unique": kept_fraction,
            "profile": profile, "thresholds": {"score": "sieve"}}


def rules_fired(result):
    return {f["rule"]: f["level"] for f in result["findings"]}


def test_fewer_samples_read_than_expected_fails_and_unknown_expected_is_said():
    check = HealthCheck(HealthRules())
    short = [{"shard": "00000000", "read": 10, "expected": 10}, {"shard": "00000001", "read": 2, "expected": 10}]
    result = check.verdict(summary(read=12), short, {}, None, [])
    assert result["verdict"] == "failed" and rules_fired(result)["read_vs_expected"] == "failed"
    assert "read 12 of 20 expected samples in 2 shards; short: 00000001" in str(result["findings"])

    unknown = [{"shard": "00000000", "read": 10, "expected": None}, {"shard": "00000001", "read": 7}]
    result = check.verdict(summary(read=17), unknown, {}, None, [])
    assert result["verdict"] == "healthy" and "expected unknown" in str(result["findings"])


def test_failure_rate_levels_and_test_profile_in_scheduled_runs():
    rules = HealthRules(failure_rate_warning=0.1, failure_rate_failed=0.3)
    assert HealthCheck(rules).verdict(summary(failed=10), [], {}, None, [])["verdict"] == "healthy"
    assert HealthCheck(rules).verdict(summary(failed=11), [], {}, None, [])["verdict"] == "warning"
    assert HealthCheck(rules).verdict(summary(failed=31), [], {}, None, [])["verdict"] == "failed"
    test_run = summary(profile="test")
    assert HealthCheck(rules).verdict(test_run, [], {}, None, [])["verdict"] == "healthy"
    assert HealthCheck(rules, scheduled=True).verdict(test_run, [], {}, None, [])["verdict"] == "warning"
    strict = HealthRules(test_profile_when_scheduled="failed")
    assert HealthCheck(strict, scheduled=True).verdict(test_run, [], {}, None, [])["verdict"] == "failed"


def test_drift_against_the_median_of_earlier_runs():
    same = {"low": 0.0, "width": 0.1, "counts": [1, 2, 1]}
    shifted = {"low": 0.3, "width": 0.1, "counts": [1, 2, 1]}
    history = [Baseline(f"r{i}", k, same) for i, k in enumerate((0.20, 0.22, 0.45))]
    calm = HealthCheck(HealthRules()).verdict(summary(kept_fraction=0.25), [], {"sieve": same}, None, history)
    assert calm["verdict"] == "healthy" and calm["compared_with"]["history"] == ["r0", "r1", "r2"]
    moved = HealthCheck(HealthRules()).verdict(summary(kept_fraction=0.40), [], {"sieve": shifted}, None, history)
    assert rules_fired(moved) == {"failure_rate": "healthy", "read_vs_expected": "healthy",
                                  "kept_fraction_drift_history": "warning", "score_drift_history": "warning"}
    assert cdf_distance(same, same) == 0.0 and cdf_distance(same, shifted) == pytest.approx(1.0)


def test_score_drift_compares_histograms_of_other_bin_widths():
    """An external score's histogram spans its own pool's min/max: the same distribution binned twice as wide (and
    from another start) is no drift; one shifted by half its span is."""
    fine = {"low": 0.0, "width": 0.5, "counts": [1, 1, 1, 1]}
    coarse = {"low": 0.0, "width": 1.0, "counts": [2, 2]}
    offset = {"low": -1.0, "width": 1.0, "counts": [0, 2, 2]}
    assert cdf_distance(fine, coarse) == cdf_distance(coarse, fine) == cdf_distance(fine, offset) == 0.0
    assert cdf_distance(fine, {"low": 1.0, "width": 1.0, "counts": [2, 2]}) == pytest.approx(0.5)


def test_history_is_the_published_runs_before_this_one_beside_it(tmp_path, monkeypatch):
    for day in ("2026-01-01", "2026-01-02", "2026-01-04", "2026-01-05"):
        storage.write_json_atomic(str(tmp_path / day / "manifest" / "summary.json"), {})
    (tmp_path / "2026-01-03").mkdir()  # not published
    assert history_runs(str(tmp_path / "2026-01-04"), 2) == [str(tmp_path / "2026-01-02"), str(tmp_path / "2026-01-01")]
    assert history_runs(str(tmp_path / "2026-01-04"), 0) == []
    monkeypatch.chdir(tmp_path)  # a relative run directory, as `sieve publish 2026-01-04` gets it
    assert history_runs("2026-01-04", 1) == ["./2026-01-02"]


def test_rule_limits_are_validated():
    assert HealthRules.from_mapping({"failure_rate_failed": 0.2}).failure_rate_failed == 0.2
    with pytest.raises(ValueError, match="unknown health rules"):
        HealthRules.from_mapping({"failure_rate": 0.2})
    with pytest.raises(ValueError, match="test_profile_when_scheduled"):
        HealthRules(test_profile_when_scheduled="panic")
