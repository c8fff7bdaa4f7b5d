"""JIT-built C++ ops that never hang a launch: one cache per environment, stale locks cleared.

torch builds an extension (``torch.utils.cpp_extension.load``: megawsd's C++ kernel,
DeepSpeed's shm comm op, CPUAdam, FusedAdam) under ``TORCH_EXTENSIONS_DIR/<name>/`` and takes
a ``FileBaton`` there on EVERY load, even of an op that is already built: ``lock``, created
with O_EXCL, its fd kept open by the holder, removed when the holder is done. A process killed
while it holds it (a preemption, ``kill -9``, an OOM kill during start-up) leaves the file, and
every later load sleeps in ``FileBaton.wait`` forever, without a log line.

What this module adds around torch's load:

- **One cache per environment** (:func:`default_root`): unless the user set
  ``TORCH_EXTENSIONS_DIR``, a directory keyed by Python, torch, DeepSpeed, the CPU/CUDA build,
  the host's CPU flags and a hash of ``sys.prefix``, so two venvs (or two DeepSpeed versions)
  never rebuild the same op directory over each other. A user's own setting always wins.
- **Our own advisory lock** (:func:`build_guard`): ``fcntl.flock`` on ``megawsd-build.lock``
  next to torch's ``lock``, held for the whole load. The kernel releases it when its holder
  dies, so it can never go stale; while we hold it, no other megawsd process is inside torch's
  load of that op, and a torch ``lock`` that no local process has open (``/proc/*/fd``) was
  left by a dead process: it is removed with a warning. A live holder is waited for with a log
  line naming the file and its pid, for at most ``MEGAWSD_JIT_LOCK_TIMEOUT_S`` seconds, then
  :class:`BuildLockError` names the file and the fix.
- **A message when a build happens** (:func:`announce`): what is built, where, and that it
  happens once per environment, instead of minutes of silence.

Shared filesystems: a holder on another host is seen only through our flock (NFS and Lustre
with ``flock`` mounts carry it across hosts); a non-megawsd process building the same op dir
on another host at the same moment is invisible here. See docs/jit_ops.md.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.metadata
import json
import logging
import os
import sys
import time
from collections.abc import Iterator, MutableMapping
from pathlib import Path

import torch

from megawsd.errors import MegawsdError

log = logging.getLogger(__name__)

ENV_VAR = "TORCH_EXTENSIONS_DIR"
TIMEOUT_ENV = "MEGAWSD_JIT_LOCK_TIMEOUT_S"
LOCK_TIMEOUT_S = 1800.0  # a live build of FusedAdam on a busy node can take many minutes
LOG_EVERY_S = 30.0
POLL_S = 0.5
TORCH_LOCK = "lock"  # torch's FileBaton: os.path.join(build_directory, "lock")
OUR_LOCK = "megawsd-build.lock"


class BuildLockError(MegawsdError):
    """A JIT build lock is held by a live process for too long, or by one we cannot see."""


# -- one cache per environment ----------------------------------------------------------------


def _cpu_flags() -> str:
    """The host's CPU feature flags: ops built with -march=native (CPUAdam) must not be loaded
    on a CPU without those instructions, even when the filesystem is shared."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return " ".join(sorted(line.split(":", 1)[1].split()))
    except OSError:
        pass
    return ""


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "none"


def _accelerator() -> str:
    if torch.version.hip:
        return "rocm" + torch.version.hip.replace(".", "")
    if torch.version.cuda:
        return "cu" + torch.version.cuda.replace(".", "")
    return "cpu"


def env_key() -> str:
    """A readable name plus a hash of everything an op build depends on in this environment."""
    parts = {
        "python": sys.version,
        "prefix": os.path.realpath(sys.prefix),
        "torch": torch.__version__,
        "deepspeed": _version("deepspeed"),
        "accelerator": _accelerator(),
        "cpu_flags": _cpu_flags(),
    }
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:10]
    py = f"py{sys.version_info.major}{sys.version_info.minor}"
    return f"{py}-torch{torch.__version__}-ds{parts['deepspeed']}-{parts['accelerator']}-{digest}"


def default_root() -> Path:
    """``~/.cache/torch_extensions/megawsd-<env key>`` (XDG_CACHE_HOME honoured)."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "torch_extensions" / f"megawsd-{env_key()}"


def extensions_root() -> Path:
    """Where ops are built: the user's ``TORCH_EXTENSIONS_DIR``, else :func:`default_root`."""
    return Path(os.environ.get(ENV_VAR) or default_root())


