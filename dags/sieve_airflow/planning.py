"""Pure helpers (no Airflow, no torch): run URIs, shard batching, settings from params, pod arguments."""

from __future__ import annotations

import math
import os
import re
from datetime import timedelta
from typing import Any

#: Param name → ``sieve_tasks.settings.Settings`` field, for every option the trigger form exposes.
SETTINGS_PARAMS = {
    "profile": "profile",
    "captioner": "captioner",
    "text_encoder": "text_encoder",
    "clip": "clip",
    "num_captions": "num_captions",
    "caption_batch_size": "caption_batch_size",
    "embeddings": "embeddings",
    "int8": "int8",
    "caption_cache": "caption_cache",
    "score": "score",
    "weights": "weights",
    "fraction": "fraction",
    "threshold": "threshold",
    "thresholds_from": "thresholds_from",
    "basic_filter": "basic_filter",
    "external_scores": "external_scores",
    "metadata": "metadata",
    "clip_from_metadata": "clip_from_metadata",
    "population": "population",
    "overwrite": "overwrite",
}

#: Settings fields of the caption/embed stages and the ``sieve caption|embed`` flag that carries each.
STAGE_FLAGS = {
    "profile": "--profile",
    "captioner": "--captioner",
    "captions": "--captions",
    "num_captions": "--num-captions",
    "top_p": "--top-p",
    "min_length": "--min-length",
    "max_length": "--max-length",
    "repetition_penalty": "--repetition-penalty",
    "prompt": "--prompt",
    "image_size": "--image-size",
    "fast_decode": "--fast-decode",
    "caption_batch_size": "--caption-batch-size",
    "seed": "--seed",
    "max_pixels": "--max-pixels",
    "decode_workers": "--decode-workers",
    "text_encoder": "--text-encoder",
    "clip": "--clip",
    "clip_from_metadata": "--clip-from-metadata",
    "metadata": "--metadata",
    "mask_phrases": "--mask-phrases",
    "mask_mode": "--mask-mode",
    "embed_batch_size": "--embed-batch-size",
    "embeddings": "--embeddings",
    "device": "--device",
    "dtype": "--dtype",
    "int8": "--int8",
    "caption_cache": "--caption-cache",
}

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def sanitize_run_id(run_id: str) -> str:
    """A run id as one safe path segment: ``manual__2026-01-01T00:00:00+00:00`` → ``manual__2026-01-01T00_00_00_00_00``."""
    cleaned = _UNSAFE.sub("_", run_id).strip("._")
    if not cleaned:
        raise ValueError(f"run id {run_id!r} has no usable characters for a directory name")
    return cleaned[:200]


def default_run_base(variable: str | None = None) -> str:
    """Airflow Variable ``sieve_run_base``, else env ``SIEVE_RUN_BASE``, else ``$AIRFLOW_HOME/sieve-runs``."""
    if variable:
        return variable.rstrip("/")
    if os.environ.get("SIEVE_RUN_BASE"):
        return os.environ["SIEVE_RUN_BASE"].rstrip("/")
    home = os.environ.get("AIRFLOW_HOME") or os.path.expanduser("~/airflow")
    return os.path.join(home, "sieve-runs")


def join_uri(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts])


def batch_shards(shard_ids: list[str], shards_per_task: int, max_map_length: int) -> list[list[str]]:
    """Consecutive batches of ``shards_per_task`` ids, enlarged so there are at most ``max_map_length``."""
    if shards_per_task < 1:
        raise ValueError(f"shards_per_task must be at least 1, got {shards_per_task}")
    if max_map_length < 1:
        raise ValueError(f"max_map_length must be at least 1, got {max_map_length}")
    size = max(shards_per_task, math.ceil(len(shard_ids) / max_map_length))
    return [shard_ids[i : i + size] for i in range(0, len(shard_ids), size)]


