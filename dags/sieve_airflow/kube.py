"""Caption/embed as Kubernetes pods: ``sieve <stage> INPUT RUN --shards ...`` on a GPU node.

Where and how pods run is configuration, not code: ``kubernetes.json`` beside this module (or the file named
by env ``SIEVE_KUBERNETES_CONFIG``) holds the defaults, and the Airflow Variable ``sieve_kubernetes`` (JSON)
overrides them key by key. The configuration is read when the task runs, never while DAG files are parsed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
from kubernetes.client import models as k8s

from sieve_airflow.planning import batch_label, stage_arguments

CONFIG_VARIABLE = "sieve_kubernetes"
DEFAULT_CONFIG_FILE = Path(__file__).with_name("kubernetes.json")
GPU_POOL = os.environ.get("SIEVE_GPU_POOL", "gpu")
CONFIG_KEYS = {
    "image", "image_pull_policy", "namespace", "kubernetes_conn_id", "service_account_name", "gpus",
    "resources", "node_selector", "tolerations", "env", "env_from_secrets", "labels", "startup_timeout_seconds",
}


def load_kubernetes_config(override: dict[str, Any] | None = None) -> dict[str, Any]:
    """Defaults file merged with ``override`` (default: the ``sieve_kubernetes`` Variable, if set)."""
    path = Path(os.environ.get("SIEVE_KUBERNETES_CONFIG") or DEFAULT_CONFIG_FILE)
    config = json.loads(path.read_text())
    if override is None:
        from airflow.sdk import Variable

        override = Variable.get(CONFIG_VARIABLE, default=None, deserialize_json=True)
    config.update(override or {})
    unknown = set(config) - CONFIG_KEYS
    if unknown:
        raise ValueError(f"unknown keys in Kubernetes config: {sorted(unknown)}; known: {sorted(CONFIG_KEYS)}")
    if not isinstance(config.get("image"), str) or not config["image"]:
        raise ValueError("Kubernetes config needs an 'image'")
    if not isinstance(config.get("namespace"), str) or not config["namespace"]:
        raise ValueError("Kubernetes config needs a 'namespace'")
    if not isinstance(config.get("gpus", 0), int) or config.get("gpus", 0) < 0:
        raise ValueError(f"'gpus' must be a non-negative integer, got {config.get('gpus')!r}")
    return config


def check_cli_roundtrip(arguments: list[str], settings: dict[str, Any]) -> None:
    """Parse the pod's args with the real ``sieve`` parser: the pod must get the stage settings we intend."""
    from sieve_tasks.cli import build_parser, settings_from_args
    from sieve_tasks.settings import CAPTION_SETTINGS, EMBED_SETTINGS, Settings

    names = CAPTION_SETTINGS + EMBED_SETTINGS  # what the pod's stages fingerprint
    intended = Settings(**settings).subset(*names)
    parsed = settings_from_args(build_parser().parse_args(arguments)).subset(*names)
    differ = {f: (intended[f], parsed[f]) for f in names if intended[f] != parsed[f]}
    if differ:
        raise ValueError(f"these settings cannot be passed to a pod through the sieve CLI: {differ}")


class SievePodOperator(KubernetesPodOperator):
    """One pod running ``sieve <stage>`` over a batch of shards; idempotent like the in-process stage."""

    template_fields = (*KubernetesPodOperator.template_fields, "stage", "shard_ids", "plan")
    ui_color = "#d3e4cd"

    def __init__(self, *, stage: str, shard_ids: Any, plan: Any, **kwargs: Any) -> None:
        kwargs.setdefault("name", f"sieve-{stage}")
        kwargs.setdefault("cmds", ["sieve"])  # the worker image's console script (also its ENTRYPOINT)
        kwargs.setdefault("pool", GPU_POOL)
        kwargs.setdefault("on_finish_action", "delete_succeeded_pod")
        kwargs.setdefault("map_index_template", "{{ task.shard_ids | batch_label }}")  # filter: planning.TEMPLATE_FILTERS
        super().__init__(**kwargs)
        self.stage = stage
        self.shard_ids = shard_ids
        self.plan = plan

    def prepare_pod(self, context: Any, config: dict[str, Any] | None = None) -> None:
        """Fill image, placement, resources and args from the config and the (rendered) plan."""
        from airflow.providers.cncf.kubernetes.backcompat.backwards_compat_converters import convert_toleration

        config = config if config is not None else load_kubernetes_config()
        shard_ids = list(self.shard_ids)
        self.image = config["image"]
        self.namespace = config["namespace"]
        self.image_pull_policy = config.get("image_pull_policy")
        self.service_account_name = config.get("service_account_name")
        self.kubernetes_conn_id = config.get("kubernetes_conn_id") or self.kubernetes_conn_id
        self.node_selector = dict(config.get("node_selector") or {})
        self.tolerations = [convert_toleration(t) for t in config.get("tolerations") or []]
        resources = config.get("resources") or {}
        limits = dict(resources.get("limits") or {})
        if config.get("gpus"):
            limits["nvidia.com/gpu"] = str(config["gpus"])
        self.container_resources = k8s.V1ResourceRequirements(requests=resources.get("requests") or None,
                                                              limits=limits or None)
        self.env_vars = [k8s.V1EnvVar(name=k, value=str(v)) for k, v in (config.get("env") or {}).items()]
        self.env_from = [k8s.V1EnvFromSource(secret_ref=k8s.V1SecretEnvSource(name=name))
                         for name in config.get("env_from_secrets") or []]
        self.labels = {**(config.get("labels") or {}), "sieve-stage": self.stage}
        self.annotations = {**(self.annotations or {}), "sieve/run": self.plan["run"],
                            "sieve/shards": ",".join(shard_ids)}
        if config.get("startup_timeout_seconds"):
            self.startup_timeout_seconds = self.schedule_timeout_seconds = int(config["startup_timeout_seconds"])
        self.arguments = stage_arguments(self.stage, self.plan["input"], self.plan["run"], shard_ids,
                                         self.plan["settings"], self.plan.get("lease_owner"))
        check_cli_roundtrip(self.arguments, self.plan["settings"])

    def execute(self, context: Any) -> Any:
        self.prepare_pod(context)
        self.log.info("sieve %s over %s in %s", self.stage, batch_label(list(self.shard_ids)), self.image)
        return super().execute(context)
