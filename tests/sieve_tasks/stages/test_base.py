"""The per-shard stages' outputs make one result: one set of settings per stage, each computed from what is there."""

from __future__ import annotations

import shutil

import pytest

from sieve_tasks.cli import main
from sieve_tasks.stages.base import InconsistentRun, check_one_result


def _markers() -> dict[str, list[dict]]:
    """Two shards' markers of the three stages, one result."""
    return {stage: [{"shard": shard, "fingerprint": f"{stage}-{shard}", "settings": {"seed": 0, "mode": "a"},
                     "upstream": f"{upstream}-{shard}" if upstream else None}
                    for shard in ("00000000", "00000001")]
            for stage, upstream in (("captions", None), ("embeddings", "captions"), ("scores", "embeddings"))}


def test_one_result_passes_and_older_markers_without_their_upstream_pass():
    check_one_result(_markers())
    older = _markers()
    for done in older["scores"]:
        del done["upstream"]
    check_one_result(older)


def test_a_stage_with_other_settings_on_some_shards_is_refused():
    markers = _markers()
    markers["embeddings"][1]["settings"] = {"seed": 5, "mode": "a"}
    with pytest.raises(InconsistentRun, match=r"the embeddings of some shards were made with other settings "
                                              r"\(seed: 0 on 00000000, 5 on 00000001\): run `sieve embed` again"):
        check_one_result(markers)


def test_outputs_computed_from_an_upstream_that_was_recomputed_are_refused():
    markers = _markers()
    markers["captions"][1]["fingerprint"] = "captions-00000001-again"
    with pytest.raises(InconsistentRun, match=r"shard 00000001: its embeddings were computed from other captions .*"
                                              r"run `sieve embed` again for it"):
        check_one_result(markers)


def test_scoring_after_captioning_again_without_embedding_again_is_refused(test_profile_run, sample_pool, tmp_path,
                                                                          capsys):
    """`sieve score` reads the captions and the embeddings: new captions beside old similarities are an error, and
    so is publishing scores made before the captions changed."""
    run = str(tmp_path / "run")
    shutil.copytree(test_profile_run, run)
    assert main(["caption", sample_pool, run, "--profile", "test", "--seed", "1", "--shards", "00000000"]) == 0
    assert main(["score", sample_pool, run, "--profile", "test", "--seed", "1"]) == 2
    assert "shard 00000000: its embeddings were computed from other captions" in capsys.readouterr().err
    assert main(["publish", run]) == 2
    assert "the captions of some shards were made with other settings (seed: 1 on 00000000, 0 on 00000001)" in \
        capsys.readouterr().err
    assert main(["caption", sample_pool, run, "--profile", "test", "--seed", "1"]) == 0
    for stage in ("embed", "score"):
        assert main([stage, sample_pool, run, "--profile", "test", "--seed", "1"]) == 0
    assert main(["aggregate", run]) == 0 and main(["publish", run]) == 0


def test_publish_refuses_outputs_of_a_tar_the_pool_now_records_as_replaced(test_profile_run, tmp_path, capsys):
    """A stage that found a shard's tar replaced records its new identity: outputs computed from the old tar no
    longer belong to the pool."""
    import json

    run = tmp_path / "run"
    shutil.copytree(test_profile_run, run)
    recorded = json.loads((run / "shards.json").read_text())
    recorded["identities"]["00000001"] = json.dumps({"mtime": 1.0, "size": 1})
    (run / "shards.json").write_text(json.dumps(recorded))
    assert main(["publish", str(run)]) == 2
    assert "shard 00000001: its captions were computed from its tar before it was replaced" in capsys.readouterr().err
    assert not (run / "manifest" / "_SUCCESS").exists()
