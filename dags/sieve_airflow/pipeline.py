"""The shared task graph: plan → per-batch caption → embed → score (local or pods) → aggregate → publish."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import quote

from airflow.sdk import Asset, BaseOperator, BaseOperatorLink, get_current_context, task, task_group
from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

from sieve_airflow.kube import SievePodOperator
from sieve_airflow.planning import (
    batch_shards,
    default_run_base,
    join_uri,
    lease_owner,
    sanitize_run_id,
    settings_options,
    unshared_paths_warning,
)

log = logging.getLogger(__name__)

#: Updated by every publish; the event's extra names the run, so downstream DAGs know which manifest.
MANIFEST_ASSET = Asset(name="sieve-manifest", uri="sieve://manifest", group="sieve")
LOCAL_GROUP = "local_batch"
POD_GROUP = "pod_batch"
RUN_BASE_VARIABLE = "sieve_run_base"
HEALTH_RULES_VARIABLE = "sieve_health_rules"


def accelerator_queue() -> dict[str, str]:
    """Where local mode's caption and embed tasks go: the Celery queue that the GPU nodes' workers listen to
    (env ``SIEVE_GPU_QUEUE`` where the DAGs are parsed), else Airflow's default queue."""
    queue = os.environ.get("SIEVE_GPU_QUEUE")
    return {"queue": queue} if queue else {}


@contextmanager
def object_store(conn_id: str | None) -> Iterator[None]:
    """Open ``s3://`` URIs in the block with an Airflow AWS connection's credentials and endpoint.

    They are handed to ``sieve_tasks.storage`` as fsspec options for this context only: the worker's
    environment is left alone, so concurrent tasks of one worker never see each other's credentials.
    Without a connection id the worker's own AWS environment applies.
    """
    from sieve_tasks.storage import storage_options

    if not conn_id:
        yield
        return
    with storage_options("s3", s3_options(conn_id)):
        yield


def s3_options(conn_id: str) -> dict[str, Any]:
    """s3fs options from an AWS connection (login/password, extra ``aws_session_token``, ``endpoint_url``,
    ``region_name``), read the way the Amazon provider reads them."""
    from airflow.providers.amazon.aws.utils.connection_wrapper import AwsConnectionWrapper
    from airflow.sdk import BaseHook

    wrapper = AwsConnectionWrapper(BaseHook.get_connection(conn_id))
    options: dict[str, Any] = {"key": wrapper.aws_access_key_id, "secret": wrapper.aws_secret_access_key,
                               "token": wrapper.aws_session_token, "endpoint_url": wrapper.endpoint_url}
    if wrapper.region_name:
        options["client_kwargs"] = {"region_name": wrapper.region_name}
    return {name: value for name, value in options.items() if value}


@contextmanager
def run_access(plan: dict[str, Any], last_step: bool = False) -> Iterator[None]:
    """Credentials for the run's object store, and the run directory's lease (shared by every task and pod
    of this DAG run). Tasks leave the shared lease in place when they end (siblings may still be writing);
    the last step, publish, releases it, and a crashed run's lease expires."""
    from sieve_tasks import lease

    with object_store(plan.get("aws_conn_id")), lease.hold(plan["run"], plan.get("lease_owner"),
                                                          release_at_end=last_step):
        yield


def run_base() -> str:
    from airflow.sdk import Variable

    return default_run_base(Variable.get(RUN_BASE_VARIABLE, default=None))


def default_run_uri(run_id: str) -> str:
    return join_uri(run_base(), sanitize_run_id(run_id))


def health_rules(params: dict[str, Any]) -> dict[str, Any]:
    """The health rule limits: the Variable ``sieve_health_rules`` (JSON), overridden by the param
    ``health_rules``; refused at planning when a name or value is wrong."""
    from airflow.sdk import Variable

    from sieve_tasks.report.health import HealthRules

    try:
        configured = Variable.get(HEALTH_RULES_VARIABLE, default={}, deserialize_json=True)
        return HealthRules.from_mapping({**configured, **(params.get("health_rules") or {})}).to_dict()
    except (TypeError, ValueError) as exc:
        raise AirflowFailException(f"invalid health rules: {exc}") from exc


