"""JIT-built ops never hang a launch (issue #22 item 4, issue #21 item 11).

- a build killed mid-way leaves torch's ``lock``: plain torch then waits forever (shown, in a
  subprocess, by where it blocks), megawsd's load removes it with a warning and completes;
- a live holder is waited for with its pid named, then a bounded error naming the file;
- the cache is keyed by the environment, and a user's TORCH_EXTENSIONS_DIR wins;
- `megawsd train` builds what the config needs before the ranks start, and says so;
- the torch internals this relies on (the FileBaton at ``<build_dir>/lock``, taken on every
  load) are pinned.

A tiny C++ file (no torch headers: one function) stands in for the real ops; it builds in
about a second.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest
from torch.utils import cpp_extension, file_baton

from megawsd.commands import train as train_cmd
from megawsd.kernels import jit, sf_adamw_cpu
from megawsd.train import jit_ops, launcher
from megawsd.train.config import load_config

REPO = Path(__file__).resolve().parent.parent
SOURCE = "int megawsd_jit_probe() { return 42; }\n"


@pytest.fixture
def root(tmp_path, monkeypatch):
    """A private TORCH_EXTENSIONS_DIR, with the C++ probe's source next to it."""
    ext = tmp_path / "ext"
    monkeypatch.setenv(jit.ENV_VAR, str(ext))
    (tmp_path / "probe.cpp").write_text(SOURCE)
    return ext


@pytest.fixture
def name():
    """A fresh op name per test: torch versions a name loaded twice in one process from
    two build directories (``<name>_v1``)."""
    return f"megawsd_jit_probe_{uuid.uuid4().hex[:8]}"


def _env(root: Path) -> dict[str, str]:
    return {**os.environ, jit.ENV_VAR: str(root), "PYTHONPATH": str(REPO)}


