"""The cluster harness itself (tests/cluster): real hosts, a real SLURM cluster, real sshd.

Each test checks one thing the multi-node tests rely on, on one 2-host cluster shared by the
module: SLURM places a job's steps on two hosts with different addresses; ssh and pdsh reach
every host from the login namespace and from the hosts; a link taken down cuts a host off and
comes back; kill_host leaves nothing running there; teardown leaves nothing on the machine.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cluster import harness
from tests.cluster.fixtures import cluster_or_skip
from tests.cluster.harness import Cluster

pytestmark = pytest.mark.cluster


def test_sbatch_two_nodes_runs_one_step_per_host(cluster, tmp_path):
    script = tmp_path / "job.sh"
    script.write_text("#!/bin/bash\nsrun bash -c 'echo $SLURMD_NODENAME $(hostname -I)'\n")
    out = tmp_path / "out.txt"
    job = cluster.sbatch(["--nodes", "2", "--output", out, script], cwd=tmp_path)
    assert cluster.wait_job(job, timeout=60) == "COMPLETED", cluster.job_info(job)
    seen = dict(line.split() for line in out.read_text().splitlines())
    assert seen == {h.name: h.addr for h in cluster.hosts}


def test_requeue_runs_the_job_again_on_both_hosts(cluster, tmp_path):
    script = tmp_path / "job.sh"
    script.write_text(
        "#!/bin/bash\nsrun bash -c 'echo ${SLURM_RESTART_COUNT:-0} $SLURMD_NODENAME' >> runs.txt\n"
        "sleep 300\n"
    )
    runs = tmp_path / "runs.txt"
    job = cluster.sbatch(["--nodes", "2", "--output", tmp_path / "o", script], cwd=tmp_path)

    def lines(n):
        return lambda: runs.exists() and len(runs.read_text().splitlines()) == n

    try:
        cluster.wait_until(lines(2), 30, "the first run's steps")
        cluster.requeue(job)
        cluster.wait_job(job, timeout=30, states={"RUNNING"})
        assert cluster.job_info(job)["Restarts"] == "1"
        cluster.wait_until(lines(4), 30, "the second run's steps")
    finally:
        cluster.cleanup_jobs()
    assert sorted(runs.read_text().splitlines()) == sorted(
        f"{r} {h.name}" for r in (0, 1) for h in cluster.hosts
    )


@pytest.mark.parametrize("where", ["login", "host0", "host1"])
def test_ssh_and_pdsh_reach_every_host(cluster, where):
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


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return ""


def _reaches(cluster, src: int, dst: int) -> bool:
    """A TCP connection from host ``src`` to host ``dst``'s sshd opens within 2 s."""
    addr = cluster.hosts[dst].addr
    p = cluster.run(["timeout", "2", "bash", "-c", f"echo > /dev/tcp/{addr}/22"], host=src)
    return p.returncode == 0


def test_link_down_cuts_a_host_off_and_link_up_restores_it(cluster):
    assert _reaches(cluster, 0, 1)
    try:
        cluster.link_down(1)
        assert not _reaches(cluster, 0, 1)
        assert not _reaches(cluster, 1, 0)
        assert _reaches(cluster, 0, 0)  # the rest of the cluster is untouched
    finally:
        cluster.link_up(1)
    assert _reaches(cluster, 0, 1)
    assert cluster.run(["ssh", cluster.hosts[1].name, "true"], host=0).returncode == 0