def plan_run(params: dict[str, Any], input_spec: str, run: str, *, skip_if_empty: bool = False) -> list[list[str]]:
    """Validate the settings, register the pool in RUN/shards.json and cut it into batches (idempotent).

    Returns the batches (what the per-batch group maps over) and pushes the plan (input, run, settings,
    mode) as the XCom ``plan`` and the run URI as ``run``.
    """
    from airflow.sdk import conf

    from sieve_tasks.models import require_available
    from sieve_tasks.pool import register_pool
    from sieve_tasks.shards import NoShardsFound, discover_shards
    from sieve_tasks.settings import Settings
    from sieve_tasks.tables import check_sources

    if not input_spec or not input_spec.strip():
        raise AirflowFailException("param 'input' is empty: give a shard directory, prefix, glob or list")
    try:
        settings = Settings(**settings_options(params))
    except (TypeError, ValueError) as exc:  # a bad trigger form: retrying cannot help
        raise AirflowFailException(f"invalid settings: {exc}") from exc
    if settings.int8 and params.get("mode") == "kubernetes":
        raise AirflowFailException("int8 is for CPU workers; kubernetes mode runs the GPU worker image (use bf16 there)")
    rules = health_rules(params)
    context = get_current_context()
    owner = lease_owner(context["dag"].dag_id, context["run_id"])
    access = {"run": run, "lease_owner": owner, "aws_conn_id": params.get("aws_conn_id")}
    if params.get("mode", "local") == "local":  # pods load models from their own image and stores
        try:
            require_available(settings.required_models())
        except FileNotFoundError as exc:
            raise AirflowFailException(str(exc)) from exc
    try:
        with object_store(access["aws_conn_id"]):
            discover_shards(input_spec)  # an empty input is found before anything is written to the run
            try:
                check_sources(settings)  # metadata and score tables exist before any shard is captioned
            except FileNotFoundError as exc:
                raise AirflowFailException(str(exc)) from exc
        with run_access(access):
            shards = register_pool(input_spec, run)
    except NoShardsFound as exc:
        if skip_if_empty:
            log.warning("no .tar shards in %s: nothing to curate, the run is skipped", input_spec)
            raise AirflowSkipException(f"nothing to curate: {exc}") from exc
        raise AirflowFailException(str(exc)) from exc
    except (FileNotFoundError, ValueError) as exc:  # a missing bucket or prefix, a run started on another pool
        raise AirflowFailException(str(exc)) from exc
    max_map_length = conf.getint("core", "max_map_length", fallback=1024)
    batches = batch_shards([s.shard_id for s in shards], int(params.get("shards_per_task") or 1), max_map_length)
    mode = params.get("mode", "local")
    if warning := unshared_paths_warning(mode, conf.get("core", "executor", fallback=""), input_spec, run):
        log.warning(warning)
    if settings.profile == "test":
        from sieve_tasks.stages.publish import TEST_PROFILE_WARNING

        log.warning(TEST_PROFILE_WARNING)
    log.info("run %s: %d shards in %d batches of up to %d", run, len(shards), len(batches), len(batches[0]))
    plan = {"input": input_spec, "run": run, "settings": settings.to_dict(), "mode": mode,
            "lease_owner": owner, "aws_conn_id": access["aws_conn_id"], "shards": len(shards),
            "batches": len(batches), "health_rules": rules}
    ti = context["ti"]
    ti.xcom_push(key="plan", value=plan)  # what every later task needs
    ti.xcom_push(key="run", value=run)  # what the summary plugin looks up
    return batches


@task.branch
def choose_mode(plan: dict[str, Any]) -> str:
    """local: every stage runs on the Airflow worker; kubernetes: caption and embed run as GPU pods."""
    if plan["mode"] not in ("local", "kubernetes"):
        raise AirflowFailException(f"unknown execution mode {plan['mode']!r}")
    group = LOCAL_GROUP if plan["mode"] == "local" else POD_GROUP
    return f"{group}.caption"


@task(map_index_template="{{ task.op_kwargs['batch'] | batch_label }}")
def run_stage(stage: str, batch: list[str], plan: dict[str, Any]) -> list[dict[str, Any]]:
    """One per-shard stage over a batch, in this process; finished shards are skipped (completion markers)."""
    from sieve_tasks.runner import run_shard_stage
    from sieve_tasks.settings import Settings

    with run_access(plan):
        markers = run_shard_stage(stage, plan["input"], plan["run"], Settings(**plan["settings"]), batch)
    for m in markers:
        log.info("%s %s: %s ok, %s failed, %s", stage, m["shard"], m["ok"], m["failed"],
                 "skipped (complete)" if m["skipped"] else f"{m['seconds']}s")
    return [{k: m.get(k) for k in ("shard", "rows", "ok", "failed", "skipped", "seconds")} for m in markers]


@task_group(group_id=LOCAL_GROUP)
def local_batch(batch: list[str], plan: dict[str, Any]) -> None:
    """caption → embed → score for one batch of shards, on Airflow workers (caption and embed on the
    accelerator queue when one is configured)."""
    caption = run_stage.override(task_id="caption", **accelerator_queue())(stage="caption", batch=batch, plan=plan)
    embed = run_stage.override(task_id="embed", **accelerator_queue())(stage="embed", batch=batch, plan=plan)
    score = run_stage.override(task_id="score")(stage="score", batch=batch, plan=plan)
    caption >> embed >> score


@task_group(group_id=POD_GROUP)
def pod_batch(batch: list[str], plan: dict[str, Any]) -> None:
    """caption → embed as GPU pods (``sieve caption|embed ... --shards``), then score on the worker."""
    caption = SievePodOperator(task_id="caption", stage="caption", shard_ids=batch, plan=plan)
    embed = SievePodOperator(task_id="embed", stage="embed", shard_ids=batch, plan=plan)
    score = run_stage.override(task_id="score")(stage="score", batch=batch, plan=plan)
    caption >> embed >> score


