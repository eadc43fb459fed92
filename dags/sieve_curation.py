"""SIEVE curation of an image-text pool, triggered by hand (or the REST API) with a validated form."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from airflow.sdk import Param, dag, task

from sieve_airflow.params import execution_params, model_params, selection_params
from sieve_airflow.notifications import HEALTH_WARNING_NOTIFIERS
from sieve_airflow.pipeline import build_pipeline, default_run_uri, plan_run
from sieve_airflow.planning import TEMPLATE_FILTERS, retry_delay

DOC = """
### SIEVE curation

Prunes a DataComp-format image-text pool by comparing each alt-text with captions generated for the image
(SIEVE), optionally fused with CLIP, and publishes a DataComp `subset.npy` in `RUN/manifest/`.

* **list_shards** registers the pool in `RUN/shards.json` and cuts it into batches of *shards per task*
  (enlarged automatically so there are never more than `core.max_map_length` batches).
* **choose_mode** follows the *execution mode*: **local_batch** runs caption → embed → score on the
  Airflow worker; **pod_batch** runs caption and embed as GPU pods (`sieve caption|embed INPUT RUN --shards
  ...`, configured by the Variable `sieve_kubernetes`, pool `gpu`) and score on the worker. Both groups are
  mapped, one instance per batch, labelled with its shard ids; the other group ends skipped.
* **aggregate** computes the threshold over the whole pool with DuckDB; **publish** writes the manifest and
  updates the asset `sieve-manifest` (its event extra names the run).

Every task is idempotent: per-shard completion markers make retries and reruns skip finished work.
The run directory defaults to `<sieve_run_base>/<run id>` (Variable `sieve_run_base`, env `SIEVE_RUN_BASE`,
else `$AIRFLOW_HOME/sieve-runs`). The *SIEVE summary* link on **publish** opens the run's report (also the DAG run's *SIEVE report* tab).
"""


@dag(
    dag_id="sieve_curation",
    schedule=None,
    catchup=False,
    max_active_runs=4,
    tags=["sieve", "curation", "datacomp"],
    user_defined_filters=TEMPLATE_FILTERS,
    doc_md=DOC,
    default_args={"owner": "data-curation", "retries": 2, "retry_delay": retry_delay(timedelta(minutes=2)),
                  "retry_exponential_backoff": 2.0, "max_retry_delay": timedelta(minutes=30)},
    params={
        "input": Param(type="string", minLength=1, title="Input shards", section="Data",
                       description="Shard directory/prefix, glob or brace list, local or s3:// "
                                   "(e.g. s3://bucket/pool/{00000000..00000127}.tar)."),
        "run": Param(None, type=["null", "string"], title="Run directory", section="Data",
                     description="Where outputs go (local or s3://); empty: <sieve_run_base>/<run id>."),
        **selection_params(),
        **model_params(),
        **execution_params(),
    },
)
def sieve_curation() -> None:
    @task
    def list_shards(params: dict[str, Any], run_id: str) -> list[list[str]]:
        return plan_run(params, params["input"], params.get("run") or default_run_uri(run_id))

    build_pipeline(list_shards(), on_warning_callback=HEALTH_WARNING_NOTIFIERS)


sieve_curation()
