"""What `megawsd train` checks in the launching process, before any rank starts.

A rank finds a bad config only after the launcher has spawned it, joined the process group
and built the model: on CPU that is 15 s or more, on a cluster a queue wait and minutes of
node start-up, for an error that was knowable from the files alone. So the launching process
runs the same checks the ranks would run first, with the same code:

- the config (``load_config``: types, unknown keys, the schedule) is already loaded by the
  caller;
- the data: every prepared directory of ``data:`` (and ``data.switch_to``) is opened the way
  the loader opens it (``engine.build_stream``: meta.json, token file sizes, ``seq_len``
  against the data). Relative data paths are read from the current directory, as every CLI
  argument is; the config file's directory is only named in the error when the path exists
  there (configs/ shipped with megawsd say ``data: data/stdlib``, prepared from the
  repository root, so changing the base would break them);
- the DeepSpeed section, merged the way the ranks merge it (``engine.deepspeed_config``: the
  batch layout for the world size, precision against ZeRO stage, conflicting keys), then
  parsed by DeepSpeed's own config class, which refuses unknown keys in its sections.

The ranks repeat these checks (a resumed or hand-launched rank has no launching process).
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import ValidationError

from megawsd.errors import ConfigError, DataError
from megawsd.train.config import RunConfig


def preflight(cfg: RunConfig, config_path: str | Path, world_size: int | None) -> None:
    """Raise the ConfigError / DataError a rank would raise, before any rank exists.

    ``world_size`` is the number of ranks the launch will start (None when not known, e.g. a
    hostfile that cannot be read: the layout is then checked for one rank, which every world
    size needs too).
    """
    cfg.check_layout(world_size or 1)  # the cheapest first
    check_deepspeed(cfg, world_size or 1)
    check_data(cfg, Path(config_path))


def check_data(cfg: RunConfig, config_path: Path) -> None:
    """Open the training data as the ranks will; a missing directory says where it looked."""
    from megawsd.train.engine import build_stream

    try:
        build_stream(cfg)
    except DataError as err:
        missing = _missing_data_paths(cfg)
        if not missing:
            raise
        raise DataError(_explain_missing(missing, config_path)) from err


def _data_paths(value) -> list[str]:
    """The directories named by a ``data.path`` / ``data.switch_to`` value (any mix form)."""
    items = value if isinstance(value, list) else [value]
    out = []
    for item in items:
        if isinstance(item, dict):
            item = item.get("path")
        elif isinstance(item, (list, tuple)) and item:
            item = item[0]
        if not isinstance(item, str):
            continue
        for part in (p.strip() for p in item.split(",")):
            head, _, tail = part.rpartition(":")
            path = head if head and _is_number(tail) and not Path(part).exists() else part
            if path:
                out.append(path)
    return out


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _missing_data_paths(cfg: RunConfig) -> list[tuple[str, str]]:
    """(field, path) of every data directory that does not exist."""
    paths = [("data.path", p) for p in _data_paths(cfg.data.path)]
    if cfg.data.switch_to is not None:
        paths += [("data.switch_to", p) for p in _data_paths(cfg.data.switch_to)]
    return [(f, p) for f, p in paths if not Path(p).is_dir() and not Path(p).is_file()]


def _explain_missing(missing: list[tuple[str, str]], config_path: Path) -> str:
    field, path = missing[0]
    cwd = Path.cwd()
    where = f"{str(Path(path).absolute())!r}" if not Path(path).is_absolute() else "there"
    msg = f"{field} = {path!r}: no prepared data directory at {where}"
    if not Path(path).is_absolute():
        msg += (
            f" (relative data paths are read from the current directory, {str(cwd)!r}, "
            "not from the config file's directory)"
        )
        beside = config_path.parent / path
        if beside.is_dir() and config_path.parent.resolve() != cwd.resolve():
            msg += f"; it exists beside the config: write data: {str(beside)!r}, or run from there"
            return msg
    return msg + "; prepare it with `megawsd data prepare --input ... --out DIR` or fix the path"


def check_deepspeed(cfg: RunConfig, world_size: int) -> None:
    """The DeepSpeed JSON the ranks will build, and DeepSpeed's own parse of it."""
    from megawsd.train.engine import deepspeed_config

    ds = deepspeed_config(cfg, world_size)
    _deepspeed_parses(ds, world_size)


def _deepspeed_parses(ds: dict, world_size: int) -> None:
    """DeepSpeed's ``DeepSpeedConfig`` on the merged dict: unknown keys in its pydantic
    sections (``zero_optimization: {stag: 1}``) and bad values are refused here. Without a
    process group DeepSpeed counts one rank, so the probe carries the per-rank batch
    (``deepspeed_config`` has checked the layout for ``world_size`` already)."""
    from deepspeed.runtime.config import DeepSpeedConfig

    probe = dict(ds)
    probe.pop("optimizer", None)  # built by DeepSpeed at initialize, from its own type
    probe["train_batch_size"] = ds["train_batch_size"] // world_size
    try:
        DeepSpeedConfig(probe)
    except ValidationError as err:
        e = err.errors()[0]
        where = ".".join(str(x) for x in e["loc"])
        raise ConfigError(
            f"deepspeed ({err.title}) {where} = {e.get('input')!r}: {e['msg']}; fix the "
            "deepspeed: section or its JSON (https://www.deepspeed.ai/docs/config-json/)"
        ) from None
    except (AssertionError, ValueError, KeyError, TypeError) as err:
        raise ConfigError(
            f"deepspeed = {_short(ds)}: DeepSpeed refuses it ({type(err).__name__}: {err}); "
            "fix the deepspeed: section or its JSON (https://www.deepspeed.ai/docs/config-json/)"
        ) from None


def _short(d: dict) -> str:
    text = repr({k: v for k, v in d.items() if k not in ("steps_per_print",)})
    return text if len(text) < 200 else text[:197] + "..."


def hostfile_world_size(hostfile: str | Path, nproc: int | None) -> int:
    """Ranks a DeepSpeed hostfile launch starts: the hosts' slots, or ``nproc`` per host."""
    path = Path(hostfile)
    try:
        lines = path.read_text().splitlines()
    except OSError as err:
        raise ConfigError(
            f"--hostfile = {str(hostfile)!r}: cannot be read ({err.strerror or err}); give "
            "a DeepSpeed hostfile, one `HOST slots=N` line per node"
        ) from None
    slots = []
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        host, _, rest = line.partition(" ")
        value = rest.strip().removeprefix("slots=")
        if not value.isdigit() or int(value) < 1:
            raise ConfigError(
                f"--hostfile = {str(hostfile)!r}: line {line!r} is not `HOST slots=N` "
                "(N >= 1 ranks on that host)"
            )
        slots.append(int(value))
    if not slots:
        raise ConfigError(f"--hostfile = {str(hostfile)!r}: names no host; add `HOST slots=N`")
    return nproc * len(slots) if nproc else sum(slots)


def launch_world_size(nproc: int | None, hostfile: str | None, devices) -> int:
    """The world size `megawsd train` will launch (``devices()``: ranks on this node when
    neither --nproc nor --hostfile is given, or the world of an enclosing launch)."""
    if hostfile:
        return hostfile_world_size(hostfile, nproc)
    if nproc:
        return nproc
    env = os.environ.get("WORLD_SIZE")
    return int(env) if env and env.isdigit() else devices()
