#!/usr/bin/env bash
# The Debian packages the multi-host cluster tests run on (tests/cluster: a real SLURM cluster
# and an sshd per host, in network namespaces): slurm-wlm, munge, openssh-server, pdsh.
# Installed only as root on a Debian/Ubuntu machine and only when one is missing (~1 min once);
# elsewhere the cluster tests skip with the reason (and fail under CI=true).
set -euo pipefail
missing=$(for b in slurmctld slurmd munged sshd pdsh; do command -v "$b" >/dev/null || echo "$b"; done)
[ -z "$missing" ] && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
  echo "cluster tests: missing $(echo $missing) (as root: apt-get install slurm-wlm munge openssh-server pdsh); they will skip" >&2
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q slurm-wlm munge openssh-server pdsh
