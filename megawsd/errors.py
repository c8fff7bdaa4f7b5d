"""One exception family for everything a user can get wrong.

Every message names the field (or file, or flag), the value that was given and the fix, so
that a user never has to read a traceback to know what to change. The CLI prints these
without a traceback and exits with status 2.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path


class MegawsdError(Exception):
    """Base class: a problem with user input (config, data, checkpoint, CLI arguments)."""


class ConfigError(MegawsdError, ValueError):
    """A run, schedule, optimizer or DeepSpeed config value is invalid."""


class DataError(MegawsdError):
    """Input corpus, prepared token files or their meta.json are unusable."""


class CheckpointError(MegawsdError):
    """A checkpoint or run directory is missing, incomplete, damaged or incompatible."""


class OptimizerError(MegawsdError):
    """The optimizer was used in a way that would silently compute the wrong thing."""


def field_error(
    field: str, value: object, fix: str, cls: type[MegawsdError] = ConfigError
) -> MegawsdError:
    """Build the standard message: ``<field> = <value!r>: <fix>``."""
    return cls(f"{field} = {value!r}: {fix}")


# -- why a write failed ----------------------------------------------------------------------
# One reading of a failed write for every writer (checkpoints, metrics, the run lock, data
# preparation), so a full disk reads the same whichever of them hit it first.

_LOW_SPACE = 1 << 20  # after a failed write, less than this free means the disk filled up


def existing_parent(path: str | os.PathLike) -> Path:
    """``path`` or its nearest existing ancestor: the directory a failed mkdir was under."""
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _human(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def write_cause(err: BaseException | None, directory: str | os.PathLike) -> str | None:
    """The cause of a write error in words (full disk, read-only, no permission), read from
    the error and the filesystem of ``directory`` right after the failure; None if unclear.

    The filesystem is asked too because not every writer keeps the errno (torch reports a
    full disk as a RuntimeError without one)."""
    d = existing_parent(directory)
    code = getattr(err, "errno", None)
    try:
        st = os.statvfs(d)
    except OSError:
        st = None
    if code == errno.EROFS or (st is not None and st.f_flag & os.ST_RDONLY):
        return f"{str(d)!r} is on a read-only filesystem"
    if st is not None:
        free, total = st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize
        if code in (errno.ENOSPC, errno.EDQUOT) or free < _LOW_SPACE:
            return (
                f"no space left on the filesystem of {str(d)!r} ({_human(free)} free of "
                f"{_human(total)})"
            )
    elif code in (errno.ENOSPC, errno.EDQUOT):
        return f"no space left on the filesystem of {str(d)!r}"
    if code in (errno.EACCES, errno.EPERM) or not os.access(d, os.W_OK):
        return f"no write permission on {str(d)!r}"
    return None


def explain(err: BaseException, directory: str | os.PathLike) -> str:
    """``cause (raw error)``: the words a user acts on, and the error for the record."""
    raw = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
    cause = write_cause(err, directory)
    return f"{cause} ({raw[:300]})" if cause else raw[:300]