@task
def aggregate(plan: dict[str, Any]) -> dict[str, Any]:
    """Thresholds over every score file (DuckDB); skipped when already computed with the same inputs."""
    from sieve_tasks.settings import Settings
    from sieve_tasks.stages.aggregate import aggregate as aggregate_run

    with run_access(plan):
        result = aggregate_run(plan["run"], Settings(**plan["settings"]))
    return {"counts": result["counts"], "threshold": result["selection"]["threshold"],
            "rule": result["selection"]["rule"]}


#: The plugin's external view on DAG runs (plugins/sieve_summary_plugin.py): the report inside the Airflow UI.
REPORT_VIEW_ROUTE = "sieve-run-summary"


def _api_base() -> str:
    from airflow.sdk import conf

    return (conf.get("api", "base_url", fallback="") or "").rstrip("/")


def summary_url(run: str) -> str:
    """The plugin's page of a run's report, on its own (absolute when [api] base_url is set)."""
    return f"{_api_base()}/sieve/run?uri={quote(run, safe='')}"


class SieveSummaryLink(BaseOperatorLink):
    """'SIEVE summary' button on the publish task: the DAG run's "SIEVE report" tab, inside the Airflow UI."""

    name = "SIEVE summary"

    def get_link(self, operator: BaseOperator, *, ti_key: Any) -> str:
        return (f"{_api_base()}/dags/{quote(ti_key.dag_id, safe='')}/runs/{quote(ti_key.run_id, safe='')}"
                f"/plugin/{REPORT_VIEW_ROUTE}")


class SievePublishOperator(BaseOperator):
    """Write RUN/manifest (subset.npy, kept.parquet, summary.json, report.html, _SUCCESS) and update the manifest
    asset, unless the health verdict is ``failed``: then the task fails (no retry) before any Asset event.

    ``on_warning_callback``: notifiers (any ``BaseNotifier``, e.g. the Slack provider's ``SlackNotifier``, or
    callables taking the context) called when the verdict is ``warning``; their templates see ``sieve_health``
    (verdict, findings) and ``sieve_report_url`` besides the task context.
    """

    template_fields = ("plan",)
    operator_extra_links = (SieveSummaryLink(),)
    ui_color = "#f5e6c8"

    def __init__(self, *, plan: Any, on_warning_callback: Any = None, **kwargs: Any) -> None:
        kwargs.setdefault("outlets", [MANIFEST_ASSET])
        super().__init__(**kwargs)
        self.plan = plan
        self.on_warning_callback = list(on_warning_callback or [])

    def execute(self, context: Any) -> dict[str, Any]:
        from sieve_tasks.report.health import HealthRules
        from sieve_tasks.stages.publish import publish

        run_type = context["dag_run"].run_type
        scheduled = getattr(run_type, "value", run_type) != "manual"  # scheduled, backfill, asset-triggered
        with run_access(self.plan, last_step=True):
            summary = publish(self.plan["run"], HealthRules.from_mapping(self.plan.get("health_rules")), scheduled)
        counts, health, report = summary["counts"], summary["health"], summary_url(self.plan["run"])
        self.log.info("kept %s of %s read (%s failed); manifest %s; health %s; report %s", counts["kept"],
                      counts["read"], counts["failed"], summary["manifest"]["subset.npy"], health["verdict"], report)
        if summary.get("warning"):
            self.log.warning(summary["warning"])
        problems = "; ".join(f"{f['rule']}: {f['message']}" for f in health["findings"] if f["level"] != "healthy")
        if health["verdict"] == "failed":
            raise AirflowFailException(f"health verdict failed ({problems}); not published, see {report}")
        if health["verdict"] == "warning":
            self.log.warning("health verdict warning: %s", problems)
            for notify in self.on_warning_callback:
                notify({**context, "sieve_health": health, "sieve_report_url": report})
        extra = {"run": self.plan["run"], "subset": summary["manifest"]["subset.npy"], "kept": counts["kept"],
                 "profile": summary["profile"], "verdict": health["verdict"]}
        for asset in self.outlets:
            context["outlet_events"][asset].extra = extra
        return {"run": self.plan["run"], "counts": counts, "manifest": summary["manifest"],
                "summary_url": report, "verdict": health["verdict"]}


def build_pipeline(listing: Any, on_warning_callback: Any = None) -> Any:
    """Wire the per-batch group, aggregate and publish behind a planning task that ran ``plan_run``;
    ``on_warning_callback``: publish's notifiers for a ``warning`` verdict."""
    plan = listing["plan"]  # the XCom with key "plan"
    mode = choose_mode(plan)
    local = local_batch.partial(plan=plan).expand(batch=listing)
    pods = pod_batch.partial(plan=plan).expand(batch=listing)
    thresholds = aggregate.override(trigger_rule="none_failed_min_one_success")(plan)
    published = SievePublishOperator(task_id="publish", plan=plan, on_warning_callback=on_warning_callback)
    mode >> [local, pods]
    [local, pods] >> thresholds >> published
    return published
