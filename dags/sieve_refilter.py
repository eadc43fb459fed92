"""Daily SIEVE refilter: each day's new crawl shards, filtered with the thresholds of a reference run."""

from __future__ import annotations

import logging
import os
from datetime import datetime, timedelta, timezone
from typing import Any

from airflow.sdk import Param, Variable, dag, task
from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

from sieve_airflow.params import execution_params, model_params, selection_params
from sieve_airflow.notifications import HEALTH_WARNING_NOTIFIERS
from sieve_airflow.pipeline import build_pipeline, object_store, plan_run, run_base
from sieve_airflow.planning import TEMPLATE_FILTERS, join_uri, retry_delay

CRAWL_BASE_VARIABLE = "sieve_crawl_base"
REFERENCE_VARIABLE = "sieve_reference_run"
CAPTION_CACHE_VARIABLE = "sieve_caption_cache"
log = logging.getLogger(__name__)

DOC = """
### SIEVE daily refilter

Every day, curates the shards that landed under `{base}/crawl/{ds}/` (param *input_template*; `base` is the
param *crawl_base*, else the Variable `sieve_crawl_base`, else env `SIEVE_CRAWL_BASE`) into
`<sieve_run_base>/refilter/{ds}`.

By default it keeps what a **reference run** would keep: its threshold is reused (`thresholds_from`, from the
param or the Variable `sieve_reference_run`), so daily subsets are comparable. Give *fraction* or *threshold*
instead to select within the day.

The DAG is **paused when first created**: set the crawl base (and a reference run), then unpause it.
A day whose prefix exists but holds no shards ends with **list_shards skipped** (and everything after it; the
log names the prefix it checked); a missing bucket or prefix fails the run. Backfill
with `airflow backfill create --dag-id sieve_refilter --from-date ... --to-date ...`; reruns of a day reuse its
directory and skip finished shards. The published manifest updates the `sieve-manifest` asset.

Captions are reused across days through the **caption cache** (param *caption_cache*, else the Variable
`sieve_caption_cache`): an image whose bytes were captioned before with the same settings is not captioned
again. After publishing, **compact_caption_cache** merges the cache's small files and drops entries not used
for *cache_retention_days* days; the summary shows hits, misses and the captioning time saved.
"""


@dag(
    dag_id="sieve_refilter",
    schedule="@daily",
    start_date=datetime(2026, 1, 1, tzinfo=timezone.utc),
    catchup=False,
    is_paused_upon_creation=True,  # nothing to curate until the crawl base is configured: unpause after that
    max_active_runs=2,
    tags=["sieve", "refilter", "datacomp"],
    user_defined_filters=TEMPLATE_FILTERS,
    doc_md=DOC,
    default_args={"owner": "data-curation", "retries": 2, "retry_delay": retry_delay(timedelta(minutes=5)),
                  "retry_exponential_backoff": 2.0, "max_retry_delay": timedelta(minutes=30)},
    params={
        "crawl_base": Param(None, type=["null", "string"], section="Data", title="Crawl base",
                            description="Root of the daily crawl drops (local or s3://); empty: the Variable "
                                        "sieve_crawl_base."),
        "input_template": Param("{base}/crawl/{ds}/", type="string", minLength=1, section="Data",
                                title="Input template",
                                description="Python format string; fields: base, ds, ds_nodash, "
                                            "data_interval_start, data_interval_end."),
        "cache_retention_days": Param(30, type=["null", "integer"], minimum=1, section="Data",
                                      title="Caption cache retention (days)",
                                      description="After publishing, the caption cache drops entries not used for "
                                                  "this many days; empty: it only merges small files."),
        **selection_params(),
        **model_params(),
        **execution_params(),
    },
)
def sieve_refilter() -> None:
    @task
    def list_shards(params: dict[str, Any], ds: str, ds_nodash: str, data_interval_start: Any = None,
                    data_interval_end: Any = None) -> list[list[str]]:
        base = params.get("crawl_base") or Variable.get(CRAWL_BASE_VARIABLE, default=None) \
            or os.environ.get("SIEVE_CRAWL_BASE")
        if not base:
            raise AirflowFailException(f"no crawl base: set the param crawl_base or the Variable {CRAWL_BASE_VARIABLE}")
        try:
            input_spec = params["input_template"].format(
                base=base.rstrip("/"), ds=ds, ds_nodash=ds_nodash,
                data_interval_start=data_interval_start.isoformat() if data_interval_start else ds,
                data_interval_end=data_interval_end.isoformat() if data_interval_end else ds)
        except (KeyError, IndexError, ValueError) as exc:
            raise AirflowFailException(f"bad input_template {params['input_template']!r}: {exc!r}") from exc
        resolved = dict(params)
        if all(resolved.get(k) is None for k in ("fraction", "threshold", "thresholds_from")):
            reference = Variable.get(REFERENCE_VARIABLE, default=None)
            if not reference:
                raise AirflowFailException(f"no selection rule: set the Variable {REFERENCE_VARIABLE} (a reference "
                                           "run) or give thresholds_from, fraction or threshold")
            resolved["thresholds_from"] = reference
        if not resolved.get("caption_cache"):
            resolved["caption_cache"] = Variable.get(CAPTION_CACHE_VARIABLE, default=None)
        return plan_run(resolved, input_spec, join_uri(run_base(), "refilter", ds), skip_if_empty=True)

    @task
    def compact_caption_cache(plan: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
        """Merge the cache's small files, fold in today's hits, drop entries unused for the retention period;
        returns (and logs) what it did and the cache's size and hit rate."""
        uri = plan["settings"].get("caption_cache")
        if not uri:
            raise AirflowSkipException("this run used no caption cache")
        from sieve_tasks.cache_admin import compact, stats

        with object_store(plan.get("aws_conn_id")):
            result = {"compaction": compact(uri, params.get("cache_retention_days")), **stats(uri)}
        log.info("caption cache %s: %s", uri, result)
        return result

    listing = list_shards()
    build_pipeline(listing, on_warning_callback=HEALTH_WARNING_NOTIFIERS) >> compact_caption_cache(listing["plan"])


sieve_refilter()
