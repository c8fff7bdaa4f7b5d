"""Starting ranks: the DeepSpeed launcher from `megawsd train/branch`, or in-process.

`megawsd train CONFIG --nproc N` runs ``python -m deepspeed.launcher.runner --num_gpus N
--module megawsd.train CONFIG ...`` (the ``deepspeed`` command, with the same Python), and
``--hostfile F`` the multi-node form. On machines without CUDA it sets DS_ACCELERATOR=cpu
(DeepSpeed's CPU accelerator, gloo), one OpenMP thread budget per rank, and a free master port
so that several runs on one machine do not collide on DeepSpeed's default 29500.

The ranks must not outlive the `megawsd` process that started them (a `kill -9` of it, a
closed terminal): the launcher gets a parent-death signal (Linux ``PR_SET_PDEATHSIG``), and
since DeepSpeed's own launch.py under it would survive that, every rank also watches the
`megawsd` pid (:func:`watch_parent`) and stops when it is gone: SIGTERM to itself (finish
the step, checkpoint, exit, as for a preemption), then a hard exit after a grace period.
"""

from __future__ import annotations

import ctypes
import datetime
import ipaddress
import json
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from megawsd.errors import ConfigError
from megawsd.train.netif import choose_interface, interface_for, resolve

log = logging.getLogger(__name__)

LAUNCHED_VARS = ("RANK", "LOCAL_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK")
# Set by `megawsd train/branch` for the ranks it launches: whom to watch (watch_parent).
PARENT_PID_ENV, PARENT_HOST_ENV = "MEGAWSD_PARENT_PID", "MEGAWSD_PARENT_HOST"
ORPHAN_GRACE_ENV = "MEGAWSD_ORPHAN_GRACE_S"
ORPHAN_GRACE_S = 120.0  # to finish the step and checkpoint once the parent is gone
_PR_SET_PDEATHSIG = 1


def already_launched() -> bool:
    """Inside a rank started by deepspeed, torchrun, mpirun or srun+launcher."""
    return any(v in os.environ for v in LAUNCHED_VARS)


def cpu_only() -> bool:
    import torch

    return not torch.cuda.is_available()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(timeout_s: float | None = None) -> int:
    """Join the process group (a world of one when nothing launched us); returns the rank.

    ``timeout_s`` bounds every collective: a rank whose peer died or hangs raises after it
    instead of waiting forever (stability.dist_timeout_s; the DeepSpeed launcher then
    terminates the other ranks)."""
    if not already_launched():
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    if cpu_only():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    choose_interface(os.environ, cuda=not cpu_only())  # not the loopback trap of real nodes
    from megawsd.train import jit_ops  # torch: kept lazy like the rest of this module

    jit_ops.guard_rank()  # DeepSpeed's shm op loads in init_distributed: never on a stale lock
    import deepspeed
    import torch.distributed as dist

    if not dist.is_initialized():
        kwargs = {}
        if timeout_s is not None:
            kwargs["timeout"] = datetime.timedelta(seconds=timeout_s)
        deepspeed.init_distributed(dist_backend="gloo" if cpu_only() else None, **kwargs)
    return dist.get_rank()


