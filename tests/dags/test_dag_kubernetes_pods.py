"""Kubernetes mode: every pod rendered offline is a valid v1 Pod running the right ``sieve`` command."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

from tests.dags.dagrun_helpers import labels, load_dag, run_dag, states

K8S_VERSION = "1.30"
OVERRIDE = {
    "image": "registry.example.com/sieve-worker:0.1.0",
    "namespace": "curation",
    "gpus": 2,
    "node_selector": {"cloud.google.com/gke-accelerator": "nvidia-l4"},
    "tolerations": [{"key": "nvidia.com/gpu", "operator": "Equal", "value": "present", "effect": "NoSchedule"}],
    "env_from_secrets": ["sieve-aws"],
    "service_account_name": "sieve-worker",
}


def pod_body(operator, context=None) -> dict:
    from kubernetes.client import ApiClient

    pod = operator.build_pod_request_obj(context, dry_run=True)
    return ApiClient().sanitize_for_serialization(pod)


def validate(body: dict) -> None:
    import kubernetes_validate

    kubernetes_validate.validate(body, K8S_VERSION, strict=True)


def plan_for(settings_options: dict, run: str = "s3://bucket/runs/r1", input_spec: str = "s3://bucket/pool/") -> dict:
    from sieve_tasks.settings import Settings

    return {"input": input_spec, "run": run, "settings": Settings(**settings_options).to_dict(), "mode": "kubernetes",
            "lease_owner": "airflow/sieve_curation/manual__1"}


def test_defaults_come_from_the_config_file_and_the_variable_overrides_them(monkeypatch):
    from sieve_airflow.kube import DEFAULT_CONFIG_FILE, load_kubernetes_config

    defaults = json.loads(DEFAULT_CONFIG_FILE.read_text())
    monkeypatch.delenv("AIRFLOW_VAR_SIEVE_KUBERNETES", raising=False)
    assert load_kubernetes_config({}) == defaults
    monkeypatch.setenv("AIRFLOW_VAR_SIEVE_KUBERNETES", json.dumps({"namespace": "other", "gpus": 4}))
    merged = load_kubernetes_config()  # reads the Variable (here from the environment backend)
    assert merged["namespace"] == "other" and merged["gpus"] == 4 and merged["image"] == defaults["image"]
    with pytest.raises(ValueError, match="unknown keys"):
        load_kubernetes_config({"imagee": "typo"})
    with pytest.raises(ValueError, match="gpus"):
        load_kubernetes_config({"gpus": -1})


@pytest.mark.parametrize(("shards", "per_task"), [(5, 1), (5, 2), (7, 3)])
def test_one_valid_pod_per_batch_with_the_right_args(airflow_db, shards, per_task):
    from sieve_airflow.kube import load_kubernetes_config
    from sieve_airflow.planning import batch_shards

    dag = load_dag("sieve_curation")
    config = load_kubernetes_config(OVERRIDE)
    ids = [f"{i:08d}" for i in range(shards)]
    batches = batch_shards(ids, per_task, 1024)
    assert len(batches) == math.ceil(shards / per_task)
    plan = plan_for({"captioner": "s3://models/blip-large", "num_captions": 4, "metadata": "s3://bucket/metadata/",
                     "clip_from_metadata": "l14"})
    for stage in ("caption", "embed"):
        operator = dag.get_task(f"pod_batch.{stage}")
        seen = []
        for batch in batches:
            operator.shard_ids, operator.plan = batch, plan  # what rendering the mapped instance resolves
            context: dict = {}
            operator.prepare_pod(context, config)
            body = pod_body(operator)
            validate(body)
            spec = body["spec"]
            (container,) = spec["containers"]
            assert container["image"] == OVERRIDE["image"]
            assert container["command"] == ["sieve"]  # the console script, also the image's ENTRYPOINT
            args = container["args"]
            assert args[:5] == [stage, plan["input"], plan["run"], "--shards", ",".join(batch)]
            assert args[args.index("--captioner") + 1] == "s3://models/blip-large"
            assert args[args.index("--num-captions") + 1] == "4"
            assert args[args.index("--metadata") + 1] == "s3://bucket/metadata/"  # caption leaves the clip score to it
            assert args[args.index("--clip-from-metadata") + 1] == "l14"
            assert args[args.index("--lease-owner") + 1] == "airflow/sieve_curation/manual__1"
            assert container["resources"]["limits"]["nvidia.com/gpu"] == "2"
            assert container["resources"]["requests"]["memory"] == "24Gi"
            assert container["envFrom"] == [{"secretRef": {"name": "sieve-aws"}}]
            assert spec["nodeSelector"] == OVERRIDE["node_selector"]
            assert spec["tolerations"] == OVERRIDE["tolerations"]
            assert spec["serviceAccountName"] == "sieve-worker"
            assert spec["restartPolicy"] == "Never"
            assert body["metadata"]["namespace"] == "curation"
            assert body["metadata"]["labels"]["sieve-stage"] == stage
            assert body["metadata"]["annotations"]["sieve/shards"] == ",".join(batch)
            seen += args[4].split(",")
        assert seen == ids  # every shard in exactly one pod


def test_pods_are_valid_with_the_shipped_defaults(airflow_db):
    from sieve_airflow.kube import load_kubernetes_config

    operator = load_dag("sieve_curation").get_task("pod_batch.caption")
    operator.shard_ids, operator.plan = ["00000000"], plan_for({})
    operator.prepare_pod({}, load_kubernetes_config({}))
    body = pod_body(operator)
    validate(body)
    assert body["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert body["spec"]["tolerations"][0]["key"] == "nvidia.com/gpu"


@pytest.mark.slow
def test_kubernetes_mode_end_to_end_with_a_fake_kubelet(airflow_db, demo_pool, monkeypatch):
    """dag.test() in kubernetes mode; each pod is rendered, validated, then its container args are run
    with the real ``sieve`` CLI, as the worker image would. The subset equals the local run's."""
    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator

    from sieve_tasks import cli
    from sieve_tasks.runner import run_all
    from sieve_tasks.settings import Settings

    pods: list[dict] = []

    def fake_execute(self, context):
        body = pod_body(self, context)
        validate(body)
        pods.append(body)
        (container,) = body["spec"]["containers"]
        assert container["command"] == ["sieve"]
        if cli.main(container["args"]) != 0:
            raise RuntimeError(f"pod {body['metadata']['name']} failed")

    monkeypatch.setattr(KubernetesPodOperator, "execute", fake_execute)
    monkeypatch.setenv("AIRFLOW_VAR_SIEVE_KUBERNETES", json.dumps(OVERRIDE))
    dagrun = run_dag("sieve_curation", {"input": demo_pool, "profile": "test", "mode": "kubernetes"})
    assert dagrun.state == "success", states(dagrun)

    # no run param: the run directory is <SIEVE_RUN_BASE>/<sanitised run id>
    from sieve_airflow.planning import sanitize_run_id

    run = Path(os.environ["SIEVE_RUN_BASE"]) / sanitize_run_id(dagrun.run_id)
    assert (run / "manifest" / "_SUCCESS").exists()

    assert sorted((p["spec"]["containers"][0]["args"][0], p["spec"]["containers"][0]["args"][4]) for p in pods) == [
        ("caption", "00000000"), ("caption", "00000001"), ("embed", "00000000"), ("embed", "00000001")]
    assert all(p["spec"]["containers"][0]["args"][2] == str(run) for p in pods)
    # all pods of the DAG run share its lease on the run directory (they run in parallel on a real cluster)
    owners = {p["spec"]["containers"][0]["args"][p["spec"]["containers"][0]["args"].index("--lease-owner") + 1]
              for p in pods}
    assert owners == {f"airflow/sieve_curation/{dagrun.run_id}"}
    assert not (run / "_lease.json").exists()  # released when the run finished
    assert all(p["metadata"]["labels"]["dag_id"] == "sieve_curation" for p in pods)
    got = states(dagrun)
    assert {got[(t, -1)] for t in ("local_batch.caption", "local_batch.embed", "local_batch.score")} == {"skipped"}
    assert labels(dagrun, "pod_batch.caption") == ["00000000", "00000001"]
    assert labels(dagrun, "pod_batch.score") == ["00000000", "00000001"]

    reference = run.parent / (run.name + "-reference")
    run_all(demo_pool, str(reference), Settings(profile="test"), progress=False)
    assert (run / "manifest" / "subset.npy").read_bytes() == (reference / "manifest" / "subset.npy").read_bytes()
