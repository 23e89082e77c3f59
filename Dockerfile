# The service image: `hpo` (run, worker, serve, db, sync) and `mlflow server`.
# CPU by default. For NVIDIA GPUs, build with a CUDA build of PyTorch:
#   HPO_TORCH_INDEX=https://download.pytorch.org/whl/cu128 docker compose --profile gpu build
# (the wheels carry CUDA's runtime; the host needs the NVIDIA driver and container toolkit).
ARG BASE_IMAGE=python:3.12-slim
FROM ${BASE_IMAGE}

ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.13.0

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HPO_HOME=/data

RUN pip install --index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}"

WORKDIR /app
COPY pyproject.toml README.md ./
COPY service ./service
COPY alembic ./alembic
RUN pip install . && useradd --create-home --uid 1000 hpo && mkdir -p /data /artifacts \
    && chown hpo /data /artifacts
COPY experiments ./experiments

USER hpo
VOLUME ["/data"]
CMD ["hpo", "--help"]
