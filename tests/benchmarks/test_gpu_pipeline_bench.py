"""CI dry run of benchmarks/gpu_pipeline_bench.py: --tiny on CPU, every figure in the summary, a published run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "gpu_pipeline_bench.py"
STAGES = ("caption", "embed", "score", "aggregate")


def _bench(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=180)


@pytest.mark.slow
def test_tiny_dry_run_reports_every_figure(tmp_path):
    out = tmp_path / "summary.json"
    result = _bench("--tiny", "--device", "cpu", "--workdir", str(tmp_path / "work"), "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(out.read_text())

    assert summary["samples"] == 64 and summary["shards"] == 4 and summary["device"] == "cpu"
    assert summary["mean_jpeg_kb"] > 0 and summary["caption_batch_size"] == 8
    assert summary["gpu_decode_refused"] == 0  # the CPU path decodes with PIL: nothing is refused
    assert set(summary["machine"]) >= {"cpu", "cpus", "gpu", "torch", "transformers", "open_clip"}
    assert list(summary["stages"]) == list(STAGES)
    for stage, figures in summary["stages"].items():
        assert figures["rows"] == 64, stage
        assert figures["seconds"] > 0 and figures["rows_per_s"] > 0, stage
    alone = summary["caption_task_alone"]
    assert alone["rows"] == 64 and alone["rows_per_s"] > 0
    assert alone["gpu_busy_pct"] is None and alone["gpu_busy_from_first_launch_pct"] is None  # no GPU: n/a
    assert 0 < alone["first_launch_after_s"] < alone["seconds"]  # BLIP was launched, after its loading
    e2e = summary["end_to_end"]
    assert e2e["samples"] == 64 and e2e["samples_per_s"] > 0 and e2e["gpu_busy_pct"] is None
    phases = e2e["phases"]
    assert 0 < phases["first_launch_after_s"] and 0 < phases["captioning_s"] and 0 < phases["after_captioning_s"]
    assert phases["first_launch_after_s"] + phases["captioning_s"] + phases["after_captioning_s"] <= e2e["seconds"] + 0.05
    assert phases["captioning_samples_per_s"] > e2e["samples_per_s"] and phases["gpu_busy_captioning_pct"] is None
    assert summary["cold_imports_s"] > 0
    decoder = summary["decoder_alone"]
    assert decoder["batch"] == 8 and decoder["batches"] == 1 and decoder["img_per_s"] > 0
    assert decoder["gpu_busy_pct"] is None

    manifest = Path(summary["manifest"])
    assert (manifest / "_SUCCESS").exists() and (manifest / "subset.npy").exists()
    assert summary["health"] == "healthy"
    assert json.loads((manifest / "summary.json").read_text())["counts"]["read"] == 64
    assert "==== SIEVE pipeline benchmark ====" in result.stdout and "n/a (no GPU)" in result.stdout


def test_copy_minilm_config_copies_small_files_only(tmp_path):
    result = _bench("--copy-minilm-config", str(tmp_path / "minilm"))
    assert result.returncode == 0, result.stderr[-3000:]
    copied = sorted(p.relative_to(tmp_path / "minilm").as_posix() for p in (tmp_path / "minilm").rglob("*")
                    if p.is_file())
    assert "1_Pooling/config.json" in copied and "vocab.txt" in copied and "modules.json" in copied
    assert not [name for name in copied if name.endswith((".safetensors", ".bin"))]
    assert sum((tmp_path / "minilm" / name).stat().st_size for name in copied) < 1_000_000


def test_building_clip_leaves_the_tokenizers_threads_on(tmp_path):
    """open_clip's import sets TOKENIZERS_PARALLELISM=false process-wide; the text process sieve run spawns later in
    the benchmark's process must not inherit it (a real sieve run spawns it before CLIP is imported)."""
    code = ("import os, sys; sys.path.insert(0, 'benchmarks'); import gpu_pipeline_bench as bench; "
            f"bench.build_clip(__import__('pathlib').Path({str(tmp_path / 'clip')!r}), tiny=True); "
            "import open_clip; print(os.environ.get('TOKENIZERS_PARALLELISM'))")
    env = {k: v for k, v in os.environ.items() if k != "TOKENIZERS_PARALLELISM"}
    env["PYTHONPATH"] = str(REPO)
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "None"
    assert (tmp_path / "clip" / "open_clip_model.safetensors").exists()
