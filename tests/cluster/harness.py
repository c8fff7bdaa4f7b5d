"""N cluster hosts on one machine: network namespaces on a bridge, a real SLURM cluster and sshd.

Why: multi-node launches fail in ways one host cannot show (a hostname that resolves to
127.0.0.1, a peer that vanishes, a link that goes down). This harness gives the tests real
hosts -- each its own network stack and address -- that share the filesystem, as cluster nodes
share home and scratch, with the same daemons a user's cluster runs: munge, slurmctld, one
slurmd per host, one sshd per host. Nothing in it is mocked.

Usage (the API the cluster tests code against)::

    from tests.cluster.harness import Cluster

    with Cluster(n_hosts=2) as c:
        c.hosts[0]            # Host(index, name, addr, netns, ifname, veth)
        c.env                 # os.environ + SLURM_CONF (...): pass to any subprocess
        c.run("hostname -I", host=1)          # CompletedProcess, in host 1's netns
        p = c.popen(["megawsd", "train", ...], host=0)   # Popen, killed at teardown
        job = c.sbatch(["--nodes", "2", "job.sh"], cwd=tmp, env_extra={"X": "1"})
        c.wait_job(job, timeout=60)          # -> final state, e.g. "COMPLETED"
        c.job_state(job), c.job_info(job), c.scontrol("requeue", str(job))
        c.hostfile(tmp / "hostfile", slots=2)
        c.pids(1); c.kill_host(1); c.restart_host(1)     # host lost, and back
        c.link_down(1); c.link_up(1)                     # partition, and healed
        c.cleanup_jobs()                                 # scancel everything, wait
    # here: no daemon, namespace, link, /etc/hosts line or ssh config of it is left

- ``Host.name`` is the host name (in /etc/hosts, what ``ssh``/``pdsh`` take) and the SLURM
  node name; ``addr`` its address on the bridge; ``netns`` its namespace (run anything there
  with ``nsenter --net=/var/run/netns/NETNS``, or ``c.run(..., host=i)``); ``ifname`` the
  interface inside it (``eth0``); ``veth`` the root-side end that ``link_down`` takes down.
- ``run``/``popen`` take a list (exec'd) or a string (``bash -c``); ``host=None`` is the root
  namespace, the "login node" where pytest runs and where slurmctld listens on the bridge.
- Every host's ``hostname`` is this machine's (``vm``, which resolves to 127.0.0.1): the trap
  real nodes set, kept on purpose. ``hostname -I`` / ``SLURMD_NODENAME`` tell hosts apart.
- ``ssh HOST`` and ``pdsh -R ssh -w HOST,HOST`` work from the root namespace and from inside
  every host (key login as root; an ``/etc/ssh/ssh_config.d`` file scoped to these names).
- Slow-to-notice faults are tuned: ``SlurmdTimeout`` 20 s, ``KillWait`` 10 s; change any
  slurm.conf key with ``Cluster(slurm_conf={"KillWait": "30"})``.

Everything is instance scoped: a prefix ``mwc<pid><letter>`` names namespaces, links, host
names, the /etc/hosts block and the ssh config file; a free 10.77.K.0/24 and free ports are
picked under a machine-wide lock, so two test processes can each run a cluster at once. A
start first removes what a crashed earlier run left (its owner pid is gone).

Needs root, ``ip``/``nsenter`` and Debian's ``slurm-wlm munge openssh-server pdsh``; without
them ``Cluster`` raises ``ClusterUnavailable`` saying what is missing and how to get it (the
fixture in ``tests/cluster/fixtures.py`` turns that into a skip, or a failure under CI=true).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

BINARIES = ("slurmctld", "slurmd", "munged", "sshd", "ssh", "ssh-keygen", "pdsh", "ip", "nsenter")
BINARIES += ("sbatch", "scontrol", "sinfo", "squeue", "scancel", "srun")
INSTALL_HINT = (
    "apt-get install -y slurm-wlm munge openssh-server pdsh (Debian/Ubuntu, as root; "
    "`ip` is iproute2, `nsenter` util-linux)"
)
ETC_HOSTS = Path("/etc/hosts")
SSH_CONFIG_DIR = Path("/etc/ssh/ssh_config.d")
NETNS_DIR = Path("/var/run/netns")
LOCK_FILE = Path(tempfile.gettempdir()) / "megawsd-cluster.lock"
PREFIX_RE = re.compile(r"mwc(\d+)[a-z]")
TERMINAL_STATES = frozenset(
    "COMPLETED FAILED CANCELLED TIMEOUT NODE_FAIL PREEMPTED BOOT_FAIL DEADLINE OUT_OF_MEMORY".split()
)
IFNAME = "eth0"
_instances = 0


class ClusterUnavailable(RuntimeError):
    """A prerequisite is missing (not root, a binary, network namespaces): not a harness bug."""


@dataclass(frozen=True)
class Host:
    index: int
    name: str  # host name in /etc/hosts, and the SLURM node name
    addr: str  # its address on the bridge
    netns: str  # network namespace name (/var/run/netns/<netns>)
    ifname: str  # the interface inside the namespace
    veth: str  # the root-namespace end of its link (link_down/link_up)

    @property
    def nsenter(self) -> list[str]:
        return ["nsenter", f"--net={NETNS_DIR / self.netns}"]


def missing_prerequisites() -> list[str]:
    """Why a cluster cannot start here, each with how to fix it; empty when it can."""
    out = []
    if os.geteuid() != 0:
        out.append("not root (network namespaces, /etc/hosts and the daemons need root)")
    missing = [b for b in BINARIES if shutil.which(b) is None]
    if missing:
        out.append(f"missing binaries {', '.join(missing)}: {INSTALL_HINT}")
    return out


def _sh(cmd, check=True, **kw) -> subprocess.CompletedProcess:
    """Run a harness command; a failure names the command and its output."""
    kw.setdefault("timeout", 60)
    p = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if check and p.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} -> {p.returncode}: {p.stderr or p.stdout}")
    return p


@contextlib.contextmanager
def machine_lock():
    """One machine-wide lock around changes to shared state (/etc/hosts, subnets, stale runs)."""
    with open(LOCK_FILE, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def netns_pids(netns: str) -> list[int]:
    """Processes whose network namespace is ``netns`` (``ip netns pids``)."""
    p = _sh(["ip", "netns", "pids", netns], check=False)
    return [int(x) for x in p.stdout.split()]


def kill_netns(netns: str, reap=None, rounds: int = 100) -> None:
    """SIGKILL everything in ``netns`` until nothing is left (children forked meanwhile too);
    ``reap()`` collects the caller's own children, which would otherwise stay as zombies."""
    for _ in range(rounds):
        if reap is not None:
            reap()
        pids = netns_pids(netns)
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)
    raise RuntimeError(f"processes survive SIGKILL in netns {netns}: {netns_pids(netns)}")