def use_keyed_root(env: MutableMapping[str, str] | None = None) -> Path:
    """Set ``TORCH_EXTENSIONS_DIR`` in ``env`` (this process's environment by default, so
    DeepSpeed's loads and every child inherit it) unless it is set; returns it."""
    env = os.environ if env is None else env
    if not env.get(ENV_VAR):
        env[ENV_VAR] = str(default_root())
    return Path(env[ENV_VAR])


def build_dir(name: str) -> Path:
    """torch's build directory of op ``name`` (``_get_build_directory`` when the variable is
    set, pinned by tests/test_jit_ops.py)."""
    return extensions_root() / name


# -- who holds torch's lock -------------------------------------------------------------------


def lock_holders(lock: Path) -> tuple[list[int], bool]:
    """(pids that have ``lock`` open, whether every candidate process could be inspected).

    Only a process running as the file's owner can hold it (it created the file); those are
    inspectable when they run as us, or when we are root."""
    target = os.path.realpath(lock)
    try:
        owner = os.stat(lock).st_uid
    except FileNotFoundError:
        return [], True
    complete = owner == os.geteuid() or os.geteuid() == 0
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            fds = os.listdir(f"/proc/{entry}/fd")
        except (PermissionError, FileNotFoundError, ProcessLookupError):
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{entry}/fd/{fd}") == target:
                    pids.append(int(entry))
                    break
            except OSError:
                continue
    return pids, complete


