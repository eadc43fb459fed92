"""Crash-resume: SIGKILL in the middle of each stage, re-run, and get exactly the uninterrupted result."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import pyarrow.parquet as pq
import pytest

from sieve_tasks.cli import main

pytestmark = pytest.mark.slow

# Each injection replaces one function so that the process kills itself (SIGKILL: no cleanup, no atexit)
# at a chosen point inside a stage.
# (module, class, attribute, nth matching call, text the call's first argument must contain)
KILL_POINTS = {
    # the second shard's captions staged, not yet renamed (written while a next shard would be captioned)
    "caption": ("sieve_tasks.storage", "LocalStaging", "__exit__", 2, "/captions/0"),
    # captioning the second shard, while the first one's write may still be under way
    "caption model": ("sieve_tasks.captioner", "BlipCaptioner", "launch", 2, ""),
    "embed": ("sieve_tasks.encoders", "TextEncoder", "encode", 2, ""),          # embedding the second shard
    "score": ("sieve_tasks.storage", "LocalStaging", "__exit__", 1, "/scores/"),  # staged, not yet renamed
    "aggregate": ("sieve_tasks.stages.aggregate", None, "_selection", 1, ""),  # counted, thresholds not written
    "publish": ("pyarrow.parquet", "ParquetWriter", "write_table", 1, "kept.parquet"),  # mid-manifest
}
# What exists when the kill lands where intended (marker path → exists?).
STATE_AT_KILL = {
    "caption": {"captions/_done/00000000.json": True, "captions/_done/00000001.json": False},
    "caption model": {"captions/_done/00000001.json": False},
    "embed": {"embeddings/_done/00000000.json": True, "embeddings/_done/00000001.json": False},
    "score": {"embeddings/_done/00000000.json": True, "scores/_done/00000000.json": False},  # shards pipelined
    "aggregate": {"scores/_done/00000001.json": True, "thresholds.json": False},
    "publish": {"thresholds.json": True, "manifest/summary.json": False},
}

HARNESS = """
import importlib, os, signal, sys
module_name, class_name, attribute, nth, match = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
owner = importlib.import_module(module_name)
if class_name != "-":
    owner = getattr(owner, class_name)
original = getattr(owner, attribute)
calls = [0]
def killer(*args, **kwargs):
    target = getattr(args[0], "uri", None) or getattr(args[0], "where", "")
    if match and match not in str(target):
        return original(*args, **kwargs)
    calls[0] += 1
    if calls[0] >= nth:
        os.kill(os.getpid(), signal.SIGKILL)
    return original(*args, **kwargs)
setattr(owner, attribute, killer)
{rebind}
from sieve_tasks.cli import main
sys.exit(main(sys.argv[6:]))
"""


def _run_killed(stage, args):
    module, cls, attribute, nth, match = KILL_POINTS[stage]
    # a module-level function is also imported by name elsewhere: rebind it there
    rebind = "import sieve_tasks.stages.aggregate as a; a._selection = killer" if cls is None else ""
    code = textwrap.dedent(HARNESS).replace("{rebind}", rebind)
    return subprocess.run([sys.executable, "-c", code, module, cls or "-", attribute, str(nth), match, *args],
                          capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("stage", list(KILL_POINTS))
def test_killed_run_resumes_to_the_same_result(stage, sample_pool, test_profile_run, tmp_path):
    run = str(tmp_path / "run")
    args = ["run", sample_pool, run, "--profile", "test", "--no-progress"]
    killed = _run_killed(stage, args)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    for path, present in STATE_AT_KILL[stage].items():
        assert os.path.exists(os.path.join(run, path)) == present, path
    assert main(args) == 0
    for name in ("subset.npy", "kept.parquet"):
        assert open(os.path.join(run, "manifest", name), "rb").read() == \
            open(os.path.join(test_profile_run, "manifest", name), "rb").read(), name
    ours = json.load(open(os.path.join(run, "manifest", "summary.json")))
    reference = json.load(open(os.path.join(test_profile_run, "manifest", "summary.json")))
    assert ours["counts"] == reference["counts"] and ours["thresholds"] == reference["thresholds"]
    for part in ("captions", "scores"):
        assert pq.read_table(os.path.join(run, part)).equals(pq.read_table(os.path.join(test_profile_run, part)))
