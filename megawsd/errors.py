"""One exception family for everything a user can get wrong.

Every message names the field (or file, or flag), the value that was given and the fix, so
that a user never has to read a traceback to know what to change. The CLI prints these
without a traceback and exits with status 2.
"""

from __future__ import annotations


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


def field_error(field: str, value: object, fix: str, cls: type[MegawsdError] = ConfigError) -> MegawsdError:
    """Build the standard message: ``<field> = <value!r>: <fix>``."""
    return cls(f"{field} = {value!r}: {fix}")
