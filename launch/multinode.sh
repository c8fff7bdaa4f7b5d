#!/usr/bin/env bash
# Several nodes through the DeepSpeed launcher over passwordless ssh (pdsh by default).
#
#   bash launch/multinode.sh HOSTFILE CONFIG [extra `megawsd train` args...]
#   bash launch/multinode.sh launch/hostfile.example configs/llama-1b.yaml --run-dir /shared/runs/1b
#
# Run it on the first host of the hostfile. It runs
#   deepspeed --hostfile HOSTFILE --master_port <free port> --module megawsd.train CONFIG ...
# which starts `slots` ranks on every host. Requirements: the same Python environment and
# repository path on every node, and a run directory on a filesystem all nodes share
# (checkpoints are written shard-per-rank into it, `latest` by rank 0).
#
# Without ssh (e.g. one command per node from your scheduler), start on node i:
#   megawsd train CONFIG --hostfile HOSTFILE --no-ssh --node-rank i \
#       --master-addr FIRST_HOST_IP --master-port 29500
set -euo pipefail
if [[ $# -lt 2 ]]; then
  sed -n '2,16p' "$0"; exit 2
fi
HOSTFILE=$1; CONFIG=$2; shift 2
exec python3 -m megawsd.cli train "$CONFIG" --hostfile "$HOSTFILE" "$@"
