# syntax=docker/dockerfile:1.7
# Airflow 3 image with the SIEVE DAGs, the summary plugin, the providers and the sieve_tasks library
# (CPU torch by default: the worker runs score/aggregate/publish, and every stage in local mode).
# Build from the repository root:  docker build -f docker/airflow.Dockerfile -t sieve-airflow:0.1.0 .
# The versions below are pinned to pyproject.toml (tests/docker checks they agree).
ARG AIRFLOW_VERSION=3.3.2
ARG PYTHON_VERSION=3.11
FROM apache/airflow:${AIRFLOW_VERSION}-python${PYTHON_VERSION}

ARG AIRFLOW_VERSION=3.3.2
ARG CNCF_KUBERNETES_PROVIDER_VERSION=10.25.0
ARG AMAZON_PROVIDER_VERSION=9.39.0
ARG CELERY_PROVIDER_VERSION=3.26.0
ARG CELERY_VERSION=5.6.3
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1
# the PyTorch wheel index: cpu for the scheduler and CPU workers, a CUDA one (cu128) for a GPU node's worker
ARG TORCH_INDEX=cpu

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    SIEVE_CACHE=/opt/airflow/sieve-cache \
    SIEVE_RUN_BASE=/opt/airflow/sieve-runs

COPY --chown=airflow:0 pyproject.toml README.md /opt/sieve/
COPY --chown=airflow:0 sieve_tasks/ /opt/sieve/sieve_tasks/
# the providers and Airflow stay at the pinned versions; torch comes as the build of TORCH_INDEX
RUN pip install --extra-index-url https://download.pytorch.org/whl/${TORCH_INDEX} \
        "apache-airflow==${AIRFLOW_VERSION}" \
        "apache-airflow-providers-cncf-kubernetes==${CNCF_KUBERNETES_PROVIDER_VERSION}" \
        "apache-airflow-providers-amazon==${AMAZON_PROVIDER_VERSION}" \
        "apache-airflow-providers-celery==${CELERY_PROVIDER_VERSION}" "celery[redis]==${CELERY_VERSION}" \
        "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}" \
        "/opt/sieve[airflow]" \
 && sieve --help > /dev/null

COPY --chown=airflow:0 dags/ /opt/airflow/dags/
COPY --chown=airflow:0 plugins/ /opt/airflow/plugins/