def _describe(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        cmd = "?"
    return f"pid {pid} ({cmd[:120]})"


def _flock_holder(path: Path) -> str:
    """The pid holding a flock on ``path``, from /proc/locks (for the waiting log line)."""
    try:
        st = os.stat(path)
        ident = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
        with open("/proc/locks") as f:
            for line in f:
                fields = line.split()
                if "FLOCK" in fields and ident in fields:
                    return _describe(int(fields[fields.index(ident) - 1]))
    except (OSError, ValueError, IndexError):
        pass
    return "a process on this or another host"


def _timeout_s() -> float:
    return float(os.environ.get(TIMEOUT_ENV, LOCK_TIMEOUT_S))


def _fix(lock: Path) -> str:
    return (
        f"if no build of it is running anywhere, delete {lock} and rerun; or point "
        f"{ENV_VAR} at another directory; {TIMEOUT_ENV} sets how long to wait"
    )


# -- the guard --------------------------------------------------------------------------------


def _poll_until(done, deadline: float, timed_out, waiting, *, say_at_once: bool) -> None:
    """Poll ``done()`` every POLL_S until true; ``waiting(seconds)`` every LOG_EVERY_S (the
    first one at once or after LOG_EVERY_S), and ``raise timed_out(seconds)`` at ``deadline``:
    every wait on a build is bounded and said."""
    start = time.monotonic()
    last = -LOG_EVERY_S if say_at_once else start
    while not done():
        now = time.monotonic()
        if now >= deadline:
            raise timed_out(now - start)
        if now - last >= LOG_EVERY_S:
            last = now
            waiting(now - start)
        time.sleep(POLL_S)


def _acquire_flock(fd: int, path: Path, what: str, deadline: float) -> None:
    """Our advisory lock, waited for with a log line every LOG_EVERY_S, bounded."""

    def taken() -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False

    _poll_until(
        taken,
        deadline,
        lambda s: BuildLockError(
            f"{path}: {_flock_holder(path)} has been building or loading {what} for "
            f"over {s:.0f} s; {_fix(path.parent / TORCH_LOCK)}"
        ),
        lambda s: log.warning(
            "waiting for %s to finish building %s (lock %s, %.0f s so far)",
            _flock_holder(path),
            what,
            path,
            s,
        ),
        say_at_once=False,
    )


def _stale(lock: Path) -> bool:
    """No local process holds ``lock`` (two scans, the same file both times)."""
    try:
        ino = os.stat(lock).st_ino
    except FileNotFoundError:
        return False
    for _ in range(2):
        pids, complete = lock_holders(lock)
        if pids or not complete:
            return False
        time.sleep(0.05)
    try:
        return os.stat(lock).st_ino == ino
    except FileNotFoundError:
        return False


def remove_if_stale(lock: Path, what: str) -> bool:
    """Remove torch's ``lock`` when its holder is gone (call with our flock held)."""
    if not _stale(lock):
        return False
    with contextlib.suppress(FileNotFoundError):
        lock.unlink()
        log.warning(
            "removed a stale build lock %s (its holder is gone: a process killed while "
            "building or loading %s); continuing",
            lock,
            what,
        )
    return True


def _wait_for_torch_lock(lock: Path, what: str, deadline: float) -> None:
    """Until torch's ``lock`` is gone (or stale, then removed); bounded, with log lines."""

    def holder() -> str:
        pids, _ = lock_holders(lock)
        return ", ".join(_describe(p) for p in pids) or "a process we cannot inspect"

    _poll_until(
        lambda: not lock.exists() or remove_if_stale(lock, what),
        deadline,
        lambda s: BuildLockError(
            f"{lock}: held by {holder()} for over {s:.0f} s while loading {what}; "
            f"if that process is stuck, stop it; {_fix(lock)}"
        ),
        lambda s: log.warning("waiting for build lock %s held by %s (%s)", lock, holder(), what),
        say_at_once=True,
    )


@contextlib.contextmanager
def build_guard(directory: Path, what: str, timeout_s: float | None = None) -> Iterator[None]:
    """Hold our flock on ``directory`` with torch's ``lock`` free (stale ones removed)."""
    directory.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + (_timeout_s() if timeout_s is None else timeout_s)
    path = directory / OUR_LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        _acquire_flock(fd, path, what, deadline)
        _wait_for_torch_lock(directory / TORCH_LOCK, what, deadline)
        yield
    finally:
        os.close(fd)  # releases the flock


def sweep_stale_locks(root: Path | None = None) -> list[Path]:
    """Remove every stale torch ``lock`` under ``root`` (default: :func:`extensions_root`)
    whose directory no megawsd process is using; live ones are left alone. Returns the
    removed paths. Cheap: one directory listing and a /proc scan per lock found."""
    root = extensions_root() if root is None else root
    removed = []
    for lock in sorted(root.glob(f"*/{TORCH_LOCK}")) if root.is_dir() else []:
        try:
            fd = os.open(lock.parent / OUR_LOCK, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if remove_if_stale(lock, lock.parent.name):
                removed.append(lock)
        except BlockingIOError:
            pass
        finally:
            os.close(fd)
    return removed


# -- loading ----------------------------------------------------------------------------------


def needs_build(directory: Path, name: str, sources: list[str]) -> bool:
    """No built library, or a source newer than it: the load will compile."""
    lib = directory / f"{name}.so"
    if not lib.exists():
        return True
    built = lib.stat().st_mtime
    return any(os.path.getmtime(s) > built for s in sources if os.path.exists(s))


def announce(what: str, directory: Path, name: str, sources: list[str], minutes: str) -> bool:
    """Say, before a build, what is built, where, and that it happens once."""
    if not needs_build(directory, name, sources):
        log.debug("loading %s from %s", what, directory)
        return False
    log.warning("building %s (once per environment, %s) in %s", what, minutes, directory.parent)
    return True


def load_extension(name: str, sources: list[str], *, what: str, minutes: str, **kwargs):
    """``torch.utils.cpp_extension.load`` of one of megawsd's own ops, guarded."""
    from torch.utils import cpp_extension  # heavy import, only when an op is first loaded

    directory = build_dir(name)
    with build_guard(directory, what):
        announce(what, directory, name, sources, minutes)
        return cpp_extension.load(
            name=name, sources=sources, build_directory=str(directory), **kwargs
        )


def deepspeed_builder(class_name: str):
    """DeepSpeed's op builder of the current accelerator, or None if it has none / it is
    not compatible here (DeepSpeed itself then skips the op, e.g. shm comm off Linux)."""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder(class_name)
    if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        return None
    return builder


def load_deepspeed_op(class_name: str, *, what: str, minutes: str):
    """Build or load one of DeepSpeed's JIT ops under the guard; DeepSpeed's own later load
    of it in this process is then a dictionary lookup (``OpBuilder._loaded_ops``)."""
    from deepspeed.git_version_info import installed_ops

    builder = deepspeed_builder(class_name)
    if builder is None:
        return None
    if installed_ops.get(builder.name, False):  # built when DeepSpeed was installed
        return builder.load()
    directory = build_dir(builder.name)
    sources = [os.path.abspath(builder.deepspeed_src_path(s)) for s in builder.sources()]
    with build_guard(directory, what):
        announce(what, directory, builder.name, sources, minutes)
        return builder.load()
