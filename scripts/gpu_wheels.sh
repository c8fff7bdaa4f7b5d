#!/usr/bin/env bash
# Download, here, the wheels that scripts/gpu_check.sh needs on the GPU machine and that its image
# lacks (it has torch, triton, transformers, accelerate, sentencepiece, pyarrow, ...). Python 3.12,
# x86-64, no dependencies resolved: each one is named. Kept in .whl/ (git-ignored).
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
plat="--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64"
dl() { python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
         --implementation cp $plat -d .whl "$@"; }
# DeepSpeed ships an sdist only: build its pure-Python wheel here (its ops JIT-build there).
python3 -m pip wheel -q --no-deps --no-build-isolation -w .whl deepspeed==0.19.8
dl hjson schedulefree==1.4.1 datasets dill multiprocess pydantic pydantic-core annotated-types \
   typing-inspection
ls .whl
