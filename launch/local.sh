#!/usr/bin/env bash
# N ranks on this machine through the DeepSpeed launcher (GPUs, or CPU processes over gloo).
#
#   bash launch/local.sh CONFIG [NPROC] [extra `megawsd train` args...]
#   bash launch/local.sh configs/demo-cpu.yaml 2
#   bash launch/local.sh configs/llama-125m.yaml 8 --set optimizer.lr=3e-4
#
# Equivalent to `megawsd train CONFIG --nproc NPROC`, which runs
#   deepspeed --num_gpus NPROC --master_port <free port> --module megawsd.train CONFIG ...
# with DS_ACCELERATOR=cpu and OMP_NUM_THREADS=cores/NPROC set when there is no CUDA.
set -euo pipefail
if [[ $# -lt 1 ]]; then
  sed -n '2,11p' "$0"; exit 2
fi
CONFIG=$1; shift
if [[ $# -gt 0 && $1 =~ ^[0-9]+$ ]]; then NPROC=$1; shift; else
  NPROC=$(python3 -c 'import torch; print(max(torch.cuda.device_count(), 1))'); fi
exec python3 -m megawsd.cli train "$CONFIG" --nproc "$NPROC" "$@"