def _etc_hosts_without(prefix_re: re.Pattern, keep_alive: bool) -> tuple[str, list[str]]:
    """/etc/hosts with the marker blocks matching ``prefix_re`` removed (only those of dead
    owners when ``keep_alive``); returns the text and the prefixes removed."""
    out, removed, skipping = [], [], None
    for line in ETC_HOSTS.read_text().splitlines(keepends=True):
        m = re.match(r"# megawsd-cluster (\S+) (begin|end)", line)
        if m and m.group(2) == "begin" and prefix_re.fullmatch(m.group(1)):
            owner = PREFIX_RE.fullmatch(m.group(1))
            if not (keep_alive and owner and _pid_alive(int(owner.group(1)))):
                skipping = m.group(1)
                removed.append(skipping)
                continue
        if skipping is not None:
            if m and m.group(2) == "end" and m.group(1) == skipping:
                skipping = None
            continue
        out.append(line)
    return "".join(out), removed


def _write_in_place(path: Path, text: str) -> None:
    """Rewrite in place: /etc/hosts may be a bind mount that a rename cannot replace."""
    with open(path, "r+") as f:
        f.seek(0)
        f.write(text)
        f.truncate()


def clean_stale() -> list[str]:
    """Remove what crashed clusters left (their owner pid is dead); call under machine_lock."""
    cleaned = []
    text, removed = _etc_hosts_without(PREFIX_RE, keep_alive=True)
    if removed:
        _write_in_place(ETC_HOSTS, text)
        cleaned += [f"/etc/hosts block {p}" for p in removed]
    dead = lambda name: (m := PREFIX_RE.match(name)) and not _pid_alive(int(m.group(1)))  # noqa: E731
    for ns in _sh(["ip", "netns", "list"], check=False).stdout.split("\n"):
        name = ns.split(" ")[0]
        if name and dead(name):
            kill_netns(name)
            _sh(["ip", "netns", "del", name], check=False)
            cleaned.append(f"netns {name}")
    for link in _links():
        if dead(link):
            _sh(["ip", "link", "del", link], check=False)
            cleaned.append(f"link {link}")
    for conf in SSH_CONFIG_DIR.glob("megawsd-cluster-*.conf"):
        if dead(conf.stem.removeprefix("megawsd-cluster-")):
            conf.unlink()
            cleaned.append(str(conf))
    for pid, cmd in _processes_matching(r"megawsd-cluster-(mwc\d+[a-z])-"):
        owner = PREFIX_RE.search(cmd)
        if owner and not _pid_alive(int(owner.group(1))):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            cleaned.append(f"process {pid} {cmd[:80]}")
    return cleaned


