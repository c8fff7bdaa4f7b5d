#!/usr/bin/env bash
# Install megawsd and its test extras. torch goes first, pinned: a bare `torch` requirement
# resolved on its own pulls a multi-GB CUDA build on a CPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if ! $PYTHON -c "import torch" >/dev/null 2>&1; then
  $PYTHON -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
fi
$PYTHON -m pip install -q -e ".[test]"