def launch_env(nproc_per_node: int) -> dict[str, str]:
    env = dict(os.environ)
    if cpu_only():
        env.setdefault("DS_ACCELERATOR", "cpu")
        threads = max(1, (os.cpu_count() or 1) // max(nproc_per_node, 1))
        env.setdefault("OMP_NUM_THREADS", str(threads))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env[PARENT_PID_ENV], env[PARENT_HOST_ENV] = str(os.getpid()), host_identity()
    # the package must be importable in the ranks even when run from a source checkout
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def host_identity() -> str:
    """This host, for "is the launching process on my host": the hostname, the boot id and the
    network namespace (two nodes may share a hostname, as containers and test hosts do)."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        netns = os.stat("/proc/self/ns/net").st_ino
    except OSError:
        boot, netns = "", 0
    return f"{socket.gethostname()}/{boot}/{netns}"


# What the ranks on the other hosts need from the launching environment. DeepSpeed's pdsh
# runner exports only PYTHON*, MLFLOW*, MV2*, UCX* (and the accelerator's, NCCL* on CUDA) plus
# a .deepspeed_env file; without these the remote ranks would pick another accelerator, thread
# count or extensions cache than the local ones. GLOO_/NCCL_SOCKET_IFNAME go only when the user
# set them: megawsd picks each host's own interface in the rank (megawsd.train.netif).
REMOTE_ENV_PREFIXES = (
    "MEGAWSD_",
    "DS_ACCELERATOR",
    "OMP_NUM_THREADS",
    "TORCH_EXTENSIONS_DIR",
    "TOKENIZERS_PARALLELISM",
    "TRITON_",
    "HF_",
    "TRANSFORMERS_",
    "GLOO_",
    "NCCL_",
    "TORCH_DISTRIBUTED_DEBUG",
)
# pdsh's ssh sessions give up on a host that stopped answering (a cut link) after ~30 s
# instead of waiting for the kernel's TCP timeout (hours).
SSH_KEEPALIVE = "-o ServerAliveInterval=10 -o ServerAliveCountMax=3"


def remote_env_file(env: dict[str, str], directory: Path) -> Path:
    """A .deepspeed_env for DeepSpeed's multi-node runner (DS_ENV_FILE): the user's own file
    first (DS_ENV_FILE, ~/.deepspeed_env, ./.deepspeed_env, which our setting would otherwise
    hide), then the variables in REMOTE_ENV_PREFIXES."""
    lines: list[str] = []
    for user_file in _user_env_files(env):
        lines += [x.rstrip("\n") for x in user_file.read_text().splitlines() if "=" in x]
    for key, value in sorted(env.items()):
        if key.startswith(REMOTE_ENV_PREFIXES) and "\n" not in value:
            lines.append(f"{key}={value}")
    path = directory / f"megawsd-deepspeed-env-{os.getpid()}"
    path.write_text("\n".join(lines) + "\n")
    return path


def _user_env_files(env: dict[str, str]) -> list[Path]:
    name = env.get("DS_ENV_FILE", ".deepspeed_env")
    found = [Path(d).expanduser() / name for d in ("~", ".")]
    return [p for i, p in enumerate(found) if p.is_file() and p not in found[:i]]


def multinode_env(env: dict[str, str], directory: Path) -> dict[str, str]:
    """The launching environment of an ssh (pdsh) launch: remote env file and ssh keepalive."""
    env = dict(env)
    env["DS_ENV_FILE"] = str(remote_env_file(env, directory))
    ssh_args = env.get("PDSH_SSH_ARGS_APPEND", "")
    if "ServerAlive" not in ssh_args:
        env["PDSH_SSH_ARGS_APPEND"] = f"{ssh_args} {SSH_KEEPALIVE}".strip()
    return env


def hostfile_hosts(hostfile: str | Path) -> list[str]:
    """The host names of a DeepSpeed hostfile, in order (``host slots=N`` lines, # comments)."""
    hosts = []
    for line in Path(hostfile).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            hosts.append(line.split()[0])
    return hosts


def master_address(
    hostfile: str | Path, given: str | None, no_ssh: bool
) -> tuple[str | None, bool]:
    """The master address of a hostfile launch, and whether every host of the hostfile is this
    machine (several "nodes" on one host, where loopback is right).

    Given: as given, but a loopback master for hosts that are other machines is refused (their
    ranks would connect to themselves). Over ssh without one: left to DeepSpeed's runner (``ssh
    FIRST_HOST hostname -I``). Without ssh DeepSpeed would still try ssh, so the first host's
    name is resolved here, and refused when it names loopback (the first host itself, on a
    node whose /etc/hosts maps its own name to 127.0.1.1)."""
    hosts = hostfile_hosts(hostfile)
    if len(hosts) < 2:
        return given, True
    local = all(is_this_machine(h) for h in hosts)
    if given is None and not no_ssh:
        return None, local
    addr = resolve(given or hosts[0])
    if ipaddress.ip_address(addr).is_loopback and not local:
        what = (
            f"--master-addr = {given!r}"
            if given
            else (f"--master-addr: not given, and the hostfile's first host {hosts[0]!r}")
        )
        raise ConfigError(
            f"{what} resolves to {addr} (loopback) on {socket.gethostname()}, but the "
            f"hostfile's hosts {', '.join(hosts)} are not all this machine: their ranks could "
            "not reach it. Give --master-addr the first host's address on the network the "
            "hosts share, the same on every host"
        )
    return (given or addr), local


def is_this_machine(host: str) -> bool:
    """``host`` resolves to loopback or to an address of one of this host's interfaces."""
    try:
        addr = resolve(host)
    except ConfigError:
        return False
    return ipaddress.ip_address(addr).is_loopback or interface_for(addr) is not None


def launcher_command(
    module_args: list[str],
    *,
    nproc: int | None = None,
    hostfile: str | None = None,
    master_port: int | None = None,
    master_addr: str | None = None,
    node_rank: int | None = None,
    no_ssh: bool = False,
    extra: list[str] | None = None,
) -> list[str]:
    """The `deepspeed` command line that starts `python -m megawsd.train ...` on every rank."""
    cmd = [sys.executable, "-u", "-m", "deepspeed.launcher.runner"]
    if hostfile:
        cmd += ["--hostfile", str(hostfile)]
        if nproc:
            cmd += ["--num_gpus", str(nproc)]
    else:
        cmd += ["--num_gpus", str(nproc or 1)]
    cmd += ["--master_port", str(master_port or free_port())]
    if master_addr:
        cmd += ["--master_addr", master_addr]
    if no_ssh:
        cmd += ["--no_ssh", "--node_rank", str(node_rank or 0)]
    cmd += list(extra or [])
    cmd += ["--module", "megawsd.train", *module_args]
    return cmd


def run_launcher(cmd: list[str], env: dict[str, str], status_file: Path | None = None) -> int:
    """Run the launcher, forwarding SIGTERM/SIGINT to every rank (preemption).

    The signal goes to the ranks only (the `megawsd.train` processes under the launcher):
    DeepSpeed's launch.py, if signalled itself, terminates its ranks and SIGKILLs them 30 s
    later, too short for a large checkpoint. The ranks finish their step, checkpoint and exit
    0, and the launcher then exits 0 too. The outcome is also read from run.json: "stopped"
    after a signal is a clean exit whatever the launcher returned.
    """
    log.info("launching: %s", " ".join(cmd))
    linux = sys.platform.startswith("linux")
    proc = subprocess.Popen(
        cmd,
        env=env,
        start_new_session=True,
        preexec_fn=_die_with_parent(os.getpid()) if linux else None,
    )
    signalled = []

    def forward(signum, frame):
        signalled.append(signum)
        ranks = _rank_processes(proc.pid)
        try:
            if ranks:
                for p in ranks:
                    p.send_signal(signal.SIGTERM)
            else:  # not spawned yet: stop the whole launch
                os.killpg(proc.pid, signal.SIGTERM)
        except (ProcessLookupError, OSError):
            pass

    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        rc = proc.wait()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        if "--master_port" in cmd:
            remove_shm_buffers(int(cmd[cmd.index("--master_port") + 1]))
    if signalled and status_file is not None and status_file.exists():
        status = json.loads(status_file.read_text()).get("status")
        if status in ("stopped", "done"):
            log.info(
                "stopped cleanly after %s; resume with the same command",
                signal.Signals(signalled[0]).name,
            )
            return 0
    return rc


def shm_buffers(port: int | str = "*") -> list[Path]:
    """The /dev/shm buffers of DeepSpeed's CPU shm allreduce for ranks that used ``port``
    (this user's; ``"*"``: every port). Named by ``ops/csrc/cpu/comm/shm.cpp``."""
    return sorted(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_*"))


def remove_shm_buffers(port: int) -> int:
    """Delete the shared-memory buffers DeepSpeed's CPU communication backend left for the
    ranks that used ``port``; returns how many.

    DeepSpeed 0.19.8's shm allreduce (``ops/csrc/cpu/comm/shm.cpp``) creates
    ``/dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>`` (tens of MB each) and
    never unlinks it: without this, every multi-rank CPU run would leave them behind until
    /dev/shm fills memory. Called once the ranks have exited."""
    removed = 0
    for path in shm_buffers(port):
        try:
            path.unlink()
            removed += 1
        except OSError:
            pass
    return removed


def _rank_processes(pid: int) -> list:
    import psutil

    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []
    out = []
    for c in children:
        try:
            if "megawsd.train" in c.cmdline() and "deepspeed.launcher" not in " ".join(c.cmdline()):
                out.append(c)
        except psutil.Error:
            continue
    return out


# -- no orphaned ranks ------------------------------------------------------------------------


def _die_with_parent(parent: int):
    """preexec_fn: SIGTERM this child when its parent dies (Linux prctl; runs after fork)."""

    def preexec() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        except (OSError, AttributeError):
            return
        if os.getppid() != parent:  # the parent died before prctl took effect
            os.kill(os.getpid(), signal.SIGTERM)

    return preexec


def _wait_for_exit(pid: int, poll_s: float = 1.0) -> None:
    """Block until process ``pid`` is gone (a pidfd where the kernel has them, else polling)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    except (AttributeError, OSError):
        fd = None
    if fd is not None:
        try:
            select.select([fd], [], [])  # readable once the process has exited
        finally:
            os.close(fd)
        return
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        except PermissionError:
            pass
        time.sleep(poll_s)


def watch_parent() -> threading.Thread | None:
    """In a rank launched by `megawsd train/branch`: stop when that `megawsd` process dies.

    First SIGTERM to this rank (the loop finishes the step, every rank agrees to stop,
    checkpoints and exits 0, so a rerun resumes), then, if the rank is still there after
    ``MEGAWSD_ORPHAN_GRACE_S`` (stuck before the loop or in a collective), a hard exit.
    Ranks on other hosts (the parent's pid means nothing there) are not watched.
    """
    pid = os.environ.get(PARENT_PID_ENV)
    if not pid or os.environ.get(PARENT_HOST_ENV) != host_identity():
        return None
    grace = float(os.environ.get(ORPHAN_GRACE_ENV, ORPHAN_GRACE_S))

    def watch() -> None:
        _wait_for_exit(int(pid))
        log.warning(
            "the megawsd process that launched this rank (pid %s) is gone: stopping "
            "(checkpoint, then exit; hard exit in %.0f s)",
            pid,
            grace,
        )
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(grace)
        log.error("still running %.0f s after the launching process died: exiting", grace)
        os._exit(1)

    t = threading.Thread(target=watch, daemon=True, name="megawsd-parent-watch")
    t.start()
    return t
