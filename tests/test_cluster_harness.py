"""The cluster harness itself (tests/cluster): real hosts, a real SLURM cluster, real sshd.

Each test checks one thing the multi-node tests rely on, on one 2-host cluster shared by the
module: SLURM places a job's steps on two hosts with different addresses; ssh and pdsh reach
every host from the login namespace and from the hosts; a link taken down cuts a host off and
comes back; kill_host leaves nothing running there; teardown leaves nothing on the machine.
"""

from __future__ import annotations

import pytest

from tests.cluster.fixtures import cluster  # noqa: F401  (the module-scoped fixture)

pytestmark = pytest.mark.cluster


def test_sbatch_two_nodes_runs_one_step_per_host(cluster, tmp_path):  # noqa: F811
    script = tmp_path / "job.sh"
    script.write_text("#!/bin/bash\nsrun bash -c 'echo $SLURMD_NODENAME $(hostname -I)'\n")
    out = tmp_path / "out.txt"
    job = cluster.sbatch(["--nodes", "2", "--output", out, script], cwd=tmp_path)
    assert cluster.wait_job(job, timeout=60) == "COMPLETED", cluster.job_info(job)
    seen = dict(line.split() for line in out.read_text().splitlines())
    assert seen == {h.name: h.addr for h in cluster.hosts}


@pytest.mark.parametrize("where", ["login", "host0", "host1"])
def test_ssh_and_pdsh_reach_every_host(cluster, where):  # noqa: F811
    """Plain ``ssh NAME`` and ``pdsh -R ssh``, as DeepSpeed's runner calls them."""
    origin = None if where == "login" else int(where[-1])
    names = ",".join(h.name for h in cluster.hosts)
    for h in cluster.hosts:
        p = cluster.run(["ssh", h.name, "hostname", "-I"], host=origin, timeout=30)
        assert p.returncode == 0, p.stderr
        assert p.stdout.split() == [h.addr]
    p = cluster.run(["pdsh", "-R", "ssh", "-w", names, "hostname", "-I"], host=origin, timeout=30)
    assert p.returncode == 0, p.stderr
    seen = dict(line.split(": ") for line in p.stdout.strip().splitlines())
    assert {k: v.strip() for k, v in seen.items()} == {h.name: h.addr for h in cluster.hosts}