def _wait_for(path: Path, proc: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + 300  # a safety net for a loaded machine, not a measurement
    while not path.exists():
        assert proc.poll() is None, f"{what} exited early: {proc.communicate()}"
        assert time.monotonic() < deadline, f"{what}: {path} never appeared"
        time.sleep(0.05)


def _hold(path: Path) -> subprocess.Popen:
    """A process holding ``path`` as torch's FileBaton does (O_EXCL, fd kept open)."""
    code = "import os,sys,time; os.open(sys.argv[1], os.O_CREAT|os.O_EXCL); time.sleep(600)"
    path.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([sys.executable, "-c", code, str(path)])
    _wait_for(path, proc, "the lock holder")
    return proc


def _plant_stale(path: Path) -> None:
    """torch's lock left by a holder killed with SIGKILL."""
    proc = _hold(path)
    while not jit.lock_holders(path)[0]:  # the fd is in /proc once os.open returned
        time.sleep(0.01)
    proc.kill()
    proc.wait()


# -- a build killed mid-way ------------------------------------------------------------------

_KILLED_BUILD = """
import sys, time
from torch.utils import cpp_extension
from megawsd.kernels import jit
# the compiler step never ends: the process is killed while it holds the build lock
cpp_extension._write_ninja_file_and_build_library = lambda **kw: time.sleep(600)
jit.load_extension({name!r}, [{src!r}], what="the probe", minutes="1 s", is_python_module=False)
"""

_OLD_LOAD = """
import sys
from torch.utils import cpp_extension, file_baton
wait = file_baton.FileBaton.wait
def traced(self):
    print("WAITING", self.lock_file_path, flush=True)
    wait(self)
file_baton.FileBaton.wait = traced
cpp_extension.load({name!r}, [{src!r}], is_python_module=False)
print("LOADED", flush=True)
"""


def test_a_build_killed_midway_does_not_hang_the_next_load(root, name, caplog):
    src = str(root.parent / "probe.cpp")
    lock = root / name / jit.TORCH_LOCK
    code = _KILLED_BUILD.format(name=name, src=src)
    build = subprocess.Popen([sys.executable, "-c", code], env=_env(root))
    _wait_for(lock, build, "the build")
    build.send_signal(signal.SIGKILL)
    build.wait()
    assert lock.exists()

    # Old code (torch's load, as megawsd and DeepSpeed called it): it blocks in
    # FileBaton.wait on a lock nobody will ever remove, i.e. forever.
    code = _OLD_LOAD.format(name=name, src=src)
    old = subprocess.Popen(
        [sys.executable, "-c", code], env=_env(root), stdout=subprocess.PIPE, text=True
    )
    try:
        line = old.stdout.readline()
        assert line.split() == ["WAITING", str(lock)], line
        assert old.poll() is None and lock.exists()
    finally:
        old.kill()
        old.wait()

    with caplog.at_level(logging.WARNING, logger=jit.__name__):
        jit.load_extension(name, [src], what="the probe", minutes="1 s", is_python_module=False)
    assert (root / name / f"{name}.so").exists() and not lock.exists()
    removed = [r.getMessage() for r in caplog.records if "stale build lock" in r.getMessage()]
    assert removed and str(lock) in removed[0], caplog.text


def test_sweep_removes_only_stale_locks(root, caplog):
    stale, live = root / "a" / jit.TORCH_LOCK, root / "b" / jit.TORCH_LOCK
    _plant_stale(stale)
    holder = _hold(live)
    try:
        with caplog.at_level(logging.WARNING, logger=jit.__name__):
            assert jit.sweep_stale_locks(root) == [stale]
        assert not stale.exists() and live.exists()
        assert str(stale) in caplog.text
    finally:
        holder.kill()
        holder.wait()


def test_a_live_holder_is_waited_for_then_named_in_a_bounded_error(root, caplog, monkeypatch):
    monkeypatch.setattr(jit, "POLL_S", 0.05)
    lock = root / "op" / jit.TORCH_LOCK
    holder = _hold(lock)
    try:
        with caplog.at_level(logging.WARNING, logger=jit.__name__):
            with pytest.raises(jit.BuildLockError) as err:
                with jit.build_guard(root / "op", "the op", timeout_s=0.5):
                    pass
        assert str(lock) in str(err.value) and f"pid {holder.pid}" in str(err.value)
        assert "delete" in str(err.value) and jit.TIMEOUT_ENV in str(err.value)
        assert f"pid {holder.pid}" in caplog.text and str(lock) in caplog.text
    finally:
        holder.kill()
        holder.wait()
    assert lock.exists()  # never taken from a live holder


def test_another_megawsd_build_is_waited_for_through_our_flock(root, monkeypatch):
    monkeypatch.setattr(jit, "POLL_S", 0.05)
    (root / "op").mkdir(parents=True)
    ours = root / "op" / jit.OUR_LOCK
    code = textwrap.dedent(
        """
        import fcntl, os, sys, time
        fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
        fcntl.flock(fd, fcntl.LOCK_EX)
        print("held", flush=True)
        time.sleep(600)
        """
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", code, str(ours)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(jit.BuildLockError, match=str(ours)):
            with jit.build_guard(root / "op", "the op", timeout_s=0.3):
                pass
    finally:
        holder.kill()
        holder.wait()
    with jit.build_guard(root / "op", "the op", timeout_s=5):  # the kernel dropped its flock
        pass


# -- one cache per environment ---------------------------------------------------------------


def test_environments_get_different_directories(monkeypatch):
    base = jit.env_key()
    assert jit.env_key() == base  # stable within one environment
    keys = {base}
    with monkeypatch.context() as m:
        m.setattr(sys, "prefix", "/some/other/venv")
        keys.add(jit.env_key())
    with monkeypatch.context() as m:
        m.setattr(jit, "_version", lambda dist: "0.0.1")
        keys.add(jit.env_key())
    with monkeypatch.context() as m:
        m.setattr(jit.torch, "__version__", "9.9.9")
        keys.add(jit.env_key())
    with monkeypatch.context() as m:
        m.setattr(jit, "_accelerator", lambda: "cu999")
        keys.add(jit.env_key())
    assert len(keys) == 5, keys
    monkeypatch.delenv(jit.ENV_VAR, raising=False)
    assert jit.extensions_root() == jit.default_root()
    assert jit.default_root().name == f"megawsd-{base}"


def test_a_users_directory_wins_and_is_exported_to_the_ranks(monkeypatch, tmp_path):
    monkeypatch.setenv(jit.ENV_VAR, str(tmp_path / "mine"))
    assert jit.use_keyed_root() == tmp_path / "mine"
    assert jit.build_dir("op") == tmp_path / "mine" / "op"
    assert launcher.launch_env(2)[jit.ENV_VAR] == str(tmp_path / "mine")
    monkeypatch.delenv(jit.ENV_VAR)
    env: dict[str, str] = {}
    assert jit.use_keyed_root(env) == jit.default_root() and jit.ENV_VAR not in os.environ
    jit.use_keyed_root()
    assert launcher.launch_env(2)[jit.ENV_VAR] == str(jit.default_root())


# -- building before the ranks start ---------------------------------------------------------


def _cfg(*overrides: str):
    return load_config(REPO / "configs" / "tiny-test.yaml", list(overrides))


SF = "optimizer.type=schedule_free_adamw"
OFFLOAD = "deepspeed.zero_optimization={offload_optimizer: {device: cpu}}"


@pytest.mark.parametrize(
    ("overrides", "cpu", "want"),
    [
        ((), True, ["shm_comm"]),
        ((), False, []),
        ((SF,), True, ["shm_comm", "sf_adamw_cpu"]),
        ((SF, "optimizer.params={backend: compiled}"), True, ["shm_comm"]),
        ((SF,), False, []),  # the Triton kernel on CUDA
        ((SF, OFFLOAD), False, ["sf_adamw_cpu"]),  # the offloaded step runs on the CPU
        (("optimizer.type=Adam", OFFLOAD), False, ["cpu_adam"]),
        (("optimizer.type=Adam",), False, ["fused_adam"]),
        (("optimizer.type=Adam", OFFLOAD), True, ["shm_comm", "cpu_adam"]),
    ],
)
def test_needed_ops(overrides, cpu, want):
    assert [op.name for op in jit_ops.needed_ops(_cfg(*overrides), cpu=cpu)] == want


def test_launch_builds_the_ops_before_the_ranks_start(root, monkeypatch, caplog, tmp_path):
    calls = []
    monkeypatch.setattr(jit_ops, "build", lambda op: calls.append(op.name))
    monkeypatch.setattr(jit_ops, "deepspeed_on_cpu", lambda: True)
    monkeypatch.setattr(
        launcher, "run_launcher", lambda cmd, env, status: calls.append(env[jit.ENV_VAR]) or 0
    )
    config = REPO / "configs" / "tiny-test.yaml"
    args = [str(config), "--run-dir", str(tmp_path / "run"), "--set", SF]
    with caplog.at_level(logging.INFO, logger=jit_ops.__name__):
        assert train_cmd.launch_or_run(args, tmp_path / "run", nproc=2) == 0
    assert calls == ["shm_comm", "sf_adamw_cpu", str(root)]
    assert "shm_comm, sf_adamw_cpu" in caplog.text and str(root) in caplog.text


def test_a_build_says_what_where_and_once(root, monkeypatch, caplog):
    monkeypatch.setattr(cpp_extension, "load", lambda **kw: None)
    monkeypatch.setattr(sf_adamw_cpu, "_LOADED", False)
    monkeypatch.setattr(sf_adamw_cpu, "_BROKEN", None)
    with caplog.at_level(logging.WARNING, logger=jit.__name__):
        assert sf_adamw_cpu.available()  # what the first ScheduleFreeAdamW.step() calls
    assert "building megawsd's C++ schedule-free AdamW kernel (once per environment" in (
        caplog.text
    )
    assert str(root) in caplog.text

    from deepspeed.ops.op_builder.builder import OpBuilder

    caplog.clear()
    monkeypatch.setattr(OpBuilder, "load", lambda self, verbose=False: "loaded")
    with caplog.at_level(logging.WARNING, logger=jit.__name__):
        assert (
            jit.load_deepspeed_op(
                "ShareMemCommBuilder", what="DeepSpeed's shm_comm op", minutes="~2 min"
            )
            == "loaded"
        )
    assert f"building DeepSpeed's shm_comm op (once per environment, ~2 min) in {root}" in (
        caplog.text
    )


def test_a_stale_lock_on_deepspeeds_op_is_cleared_before_init_distributed(root, monkeypatch):
    """The preemption of issue #22: DeepSpeed's shm op dir keeps a dead rank's lock."""
    loads = []
    monkeypatch.setattr(jit, "deepspeed_builder", lambda name: _FakeBuilder(loads, root))
    lock = root / _FakeBuilder.name / jit.TORCH_LOCK
    _plant_stale(lock)
    jit_ops.guard_rank()
    assert loads == [False]  # loaded once, with the lock gone


class _FakeBuilder:
    name = "deepspeed_shm_comm"

    def __init__(self, loads, root):
        self.loads, self.root = loads, root

    def deepspeed_src_path(self, path):
        return path

    def sources(self):
        return []

    def load(self):
        self.loads.append((self.root / self.name / jit.TORCH_LOCK).exists())


# -- the torch internals this relies on ------------------------------------------------------


def test_torch_takes_a_file_baton_at_build_dir_lock_on_every_load(root, name, monkeypatch):
    """torch 2.13: ``_jit_compile`` takes ``FileBaton(<build_directory>/lock)`` (O_EXCL, the
    fd kept open by the holder, the file removed on release) on every load, built or not, and
    ``_get_build_directory`` is ``$TORCH_EXTENSIONS_DIR/<name>``. If a torch upgrade changes
    any of this, megawsd.kernels.jit must change with it."""
    assert cpp_extension.FileBaton is file_baton.FileBaton
    assert cpp_extension._get_build_directory(name, False) == str(jit.build_dir(name))
    batons = []

    class Recording(file_baton.FileBaton):
        def try_acquire(self):
            got = super().try_acquire()
            held = got and os.readlink(f"/proc/self/fd/{self.fd}")
            batons.append((self.lock_file_path, got, held))
            return got

    monkeypatch.setattr(cpp_extension, "FileBaton", Recording)
    src = str(root.parent / "probe.cpp")
    lock = str(jit.build_dir(name) / jit.TORCH_LOCK)
    for _ in range(2):  # a build, then a load of the built op
        cpp_extension.load(name, [src], is_python_module=False)
        assert not os.path.exists(lock)
    assert batons == [(lock, True, os.path.realpath(lock))] * 2
    assert (jit.build_dir(name) / f"{name}.so").exists()  # what jit.needs_build looks for


# -- the preemption of issue #22, end to end -------------------------------------------------


@pytest.mark.slow
@pytest.mark.dist
def test_a_launch_killed_while_building_then_the_next_launch_completes(tmp_path):
    """`megawsd train --nproc 2` in a fresh cache, killed (the whole process group, as SLURM
    does) while it builds DeepSpeed's shm op: the rerun removes the lock with a warning and
    trains. Before megawsd.kernels.jit the rerun's ranks slept in FileBaton.wait forever.
    Builds the shm op from scratch (minutes)."""
    from tests.workers.train_common import cli_command, cli_env, prepare_data, write_config

    data = prepare_data(tmp_path / "data")
    cfg = write_config(tmp_path / "run.yaml", data, steps=2)
    ext = tmp_path / "ext"
    env = {**cli_env(), jit.ENV_VAR: str(ext)}
    cmd = cli_command("train", cfg, "--nproc", "2", "--run-dir", tmp_path / "run")
    lock = ext / "deepspeed_shm_comm" / jit.TORCH_LOCK
    first = subprocess.Popen(cmd, env=env, cwd=REPO, start_new_session=True)
    _wait_for(lock, first, "the first launch")
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    assert lock.exists()
    second = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=1500)
    out = second.stdout + second.stderr
    assert second.returncode == 0, out[-5000:]
    assert "removed a stale build lock" in out and str(lock) in out, out[-5000:]
    assert "building DeepSpeed's shm_comm op (once per environment" in out
    assert json.loads((tmp_path / "run" / "run.json").read_text())["status"] == "done"
