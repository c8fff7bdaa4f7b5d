"""One training process group per run directory: ``RUN/.lock``.

The lock's file, what it holds and when a holder on another host counts as gone are the run
directory contract's (megawsd.rundir: LOCK_FILE, read_lock, lock_age, STALE_LOCK_S), which
``megawsd runs`` reads to tell a died run; this module is the process side.

Two runs writing the same checkpoints and metrics interleave silently, so the second start
must refuse. Rank 0 holds the lock for the whole run:

- an exclusive ``flock`` on ``RUN/.lock`` (released by the kernel when the process dies, so
  a crash never leaves a lock that blocks the rerun), and in the file the holder's pid, host,
  start time and command, for the message the second process prints;
- a lock file without a live holder is stale: one from this host whose flock is free (the
  holder died), or (flock being unreliable across hosts on some network filesystems) one from
  another host whose heartbeat is older than ``stale_after_s``. A stale lock is taken over with a warning naming the previous holder.
"""

from __future__ import annotations

import datetime as _dt
import errno
import fcntl
import json
import logging
import os
import socket
import sys
import threading
from typing import Any

from megawsd.errors import CheckpointError, MegawsdError, explain
from megawsd.rundir import STALE_LOCK_S, lock_age, lock_path, read_lock

log = logging.getLogger(__name__)


class RunLockedError(MegawsdError):
    """Another process is training in this run directory."""


class RunLock:
    def __init__(self, run_dir: str | os.PathLike, stale_after_s: float = STALE_LOCK_S):
        self.path = lock_path(run_dir)
        self.stale_after_s = stale_after_s
        self._fd: int | None = None
        self._stop = threading.Event()
        self.took_over: dict[str, Any] | None = None

    def read(self) -> dict[str, Any] | None:
        return read_lock(self.path.parent)

    def acquire(self) -> RunLock:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise self._unwritable(err) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if err.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            raise self._refusal(self.read()) from None
        holder = self.read()
        if holder and not self._stale(holder):
            # flock was free but the holder looks alive: another host on a filesystem
            # without coherent flock, or a holder that is still starting up.
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
            raise self._refusal(holder)
        if holder:
            self.took_over = holder
            log.warning(
                "run directory %s: taking over a stale lock of pid %s on %s (started "
                "%s); that process is gone",
                self.path.parent,
                holder.get("pid"),
                holder.get("host"),
                holder.get("started"),
            )
        self._fd = fd
        self._write()
        # the time stamp other hosts read: refreshed well within stale_after_s
        beat = max(1.0, min(300.0, self.stale_after_s / 10))
        threading.Thread(
            target=self._beat, args=(beat,), daemon=True, name="megawsd-runlock"
        ).start()
        return self

    def _beat(self, every: float) -> None:
        while not self._stop.wait(every):
            try:
                os.utime(self.path)
            except OSError:
                pass

    def release(self) -> None:
        if self._fd is None:
            return
        self._stop.set()
        try:
            if self.read() and self.read().get("pid") == os.getpid():
                self.path.unlink(missing_ok=True)
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    # -- internals ------------------------------------------------------------------------
    def _write(self) -> None:
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "command": " ".join(sys.argv)[:500],
        }
        data = (json.dumps(info) + "\n").encode()
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, data, 0)
        os.fsync(self._fd)

    def _stale(self, holder: dict[str, Any]) -> bool:
        if holder.get("host") == socket.gethostname():
            # flock is authoritative on one host: we got it, so the holder does not hold it
            # (it died; its pid may even have been reused by an unrelated process)
            return True
        age = lock_age(self.path.parent)
        return age is None or age > self.stale_after_s

    def _unwritable(self, err: OSError) -> CheckpointError:
        """The run directory cannot hold the lock (read-only, no permission, full disk): a
        run could not write its checkpoints there either."""
        return CheckpointError(
            f"run_dir = {str(self.path.parent)!r}: cannot create the run lock {self.path.name} "
            f"({explain(err, self.path.parent)}); a run writes its checkpoints and metrics "
            "there. Make the directory writable (chown/chmod, remount read-write, free space), "
            "or pass --run-dir on a writable filesystem"
        )

    def _refusal(self, holder: dict[str, Any] | None) -> RunLockedError:
        who = (
            f"pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}"
            f" ({holder.get('command')})"
            if holder
            else "another process"
        )
        return RunLockedError(
            f"run_dir = {str(self.path.parent)!r}: already in use by {who}. Two runs in one "
            "directory would overwrite each other's checkpoints; wait for it to finish, stop it "
            f"(SIGTERM checkpoints and exits), or use another --run-dir. If that process is "
            f"gone on another host, delete {str(self.path)!r}"
        )