def _links() -> list[str]:
    out = _sh(["ip", "-o", "link", "show"], check=False).stdout
    return [m.group(1) for m in re.finditer(r"^\d+: ([^:@\s]+)", out, re.M)]


def _processes_matching(pattern: str) -> list[tuple[int, str]]:
    """(pid, command line) of every process whose command line matches ``pattern``."""
    out = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if re.search(pattern, cmd):
            out.append((int(proc.name), cmd))
    return out


def _used_subnets() -> set[int]:
    out = _sh(["ip", "-o", "-4", "addr", "show"], check=False).stdout
    return {int(k) for k in re.findall(r"inet 10\.77\.(\d+)\.", out)}


def slurm_conf(c: Cluster, extra: dict[str, str]) -> str:
    """slurm.conf for ``c``: no cgroups (linuxproc, task/none), one default partition with all
    hosts, per-node paths (%n, the filesystem is shared), final job states kept an hour."""
    s = c.state
    keys = {
        "ClusterName": c.prefix,
        "SlurmctldHost": f"{socket.gethostname().split('.')[0]}({c.bridge_addr})",
        "SlurmctldPort": str(c.ctld_port),
        "SlurmdPort": str(c.slurmd_port),
        "SlurmUser": "root",
        "SlurmdUser": "root",
        "AuthType": "auth/munge",
        "CredType": "cred/munge",
        "AuthInfo": f"socket={c.munge_socket}",
        "StateSaveLocation": f"{s}/slurmctld",
        "SlurmctldPidFile": f"{s}/run/slurmctld.pid",
        "SlurmctldLogFile": f"{s}/log/slurmctld.log",
        "SlurmdSpoolDir": f"{s}/spool/%n",
        "SlurmdPidFile": f"{s}/run/slurmd-%n.pid",
        "SlurmdLogFile": f"{s}/log/slurmd-%n.log",
        "PlugStackConfig": f"{s}/plugstack.conf",
        "ProctrackType": "proctrack/linuxproc",
        "TaskPlugin": "task/none",
        "JobAcctGatherType": "jobacct_gather/none",
        "AccountingStorageType": "accounting_storage/none",
        "JobCompType": "jobcomp/none",
        "SwitchType": "switch/none",
        "MpiDefault": "none",
        "SchedulerType": "sched/backfill",
        "SelectType": "select/cons_tres",
        "SelectTypeParameters": "CR_CPU",
        "ReturnToService": "2",
        "JobRequeue": "1",
        "MinJobAge": "3600",
        "SlurmdTimeout": "20",
        "KillWait": "10",
        "InactiveLimit": "0",
        "MessageTimeout": "10",
        "SlurmctldDebug": "info",
        "SlurmdDebug": "info",
    }
    keys.update(extra)
    lines = [f"{k}={v}" for k, v in keys.items()]
    for h in c.hosts:
        lines.append(f"NodeName={h.name} NodeAddr={h.addr} CPUs={c.cpus} State=UNKNOWN")
    lines.append("PartitionName=main Nodes=ALL Default=YES MaxTime=INFINITE State=UP")
    return "\n".join(lines) + "\n"


