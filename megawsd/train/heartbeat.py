"""Noticing a lost or cut-off host in seconds, not after the collective timeout.

A rank whose peer's *process* dies learns it at once: the peer's kernel closes its sockets and
gloo/NCCL raise. A host that loses power or its link closes nothing, and the survivors wait in
their next collective for ``stability.dist_timeout_s`` (30 minutes by default, sized for the
slowest legitimate collective: a first-step compile, a large checkpoint). torch offers no
liveness check below that for gloo, so each rank runs this small heartbeat beside training:

- every ``heartbeat_s`` each rank increments its counter ``megawsd/hb/<rank>`` in the run's
  rendezvous store (a second client of the TCPStore that rank 0 already serves at
  MASTER_ADDR:MASTER_PORT, with its own timeout, so it never waits behind a collective);
- rank 0 reads every counter and notes when each last moved (its own clock only: no clock
  comparison across hosts); a rank whose counter has not moved for ``heartbeat_timeout_s`` and
  that did not say goodbye (``megawsd/hb/bye/<rank>``) has stopped answering;
- a rank that cannot reach the store for ``heartbeat_timeout_s`` has lost the master's host.

Either way the detecting rank logs which rank and host stopped answering, marks run.json
failed (unless it already says done/stopped: the run ended and its master left first), and
exits, so that the launcher ends the rank's siblings; a rerun resumes from the last complete
checkpoint. A rank starved of the GIL or CPU for longer than the timeout is not blamed on its
peers: rank 0 restarts its clocks when its own loop was late.
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
import threading
import time
from pathlib import Path

from megawsd.train.netif import resolve, source_address
from megawsd.train.rundir import RunDir

log = logging.getLogger(__name__)

PREFIX = "megawsd/hb"
EXIT_CODE = 17  # distinct from a crash (1) and a refused input (2) in the ranks' exit codes


class Heartbeat:
    def __init__(
        self,
        rank: int,
        world: int,
        run_dir: str | Path,
        *,
        interval_s: float,
        timeout_s: float,
        exit_on_loss: bool = True,
    ):
        self.rank, self.world = rank, world
        self.run = RunDir(run_dir)
        self.interval_s, self.timeout_s = interval_s, timeout_s
        self.exit_on_loss = exit_on_loss
        self.lost: str | None = None  # what was detected (tests read it with exit_on_loss off)
        self._stop = threading.Event()
        self._once, self._fired = threading.Lock(), False
        self._thread: threading.Thread | None = None
        self._store = None

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> Heartbeat:
        import torch.distributed as dist

        addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
        self.master = f"{addr}:{port}"
        self._store = dist.TCPStore(
            addr,
            port,
            is_master=False,
            timeout=datetime.timedelta(seconds=self.timeout_s),
            wait_for_workers=False,
        )
        me = f"{socket.gethostname()} ({_local_address(addr)})"
        self._store.set(f"{PREFIX}/host/{self.rank}", me)
        self._store.add(f"{PREFIX}/{self.rank}", 1)
        self._last_ok = time.monotonic()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="megawsd-heartbeat")
        self._thread.start()
        # A store call on a cut link can block far longer than the store's timeout (TCP
        # retransmits): a second thread judges the beats' freshness instead of waiting on one.
        self._judge = threading.Thread(
            target=self._judge_loop, daemon=True, name="megawsd-hb-judge"
        )
        self._judge.start()
        return self

    def stop(self) -> None:
        """A normal end: say goodbye first, so rank 0 does not take the silence for a loss."""
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join(timeout=self.interval_s + 5)
        self._judge.join(timeout=self.interval_s + 5)
        # the master may be gone or cut off: never wait on it for long at the end
        bye = threading.Thread(target=self._say_goodbye, daemon=True)
        bye.start()
        bye.join(timeout=5)
        self._thread = None

    def _say_goodbye(self) -> None:
        try:
            self._store.set(f"{PREFIX}/bye/{self.rank}", "1")
        except Exception:  # noqa: BLE001 - nobody left to tell
            pass

    # -- the loop ----------------------------------------------------------------------------
    def _loop(self) -> None:
        seen = {r: (0, time.monotonic()) for r in range(self.world)}
        last_tick = time.monotonic()
        while not self._stop.wait(self.interval_s):
            now = time.monotonic()
            late = now - last_tick > 2 * self.interval_s + 1  # this process itself was starved
            last_tick = now
            try:
                self._store.add(f"{PREFIX}/{self.rank}", 1)
                self._last_ok = time.monotonic()
            except Exception as err:  # noqa: BLE001 - any store error means the same here
                if not self._stop.is_set():
                    self._lost(f"lost contact with the master's host ({self.master}): {err}")
                return
            if self.rank != 0:
                continue
            silent = self._check(seen, now, late)
            if silent:
                self._lost(self._describe(silent))
                return

    def _judge_loop(self) -> None:
        last_tick = time.monotonic()
        while not self._stop.wait(self.interval_s):
            now = time.monotonic()
            late, last_tick = now - last_tick > 2 * self.interval_s + 1, now
            silent_for = now - self._last_ok
            if silent_for > self.timeout_s and not late and not self._stop.is_set():
                self._lost(
                    f"lost contact with the master's host ({self.master}): the rendezvous "
                    f"store has not answered for {silent_for:.0f} s"
                )
                return

    def _check(self, seen: dict, now: float, late: bool) -> list[int]:
        silent = []
        for r in range(self.world):
            count = self._store.add(f"{PREFIX}/{r}", 0)
            if count != seen[r][0] or late:
                seen[r] = (count, now)
            elif now - seen[r][1] > self.timeout_s and not self._store.check([f"{PREFIX}/bye/{r}"]):
                silent.append(r)
        return silent

    def _describe(self, ranks: list[int]) -> str:
        hosts = []
        for r in ranks:
            try:
                key = f"{PREFIX}/host/{r}"
                hosts.append(self._store.get(key).decode() if self._store.check([key]) else "?")
            except Exception:  # noqa: BLE001
                hosts.append("?")
        who = ", ".join(f"rank {r} on {h}" for r, h in zip(ranks, hosts))
        return f"{who} stopped answering (no heartbeat for {self.timeout_s:.0f} s)"

    def _lost(self, what: str) -> None:
        with self._once:
            if self._fired:
                return
            self._fired = True
        try:
            end = self._record(what)
        finally:
            self.lost = what  # after run.json: what a reader of `lost` may rely on
        if end:
            self._exit()

    def _record(self, what: str) -> bool:
        """Log and mark run.json; whether this rank must end."""
        status = _status(self.run)
        if status in ("done", "stopped"):
            log.info("heartbeat: %s after the run was %s: nothing to do", what, status)
            return False
        if status == "failed":  # another rank failed first and said why: keep its reason
            log.error("heartbeat: %s after the run failed (%s)", what, _error(self.run))
            return True
        step = self.run.latest_step()
        log.error(
            "%s: stopping this rank (%s). The run resumes from %s with the same command once "
            "the hosts answer again.",
            what,
            f"rank {self.rank} on {socket.gethostname()}",
            f"step {step}" if step is not None else "the start (no checkpoint yet)",
        )
        try:
            self.run.update_run_json(status="failed", error=what[:1000], checkpoint_step=step)
        except Exception as err:  # noqa: BLE001 - a shared filesystem may be cut off too
            log.error("heartbeat: could not mark %s failed: %s", self.run.run_json, err)
        return True

    def _exit(self) -> None:
        for handler in logging.getLogger().handlers:
            handler.flush()
        if self.exit_on_loss:
            os._exit(EXIT_CODE)


def _status(run: RunDir) -> str | None:
    try:
        return run.read_run_json().get("status")
    except Exception:  # noqa: BLE001
        return None


def _error(run: RunDir) -> str:
    try:
        return str(run.read_run_json().get("error", "?"))
    except Exception:  # noqa: BLE001
        return "?"


def _local_address(master: str) -> str:
    try:
        return source_address(resolve(master))
    except Exception:  # noqa: BLE001 - only for the message
        return "?"


def start_heartbeat(run_dir: str | Path, cfg) -> Heartbeat | None:
    """The heartbeat of this rank, when the job has more than one rank and it is enabled."""
    import torch.distributed as dist

    world = dist.get_world_size()
    if world < 2 or cfg.heartbeat_timeout_s <= 0 or "MASTER_ADDR" not in os.environ:
        return None
    hb = Heartbeat(
        dist.get_rank(),
        world,
        run_dir,
        interval_s=cfg.heartbeat_s,
        timeout_s=cfg.heartbeat_timeout_s,
    )
    return hb.start()
