"""The caption stage with its CUDA helpers — CLIP's alt-text tokenizer and the tar reader in processes of their own —
writes what it writes without them."""

from __future__ import annotations

import os
import shutil
from concurrent.futures import Future
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sieve_tasks.cli import main
from sieve_tasks.encoders import ClipEncoder
from sieve_tasks.models import Device
from sieve_tasks.pool import register_pool
from sieve_tasks.runner import caption_shards
from sieve_tasks.settings import Settings
from sieve_tasks.stages.caption import CaptionStage
from sieve_tasks.test_models import TINY_CLIP


def test_worker_processes_give_the_inline_captions_table(sample_pool, tmp_path, monkeypatch):
    settings = Settings(profile="test")
    tables = []
    for processes in (0, 1):
        run = str(tmp_path / f"run{processes}")
        clip = ClipEncoder(TINY_CLIP, Device.choose("cpu"), settings.embed_batch_size, processes)
        stage = CaptionStage(run, settings, clip=clip)
        make_pass = stage.image_pass

        def image_pass(make_pass=make_pass, processes=processes):
            images = make_pass()
            images.reader_process = bool(processes)
            return images

        monkeypatch.setattr(stage, "image_pass", image_pass)
        for _ in caption_shards(stage, register_pool(sample_pool, run)):
            pass
        assert clip._tokenizing is None  # the stage's close() stopped the processes
        tables.append(pq.read_table(f"{run}/captions").sort_by([("shard", "ascending"), ("position", "ascending")]))
    inline, pooled = tables
    assert inline.column("clip_score").null_count < inline.num_rows
    assert "failed" in inline.column("status").to_pylist()
    assert pooled.equals(inline)


def test_a_shard_whose_captioning_fails_has_the_shard_before_it_written(sample_pool, test_profile_run, tmp_path):
    """A shard is finished only once the next one has launched its first batch: when the next one fails before
    that, the shard before is still finished and written, then the error is raised."""
    pool = tmp_path / "pool"
    shutil.copytree(sample_pool, pool)
    run = str(tmp_path / "run")
    shards = register_pool(str(pool), run)
    assert [shard.shard_id for shard in shards] == ["00000000", "00000001"]
    (pool / "00000001.tar").unlink()
    with pytest.raises(FileNotFoundError):
        for _ in caption_shards(CaptionStage(run, Settings(profile="test")), shards):
            pass
    written = pq.read_table(f"{run}/captions/00000000.parquet")
    assert written.equals(pq.read_table(f"{test_profile_run}/captions/00000000.parquet"))
    assert not (tmp_path / "run" / "captions" / "_done" / "00000001.json").exists()


def test_a_shard_that_cannot_be_prepared_fails_at_its_turn(sample_pool, test_profile_run, tmp_path, monkeypatch):
    """The next shard is prepared (its inputs read, its image pass started) while the current one is captioned: a
    failure there is the next shard's, raised at its turn, after the current shard is captioned and written."""
    run = str(tmp_path / "run")
    shards = register_pool(sample_pool, run)
    stage = CaptionStage(run, Settings(profile="test"))
    real = stage.metadata_clip_scores

    def failing(shard):
        if shard.shard_id == "00000001":
            raise FileNotFoundError("--clip-from-metadata needs 00000001.parquet")
        return real(shard)

    monkeypatch.setattr(stage, "metadata_clip_scores", failing)
    with pytest.raises(FileNotFoundError, match="00000001.parquet"):
        for _ in caption_shards(stage, shards):
            pass
    written = pq.read_table(f"{run}/captions/00000000.parquet")
    assert written.equals(pq.read_table(f"{test_profile_run}/captions/00000000.parquet"))
    assert (tmp_path / "run" / "captions" / "_done" / "00000000.json").exists()
    assert not (tmp_path / "run" / "captions" / "_done" / "00000001.json").exists()


