# syntax=docker/dockerfile:1.7
# GPU worker image for caption/embed pods: `sieve caption|embed INPUT RUN --shards ...`.
# Build from the repository root:  docker build -f docker/worker.Dockerfile -t sieve-worker:0.1.0 .
# The versions below are pinned to pyproject.toml (tests/docker checks they agree).
ARG TORCH_VERSION=2.14.1
ARG CUDA_TAG=cuda12.8-cudnn9-runtime
FROM pytorch/pytorch:${TORCH_VERSION}-${CUDA_TAG}

ARG TORCH_VERSION=2.14.1
ARG SIEVE_VERSION=0.1.0
LABEL org.opencontainers.image.title="sieve-worker" \
      org.opencontainers.image.version="${SIEVE_VERSION}" \
      org.opencontainers.image.description="SIEVE curation stages (captioner, encoders) on CUDA"

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    SIEVE_CACHE=/cache/sieve \
    HF_HOME=/cache/huggingface

# the project supports exactly Python 3.11 (requires-python); fail the build if the base image moves
RUN python -c "import sys; assert sys.version_info[:2] == (3, 11), sys.version" \
 && python -c "import torch, sys; v = torch.__version__.split('+')[0]; sys.exit(v != '${TORCH_VERSION}' and f'torch {v} != ${TORCH_VERSION}')"

WORKDIR /opt/sieve
COPY pyproject.toml README.md ./
COPY sieve_tasks/ ./sieve_tasks/
# torch is already the pinned CUDA build of the base image; pip keeps it and installs the rest as pinned
RUN pip install "torch==${TORCH_VERSION}" . \
 && sieve --help > /dev/null

RUN useradd --create-home --uid 1000 sieve && mkdir -p /cache && chown sieve /cache
USER sieve
WORKDIR /home/sieve
ENTRYPOINT ["sieve"]
CMD ["--help"]
