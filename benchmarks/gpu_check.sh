#!/usr/bin/env bash
# GPU check: the machine, the GPU-marked tests, the rest of tests/training and, when this
# project's other packages can be installed from wheels in .whl/ (see the device README), the
# pack throughput benchmark with and without the CUDA graph (benchmarks/pack_speed.py) and the
# end-to-end throughput benchmark (benchmarks/throughput.py: baseline, hpo run --pack 1,
# --pack auto, one MLflow server).
# Needs python3 with torch, numpy, scikit-learn, pytest and requests; `bash
# benchmarks/gpu_wheels.sh`, run where pip can fetch, puts the rest in .whl/ (41 MiB; name .whl
# in the device call's carry).
#
#     bash benchmarks/gpu_check.sh            # full run (about 7-8 minutes on one H100/H200:
#                                             # the pack sweep ~1, the end-to-end benchmark ~5)
#     QUICK=1 bash benchmarks/gpu_check.sh    # seconds; also works without a GPU (the full
#                                             # run fails at once without one)
#     SCALE=256 bash benchmarks/gpu_check.sh  # the end-to-end benchmark adds a 256-trial study
#                                             # (throughput.py --scale; about 2 more minutes);
#                                             # SCALE_PACKS=auto,64 runs it at pack 64 too,
#                                             # SCALE_WORKERS=3 with 3 hpo workers beside it (curves on, then off)
#     ONLY_E2E=1 TRIALS=8 SCALE=512 ...       # the GPU tests and the end-to-end benchmark only
#
# Everything goes to stdout; when $OUT is set, a copy goes to $OUT/gpu_check.log.
set -u -o pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1

section() { printf '\n===== %s =====\n' "$*"; }

# Without a GPU the GPU tests skip and every CUDA figure is missing, yet the run would pass:
# outside QUICK (a smoke run that also works on a CPU), no GPU is a failure, found before
# anything else runs.
if [ -z "${QUICK:-}" ] && ! "$PY" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
    msg="gpu_check.sh: torch sees no CUDA GPU here (torch.cuda.is_available() is false);"
    msg+=" run it on a GPU machine, or QUICK=1 for the CPU smoke run"
    echo "$msg" >&2
    if [ -n "${OUT:-}" ]; then mkdir -p "$OUT" && echo "$msg" >"$OUT/gpu_check.log"; fi
    exit 1
fi

main() {
local status=0

section "machine ($(date -u +%Y-%m-%dT%H:%M:%SZ))"
uname -srm
nproc
if command -v nvidia-smi >/dev/null; then
    nvidia-smi -L
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
else
    echo "nvidia-smi: not found"
fi
"$PY" - <<'EOF'
import platform, torch, numpy, sklearn, pytest
print(f"python {platform.python_version()}  torch {torch.__version__}  numpy {numpy.__version__}"
      f"  scikit-learn {sklearn.__version__}  pytest {pytest.__version__}")
print(f"torch CUDA runtime {torch.version.cuda}, cuda available: {torch.cuda.is_available()}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"CUDA device: {torch.cuda.get_device_name(0)}, {p.total_memory / 2**30:.1f} GiB, "
          f"{p.multi_processor_count} SMs, capability {p.major}.{p.minor}")
EOF

if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    section "this project's other packages, from .whl/"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH=$PYTHONPATH:/tmp/site \
        && E2E=1 && echo ok || { echo "could not install them"; status=1; E2E=; }
else
    echo "no wheels in .whl/: pack_speed.py (it loads digits through service.datasets, which"
    echo "needs pydantic) and the end-to-end benchmark are skipped"
    E2E=
fi

section "imports the test suite needs (tests/conftest.py)"
"$PY" -c "import requests, service.mlflow_server, service.training; print('ok: requests', requests.__version__)" || status=1

# pyproject's filterwarnings names optuna.exceptions.ExperimentalWarning, which cannot be
# resolved without Optuna: override it with an empty list. No cache folder is written.
PYTEST=("$PY" -m pytest -p no:cacheprovider -o filterwarnings= -q)

section "GPU tests: pytest -m gpu tests/training"
"${PYTEST[@]}" -m gpu tests/training || status=1

if [ -z "${ONLY_E2E:-}" ]; then  # ONLY_E2E=1: the GPU tests and the end-to-end benchmark
if [ -n "$E2E" ]; then
section "pack throughput, with and without the CUDA graph: benchmarks/pack_speed.py"
if [ -n "${QUICK:-}" ]; then
    "$PY" benchmarks/pack_speed.py --quick || status=1
else
    # each CUDA size runs twice (with and without the graph): no new size after 60 s
    "$PY" benchmarks/pack_speed.py --cuda-packs "${CUDA_PACKS:-1,8,64,512,4096}" \
        --cuda-budget-s 60 || status=1
fi
section "a pack's last trials, full pack or shrunk to them: benchmarks/pack_tail.py"
if [ -n "${QUICK:-}" ]; then
    "$PY" benchmarks/pack_tail.py --packs 16 --repeats 1 || status=1
else
    "$PY" benchmarks/pack_tail.py --packs 64,1024,8192 --repeats 2 || status=1
fi
fi
fi

if [ -n "$E2E" ]; then
    section "end to end: benchmarks/throughput.py (packages from .whl/)"
    if [ -n "${QUICK:-}" ]; then
        "$PY" benchmarks/throughput.py --trials 4 --steps 50 || status=1
    else
        # SCALE=N adds `hpo run --pack auto` on N trials against the same server (throughput.py
        # --scale; about 75 s for 256 trials with curves on and off on an H200)
        "$PY" benchmarks/throughput.py --trials "${TRIALS:-24}" --steps "${STEPS:-400}" \
            ${SCALE:+--scale "$SCALE"} ${SCALE_PACKS:+--scale-packs "$SCALE_PACKS"} \
            ${SCALE_WORKERS:+--scale-workers "$SCALE_WORKERS"} || status=1
    fi
fi

# Last: what CI also runs (on CPU), here with a GPU beside it; a run cut short loses least here.
if [ -z "${ONLY_E2E:-}" ]; then
    section "the other training tests: pytest -m 'not gpu' tests/training"
    "${PYTEST[@]}" -m "not gpu" tests/training || status=1
fi

section "done, exit status $status"
return $status
}

if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT"
    main 2>&1 | tee "$OUT/gpu_check.log"
    exit "${PIPESTATUS[0]}"
fi
main
