"""Static checks of docker/: what the Dockerfiles COPY exists, the entrypoint is the project's console
script, and every pinned version agrees with pyproject.toml."""

from __future__ import annotations

import glob
import json
import re
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
DOCKERFILES = {"worker": DOCKER / "worker.Dockerfile", "airflow": DOCKER / "airflow.Dockerfile"}
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(l for l in path.read_text().splitlines() if not l.lstrip().startswith("#")))
    out = []
    for line in text.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def args_of(path: Path) -> dict[str, str]:
    """ARG defaults; an ARG declared twice (before and after FROM) must agree with itself."""
    found: dict[str, str] = {}
    for word, rest in instructions(path):
        if word == "ARG" and "=" in rest:
            name, value = rest.split("=", 1)
            assert found.setdefault(name, value) == value, f"{path.name}: ARG {name} has two defaults"
    return found


def pins(requirements: list[str]) -> dict[str, str]:
    result = {}
    for req in requirements:
        m = re.match(r"^([A-Za-z0-9_.\-]+)(?:\[[^\]]*\])?==([^;\s]+)", req)
        if m:
            result[m.group(1).lower().replace("_", "-")] = m.group(2)
    return result


DEPENDENCIES = pins(PYPROJECT["project"]["dependencies"])
AIRFLOW_EXTRA = pins(PYPROJECT["project"]["optional-dependencies"]["airflow"])
VERSION = PYPROJECT["project"]["version"]


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_every_copied_path_exists_in_the_build_context(name):
    """The compose file builds with the repository root as context; every COPY source must be there."""
    path = DOCKERFILES[name]
    copies = [rest for word, rest in instructions(path) if word in ("COPY", "ADD")]
    assert copies, f"{path.name} copies nothing"
    for rest in copies:
        parts = [p for p in shlex.split(rest) if not p.startswith("--")]
        assert not any(p.startswith("--from") for p in shlex.split(rest))
        sources = parts[:-1]
        assert sources, rest
        for source in sources:
            assert glob.glob(str(REPO / source)), f"{path.name}: COPY source {source!r} is not in the repository"


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_dockerignore_keeps_what_is_copied(name):
    """BuildKit reads <Dockerfile>.dockerignore; it must not exclude any COPY source."""
    ignore = Path(str(DOCKERFILES[name]) + ".dockerignore").read_text().split()
    allowed = {line[1:].rstrip("*").rstrip("/") for line in ignore if line.startswith("!")}
    for word, rest in instructions(DOCKERFILES[name]):
        if word == "COPY":
            for source in [p for p in shlex.split(rest) if not p.startswith("--")][:-1]:
                assert source.rstrip("/") in allowed, f"{source} is excluded by the .dockerignore"


def test_worker_entrypoint_is_the_projects_console_script():
    entry = [json.loads(rest) for word, rest in instructions(DOCKERFILES["worker"]) if word == "ENTRYPOINT"]
    assert entry == [["sieve"]]
    scripts = PYPROJECT["project"]["scripts"]
    assert scripts["sieve"] == "sieve_tasks.cli:main"
    module, _, function = scripts["sieve"].partition(":")
    import importlib

    assert callable(getattr(importlib.import_module(module), function))
    # the DAG's pods run that same script
    from tests.dags import airflow_env  # noqa: F401  (dags/ on sys.path)

    source = (REPO / "dags" / "sieve_airflow" / "kube.py").read_text()
    assert 'kwargs.setdefault("cmds", ["sieve"])' in source


def test_worker_versions_match_pyproject():
    args = args_of(DOCKERFILES["worker"])
    assert args["TORCH_VERSION"] == DEPENDENCIES["torch"]
    assert args["SIEVE_VERSION"] == VERSION
    text = DOCKERFILES["worker"].read_text()
    assert "FROM pytorch/pytorch:${TORCH_VERSION}-${CUDA_TAG}" in text  # a CUDA PyTorch base
    assert "cuda" in args["CUDA_TAG"]
    assert "sys.version_info[:2] == (3, 11)" in text
    assert PYPROJECT["project"]["requires-python"] == ">=3.11,<3.12"


def test_airflow_versions_match_pyproject():
    args = args_of(DOCKERFILES["airflow"])
    assert args["AIRFLOW_VERSION"] == AIRFLOW_EXTRA["apache-airflow"]
    assert args["CNCF_KUBERNETES_PROVIDER_VERSION"] == AIRFLOW_EXTRA["apache-airflow-providers-cncf-kubernetes"]
    assert args["AMAZON_PROVIDER_VERSION"] == AIRFLOW_EXTRA["apache-airflow-providers-amazon"]
    assert args["CELERY_PROVIDER_VERSION"] == AIRFLOW_EXTRA["apache-airflow-providers-celery"]
    assert args["CELERY_VERSION"] == AIRFLOW_EXTRA["celery"]
    assert args["TORCH_VERSION"] == DEPENDENCIES["torch"]
    assert args["TORCHVISION_VERSION"] == DEPENDENCIES["torchvision"]
    assert args["PYTHON_VERSION"] == "3.11"
    text = DOCKERFILES["airflow"].read_text()
    assert "FROM apache/airflow:${AIRFLOW_VERSION}-python${PYTHON_VERSION}" in text
    assert "/opt/sieve[airflow]" in text  # the project's own airflow extra, same pins
    # every == pin written in a RUN line names a version variable, never a literal that could drift
    for word, rest in instructions(DOCKERFILES["airflow"]) + instructions(DOCKERFILES["worker"]):
        if word == "RUN":
            for literal in re.findall(r'"[A-Za-z0-9_.\-\[\]]+==([^"$]+)"', rest):
                pytest.fail(f"literal pin {literal} in a RUN line; use an ARG checked against pyproject")