def test_provided_captions_replaced_at_the_same_path_are_not_stale(sample_pool, tmp_path):
    """The captions file's identity is part of the caption fingerprint: a rerun with the file unchanged skips every
    shard; with new captions at the same path it recomputes them, and the scores' stages after it."""
    captions = tmp_path / "captions.parquet"
    uids = [u for path in sorted(Path(sample_pool).glob("*.parquet"))
            for u in pq.read_table(path, columns=["uid"]).column("uid").to_pylist()]
    run = str(tmp_path / "run")
    args = ["run", sample_pool, run, "--profile", "test", "--clip", "none", "--captions", str(captions),
            "--no-progress"]
    pq.write_table(pa.table({"uid": uids, "captions": [["a photo"]] * len(uids)}), captions)
    assert main(args) == 0
    markers = {path: os.path.getmtime(path) for path in Path(run, "captions", "_done").glob("*.json")}
    assert main(args) == 0
    assert {path: os.path.getmtime(path) for path in markers} == markers  # nothing recomputed
    pq.write_table(pa.table({"uid": uids, "captions": [["a drawing of a cat"]] * len(uids)}), captions)
    os.utime(captions, ns=(os.stat(captions).st_atime_ns, os.stat(captions).st_mtime_ns + 10**9))
    assert main(args) == 0
    written = pq.read_table(Path(run, "captions"), columns=["status", "captions"]).to_pylist()
    assert {tuple(row["captions"]) for row in written if row["status"] == "ok"} == {("a drawing of a cat",)}
    scored = pq.read_table(Path(run, "scores"), columns=["status", "best_caption"]).to_pylist()
    assert {row["best_caption"] for row in scored if row["status"] == "ok"} == {"a drawing of a cat"}


def test_the_parquet_clip_from_metadata_reads_is_part_of_the_fingerprint(sample_pool, tmp_path):
    pool = tmp_path / "pool"
    shutil.copytree(sample_pool, pool)
    run = str(tmp_path / "run")
    shard = register_pool(str(pool), run)[0]
    stage = CaptionStage(run, Settings(profile="test", clip_from_metadata="b32"))
    plain = CaptionStage(run, Settings(profile="test")).fingerprint(shard)
    before = stage.fingerprint(shard)
    parquet = Path(shard.metadata_uri)
    os.utime(parquet, ns=(parquet.stat().st_atime_ns, parquet.stat().st_mtime_ns + 10**9))
    assert stage.fingerprint(shard) not in (before, plain)
    assert CaptionStage(run, Settings(profile="test")).fingerprint(shard) == plain  # no such file read: as before


class _LateTextCaptioner:
    """Hands out each batch's captions only once the next batch was launched (or the stage collects them at the
    end of the run): a stage that waited for a batch's text before launching the next would stall here."""

    oom_splits = 0

    def __init__(self):
        self.launched: list[Future] = []
        self.closed = False

    def launch(self, pixel_values, seed: int) -> Future:
        if self.launched and not self.launched[-1].done():
            self._finish(-1)
        captions: Future = Future()
        captions.batch = len(self.launched)
        captions.size = pixel_values.shape[0]
        self.launched.append(captions)
        return captions

    def start_text(self) -> None:
        pass

    def _finish(self, index: int) -> None:
        captions = self.launched[index]
        captions.set_result([[f"batch {captions.batch} image {i}"] for i in range(captions.size)])

    def close(self) -> None:
        self.closed = True


def test_captions_are_collected_after_the_next_batch_is_launched(sample_pool, tmp_path, monkeypatch):
    """The stage launches a caption batch without waiting for the one before to become text, keeps at most
    CAPTION_BATCHES_IN_TEXT waiting, finishes a shard only after the next one launched, and puts every batch's
    captions into its own rows."""
    from sieve_tasks.stages import caption as caption_module

    captioner = _LateTextCaptioner()
    waited: list[int] = []
    real_result = Future.result

    def result(self, timeout=None):
        if hasattr(self, "batch") and not self.done():
            waited.append(self.batch)
            captioner._finish(self.batch)
        return real_result(self, timeout)

    monkeypatch.setattr(Future, "result", result)
    monkeypatch.setattr(caption_module, "CAPTION_BATCHES_IN_TEXT", 1)
    run = str(tmp_path / "run")
    stage = CaptionStage(run, Settings(profile="test", clip="none", caption_batch_size=2), captioner=captioner)
    shards = register_pool(sample_pool, run)
    for _ in caption_shards(stage, shards):
        pass
    assert captioner.closed
    assert len(captioner.launched) > 2 * len(shards)
    assert all(captions.done() for captions in captioner.launched)
    assert len(shards) > 1 and waited == [len(captioner.launched) - 1]  # only the run's last batch, at its end
    rows = pq.read_table(f"{run}/captions").sort_by([("shard", "ascending"), ("position", "ascending")]).to_pylist()
    captioned = [row for row in rows if row["caption_source"] == "captioner"]
    batches = [int(row["captions"][0].split()[1]) for row in captioned]
    assert batches == sorted(batches) and len(set(batches)) == len(captioner.launched)
    for batch in set(batches):
        images = [int(row["captions"][0].split()[3]) for row in captioned if f"batch {batch} " in row["captions"][0]]
        assert images == list(range(len(images)))


