#!/usr/bin/env bash
# Fetches, on this machine, the wheels that benchmarks/gpu_check.sh installs on a GPU machine
# whose Python (3.12, x86_64) has torch, numpy, scikit-learn, pytest, requests, typer and rich
# but not the rest of this project's packages, and which can fetch nothing (device README).
# Versions are the ones installed in .venv. The wheels go to .whl/ (kept out of git here).
#
#     bash benchmarks/gpu_wheels.sh     # then carry .whl to the device call with gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}

# What `hpo run`, `mlflow server` and benchmarks/throughput.py import that the device image
# (KINDS.md's package list, read 2026-11-17) lacks; typer and rich at this project's versions.
NAMES="alembic annotated-types blinker cachetools cffi colorlog cryptography databricks-sdk
docker fastapi flask flask-cors gitdb gitpython google-auth graphene graphql-core graphql-relay
gunicorn httptools huey importlib-metadata itsdangerous mako mlflow mlflow-skinny mlflow-tracing
opentelemetry-api opentelemetry-proto opentelemetry-sdk opentelemetry-semantic-conventions
optuna optuna-integration prettytable psycopg psycopg-binary pyasn1 pyasn1-modules pycparser
pydantic pydantic-core pydantic-settings python-dotenv skops smmap sqlalchemy sqlparse starlette
typing-inspection uvicorn watchfiles wcwidth websockets typer rich"

mkdir -p .whl
if [ -d .git ] && ! grep -qxF /.whl/ .git/info/exclude 2>/dev/null; then
    echo /.whl/ >>.git/info/exclude
fi
specs=$("$PY" - $NAMES <<'PY'
import sys
from importlib.metadata import PackageNotFoundError, version

missing = []
for name in sys.argv[1:]:
    try:
        print(f"{name}=={version(name)}")
    except PackageNotFoundError:
        missing.append(name)
if missing:
    sys.exit(f"not installed in this environment: {', '.join(missing)}")
PY
)
platforms=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64)
for n in $(seq 17 39); do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
# shellcheck disable=SC2086
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp "${platforms[@]}" -d .whl $specs
echo "$(ls .whl/*.whl | wc -l) wheels in .whl/, $(du -sh .whl | cut -f1) (a device call carries 64 MiB at most)"
