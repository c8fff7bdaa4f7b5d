"""Which network interface a rank's collectives bind to, chosen so that other hosts reach it.

Gloo (and NCCL's bootstrap) bind to the address the machine's *hostname* resolves to unless
``GLOO_SOCKET_IFNAME`` / ``NCCL_SOCKET_IFNAME`` name an interface. On many real nodes that
name resolves to 127.0.0.1 or 127.0.1.1 (Debian writes the latter into /etc/hosts), so every
rank tells its peers to connect to loopback and a two-host job dies two minutes later with
``Gloo connectFullMesh failed ... remote=[127.0.0.1]``. torch has no option for "the interface
that reaches the master", so it is worked out here, once per rank, before the process group
exists:

- a variable the user set always wins (it is only checked: loopback on a multi-host job is
  refused);
- otherwise the interface whose address the kernel would use to reach ``MASTER_ADDR`` (a UDP
  ``connect`` sends nothing; ``getsockname`` then names the source address) is exported, and
  the choice is logged;
- a multi-host job that would still end up on loopback (``MASTER_ADDR`` itself resolves to a
  loopback address, say) fails at once with an error naming the variable to set, instead of a
  timeout minutes later.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import socket
from dataclasses import dataclass

from megawsd.errors import ConfigError

log = logging.getLogger(__name__)

# The variables torch's gloo and NCCL read (GLOO_SOCKET_IFNAME also accepts a comma list).
GLOO_VAR, NCCL_VAR = "GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"
# Set by `megawsd train --hostfile` when every host of the hostfile is this machine.
HOSTS_LOCAL_ENV = "MEGAWSD_HOSTS_LOCAL"


@dataclass(frozen=True)
class Interface:
    name: str
    address: str

    @property
    def loopback(self) -> bool:
        return ipaddress.ip_address(self.address).is_loopback


def hosts_in_job(env: os._Environ | dict = os.environ) -> int:
    """How many hosts the job spans: DeepSpeed's launcher sets CROSS_SIZE (nodes); torchrun
    sets LOCAL_WORLD_SIZE; else WORLD_SIZE / LOCAL_SIZE."""
    if env.get("CROSS_SIZE"):
        return int(env["CROSS_SIZE"])
    world = int(env.get("WORLD_SIZE", "1"))
    local = int(env.get("LOCAL_SIZE") or env.get("LOCAL_WORLD_SIZE") or world)
    return max(1, -(-world // max(local, 1)))


def resolve(host: str) -> str:
    """``host`` (a name or an address) as an IPv4/IPv6 address string."""
    try:
        return socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)[0][4][0]
    except socket.gaierror as err:
        raise ConfigError(
            f"MASTER_ADDR = {host!r}: does not resolve on {socket.gethostname()} ({err}); give "
            "--master-addr an address or a name every host can resolve"
        ) from None


def source_address(dest: str) -> str:
    """The local address the kernel picks to reach ``dest`` (no packet is sent)."""
    family = socket.AF_INET6 if ":" in dest else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.connect((dest, 9))
        return s.getsockname()[0]


def interface_for(address: str) -> Interface | None:
    """The interface that holds ``address``."""
    import psutil  # DeepSpeed's own dependency; lists interfaces portably

    want = ipaddress.ip_address(address)
    for name, addrs in psutil.net_if_addrs().items():
        for a in addrs:
            if a.family not in (socket.AF_INET, socket.AF_INET6):
                continue
            try:
                if ipaddress.ip_address(a.address.split("%")[0]) == want:
                    return Interface(name, address)
            except ValueError:
                continue
    return None


def route_to(master: str) -> Interface:
    """The interface this host uses to reach ``master`` (a name or an address)."""
    dest = resolve(master)
    src = source_address(dest)
    found = interface_for(src)
    if found is None:  # an address on no listed interface: report it as it is
        return Interface("?", src)
    return found


def choose_interface(env: os._Environ | dict = os.environ, *, cuda: bool = False) -> str | None:
    """Export the interface that reaches MASTER_ADDR for gloo (and NCCL with ``cuda``) unless
    the user set one; refuse a multi-host job on loopback. Returns the interface name used."""
    nhosts = hosts_in_job(env)
    master = env.get("MASTER_ADDR")
    names = [GLOO_VAR] + ([NCCL_VAR] if cuda else [])
    user = {v: env[v] for v in names if env.get(v)}
    if user:  # the user's setting always wins
        log.info("network: %s (set by you)", ", ".join(f"{k}={v}" for k, v in user.items()))
        return next(iter(user.values()))
    if not master:
        return None
    iface = route_to(master)
    if iface.loopback:
        if nhosts > 1 and env.get(HOSTS_LOCAL_ENV) != "1":
            raise ConfigError(
                f"MASTER_ADDR = {master!r} resolves to {resolve(master)} on "
                f"{socket.gethostname()}, a loopback address, but this job spans {nhosts} hosts: "
                "the other hosts cannot reach it. Give --master-addr the first host's address on "
                "the network the hosts share (or a name that resolves to it there), or set "
                f"{GLOO_VAR} (NCCL: {NCCL_VAR}) to that network's interface (`ip -br addr`); "
                f"{GLOO_VAR}=lo if all the hosts really are this one machine"
            )
        return None  # one host: loopback is right, nothing to set
    if iface.name == "?":
        log.warning(
            "network: no interface holds %s (the route to MASTER_ADDR %s); leaving %s unset",
            iface.address,
            master,
            GLOO_VAR,
        )
        return None
    for var in names:
        env[var] = iface.name
    log.info(
        "network: %s=%s (%s, the route to MASTER_ADDR %s); set %s yourself to override",
        " ".join(names),
        iface.name,
        iface.address,
        master,
        GLOO_VAR,
    )
    return iface.name


def main(argv: list[str] | None = None) -> int:
    """``python -m megawsd.train.netif HOST``: this host's address on the way to HOST (what
    launch/slurm.sbatch gives as the master address: the first node's address that the second
    node reaches, never the loopback its own name may resolve to)."""
    parser = argparse.ArgumentParser(
        prog="python -m megawsd.train.netif",
        description="Print this host's address on the route to HOST.",
    )
    parser.add_argument("host", help="a host name or address the printed address must reach")
    args = parser.parse_args(argv)
    try:
        print(source_address(resolve(args.host)))
    except ConfigError as err:
        parser.error(str(err))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