class _Launched:
    """A CLIP result as the stage sees it on CUDA: still on the device until ``cpu()`` copies it."""

    def __init__(self, vectors, events: list[str]):
        self.vectors, self.events = vectors, events

    def cpu(self):
        self.events.append("clip copied")
        return self.vectors


class _EventClip:
    """The tiny CLIP, its vectors handed out as :class:`_Launched`, what the stage does with it logged."""

    def __init__(self, clip: ClipEncoder, events: list[str]):
        self.clip, self.events = clip, events

    def __getattr__(self, name: str):
        return getattr(self.clip, name)

    def encode_images(self, pixels):
        self.events.append("clip launched")
        return _Launched(self.clip.encode_images(pixels), self.events)

    def encode_tokens(self, tokens):
        return _Launched(self.clip.encode_tokens(tokens), [])


class _EventCaptions:
    """A caption batch's future whose reading the stage logs."""

    def __init__(self, captions: Future, events: list[str]):
        self.captions, self.events = captions, events

    def done(self) -> bool:
        return self.captions.done()

    def result(self):
        self.events.append("captions collected")
        return self.captions.result()


def test_clip_is_launched_right_after_blip_and_collected_later(sample_pool, tmp_path):
    """On CUDA BLIP's launch returns when the device is done with it, and a copy to the host waits for the device:
    the stage launches CLIP right after BLIP, before putting any captions or vectors into rows, and copies a batch's
    CLIP vectors only once something else was launched after them (a shard's last ones after the next shard's first
    launches; only the run's last batch is copied at once) — so the device has work while the stage does its
    bookkeeping, across shards too. The CLIP scores are those of copying at once."""
    settings = Settings(profile="test", caption_batch_size=2)
    events: list[str] = []
    tables = []
    for logged in (False, True):
        run = str(tmp_path / f"run{logged}")
        clip = ClipEncoder(TINY_CLIP, Device.choose("cpu"), settings.embed_batch_size)
        stage = CaptionStage(run, settings, clip=_EventClip(clip, events) if logged else clip)
        if logged:
            captioner = stage.captioner
            launch, start_text, make = captioner.launch, captioner.start_text, captioner._captions
            captioner.launch = lambda *args: (events.append("caption launched"),
                                              _EventCaptions(launch(*args), events))[1]
            captioner.start_text = lambda: (events.append("text started"), start_text())[1]
            captioner._captions = lambda tokens: (events.append("text made"), make(tokens))[1]
        shards = register_pool(sample_pool, run)
        for _ in caption_shards(stage, shards):
            pass
        tables.append(pq.read_table(f"{run}/captions").sort_by([("shard", "ascending"), ("position", "ascending")]))
    eager, logged = tables
    assert logged.equals(eager) and logged.column("clip_score").null_count < logged.num_rows
    launches = {"caption launched", "clip launched"}
    clip_launches = [i for i, event in enumerate(events) if event == "clip launched"]
    copies = [i for i, event in enumerate(events) if event == "clip copied"]
    assert len(copies) == len(clip_launches) > 3 * len(shards)
    unhidden = [copy for launch, copy in zip(clip_launches, copies) if not launches & set(events[launch + 1 : copy])]
    assert len(shards) > 1 and len(unhidden) <= 1  # the run's last batch
    caption_launches = [i for i, event in enumerate(events) if event == "caption launched"]
    assert len(caption_launches) > 3 * len(shards)
    moments = [event for event in events if event not in ("text made", "text started")]
    late = [i for i, event in enumerate(moments) if event == "caption launched"
            and i + 1 < len(moments) and moments[i + 1] not in launches]
    assert len(late) <= 1  # the run's last caption batch, launched after its last image batch
    # a caption batch's text (Python work in the captioner's thread) is started only after CLIP's launch
    for i in caption_launches:
        following = next((j for j in range(i + 1, len(events)) if events[j] in launches), len(events))
        if following < len(events) and events[following] == "clip launched":
            assert "text started" not in events[i + 1 : following]
    launched = started_up_to = made = 0  # and never made before it is started
    for event in events:
        if event == "caption launched":
            launched += 1
        elif event == "text started":
            started_up_to = launched
        elif event == "text made":
            made += 1
            assert made <= started_up_to
    assert made == launched
