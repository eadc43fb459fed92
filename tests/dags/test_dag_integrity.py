"""The DAG files import cleanly in a fresh Airflow home and follow the house rules."""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest

from tests.dags.airflow_env import DAGS

EXPECTED_DAGS = {"sieve_curation", "sieve_refilter"}


def test_dagbag_imports_without_errors(dagbag):
    assert dagbag.import_errors == {}
    assert EXPECTED_DAGS <= set(dagbag.dags)
    # .airflowignore keeps the helper package out of DAG discovery
    assert not any("sieve_airflow" in str(path) for path in dagbag.file_last_changed)


@pytest.mark.parametrize("dag_id", sorted(EXPECTED_DAGS))
def test_dag_conventions(dagbag, dag_id):
    dag = dagbag.dags[dag_id]
    assert dag.tags, f"{dag_id} has no tags"
    assert dag.doc_md and len(dag.doc_md) > 200, f"{dag_id} has no real doc_md"
    assert dag.default_args.get("retries", 0) >= 2
    for task in dag.tasks:
        assert task.retries >= 2, f"{dag_id}.{task.task_id} retries={task.retries}"


def test_dag_files_do_not_import_torch_or_the_library():
    """Parsing must stay cheap: sieve_tasks (and torch) are imported inside tasks only."""
    import subprocess
    import sys

    code = (
        "import sys, runpy; sys.path.append(%r);"
        "from airflow.dag_processing.dagbag import BundleDagBag;"
        "from pathlib import Path;"
        "b = BundleDagBag(dag_folder=%r, bundle_path=Path(%r), bundle_name='dags-folder');"
        "assert not b.import_errors, b.import_errors;"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'sieve_tasks')))"
    ) % (str(DAGS), str(DAGS), str(DAGS))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_curation_graph(dagbag):
    dag = dagbag.dags["sieve_curation"]
    ids = set(dag.task_ids)
    assert {"list_shards", "choose_mode", "local_batch.caption", "local_batch.embed", "local_batch.score",
            "pod_batch.caption", "pod_batch.embed", "pod_batch.score", "aggregate", "publish"} <= ids
    assert dag.get_task("pod_batch.caption").pool == "gpu"
    assert dag.get_task("pod_batch.embed").pool == "gpu"
    for named in (dag, dagbag.dags["sieve_refilter"]):
        for task_id in ("local_batch.caption", "pod_batch.caption"):
            _assert_named_before_it_runs(named, named.get_task(task_id).map_index_template)
    assert dag.get_task("aggregate").trigger_rule == "none_failed_min_one_success"
    publish = dag.get_task("publish")
    assert [a.name for a in publish.outlets] == ["sieve-manifest"]
    assert [link.name for link in publish.operator_extra_links] == ["SIEVE summary"]
    from airflow.sdk.definitions.taskgroup import MappedTaskGroup

    for group in ("local_batch", "pod_batch"):  # one instance per batch of shards
        assert isinstance(dag.task_group_dict[group], MappedTaskGroup)


@pytest.mark.parametrize("gpu_queue", ["gpu", None])
def test_caption_and_embed_go_to_the_accelerator_queue(gpu_queue):
    """SIEVE_GPU_QUEUE where the DAGs are parsed routes local mode's caption and embed (not score) to it."""
    import os
    import subprocess
    import sys

    code = (
        "import sys; sys.path.append(%r);"
        "from airflow.dag_processing.dagbag import BundleDagBag;"
        "from pathlib import Path;"
        "b = BundleDagBag(dag_folder=%r, bundle_path=Path(%r), bundle_name='dags-folder');"
        "d = b.dags['sieve_curation'];"
        "print([d.get_task(t).queue for t in ('local_batch.caption', 'local_batch.embed', 'local_batch.score')])"
    ) % (str(DAGS), str(DAGS), str(DAGS))
    env = {k: v for k, v in os.environ.items() if k != "SIEVE_GPU_QUEUE"}
    if gpu_queue:
        env["SIEVE_GPU_QUEUE"] = gpu_queue
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    default = "default"
    expected = [gpu_queue or default, gpu_queue or default, default]
    assert out.stdout.strip().splitlines()[-1] == str(expected)


def test_param_defaults_match_the_library(dagbag):
    from sieve_tasks import models
    from sieve_tasks.settings import Settings

    defaults = Settings()
    params = dagbag.dags["sieve_curation"].params
    assert params["captioner"] == models.DEFAULT_CAPTIONER == defaults.captioner
    assert params["text_encoder"] == models.DEFAULT_TEXT_ENCODER == defaults.text_encoder
    assert params["clip"] == models.DEFAULT_CLIP == defaults.clip
    assert params["num_captions"] == defaults.num_captions
    assert params["caption_batch_size"] == defaults.caption_batch_size
    assert params["score"] == defaults.score
    assert params["weights"] == defaults.weights
    assert params["basic_filter"] == defaults.basic_filter
    assert params["profile"] == defaults.profile
    assert params["population"] == defaults.population
    assert params["external_scores"] == defaults.external_scores
    assert params["metadata"] is defaults.metadata is None
    assert params["clip_from_metadata"] is defaults.clip_from_metadata is None
    fields = {f.name for f in dataclasses.fields(Settings)}
    from sieve_airflow.planning import SETTINGS_PARAMS, STAGE_FLAGS

    assert set(SETTINGS_PARAMS.values()) <= fields
    assert set(STAGE_FLAGS) <= fields


