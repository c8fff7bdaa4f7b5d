"""Multi-node for real: two hosts (network namespaces with their own addresses, sharing the
filesystem), a real SLURM cluster and real sshd's (tests/cluster/harness.py), and the launch
files run as a user runs them, with nothing exported by hand.

Every host's hostname resolves to 127.0.0.1, the trap of real nodes: on the code before
megawsd chose the interface itself, gloo bound every rank to loopback and the 2-host job died
after ~2 minutes (`connectFullMesh failed ... remote=[127.0.0.1]`).

Each 2-host run (one rank per host) must give the per-step losses of a one-host run with the
same world size, bit for bit: the same ranks compute the same things; only the wire differs.
The faults (a host lost, a link cut, a preemption) must end every surviving process within a
bounded time with a message naming who stopped answering, leave run.json not "running" and
nothing running on any host; the rerun resumes and ends with the uninterrupted run's losses.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from tests.dist_helpers import free_port
from tests.workers.train_common import (
    cli_command,
    losses,
    prepare_data,
    wait_for_step,
    write_config,
)

pytestmark = [pytest.mark.cluster, pytest.mark.dist]
REPO = Path(__file__).resolve().parent.parent
STEPS = 24
HEARTBEAT_TIMEOUT_S = 15
# How long the survivors of a fault may take to end (documented in docs/multinode.md):
# the heartbeat timeout + one beat + the launcher's teardown.
FAULT_BOUND_S = HEARTBEAT_TIMEOUT_S + 2 + 30


def user_env(c) -> dict[str, str]:
    """What a user's shell has: nothing network-related exported by hand."""
    env = dict(c.env, PYTHONPATH=str(REPO), MEGAWSD_NO_BAR="1", OMP_NUM_THREADS="1")
    for var in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    return env


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("multinode")
    data = prepare_data(tmp_path_factory.getbasetemp() / "train-data")
    cfg = write_config(
        tmp / "run.yaml",
        data,
        steps=STEPS,
        optimizer__type="schedule_free_adamw",
        optimizer__params={"backend": "foreach"},
        deepspeed__zero_stage=2,
        checkpoint__interval=6,
        checkpoint__keep_last=3,
        eval__interval=8,
        logging__progress=False,
        stability__heartbeat_s=2,
        stability__heartbeat_timeout_s=HEARTBEAT_TIMEOUT_S,
    )
    straight = tmp / "straight"  # the one-host reference: 2 ranks on this machine
    env = dict(os.environ, PYTHONPATH=str(REPO), MEGAWSD_NO_BAR="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        cli_command("train", cfg, "--nproc", 2, "--run-dir", straight),
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return tmp, cfg, straight


def per_host(c, cfg, run, hostfile, port, *extra, env=None):
    """`megawsd train --hostfile --no-ssh --node-rank i` started on each host by hand."""
    return [
        c.popen(
            cli_command(
                "train", cfg, "--hostfile", hostfile, "--no-ssh", "--node-rank", i,
                "--master-port", port, "--run-dir", run, *extra,
            ),
            host=i,
            env=env or user_env(c),
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in (0, 1)
    ]  # fmt: skip


def finish(procs, timeout=600) -> list[str]:
    outs = [p.communicate(timeout=timeout)[0] for p in procs]
    return outs


def training_processes(c) -> dict[int, list[str]]:
    """megawsd/DeepSpeed processes still running on each host (the daemons do not count)."""
    out = {}
    for i in (0, 1):
        left = []
        for pid in c.pids(i):
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if any(x in cmd for x in ("megawsd.cli", "megawsd.train", "deepspeed.launcher")):
                left.append(f"{pid}: {cmd[:200]}")
        out[i] = left
    return out


def _why(out: str) -> str:
    """The line of a launcher's output that says why the run ended (for the test's report)."""
    keys = ("stopped answering", "lost contact", "Connection closed", "Connection reset", "Error")
    lines = [x for x in out.splitlines() if any(k in x for k in keys)]
    return lines[0][-300:] if lines else "?"


def run_info(run: Path) -> dict:
    return json.loads((run / "run.json").read_text())


def _sbatch_run(c, setup, name):
    tmp, cfg, _ = setup
    run, out = tmp / name, tmp / f"{name}-%j.out"
    job = c.sbatch(
        ["--nodes", "2", "--output", str(out), str(REPO / "launch/slurm.sbatch"), str(cfg),
         "--run-dir", str(run)],
        cwd=tmp,
        env_extra=user_env(c),
    )  # fmt: skip
    return job, run, Path(str(out).replace("%j", str(job)))


def test_sbatch_on_two_hosts_trains_like_one_host(cluster, setup):
    _, _, straight = setup
    job, run, out = _sbatch_run(cluster, setup, "slurm")
    state = cluster.wait_job(job, timeout=400)
    log = out.read_text()
    assert state == "COMPLETED", log[-6000:]
    assert "GLOO_SOCKET_IFNAME=eth0" in log, log[-3000:]  # each host's choice is logged
    info = run_info(run)
    assert info["status"] == "done" and info["world_size"] == 2
    assert losses(run) == losses(straight)


def test_multinode_sh_over_ssh_trains_like_one_host(cluster, setup):
    tmp, cfg, straight = setup
    run = tmp / "pdsh"
    hostfile = cluster.hostfile(tmp / "hostfile-pdsh", slots=1)
    proc = cluster.run(
        ["bash", str(REPO / "launch/multinode.sh"), str(hostfile), str(cfg), "--run-dir", str(run)],
        host=0,
        env=user_env(cluster),
        cwd=REPO,
        timeout=600,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    assert run_info(run)["status"] == "done"
    assert losses(run) == losses(straight)


def test_one_command_per_host_trains_like_one_host(cluster, setup):
    tmp, cfg, straight = setup
    run = tmp / "per-host"
    hostfile = cluster.hostfile(tmp / "hostfile-per-host", slots=1)
    # no --master-addr: the hostfile's first host is resolved (to its address, not loopback)
    outs = finish(per_host(cluster, cfg, run, hostfile, free_port()))
    assert run_info(run)["status"] == "done", "\n".join(o[-3000:] for o in outs)
    assert losses(run) == losses(straight)


def test_a_loopback_master_for_two_hosts_is_refused_in_seconds(cluster, setup):
    tmp, cfg, _ = setup
    hostfile = cluster.hostfile(tmp / "hostfile-loop", slots=1)
    t0 = time.monotonic()
    proc = cluster.run(
        cli_command("train", cfg, "--hostfile", hostfile, "--no-ssh", "--node-rank", 1,
                    "--master-addr", "127.0.0.1", "--run-dir", tmp / "never"),
        host=1,
        env=user_env(cluster),
        cwd=REPO,
        timeout=120,
    )  # fmt: skip
    took = time.monotonic() - t0
    assert proc.returncode == 2 and took < 30, (took, proc.stderr[-2000:])
    assert "--master-addr = '127.0.0.1' resolves to 127.0.0.1 (loopback)" in proc.stderr
    assert not (tmp / "never").exists()


def _fault_then_resume(c, setup, name, fault, heal):
    """Start a 2-host run, apply ``fault`` after a checkpoint, check how the survivors end,
    ``heal``, rerun the same commands and compare with the straight run. Returns the seconds
    from the fault to the last launcher's exit and the launchers' output."""
    tmp, cfg, straight = setup
    run = tmp / name
    hostfile = c.hostfile(tmp / f"hostfile-{name}", slots=1)
    procs = per_host(c, cfg, run, hostfile, free_port())
    wait_for_step(run, 8, procs[0], timeout=300)  # past the checkpoint at step 6
    t0 = time.monotonic()
    fault()
    outs, ended = ["", ""], [None, None]
    while time.monotonic() - t0 < FAULT_BOUND_S + 60 and None in ended:
        for i, p in enumerate(procs):
            if ended[i] is None and p.poll() is not None:
                ended[i] = time.monotonic() - t0
                outs[i] = p.stdout.read()
        time.sleep(0.2)
    for p in procs:
        if p.poll() is None:
            p.kill()
    took = max(t for t in ended if t is not None) if any(ended) else None
    heal()
    time.sleep(2)
    return took, ended, outs, run


def _resume_and_compare(c, setup, run):
    tmp, cfg, straight = setup
    hostfile = c.hostfile(tmp / f"hostfile-{run.name}-again", slots=1)
    outs = finish(per_host(c, cfg, run, hostfile, free_port()))
    assert run_info(run)["status"] == "done", "\n".join(o[-3000:] for o in outs)
    assert any("resum" in o.lower() for o in outs), outs[0][-2000:]
    assert losses(run) == losses(straight)


def test_a_lost_host_ends_the_run_and_the_rerun_resumes(cluster, setup):
    took, ended, outs, run = _fault_then_resume(
        cluster, setup, "lost", lambda: cluster.kill_host(1), lambda: cluster.restart_host(1)
    )
    assert ended[0] is not None and ended[0] < FAULT_BOUND_S, (ended, outs[0][-3000:])
    assert cluster.hosts[1].addr in outs[0] or "rank 1" in outs[0], outs[0][-3000:]
    assert run_info(run)["status"] == "failed"
    assert training_processes(cluster) == {0: [], 1: []}
    print(f"host lost: host 0 ended {ended[0]:.1f} s after the kill: {_why(outs[0])}")
    _resume_and_compare(cluster, setup, run)


def test_a_partition_ends_both_sides_and_the_rerun_resumes(cluster, setup):
    took, ended, outs, run = _fault_then_resume(
        cluster, setup, "partition", lambda: cluster.link_down(1), lambda: cluster.link_up(1)
    )
    assert None not in ended and took < FAULT_BOUND_S, (ended, outs[0][-3000:], outs[1][-3000:])
    assert "rank 1 on" in outs[0] and "stopped answering" in outs[0], outs[0][-3000:]
    assert "lost contact with the master's host" in outs[1], outs[1][-3000:]
    info = run_info(run)
    assert info["status"] == "failed"
    assert "heartbeat" in info["error"] or "contact" in info["error"], info
    assert training_processes(cluster) == {0: [], 1: []}
    print(f"partition: host 0 ended after {ended[0]:.1f} s, host 1 after {ended[1]:.1f} s")
    print(f"  host 0: {_why(outs[0])}\n  host 1: {_why(outs[1])}")
    _resume_and_compare(cluster, setup, run)


def _wait_for_job_step(c, job: int, run: Path, step: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not (run / "metrics.jsonl").exists() or max(losses(run), default=0) < step:
        assert time.monotonic() < deadline and c.job_state(job) in ("PENDING", "RUNNING")
        time.sleep(0.3)


def test_a_requeued_job_resumes_and_ends_like_an_uninterrupted_run(cluster, setup):
    _, _, straight = setup
    job, run, log = _sbatch_run(cluster, setup, "requeue")
    _wait_for_job_step(cluster, job, run, 8)  # past the checkpoint at step 6
    cluster.requeue(job)  # what a preemption does (start_now: no BeginTime hold in the test)
    state = cluster.wait_job(job, timeout=400)
    assert state == "COMPLETED", log.read_text()[-6000:]
    assert int(cluster.job_info(job).get("Restarts", 0)) == 1
    assert run_info(run)["status"] == "done"
    assert losses(run) == losses(straight)
    assert training_processes(cluster) == {0: [], 1: []}


def test_scancel_with_sigterm_checkpoints_and_a_new_job_resumes(cluster, setup):
    _, _, straight = setup
    job, run, log = _sbatch_run(cluster, setup, "scancel")
    _wait_for_job_step(cluster, job, run, 8)  # past the checkpoint at step 6
    # the steps get TERM (what the batch shell's trap does on the time-limit signal)
    subprocess.run(["scancel", "--signal=TERM", str(job)], env=cluster.env, check=True, timeout=30)
    cluster.wait_job(job, timeout=120)
    info = run_info(run)
    assert info["status"] == "stopped", (info, log.read_text()[-4000:])
    stopped_at = info["step"]
    assert stopped_at in (max(losses(run)), max(losses(run)) - 1) and stopped_at < STEPS
    assert training_processes(cluster) == {0: [], 1: []}
    job2, run2, log2 = _sbatch_run(cluster, setup, "scancel")
    assert run2 == run and cluster.wait_job(job2, timeout=400) == "COMPLETED", log2.read_text()
    assert run_info(run)["status"] == "done"
    assert losses(run) == losses(straight)
