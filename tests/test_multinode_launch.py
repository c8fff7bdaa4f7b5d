"""The multi-host parts of launching that need no cluster: which interface a rank binds to,
the master address of a hostfile launch, what the other hosts' ranks inherit, and the
heartbeat that notices a lost host. The same paths run across real hosts in
tests/test_multinode_cluster.py."""

from __future__ import annotations

import json
import time

import psutil
import pytest
import torch.distributed as dist

from megawsd.errors import ConfigError
from megawsd.train import launcher, netif
from megawsd.train.heartbeat import Heartbeat
from tests.dist_helpers import free_port


def _non_loopback() -> netif.Interface | None:
    for name, addrs in psutil.net_if_addrs().items():
        for a in addrs:
            if a.family.name == "AF_INET" and not a.address.startswith("127."):
                return netif.Interface(name, a.address)
    return None


def test_hosts_in_job_reads_the_launchers_variables():
    assert netif.hosts_in_job({"CROSS_SIZE": "3", "WORLD_SIZE": "6"}) == 3
    assert netif.hosts_in_job({"WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4"}) == 2
    assert netif.hosts_in_job({"WORLD_SIZE": "2", "LOCAL_SIZE": "2"}) == 1
    assert netif.hosts_in_job({}) == 1


def test_a_multi_host_job_whose_master_is_loopback_is_refused_at_once():
    env = {"MASTER_ADDR": "127.0.0.1", "CROSS_SIZE": "2", "WORLD_SIZE": "2"}
    with pytest.raises(ConfigError) as err:
        netif.choose_interface(env)
    msg = str(err.value)
    assert "MASTER_ADDR = '127.0.0.1'" in msg and "GLOO_SOCKET_IFNAME" in msg
    assert "--master-addr" in msg and "GLOO_SOCKET_IFNAME" not in env


def test_one_host_or_hosts_on_this_machine_keep_loopback():
    one = {"MASTER_ADDR": "127.0.0.1", "WORLD_SIZE": "2", "LOCAL_SIZE": "2"}
    assert netif.choose_interface(one) is None and "GLOO_SOCKET_IFNAME" not in one
    sim = {"MASTER_ADDR": "127.0.0.1", "CROSS_SIZE": "2", netif.HOSTS_LOCAL_ENV: "1"}
    assert netif.choose_interface(sim) is None


def test_the_users_interface_always_wins():
    env = {"MASTER_ADDR": "127.0.0.1", "CROSS_SIZE": "2", "GLOO_SOCKET_IFNAME": "lo"}
    assert netif.choose_interface(env) == "lo" and env["GLOO_SOCKET_IFNAME"] == "lo"


def test_the_interface_that_routes_to_the_master_is_exported():
    iface = _non_loopback()
    if iface is None:
        pytest.skip("this machine has no non-loopback IPv4 interface to route to")
    env = {"MASTER_ADDR": iface.address, "CROSS_SIZE": "2"}
    assert netif.choose_interface(env, cuda=True) == iface.name
    assert env["GLOO_SOCKET_IFNAME"] == env["NCCL_SOCKET_IFNAME"] == iface.name


def test_master_address_of_a_hostfile(tmp_path):
    hf = tmp_path / "hosts"
    hf.write_text("# two nodes\nlocalhost slots=1\n127.0.0.1 slots=2  # same machine\n")
    assert launcher.hostfile_hosts(hf) == ["localhost", "127.0.0.1"]
    assert launcher.master_address(hf, None, no_ssh=True) == ("127.0.0.1", True)
    assert launcher.master_address(hf, "127.0.0.1", no_ssh=True) == ("127.0.0.1", True)
    iface = _non_loopback()
    if iface is None:
        pytest.skip("no non-loopback interface for a second host")
    far = tmp_path / "far"
    far.write_text("localhost slots=1\n192.0.2.77 slots=1\n")  # TEST-NET: never this machine
    with pytest.raises(ConfigError, match="--master-addr = '127.0.0.1' resolves to 127.0.0.1"):
        launcher.master_address(far, "127.0.0.1", no_ssh=True)
    with pytest.raises(ConfigError, match="first host 'localhost'"):
        launcher.master_address(far, None, no_ssh=True)
    assert launcher.master_address(far, None, no_ssh=False) == (None, False)