@pytest.mark.parametrize("bad", [
    {"input": ""},
    {"score": "Median"},  # a lower-case name the form cannot check is refused by Settings (below)
    {"fraction": 0},
    {"fraction": 1.5},
    {"profile": "fast"},
    {"mode": "slurm"},
    {"shards_per_task": 0},
    {"num_captions": 0},
    {"weights": {"sieve": 1.5}},
    {"weights": {}},
    {"weights": {"sieve": 0.5, "Other-Name": 0.5}},
    {"basic_filter": "yes"},
    {"score": "sieve_score); DROP TABLE scores; --"},
    {"population": "everything"},
    {"clip_from_metadata": "h14"},
    {"external_scores": {"flyt": "s3://bucket/flyt/"}},
    {"external_scores": {"FLYT": "s3://bucket/flyt/:score"}},
    {"metadata": ""},
])
def test_trigger_form_rejects_bad_values(dagbag, bad):
    from airflow.sdk.exceptions import ParamValidationError

    params = copy.deepcopy(dagbag.dags["sieve_curation"].params)
    with pytest.raises(ParamValidationError):
        params.update({"input": "/data/pool", **bad})
        params.validate()


def test_trigger_form_accepts_a_good_conf(dagbag):
    params = copy.deepcopy(dagbag.dags["sieve_curation"].params)
    params.update({"input": "s3://bucket/pool/{00000000..00000127}.tar", "run": "s3://bucket/runs/a",
                   "fraction": 0.3, "score": "fused", "weights": {"sieve": 0.7, "clip": 0.3}, "mode": "kubernetes",
                   "shards_per_task": 4, "profile": "test"})
    resolved = params.validate()
    assert resolved["shards_per_task"] == 4
    params.update({"metadata": "s3://bucket/pool/metadata/", "clip_from_metadata": "l14", "population": "metadata",
                   "external_scores": {"flyt": "s3://bucket/scores/flyt/:score"}, "score": "fused",
                   "weights": {"clip": 0.5, "flyt": 0.5}})
    assert params.validate()["external_scores"] == {"flyt": "s3://bucket/scores/flyt/:score"}


def test_settings_from_params_check_what_the_form_cannot():
    from sieve_airflow.planning import settings_options
    from sieve_tasks.settings import Settings

    good = {"metadata": "s3://b/metadata/", "clip_from_metadata": "l14", "population": "metadata", "score": "fused",
            "external_scores": {"flyt": "s3://b/flyt/:score"}, "weights": {"clip": 0.5, "flyt": 0.5}}
    settings = Settings(**settings_options(good))
    assert settings.selected_scores == ("clip", "flyt") and settings.metadata_clip
    with pytest.raises(ValueError, match="unknown weight names"):
        Settings(**settings_options({**good, "weights": {"clip": 0.5, "dfn": 0.5}}))
    with pytest.raises(ValueError, match="population metadata"):
        Settings(**settings_options({**good, "weights": {"sieve": 0.5, "flyt": 0.5}}))
    with pytest.raises(ValueError, match="unknown score"):
        Settings(**settings_options({**good, "score": "dfn"}))


def test_input_is_required(dagbag):
    from airflow.sdk.exceptions import ParamValidationError

    with pytest.raises(ParamValidationError):
        copy.deepcopy(dagbag.dags["sieve_curation"].params).validate()


def test_batches_respect_max_map_length():
    from sieve_airflow.planning import batch_label, batch_shards

    ids = [f"{i:08d}" for i in range(10)]
    assert batch_shards(ids, 1, 1024) == [[i] for i in ids]
    assert batch_shards(ids, 3, 1024) == [ids[0:3], ids[3:6], ids[6:9], ids[9:]]
    enlarged = batch_shards(ids, 1, 4)  # 10 shards, at most 4 mapped instances → 3 per batch
    assert len(enlarged) == 4 and max(map(len, enlarged)) == math.ceil(10 / 4)
    assert sum(enlarged, []) == ids
    big = [f"{i:08d}" for i in range(5000)]
    batches = batch_shards(big, 2, 1024)
    assert len(batches) <= 1024 and sum(batches, []) == big
    assert batch_label(["00000000"]) == "00000000"
    assert batch_label(ids[:3]) == "00000000..00000002 (3 shards)"
    with pytest.raises(ValueError):
        batch_shards(ids, 0, 10)