def test_kill_host_kills_everything_there_and_restart_brings_it_back(cluster, tmp_path):
    h0, h1 = cluster.hosts
    job = cluster.sbatch(["--nodelist", h1.name, "--output", tmp_path / "o", "--wrap", "sleep 300"])
    cluster.wait_job(job, timeout=30, states={"RUNNING"})
    mine = cluster.popen(["sleep", "300"], host=1)
    before0 = set(cluster.pids(0))

    def sleeps() -> list[int]:
        return [pid for pid in cluster.pids(1) if _cmdline(pid) == "sleep 300"]

    # a RUNNING job's script may start a moment later on a loaded machine
    cluster.wait_until(lambda: len(sleeps()) == 2, 30, "the job's sleep on host 1")
    assert mine.pid in sleeps()  # mine and the job's
    try:
        cluster.kill_host(1)
        assert cluster.pids(1) == []
        assert mine.wait(10) == -9
        assert set(cluster.pids(0)) >= before0  # host 0 keeps running
        assert cluster.run(["ssh", h1.name, "true"], host=0, timeout=30).returncode != 0
        cluster.restart_host(1)
        assert cluster.run(["ssh", h1.name, "hostname", "-I"], timeout=30).stdout.split() == [
            h1.addr
        ]
    finally:
        cluster.reset()
    assert set(cluster.node_states().values()) == {"idle"}


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _traces(prefix: str, state: Path) -> list[str]:
    """Whatever of a cluster is on the machine, found without the harness's own bookkeeping."""
    out = []
    if prefix in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout:
        out.append("netns")
    if prefix in subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout:
        out.append("link")
    if prefix in Path("/etc/hosts").read_text():
        out.append("/etc/hosts")
    out += [str(f) for f in Path("/etc/ssh/ssh_config.d").glob("*") if prefix in f.read_text()]
    out += [
        f"pid {p}"
        for p in map(int, filter(str.isdigit, os.listdir("/proc")))
        if str(state) in _cmdline(p) or prefix in _cmdline(p)
    ]
    if state.exists():
        out.append(f"dir {state}")
    return out


CRASH = """
import os, signal, subprocess
from tests.cluster import harness
from tests.cluster.fixtures import cluster_or_skip
from tests.cluster.harness import Cluster
c = Cluster(n_hosts=2).start()
print(c.prefix, c.state, flush=True)
c.popen(["sleep", "300"], host=1, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_teardown_leaves_nothing_after_a_failure_and_a_crash(tmp_path):
    """A crashed run's leftovers go at the next start; a failure inside ``with`` still tears
    everything down: processes, namespaces, links, /etc/hosts lines, ssh config, files."""
    crashed = subprocess.run(
        [sys.executable, "-c", CRASH],
        capture_output=True,
        text=True,
        cwd=Path(__file__).parent.parent,
        timeout=120,
    )
    assert crashed.returncode == -9, crashed.stderr
    crashed_prefix, crashed_state = crashed.stdout.split()
    # the crash left its cluster behind (unless a parallel test process's start cleaned it)
    pids = []
    with pytest.raises(RuntimeError, match="boom"):
        with Cluster(n_hosts=2) as c:
            assert not _traces(crashed_prefix, Path(crashed_state))
            job = c.sbatch(["--nodes", "2", "--output", tmp_path / "o", "--wrap", "srun sleep 300"])
            c.wait_job(job, timeout=30, states={"RUNNING"})
            c.popen(["sleep", "300"], host=0)
            c.popen(["sleep", "300"])
            pids = [*c.pids(0), *c.pids(1), *(p.pid for p in c._daemons.values())]
            assert _traces(c.prefix, c.state)
            raise RuntimeError("boom")
    assert len(pids) > 6
    assert not _traces(c.prefix, c.state)
    assert [p for p in pids if _alive(p)] == []
    assert c.leftovers() == []


def _outcome() -> BaseException:
    """What ``cluster_or_skip`` raises here (a skip or a failure is an exception in pytest),
    caught so that a wrong skip cannot skip this test itself."""
    try:
        with cluster_or_skip(n_hosts=2):
            pass
    except BaseException as e:  # noqa: BLE001  (pytest's Skipped/Failed are BaseExceptions)
        return e
    raise AssertionError("the cluster started although a prerequisite is missing")


def test_a_missing_prerequisite_skips_with_the_fix_and_fails_under_ci(monkeypatch):
    """Never a silent pass: the skip names what is missing and the command that installs it;
    under CI=true (which installs the packages) the same is a failure."""
    monkeypatch.setattr(harness, "BINARIES", (*harness.BINARIES, "no-such-daemon"))
    monkeypatch.delenv("CI", raising=False)
    e = _outcome()
    assert isinstance(e, pytest.skip.Exception), repr(e)
    assert "no-such-daemon" in str(e) and "apt-get install -y slurm-wlm" in str(e)
    monkeypatch.setenv("CI", "true")
    e = _outcome()
    assert isinstance(e, pytest.fail.Exception), repr(e)
    assert "no-such-daemon" in str(e) and "CI=true" in str(e)
    monkeypatch.setattr(harness.os, "geteuid", lambda: 1000)
    e = _outcome()
    assert isinstance(e, pytest.fail.Exception) and "not root" in str(e), repr(e)