def sshd_config(c: Cluster, h: Host) -> str:
    """One sshd per host: its own address and host key, key-only root login."""
    d = c.state / "ssh"
    return f"""ListenAddress {h.addr}
Port 22
HostKey {d}/host_{h.name}
PidFile {c.state}/run/sshd-{h.name}.pid
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
AuthorizedKeysFile {d}/authorized_keys
StrictModes no
UsePAM no
PrintMotd no
Subsystem sftp internal-sftp
"""


def ssh_client_config(c: Cluster) -> str:
    """Plain ``ssh HOST`` (and pdsh, DeepSpeed's runner) for these host names and addresses."""
    names = " ".join([h.name for h in c.hosts] + [h.addr for h in c.hosts])
    return f"""# megawsd cluster test harness {c.prefix} (removed at teardown)
Host {names}
    User root
    IdentityFile {c.state}/ssh/id_ed25519
    IdentitiesOnly yes
    StrictHostKeyChecking no
    UserKnownHostsFile /dev/null
    GlobalKnownHostsFile /dev/null
    BatchMode yes
    LogLevel ERROR
    ConnectTimeout 5
"""


class Cluster:
    """See the module docstring. ``with Cluster(2) as c:`` or ``c.start()`` ... ``c.close()``."""

    def __init__(
        self, n_hosts: int = 2, cpus: int | None = None, slurm_conf=None, keep_state=False
    ):
        global _instances
        self.prefix = f"mwc{os.getpid()}{chr(ord('a') + _instances % 26)}"
        _instances += 1
        self.n_hosts = n_hosts
        self.cpus = cpus or os.cpu_count()
        self.slurm_conf_extra = dict(slurm_conf or {})
        self.keep_state = keep_state
        self.bridge = f"{self.prefix}br"
        self.hosts: list[Host] = []
        self.state: Path | None = None
        self._daemons: dict[str, subprocess.Popen] = {}
        self._popens: list[subprocess.Popen] = []
        self._created: list[str] = []  # what close() must undo, in order of creation
        self.env = dict(os.environ)

    # ---------------------------------------------------------------- start / close

    def __enter__(self) -> Cluster:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> Cluster:
        missing = missing_prerequisites()
        if missing:
            raise ClusterUnavailable("; ".join(missing))
        t0 = time.monotonic()
        try:
            self.state = Path(tempfile.mkdtemp(prefix=f"megawsd-cluster-{self.prefix}-"))
            for sub in ("run", "log", "spool", "slurmctld", "munge", "ssh"):
                (self.state / sub).mkdir()
            with machine_lock():
                self.stale_cleaned = clean_stale()
                self._make_network()
                self._write_etc_hosts()
            self._start_munge()
            self._start_ssh()
            self._start_slurm()
            self.wait_nodes()
            self.wait_ssh()
        except BaseException:
            self.close()
            raise
        self.start_seconds = time.monotonic() - t0
        return self

    def close(self) -> None:
        """Tear everything down; safe to call twice and after a failed start."""
        t0 = time.monotonic()
        errors = []
        for step in (
            self._stop_popens,
            self._kill_hosts,
            self._stop_root_daemons,
            self._remove_network,
            self._remove_files,
        ):
            try:
                step()
            except Exception as e:  # keep tearing down; report at the end
                errors.append(f"{step.__name__}: {e}")
        self.close_seconds = time.monotonic() - t0
        if errors:
            raise RuntimeError(f"cluster {self.prefix} teardown: " + "; ".join(errors))

    def _stop_popens(self) -> None:
        for p in self._popens:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait(10)

    def _kill_hosts(self) -> None:
        for h in self.hosts:
            if (NETNS_DIR / h.netns).exists():
                kill_netns(h.netns, reap=self._reap)

    def _stop_root_daemons(self) -> None:
        for p in self._daemons.values():
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(5)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(5)

    def _remove_network(self) -> None:
        for ns in _sh(["ip", "netns", "list"], check=False).stdout.split("\n"):
            name = ns.split(" ")[0]
            if name.startswith(self.prefix):
                kill_netns(name, reap=self._reap)
                _sh(["ip", "netns", "del", name])
        for link in _links():
            if link.startswith(self.prefix) and link != self.bridge:
                _sh(["ip", "link", "del", link], check=False)
        if self.bridge in _links():
            _sh(["ip", "link", "del", self.bridge])

    def _remove_files(self) -> None:
        with machine_lock():
            text, removed = _etc_hosts_without(re.compile(re.escape(self.prefix)), False)
            if removed:
                _write_in_place(ETC_HOSTS, text)
        self.ssh_config_path.unlink(missing_ok=True)
        if self.state is not None and self.state.exists() and not self.keep_state:
            shutil.rmtree(self.state, ignore_errors=True)

    def _reap(self) -> None:
        """Collect our own killed children, so no zombie of ours stays in a namespace."""
        for p in [*self._daemons.values(), *self._popens]:
            p.poll()

    def leftovers(self) -> list[str]:
        """Anything of this instance still on the machine (empty after a clean close)."""
        out = [
            f"netns {n}"
            for n in _sh(["ip", "netns", "list"]).stdout.split()
            if n.startswith(self.prefix)
        ]
        out += [f"link {n}" for n in _links() if n.startswith(self.prefix)]
        if f"megawsd-cluster {self.prefix} " in ETC_HOSTS.read_text():
            out.append("/etc/hosts block")
        if self.ssh_config_path.exists():
            out.append(str(self.ssh_config_path))
        if self.state is not None:
            out += [
                f"process {pid}: {cmd}"
                for pid, cmd in _processes_matching(re.escape(str(self.state)))
            ]
            if self.state.exists() and not self.keep_state:
                out.append(f"state dir {self.state}")
        out += [f"daemon {n} pid {p.pid}" for n, p in self._daemons.items() if p.poll() is None]
        out += [f"popen pid {p.pid}" for p in self._popens if p.poll() is None]
        return out

    # ---------------------------------------------------------------- network and names

    @property
    def ssh_config_path(self) -> Path:
        return SSH_CONFIG_DIR / f"megawsd-cluster-{self.prefix}.conf"

    def _make_network(self) -> None:
        """The bridge in the root namespace, one namespace per host linked to it by a veth;
        called under machine_lock so two instances never take the same subnet."""
        used = _used_subnets()
        start = os.getpid() % 250
        k = next((k for k in [*range(start, 251), *range(1, start)] if k and k not in used), None)
        if k is None:
            raise RuntimeError("no free 10.77.K.0/24 subnet for the cluster bridge")
        self.subnet = f"10.77.{k}.0/24"
        self.bridge_addr = f"10.77.{k}.254"
        _sh(["ip", "link", "add", self.bridge, "type", "bridge"])
        _sh(["ip", "addr", "add", f"{self.bridge_addr}/24", "dev", self.bridge])
        _sh(["ip", "link", "set", self.bridge, "up"])
        for i in range(self.n_hosts):
            h = Host(
                i,
                f"{self.prefix}-node{i}",
                f"10.77.{k}.{i + 1}",
                f"{self.prefix}h{i}",
                IFNAME,
                f"{self.prefix}v{i}",
            )
            self._make_host_link(h)
            self.hosts.append(h)

    def _make_host_link(self, h: Host) -> None:
        peer = f"{self.prefix}p{h.index}"
        try:
            _sh(["ip", "netns", "add", h.netns])
        except RuntimeError as e:
            raise ClusterUnavailable(f"cannot create a network namespace ({e})") from e
        _sh(["ip", "link", "add", h.veth, "type", "veth", "peer", "name", peer])
        _sh(["ip", "link", "set", peer, "netns", h.netns])
        _sh(["ip", "link", "set", h.veth, "master", self.bridge])
        _sh(["ip", "link", "set", h.veth, "up"])
        inside = [*h.nsenter, "ip"]
        _sh([*inside, "link", "set", "lo", "up"])
        _sh([*inside, "link", "set", peer, "name", h.ifname])
        _sh([*inside, "addr", "add", f"{h.addr}/24", "dev", h.ifname])
        _sh([*inside, "link", "set", h.ifname, "up"])

    def _write_etc_hosts(self) -> None:
        lines = [f"# megawsd-cluster {self.prefix} begin\n"]
        lines += [f"{h.addr} {h.name}\n" for h in self.hosts]
        lines.append(f"{self.bridge_addr} {self.prefix}-login\n")
        lines.append(f"# megawsd-cluster {self.prefix} end\n")
        text = ETC_HOSTS.read_text()
        if text and not text.endswith("\n"):
            text += "\n"
        _write_in_place(ETC_HOSTS, text + "".join(lines))

    # ---------------------------------------------------------------- daemons

    def _daemon(self, name: str, cmd: list[str], host: Host | None = None) -> subprocess.Popen:
        """Start a foreground daemon (in ``host``'s netns), its output in log/<name>.out."""
        if host is not None:
            cmd = [*host.nsenter, *cmd]
        with open(self.state / "log" / f"{name}.out", "ab") as out:
            p = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                env=self.env,
                start_new_session=True,
            )
        if name in self._daemons:  # restarted: keep the old one to reap
            self._popens.append(self._daemons[name])
        self._daemons[name] = p
        return p

    def _start_munge(self) -> None:
        d = self.state / "munge"
        key = d / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        self.munge_socket = d / "munge.socket"
        self._daemon(
            "munged",
            [
                "munged",
                "-F",
                "--force",
                f"--socket={self.munge_socket}",
                f"--key-file={key}",
                f"--pid-file={d}/munged.pid",
                f"--log-file={self.state}/log/munged.log",
                f"--seed-file={d}/munged.seed",
            ],
        )
        self._wait(lambda: self.munge_socket.exists(), 20, "munged's socket", "munged")

    def _start_ssh(self) -> None:
        d = self.state / "ssh"
        _sh(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / "id_ed25519")])
        (d / "authorized_keys").write_text((d / "id_ed25519.pub").read_text())
        for h in self.hosts:
            _sh(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / f"host_{h.name}")])
            (d / f"sshd_{h.name}.conf").write_text(sshd_config(self, h))
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation dir
        self.ssh_config_path.write_text(ssh_client_config(self))
        for h in self.hosts:
            self._start_sshd(h)

    def _start_sshd(self, h: Host) -> None:
        conf = self.state / "ssh" / f"sshd_{h.name}.conf"
        self._daemon(f"sshd-{h.name}", [shutil.which("sshd"), "-D", "-e", "-f", str(conf)], h)

    def _start_slurm(self) -> None:
        self.ctld_port, self.slurmd_port = free_port(), free_port()
        conf = self.state / "slurm.conf"
        (self.state / "plugstack.conf").write_text("")
        conf.write_text(slurm_conf(self, self.slurm_conf_extra))
        self.env["SLURM_CONF"] = str(conf)
        self.conf = conf
        self._daemon("slurmctld", ["slurmctld", "-D", "-f", str(conf)])
        for h in self.hosts:
            (self.state / "spool" / h.name).mkdir()
            self._start_slurmd(h)

    def _start_slurmd(self, h: Host) -> None:
        self._daemon(f"slurmd-{h.name}", ["slurmd", "-D", "-N", h.name, "-f", str(self.conf)], h)

    def _wait(self, ok, timeout: float, what: str, log: str | None = None) -> None:
        """Poll ``ok()`` until true; on timeout name ``what`` and show the daemon's log tail."""
        deadline = time.monotonic() + timeout
        while not ok():
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"cluster {self.prefix}: {what} not ready after {timeout} s"
                    + (f"\n{self.log_tail(log)}" if log else "")
                )
            time.sleep(0.2)

    def log_tail(self, name: str, lines: int = 30) -> str:
        """The last lines a daemon wrote (``slurmctld``, ``slurmd-<host>``, ``sshd-<host>``)."""
        out = []
        for path in sorted((self.state / "log").glob(f"{name}*")):
            out.append(
                f"--- {path}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
            )
        return "\n".join(out)

    def wait_nodes(self, timeout: float = 60) -> None:
        """Until every host's slurmd has registered and its node is idle."""
        self._wait(
            lambda: set(self.node_states().values()) == {"idle"},
            timeout,
            f"SLURM nodes (states {self.node_states()})",
            "slurm",
        )

    def node_states(self) -> dict[str, str]:
        """SLURM node name -> sinfo's state (``idle``, ``allocated``, ``down*``, ...)."""
        p = self.run(["sinfo", "-h", "-N", "-o", "%N %t"], timeout=20)
        return dict(line.split() for line in p.stdout.splitlines() if line.strip())

    def wait_ssh(self, hosts=None, timeout: float = 30) -> None:
        for h in hosts or self.hosts:
            self._wait(
                lambda h=h: self.run(["ssh", h.name, "true"], timeout=15).returncode == 0,
                timeout,
                f"sshd on {h.name}",
                f"sshd-{h.name}",
            )

    # ---------------------------------------------------------------- running things

    def _cmd(self, cmd, host) -> list[str]:
        cmd = ["bash", "-c", cmd] if isinstance(cmd, str) else [str(c) for c in cmd]
        if host is not None:
            h = host if isinstance(host, Host) else self.hosts[host]
            cmd = [*h.nsenter, *cmd]
        return cmd

    def run(self, cmd, host=None, **kw) -> subprocess.CompletedProcess:
        """``subprocess.run`` in ``host``'s netns (index or Host; None: the root namespace),
        with ``self.env``, output captured as text, a 120 s timeout; ``check`` as you pass it."""
        kw.setdefault("env", self.env)
        kw.setdefault("timeout", 120)
        if "stdout" not in kw and "stderr" not in kw:
            kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        return subprocess.run(self._cmd(cmd, host), **kw)

    def popen(self, cmd, host=None, **kw) -> subprocess.Popen:
        """``subprocess.Popen`` like ``run``, in a new session; killed (its group) at teardown."""
        kw.setdefault("env", self.env)
        kw.setdefault("start_new_session", True)
        p = subprocess.Popen(self._cmd(cmd, host), **kw)
        self._popens.append(p)
        return p

    def scontrol(self, *args: str) -> str:
        p = self.run(["scontrol", *args], timeout=30)
        if p.returncode != 0:
            raise RuntimeError(f"scontrol {' '.join(args)} -> {p.returncode}: {p.stderr}")
        return p.stdout

    def sbatch(self, args, cwd=None, env_extra=None) -> int:
        """Submit (``sbatch --parsable ARGS``) from the root namespace; returns the job id."""
        env = {**self.env, **(env_extra or {})}
        p = self.run(["sbatch", "--parsable", *map(str, args)], cwd=cwd, env=env, timeout=30)
        if p.returncode != 0:
            raise RuntimeError(f"sbatch {' '.join(map(str, args))} -> {p.returncode}: {p.stderr}")
        return int(p.stdout.strip().split(";")[0])

    def job_info(self, job: int) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, NodeList, ExitCode, Restarts, Reason, ...)."""
        out = self.scontrol("show", "job", "-o", str(job))
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def job_state(self, job: int) -> str:
        return self.job_info(job)["JobState"]

    def wait_job(self, job: int, timeout: float = 120, states=TERMINAL_STATES) -> str:
        """Until the job's state is in ``states`` (default: any final state); returns it."""
        self._wait(
            lambda: self.job_state(job) in states,
            timeout,
            f"job {job} reaching {sorted(states)} (info {self.job_info(job)})",
            "slurmctld",
        )
        return self.job_state(job)

    def cleanup_jobs(self, timeout: float = 60) -> None:
        """scancel every job of this cluster and wait until none is left pending/running."""
        self.run(["scancel", "--user", "root"], timeout=30)
        self._wait(
            lambda: not self.run(["squeue", "-h"], timeout=20).stdout.strip(),
            timeout,
            "all jobs gone after scancel",
            "slurmctld",
        )

    def hostfile(self, path, slots: int = 1) -> Path:
        """A DeepSpeed/pdsh hostfile of every host: ``NAME slots=N`` per line."""
        path = Path(path)
        path.write_text("".join(f"{h.name} slots={slots}\n" for h in self.hosts))
        return path

    # ---------------------------------------------------------------- faults

    def reset(self, timeout: float = 60) -> None:
        """Back to a clean cluster after a fault test: links up, lost hosts restarted, no
        jobs, every node idle."""
        for i, h in enumerate(self.hosts):
            self.link_up(i)
            if any(self._daemons[f"{d}-{h.name}"].poll() is not None for d in ("slurmd", "sshd")):
                self.kill_host(i)
                self.restart_host(i, timeout)
        self.cleanup_jobs(timeout)
        for name, state in self.node_states().items():
            if state.startswith(("down", "drain", "fail")):
                self.scontrol("update", f"NodeName={name}", "State=RESUME")
        self.wait_nodes(timeout)

    def pids(self, host) -> list[int]:
        """Processes running in ``host``'s network namespace (the host's processes)."""
        h = host if isinstance(host, Host) else self.hosts[host]
        return netns_pids(h.netns)

    def kill_host(self, i: int) -> None:
        """Host lost: SIGKILL every process in host i's netns (slurmd, sshd, ranks)."""
        kill_netns(self.hosts[i].netns, reap=self._reap)

    def restart_host(self, i: int, timeout: float = 60) -> None:
        """The host's daemons back (sshd, slurmd); waits for ssh and its node to respond."""
        h = self.hosts[i]
        self._start_sshd(h)
        self._start_slurmd(h)
        self.wait_ssh([h], timeout)
        self._wait(
            lambda: not self.node_states()[h.name].endswith("*"),
            timeout,
            f"{h.name} responding to slurmctld",
            f"slurmd-{h.name}",
        )

    def link_down(self, i: int) -> None:
        """Partition: host i's link to the bridge goes down (its packets go nowhere)."""
        _sh(["ip", "link", "set", self.hosts[i].veth, "down"])

    def link_up(self, i: int) -> None:
        _sh(["ip", "link", "set", self.hosts[i].veth, "up"])