def test_run_ids_become_safe_directory_names():
    from sieve_airflow.planning import default_run_base, sanitize_run_id

    assert sanitize_run_id("manual__2026-01-01T00:00:00+00:00") == "manual__2026-01-01T00_00_00_00_00"
    assert "/" not in sanitize_run_id("../../etc/passwd")
    assert not sanitize_run_id("../../etc/passwd").startswith(".")
    assert default_run_base("s3://bucket/runs/") == "s3://bucket/runs"


@pytest.mark.parametrize("options", [
    {"profile": "test"},
    {},
    {"captioner": "s3://models/blip", "clip": "none", "num_captions": 3, "caption_batch_size": 32,
     "text_encoder": "all-MiniLM-L6-v2", "overwrite": True},
    {"metadata": "s3://b/pool/metadata/", "clip_from_metadata": "l14", "score": "clip", "population": "metadata"},
])
def test_pod_arguments_carry_the_stage_settings(options):
    """What a pod parses with the real ``sieve`` CLI equals the settings the DAG resolved."""
    from sieve_airflow.kube import check_cli_roundtrip
    from sieve_airflow.planning import stage_arguments
    from sieve_tasks.cli import build_parser, settings_from_args
    from sieve_tasks.settings import Settings

    settings = Settings(**options).to_dict()
    for stage in ("caption", "embed"):
        args = stage_arguments(stage, "s3://b/pool/", "s3://b/run", ["00000003", "00000004"], settings,
                               "airflow/sieve_curation/manual__x")
        assert args[:5] == [stage, "s3://b/pool/", "s3://b/run", "--shards", "00000003,00000004"]
        check_cli_roundtrip(args, settings)
        parsed = build_parser().parse_args(args)
        assert parsed.shards == ["00000003", "00000004"]
        assert parsed.lease_owner == "airflow/sieve_curation/manual__x"
        assert settings_from_args(parsed).overwrite == settings["overwrite"]
        assert parsed.metadata == settings["metadata"] and parsed.clip_from_metadata == settings["clip_from_metadata"]


def test_settings_the_cli_cannot_carry_are_refused():
    from sieve_airflow.kube import check_cli_roundtrip
    from sieve_airflow.planning import stage_arguments
    from sieve_tasks.settings import Settings

    settings = Settings(top_p=0.5, max_length=30, prompt="a photo of ").to_dict()
    args = stage_arguments("caption", "in", "run", ["a"], settings)
    check_cli_roundtrip(args, settings)  # every decoding setting reaches the pod
    dropped = args[: args.index("--top-p")] + args[args.index("--top-p") + 2 :]
    with pytest.raises(ValueError, match="top_p"):
        check_cli_roundtrip(dropped, settings)


def _assert_named_before_it_runs(dag, template: str) -> None:
    """The mapped-instance name renders from the task's own (rendered) arguments in the DAG's template environment
    (Airflow's strict undefined, the DAG's filters), before any work: a failed instance is named by its shards as a
    successful one is."""
    import types

    from sieve_airflow.planning import batch_label

    for ids in ([], ["00000003"], ["00000000", "00000001", "00000002"]):
        task = types.SimpleNamespace(op_kwargs={"batch": ids}, shard_ids=ids)
        assert dag.get_template_env().from_string(template).render(task=task) == batch_label(ids), (template, ids)


def test_local_paths_are_flagged_where_other_machines_need_them():
    from sieve_airflow.planning import unshared_paths_warning

    assert unshared_paths_warning("local", "LocalExecutor", "/data/pool", "/data/run") is None
    assert unshared_paths_warning("local", "CeleryExecutor", "s3://b/pool", "s3://b/run") is None
    celery = unshared_paths_warning("local", "CeleryExecutor", "s3://b/pool", "/data/run")
    assert celery and "/data/run" in celery and "s3://b/pool" not in celery
    assert unshared_paths_warning("local", "LocalExecutor,CeleryExecutor", "/data/pool", "s3://b/run")
    assert unshared_paths_warning(
        "local", "airflow.providers.celery.executors.celery_executor.CeleryExecutor", "/p", "s3://b/r")
    assert "pods" in unshared_paths_warning("kubernetes", "LocalExecutor", "file:///p", "s3://b/r")


def test_retry_delay_is_configurable_where_the_dags_are_parsed(monkeypatch):
    from datetime import timedelta

    from sieve_airflow.planning import retry_delay

    monkeypatch.delenv("SIEVE_RETRY_DELAY_SECONDS", raising=False)
    assert retry_delay(timedelta(minutes=2)) == timedelta(minutes=2)
    monkeypatch.setenv("SIEVE_RETRY_DELAY_SECONDS", "5")
    assert retry_delay(timedelta(minutes=2)) == timedelta(seconds=5)