def test_the_other_hosts_ranks_get_the_launchers_settings(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / ".deepspeed_env").write_text("MY_VAR=1\n")
    env = {
        "DS_ACCELERATOR": "cpu",
        "OMP_NUM_THREADS": "4",
        "MEGAWSD_PARENT_PID": "12",
        "TORCH_EXTENSIONS_DIR": "/shared/ext",
        "SECRET_TOKEN": "x",
        "PDSH_SSH_ARGS_APPEND": "-p 2222",
    }
    out = launcher.multinode_env(env, tmp_path)
    lines = open(out["DS_ENV_FILE"]).read().splitlines()
    assert lines[0] == "MY_VAR=1"  # the user's own file is kept
    assert {"DS_ACCELERATOR=cpu", "OMP_NUM_THREADS=4", "TORCH_EXTENSIONS_DIR=/shared/ext"} <= set(
        lines
    )
    assert not any(x.startswith("SECRET_TOKEN") for x in lines)
    assert out["PDSH_SSH_ARGS_APPEND"].startswith("-p 2222 ")
    assert "ServerAliveInterval" in out["PDSH_SSH_ARGS_APPEND"]


def test_host_identity_tells_network_namespaces_apart():
    ident = launcher.host_identity()
    assert ident.count("/") == 2 and ident.split("/")[2] != "0"


# -- heartbeat ---------------------------------------------------------------------------------


@pytest.fixture
def store(monkeypatch):
    port = free_port()
    server = dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    yield server


def _beats(run, world=2, timeout=1.5):
    return [
        Heartbeat(r, world, run, interval_s=0.2, timeout_s=timeout, exit_on_loss=False).start()
        for r in range(world)
    ]


def _wait(pred, limit=20.0):
    t0 = time.time()
    while time.time() - t0 < limit and not pred():
        time.sleep(0.1)
    return pred()


def test_a_rank_that_stops_answering_is_named_and_the_run_marked_failed(tmp_path, store):
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"status": "running", "step": 7}))
    r0, r1 = _beats(run)
    r1._stop.set()  # rank 1 goes silent without saying goodbye (its host is gone)
    assert _wait(lambda: r0.lost is not None)
    assert "rank 1 on" in r0.lost and "no heartbeat for 2 s" in r0.lost
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "failed" and "rank 1" in info["error"] and info["step"] == 7
    r0.stop()


def test_a_rank_that_says_goodbye_is_not_taken_for_lost(tmp_path, store):
    r0, r1 = _beats(tmp_path)
    r1.stop()
    time.sleep(2.5)
    assert r0.lost is None and r1.lost is None
    r0.stop()


def test_a_rank_that_loses_the_masters_store_stops(tmp_path, monkeypatch):
    port = free_port()
    server = dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    r1 = Heartbeat(1, 2, tmp_path, interval_s=0.2, timeout_s=1.5, exit_on_loss=False).start()
    del server  # rank 0's process, which serves the store, is gone
    assert _wait(lambda: r1.lost is not None)
    assert r1.lost.startswith(f"lost contact with the master's host (127.0.0.1:{port})")
    assert json.loads((tmp_path / "run.json").read_text())["status"] == "failed"


def test_silence_after_the_run_ended_is_not_a_failure(tmp_path, store):
    (tmp_path / "run.json").write_text(json.dumps({"status": "done", "step": 9}))
    r0, r1 = _beats(tmp_path)
    r1._stop.set()
    assert _wait(lambda: r0.lost is not None)
    assert json.loads((tmp_path / "run.json").read_text())["status"] == "done"
    r0.stop()


class _HungStore:
    """A store whose calls never return, as on a cut link (TCP retransmits for minutes)."""

    def add(self, key, value):
        time.sleep(3600)


def test_a_store_that_stops_answering_is_noticed_without_waiting_on_it(tmp_path, store):
    r1 = Heartbeat(1, 2, tmp_path, interval_s=0.2, timeout_s=1.5, exit_on_loss=False).start()
    r1._store = _HungStore()
    assert _wait(lambda: r1.lost is not None, limit=10)
    assert "the rendezvous store has not answered for 2 s" in r1.lost
