#!/usr/bin/env bash
# The GPU check, one command on a machine with a CUDA GPU (<= 8 minutes):
#   bash scripts/gpu_check.sh [OUT_DIR]
# runs the kernel tests on CUDA, bench/optimizer_step.py at 128M and 1B params, bench/engine_step.py
# on one GPU and 100 steps of the 125M config (tokens/s, MFU), and writes OUT_DIR/gpu_check.json
# (default: out/gpu_check). Without a GPU it stops at once (exit 3) with a message saying so.
# Packages missing on the GPU machine (deepspeed, schedulefree, datasets, pydantic, ...) travel as
# wheels in .whl/: `bash scripts/gpu_wheels.sh` downloads them here; they are installed first.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! command -v nvidia-smi >/dev/null 2>&1 && [ -z "${MEGAWSD_GPU_CHECK_FORCE:-}" ]; then
  echo "gpu_check: no CUDA GPU here (nvidia-smi not found). This script measures the Triton" >&2
  echo "kernels and DeepSpeed on a GPU; on CPU run 'make test' and the benchmarks in bench/." >&2
  exit 3
fi
if compgen -G ".whl/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/megawsd-site .whl/*.whl || exit 4
  export PYTHONPATH=/tmp/megawsd-site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
exec $PY scripts/gpu_check.py --out "${1:-out/gpu_check}"