def test_installed_environment_matches_the_pins():
    """The venv the tests run in is what the images install."""
    from importlib.metadata import version

    for name, pinned in {**AIRFLOW_EXTRA, "torch": DEPENDENCIES["torch"]}.items():
        assert version(name).split("+")[0] == pinned, name


COMPOSE = yaml.safe_load((DOCKER / "docker-compose.yaml").read_text())


def resolve(value: str, env: dict[str, str] | None = None) -> str:
    """Compose's ``${NAME:-default}`` / ``${NAME}`` interpolation against ``env``."""
    env = env or {}
    return re.sub(r"\$\{(\w+)(?::-([^}]*))?\}", lambda m: env.get(m.group(1)) or (m.group(2) or ""), value)


def test_compose_runs_airflow_on_postgres_with_the_built_images():
    compose = COMPOSE
    services = compose["services"]
    assert services["postgres"]["image"].startswith("postgres:")
    assert "healthcheck" in services["postgres"]
    for name in ("airflow-init", "airflow-apiserver", "airflow-scheduler", "airflow-dag-processor",
                 "airflow-triggerer"):
        service = services[name]
        env = service["environment"]
        assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].startswith("postgresql+psycopg2://")
        assert "@postgres:" in env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"]
        assert resolve(env["AIRFLOW__CORE__EXECUTOR"]) == "LocalExecutor"  # the simple setup by default
        assert "profiles" not in service
        assert service["depends_on"]["postgres"]["condition"] == "service_healthy"
        build = service["build"]
        assert (DOCKER / build["context"] / build["dockerfile"]).resolve() == DOCKERFILES["airflow"]
        assert service["image"] == f"sieve-airflow:{VERSION}"
    assert services["airflow-init"]["command"] == ["db", "migrate"]
    assert services["airflow-apiserver"]["command"] == ["api-server"]
    worker = services["sieve-worker"]
    assert (DOCKER / worker["build"]["context"] / worker["build"]["dockerfile"]).resolve() == DOCKERFILES["worker"]
    # the image the pods pull by default is the one compose builds
    default_config = json.loads((REPO / "dags" / "sieve_airflow" / "kubernetes.json").read_text())
    assert default_config["image"] == worker["image"]
    assert default_config["image"].endswith(f":{VERSION}")


def test_compose_celery_profile_adds_redis_workers_and_flower():
    services = COMPOSE["services"]
    simple = {name for name, service in services.items() if "profiles" not in service}
    assert not simple & {"redis", "airflow-worker", "airflow-worker-gpu", "flower"}  # plain `up` stays simple
    assert services["redis"]["profiles"] == ["celery"] and "healthcheck" in services["redis"]
    env = services["airflow-scheduler"]["environment"]
    assert resolve(env["AIRFLOW__CORE__EXECUTOR"], {"SIEVE_EXECUTOR": "CeleryExecutor"}) == "CeleryExecutor"
    assert env["AIRFLOW__CELERY__BROKER_URL"].startswith("redis://redis:")
    assert env["AIRFLOW__CELERY__RESULT_BACKEND"].startswith("db+postgresql+psycopg2://")
    assert "@postgres:" in env["AIRFLOW__CELERY__RESULT_BACKEND"]

    cpu, gpu = services["airflow-worker"], services["airflow-worker-gpu"]
    assert cpu["profiles"] == ["celery"] and gpu["profiles"] == ["gpu"]
    assert cpu["command"][:2] == gpu["command"][:2] == ["celery", "worker"]
    assert cpu["command"][cpu["command"].index("--queues") + 1] == "default"
    assert int(resolve(str(cpu["deploy"]["replicas"]))) >= 2
    # the GPU worker listens to the queue the DAGs route caption and embed to
    gpu_queue = gpu["command"][gpu["command"].index("--queues") + 1]
    for queue in ("gpu", "a100"):
        configured = {"SIEVE_GPU_QUEUE": queue}
        assert resolve(gpu_queue, configured) == resolve(env["SIEVE_GPU_QUEUE"], configured) == queue
    assert resolve(env["SIEVE_GPU_QUEUE"]) == ""  # unset: caption and embed stay on the default queue
    assert gpu["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert gpu["build"]["args"]["TORCH_INDEX"].startswith("cu")
    assert (DOCKER / gpu["build"]["context"] / gpu["build"]["dockerfile"]).resolve() == DOCKERFILES["airflow"]
    for worker in (cpu, gpu):  # each worker its own model cache: no shared sieve-cache volume
        assert not any("sieve-cache" in volume for volume in worker["volumes"])
        assert worker["depends_on"]["redis"]["condition"] == "service_healthy"
        assert worker["depends_on"]["airflow-init"]["condition"] == "service_completed_successfully"
    assert services["flower"]["profiles"] == ["flower"] and services["flower"]["command"] == ["celery", "flower"]
