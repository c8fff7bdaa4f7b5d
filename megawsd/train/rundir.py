"""The write side of the run directory (docs/run_directory.md): run.json, config.yaml,
metrics.jsonl while a run trains.

The contract itself (names, checkpoint tags, the complete-checkpoint rule, the metrics
reader, the atomic write) is megawsd.rundir's, shared with every reader; this module adds
what only training does with it. Only rank 0 writes here, except the checkpoint shards.
Every file that another process may read while the run is going (run.json,
checkpoints/latest) is replaced atomically, so a reader never sees half a file.
"""

from __future__ import annotations

import datetime as _dt
import json
import socket
import subprocess
from pathlib import Path
from typing import Any

import yaml

from megawsd import __version__
from megawsd import rundir as contract
from megawsd.errors import CheckpointError, explain
from megawsd.rundir import STATE_FILE, atomic_write, tag_for

__all__ = ["RunDir", "MetricsWriter", "append_jsonl", "atomic_write", "now", "tag_for"]


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _git_rev() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    # -- paths ------------------------------------------------------------------------------
    @property
    def config_file(self) -> Path:
        return self.path / contract.CONFIG_FILE

    @property
    def run_json(self) -> Path:
        return self.path / contract.RUN_JSON

    @property
    def metrics_file(self) -> Path:
        return self.path / contract.METRICS_FILE

    @property
    def tb_dir(self) -> Path:
        return self.path / contract.TB_DIR

    @property
    def ckpt_dir(self) -> Path:
        return contract.checkpoint_dir(self.path)

    @property
    def branches_dir(self) -> Path:
        return self.path / contract.BRANCHES

    def tag_dir(self, step: int) -> Path:
        return contract.tag_dir(self.path, step)

    # -- checkpoints ------------------------------------------------------------------------
    def latest_step(self) -> int | None:
        """Step of `checkpoints/latest`, only if that checkpoint is complete."""
        return contract.latest_step(self.path)

    def saved_steps(self) -> list[int]:
        """Steps of complete checkpoints, ascending (megawsd.rundir.checkpoint_steps)."""
        return contract.checkpoint_steps(self.path)

    def read_state(self, step: int) -> dict[str, Any]:
        return json.loads((self.tag_dir(step) / STATE_FILE).read_text())

    # -- run.json ---------------------------------------------------------------------------
    def read_run_json(self) -> dict[str, Any]:
        """run.json, {} when there is none yet. An unreadable one is refused, never replaced:
        it holds the lineage of a branch and the state of the run (CheckpointError)."""
        try:
            text = self.run_json.read_text()
        except FileNotFoundError:
            return {}
        except OSError as err:
            raise self._bad_run_json(f"cannot be read ({err.strerror or err})") from None
        try:
            info = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise self._bad_run_json(f"not valid JSON ({err})") from None
        if not isinstance(info, dict):
            raise self._bad_run_json(f"not a JSON object (a {type(info).__name__})")
        return info

    def _bad_run_json(self, what: str) -> CheckpointError:
        return CheckpointError(
            f"run.json = {str(self.run_json)!r}: {what}; megawsd does not overwrite it. Restore "
            f"it from a copy, or move it away (mv {self.run_json} {self.run_json}.bad) and "
            "rerun: a new one is written and the checkpoints still resume the run (a branch's: "
            "rerun the same `megawsd branch` command to record its lineage again)"
        )

    def mark_failed(self, step: int, error: BaseException | None = None) -> dict[str, Any]:
        """status "failed" at ``step`` (the last step trained), with the newest complete
        checkpoint (where a rerun resumes, which may be older) and the error's first line."""
        fields: dict[str, Any] = {
            "status": "failed",
            "step": step,
            "checkpoint_step": self.latest_step(),
        }
        if error is not None:
            first = (str(error).strip().splitlines() or [""])[0]
            fields["error"] = f"{type(error).__name__}: {first}"[:1000]
        return self.update_run_json(**fields)

    def update_run_json(self, **fields: Any) -> dict[str, Any]:
        info = self.read_run_json()
        if not info:
            info = {
                "name": self.path.name,
                "kind": "main",
                "parent": None,
                "branch_step": None,
                "created": now(),
                "megawsd_version": __version__,
                "git": _git_rev(),
                "host": socket.gethostname(),
            }
        if fields.get("status", "failed") != "failed":
            # a rerun that got going again is no longer failed
            info.pop("error", None)
            info.pop("checkpoint_step", None)
        info.update(fields)
        info["updated"] = now()
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write(self.run_json, json.dumps(info, indent=2, sort_keys=True) + "\n")
        return info

    def write_config(self, resolved: dict[str, Any]) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write(self.config_file, yaml.safe_dump(resolved, sort_keys=False))

    # -- metrics ----------------------------------------------------------------------------
    def truncate_metrics(self, step: int) -> None:
        """On resume, drop records after the resumed step: they will be produced again."""
        if not self.metrics_file.exists():
            return
        keep = []
        for line in self.metrics_file.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill
            if rec.get("step", 0) <= step:
                keep.append(line)
        atomic_write(self.metrics_file, "".join(f"{x}\n" for x in keep))


def append_jsonl(f, record: dict[str, Any], field: str, run_path: Path) -> None:
    """Append ``record`` as one line to the open file ``f``; a write error (a full disk mid-run)
    becomes an error naming the file, the cause and the fix, not a bare errno traceback."""
    try:
        f.write(json.dumps(record) + "\n")
    except OSError as err:
        raise CheckpointError(
            f"{field} = {f.name!r}: cannot append ({explain(err, run_path)}); free space (or "
            "make the run directory writable) and rerun the same command to resume from the "
            "last checkpoint"
        ) from None


class MetricsWriter:
    """metrics.jsonl (line-buffered, so a killed run loses at most a line) + TensorBoard."""

    def __init__(self, run: RunDir, tensorboard: bool):
        run.path.mkdir(parents=True, exist_ok=True)
        self._path = run.path
        self._f = open(run.metrics_file, "a", buffering=1)
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(run.tb_dir))
            except ImportError:  # tensorboard not installed: jsonl is the record
                self._tb = None

    def write(self, record: dict[str, Any]) -> None:
        append_jsonl(self._f, record, "metrics", self._path)
        if self._tb is not None:
            step = record["step"]
            for k, v in record.items():
                if k not in ("step", "time") and isinstance(v, (int, float)):
                    self._tb.add_scalar(("val/" if k.startswith("val_") else "train/") + k, v, step)

    def close(self) -> None:
        try:
            self._f.close()
        except OSError:  # the flush of a line that already failed to be written
            pass
        if self._tb is not None:
            self._tb.close()
