"""Runs stages over shards in one process: what the CLI, the Airflow tasks and worker pods call."""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import sys
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

from sieve_tasks import storage
from sieve_tasks.pool import register_pool, select_shards
from sieve_tasks.report.health import HealthRules
from sieve_tasks.settings import Settings, fingerprint
from sieve_tasks.shards import Shard
from sieve_tasks.stages.aggregate import aggregate
from sieve_tasks.stages.base import ShardStage
from sieve_tasks.stages.embed import EmbedStage
from sieve_tasks.stages.publish import publish
from sieve_tasks.stages.score import ScoreStage
from sieve_tasks.tables import check_sources

if TYPE_CHECKING:  # the caption stage imports torch (~2 s): a score task never needs it
    from sieve_tasks.stages.caption import CaptionStage

log = logging.getLogger(__name__)

TEXT_STAGES: dict[str, type[ShardStage]] = {"embed": EmbedStage, "score": ScoreStage}


# A thread waiting for the GIL gets it after at most this many seconds (Python's default: 5 ms). The thread that
# launches the models gives the GIL up at every torch operation and must get it back at once, while the image
# pass's reader and decode threads run Python beside it.
SWITCH_INTERVAL = 0.0002


def run_shard_stage(name: str, input_spec: str, run: str, settings: Settings, shard_ids: list[str] | None = None,
                    progress: bool = False) -> list[dict[str, Any]]:
    """Run one per-shard stage over the named shards (all by default); returns their completion markers."""
    sys.setswitchinterval(SWITCH_INTERVAL)
    shards = tqdm(select_shards(register_pool(input_spec, run), shard_ids), desc=name, unit="shard",
                  disable=not progress)
    if name == "caption":
        from sieve_tasks.stages.caption import CaptionStage

        return [marker for _, marker in caption_shards(CaptionStage(run, settings), shards)]
    stage = TEXT_STAGES[name](run, settings)
    return [stage.run_shard(shard) for shard in shards]


def caption_shards(stage: CaptionStage, shards: Iterable[Shard]) -> Iterator[tuple[Shard, dict[str, Any]]]:
    """Caption shards in order (:meth:`CaptionStage.compute_shards`: one stream of batches for the accelerator
    across the shards), each shard's finishing and write in a writer thread while the next shard is captioned (the
    accelerator does not wait through the writes' storage round trips). Yields each shard with its marker once
    written; a shard whose captioning fails still gets the shard before it written."""
    written: tuple[Shard, Future[dict[str, Any]]] | None = None
    try:
        with ThreadPoolExecutor(1, thread_name_prefix="caption-writes") as writes:
            for shard, write in stage.compute_shards(list(shards)):
                submitted = shard, writes.submit(storage.carrying_options(write))
                if written is not None:
                    yield written[0], written[1].result()
                written = submitted
            if written is not None:
                yield written[0], written[1].result()
    finally:
        stage.close()


def run_all(input_spec: str, run: str, settings: Settings, progress: bool = True,
            rules: HealthRules | None = None, text_process: bool | None = None) -> dict[str, Any]:
    """caption → embed → score over every shard, then aggregate and publish (with the health ``rules``); resumes
    where it stopped. Shards are pipelined: while the image pass (caption stage) of one shard keeps the
    accelerator busy, the text side (embed, score) of the shards before it runs beside it, in order — in a process
    of its own when the models run on CUDA (``text_process=None``), so that the two sides do not share one GIL; in
    a thread otherwise (a CPU has no idle accelerator to feed, and a process costs seconds to start)."""
    from sieve_tasks.stages.caption import CaptionStage

    check_sources(settings)
    sys.setswitchinterval(SWITCH_INTERVAL)
    shards = select_shards(register_pool(input_spec, run), None)
    caption = CaptionStage(run, settings)
    if text_process is None:
        text_process = caption.torch_device.type == "cuda"
    executor = (ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) if text_process
                else ThreadPoolExecutor(1, thread_name_prefix="text-side"))
    with executor as text_side, tqdm(total=len(shards), desc="shards", unit="shard", disable=not progress) as bar:
        # the sentence encoder loads while the first shards are captioned; the caption stage never waits for the
        # text side (its shards queue up: each is only a name, the text side reads the shard's captions from
        # storage), and a text side that failed stops the run at the next captioned shard
        texts = deque([text_side.submit(text_side_of, run, settings, None, {})])
        try:
            with contextlib.closing(caption_shards(caption, shards)) as captioned:
                for shard, _ in captioned:
                    texts.append(text_side.submit(text_side_of, run, settings, shard, storage.options_snapshot()))
                    texts[-1].add_done_callback(lambda _: bar.update())
                    while texts and texts[0].done():
                        texts.popleft().result()
        except BaseException:
            text_side.shutdown(cancel_futures=True)  # queued shards keep their captions: a rerun resumes them
            raise
        for text in texts:
            text.result()
    aggregate(run, settings)
    return publish(run, rules)


_TEXT_STAGES: dict[tuple[str, str], tuple[EmbedStage, ScoreStage]] = {}  # per process: models load once


def text_side_of(run: str, settings: Settings, shard: Shard | None, options: Mapping[str, Mapping[str, Any]]) -> None:
    """Embed and score one shard (``sieve run``'s text side, in a thread or a process of its own) with the
    caller's storage options; without a shard, only load the sentence encoder."""
    key = (run, fingerprint(settings.to_dict()))
    if key not in _TEXT_STAGES:
        _TEXT_STAGES[key] = (EmbedStage(run, settings), ScoreStage(run, settings))
    if shard is None:
        _TEXT_STAGES[key][0].text_encoder
        return
    with storage.restored_options(options):
        for stage in _TEXT_STAGES[key]:
            stage.run_shard(shard)