def batch_label(shard_ids: list[str]) -> str:
    """What a mapped instance shows in the UI: ``00000000`` or ``00000000..00000007 (8 shards)``."""
    if not shard_ids:
        return "(no shards)"
    if len(shard_ids) == 1:
        return shard_ids[0]
    return f"{shard_ids[0]}..{shard_ids[-1]} ({len(shard_ids)} shards)"


#: Jinja filters of both DAGs. ``batch_label`` lets a mapped task's ``map_index_template`` name it from its own
#: arguments, which Airflow renders before the work starts, so a failed instance is named by its shards too.
TEMPLATE_FILTERS = {"batch_label": batch_label}


def settings_options(params: dict[str, Any]) -> dict[str, Any]:
    """Keyword arguments for ``Settings`` from the DAG params (None means "the library's default")."""
    options = {field: params[name] for name, field in SETTINGS_PARAMS.items() if params.get(name) is not None}
    if "weights" in options:
        options["weights"] = {k: float(v) for k, v in options["weights"].items()}
    return options


def lease_owner(dag_id: str, run_id: str) -> str:
    """The owner of the run-directory lease (``sieve_tasks.lease``): every task and pod of one DAG run
    shares it, so they write the run together while another DAG run (or a stray ``sieve``) is refused."""
    return f"airflow/{dag_id}/{run_id}"


def stage_arguments(stage: str, input_spec: str, run: str, shard_ids: list[str],
                    settings: dict[str, Any], owner: str | None = None) -> list[str]:
    """Container args for ``sieve <stage> INPUT RUN --shards ...`` (the image's ENTRYPOINT is ``sieve``).

    ``settings`` is ``Settings.to_dict()``; every caption/embed field the CLI can carry is passed, so the
    pod computes exactly the fingerprints the same stage would in-process.
    """
    if stage not in ("caption", "embed", "score"):
        raise ValueError(f"unknown stage {stage!r}")
    if not shard_ids:
        raise ValueError("a pod needs at least one shard")
    args = [stage, input_spec, run, "--shards", ",".join(shard_ids)]
    for field, flag in STAGE_FLAGS.items():
        value = settings.get(field)
        if value is None:
            continue
        if isinstance(value, bool):  # BooleanOptionalAction: --flag / --no-flag
            args.append(flag if value else "--no-" + flag.removeprefix("--"))
            continue
        args += [flag, str(value)]
    if settings.get("overwrite"):
        args.append("--overwrite")
    if owner:
        args += ["--lease-owner", owner]
    return args


#: Executors whose tasks all run on the scheduler's machine, which therefore shares its local disk.
ONE_MACHINE_EXECUTORS = {"LocalExecutor", "SequentialExecutor"}


def unshared_paths_warning(mode: str, executor: str, input_spec: str, run: str) -> str | None:
    """Why a local input or run directory may not be seen by every process that needs it, or None.

    Pods (kubernetes mode) and the workers of a distributed executor (``core.executor``, e.g. Celery, possibly
    a comma-separated list) run on other machines: a local path there is another disk, or none.
    """
    local = [uri for uri in (input_spec, run) if "://" not in uri or uri.startswith("file://")]
    if not local:
        return None
    executors = {name.strip().split(":")[-1].split(".")[-1] for name in executor.split(",") if name.strip()}
    if mode == "kubernetes":
        where = "pods only see it if the same path is mounted in them"
    elif not executors <= ONE_MACHINE_EXECUTORS:
        where = f"workers of {executor} on other hosts only see it if the same path is mounted on them"
    else:
        return None
    return f"local path(s) {', '.join(local)} with mode={mode}: {where}; prefer s3:// for input and run"


def retry_delay(default: timedelta) -> timedelta:
    """The delay before a task's first retry: env ``SIEVE_RETRY_DELAY_SECONDS`` where the DAGs are parsed
    (a test setup that kills workers retries in seconds), else ``default``."""
    seconds = os.environ.get("SIEVE_RETRY_DELAY_SECONDS")
    return timedelta(seconds=float(seconds)) if seconds else default
