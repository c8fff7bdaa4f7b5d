"""Print and plot LR schedules; compare several on one figure.

  megawsd schedule --family wsd --steps 10000 --warmup 500 --decay 20% --shape 1-sqrt --lr 3e-4
  megawsd schedule configs/llama-20m.yaml --plot lr.png --compare shape=linear family=cosine
  megawsd schedule --family constant --steps 4000 --warmup 200 --branch 3000:800:1-sqrt

CONFIG is a run config (its `schedule:` block; total_steps and peak_lr default to the run's
`steps`/`tokens` and `optimizer.lr`) or a bare schedule mapping. Flags override it. A --compare
SPEC is another config file, or comma-separated `key=value` changes to the main schedule
(keys: the flag names below without dashes, or ScheduleConfig fields).
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path
from typing import Any

from megawsd.errors import ConfigError, field_error
from megawsd.schedules import build_schedule

# flag / --compare key -> ScheduleConfig field
_ALIASES = {
    "family": "family",
    "steps": "total_steps",
    "warmup": "warmup_steps",
    "warmup_shape": "warmup_shape",
    "warmup_init": "warmup_init",
    "decay": "decay_steps",
    "shape": "decay_shape",
    "min_ratio": "min_ratio",
    "power": "power",
    "half_life": "half_life",
    "lr": "peak_lr",
    "units_per_step": "units_per_step",
}
_NUMERIC = {
    "total_steps": int,
    "warmup_init": float,
    "min_ratio": float,
    "power": float,
    "half_life": float,
    "peak_lr": float,
    "units_per_step": int,
}
_LENGTHS = {"warmup_steps", "decay_steps"}
_WSD_ONLY = {"decay_steps", "decay_shape"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("config", nargs="?", help="run config or schedule YAML/JSON")
    p.add_argument("--family", help="wsd | cosine | linear | constant | inverse-sqrt | multi-step")
    p.add_argument("--steps", help="total_steps: where the schedule ends")
    p.add_argument("--warmup", help="warmup steps: a count, a fraction (0.01) or '1%%'")
    p.add_argument("--warmup-shape", help="linear | cosine | 1-sqrt | exp | log")
    p.add_argument("--warmup-init", help="warmup start factor (default 0)")
    p.add_argument("--decay", help="WSD decay length: a count, a fraction (0.2) or '20%%'")
    p.add_argument(
        "--shape",
        help="decay shape: linear, 1-sqrt, cosine, minus_sqrt, exponential, "
        "half-life, 1-square, mirror-cosine, power",
    )
    p.add_argument("--min-ratio", help="final LR as a fraction of the peak")
    p.add_argument("--power", help="exponent a of the 'power' shape (1 - p^a)")
    p.add_argument("--half-life", help="steps per halving of the 'half-life' shape")
    p.add_argument("--lr", help="peak LR (the table then shows LRs, not just factors)")
    p.add_argument(
        "--branch",
        action="append",
        default=[],
        metavar="AT:DECAY[:SHAPE[:MIN_RATIO]]",
        help="add a cooldown branch at step AT with DECAY steps (repeatable)",
    )
    p.add_argument(
        "--compare",
        nargs="+",
        default=[],
        metavar="SPEC",
        help="other schedules: a config file or key=value[,key=value] changes",
    )
    p.add_argument("--plot", metavar="PNG", help="write the curves to this image")
    p.add_argument("--json", action="store_true", help="print the schedule dict(s) as JSON")


def run(args: argparse.Namespace) -> int:

    base = _load_config(args.config) if args.config else {}
    for flag, fld in _ALIASES.items():
        value = getattr(args, flag, None)
        if value is not None:
            _set(base, fld, value, f"--{flag.replace('_', '-')}")
    base.setdefault("family", "wsd")
    if (
        base["family"] in ("wsd", "cosine", "linear", "multi-step")
        and base.get("total_steps") is None
    ):
        raise field_error(
            "--steps", None, f"family {base['family']!r} needs the run length; add --steps N"
        )
    main = build_schedule(base)
    for spec in args.branch:
        main = _apply_branch(main, spec)
    schedules = [(_label(main, None), main)]
    for spec in args.compare:
        other = build_schedule(_compare_config(base, spec))
        schedules.append((_label(other, spec), other))

    if args.json:
        print(
            json.dumps(
                [s.to_dict() for _, s in schedules] if len(schedules) > 1 else main.to_dict(),
                indent=2,
            )
        )
    else:
        _print_table(schedules)
    if args.plot:
        path = _plot(schedules, args.plot)
        print(f"wrote {path}")
    return 0


# -- config assembly ---------------------------------------------------------------------


def _load_config(path: str) -> dict[str, Any]:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise field_error("config", path, "no such file; give a run config or schedule YAML/JSON")
    try:
        data = yaml.safe_load(p.read_text())  # JSON is YAML
    except yaml.YAMLError as err:
        raise field_error("config", path, f"not valid YAML/JSON: {err}") from None
    if not isinstance(data, dict):
        raise field_error("config", path, "expected a mapping (a run config or a schedule)")
    if "schedule" not in data:
        return dict(data)  # a bare schedule mapping
    sched = dict(data["schedule"] or {})
    sched.setdefault("family", "constant")  # the run config's default
    if sched.get("total_steps") is None and sched["family"] != "constant":
        steps = data.get("steps")
        if steps is None and data.get("tokens") is not None:
            try:
                steps = math.ceil(
                    float(data["tokens"]) / (data["global_batch_size"] * data["seq_len"])
                )
            except (KeyError, TypeError):
                raise field_error(
                    "tokens",
                    data.get("tokens"),
                    "a token budget needs global_batch_size and seq_len",
                ) from None
        if steps is not None:
            sched["total_steps"] = int(float(steps))
    lr = (data.get("optimizer") or {}).get("lr")
    if lr is not None:
        sched.setdefault("peak_lr", float(lr))
    return sched


def _parse_length(text: str, flag: str) -> int | float:
    t = text.strip()
    try:
        if t.endswith("%"):
            return float(t[:-1]) / 100.0
        if all(ch.isdigit() for ch in t.replace("_", "")):
            return int(t.replace("_", ""))
        return float(t)
    except ValueError:
        raise field_error(
            flag, text, "give a step count, a fraction (0.2) or a percentage ('20%')"
        ) from None


def _set(cfg: dict[str, Any], fld: str, text: Any, flag: str) -> None:
    if not isinstance(text, str):
        cfg[fld] = text
    elif fld in _LENGTHS:
        cfg[fld] = _parse_length(text, flag)
    elif fld in _NUMERIC:
        try:
            value = float(text)
            cfg[fld] = int(value) if _NUMERIC[fld] is int and value.is_integer() else value
        except ValueError:
            raise field_error(flag, text, "give a number") from None
    else:
        cfg[fld] = text


def _compare_config(base: dict[str, Any], spec: str) -> dict[str, Any]:
    if os.path.isfile(spec):
        cfg = _load_config(spec)
        if base.get("total_steps") is not None:
            cfg.setdefault("total_steps", base["total_steps"])
        return cfg
    changes: dict[str, Any] = {}
    for item in spec.split(","):
        key, sep, value = item.partition("=")
        key = key.strip().lstrip("-").replace("-", "_")
        if not sep or not key:
            raise field_error(
                "--compare",
                spec,
                "give a config file or key=value[,key=value] (e.g. shape=linear,decay=0.1)",
            )
        fld = _ALIASES.get(key, key)
        _set(changes, fld, value.strip(), f"--compare {key}")
    cfg = dict(base)
    if changes.get("family", cfg.get("family")) != "wsd":
        for k in _WSD_ONLY - set(changes):
            cfg.pop(k, None)
    if changes.get("family", cfg.get("family")) != "multi-step":
        cfg.pop("milestones", None)
        cfg.pop("factors", None)
    cfg["branches"] = []
    cfg.update(changes)
    return cfg


def _apply_branch(schedule, spec: str):
    parts = spec.split(":")
    if len(parts) < 2 or len(parts) > 4:
        raise field_error(
            "--branch", spec, "give AT:DECAY[:SHAPE[:MIN_RATIO]], e.g. 3000:800:1-sqrt"
        )
    try:
        at, decay = int(parts[0]), int(parts[1])
        min_ratio = float(parts[3]) if len(parts) > 3 else None
    except ValueError:
        raise field_error(
            "--branch", spec, "AT and DECAY are step counts, MIN_RATIO a number"
        ) from None
    shape = parts[2] if len(parts) > 2 else "1-sqrt"
    return schedule.branch(at, decay, shape, min_ratio)


def _label(schedule, spec: str | None) -> str:
    return summary(schedule) if spec is None or os.path.isfile(spec) else f"{spec}"


def summary(s) -> str:
    """What the schedule does, in whole optimizer steps: where warmup reaches the peak, the
    last step at the peak before the decay, where the LR reaches its end (a cooldown branch
    ends where its decay ends, not at the parent's T). Issue #21: the table said ``T=4000``
    for a branch ending at 3800 and ``decay=953.8`` steps for a 20% decay of 4769."""
    c = s.config
    end = s.total_steps
    parts = [c.family]
    if s.warmup_steps > 0:
        parts.append(f"warmup to step {math.ceil(s.warmup_steps - 1e-9)} ({c.warmup_shape})")
    if c.branches:
        for b in c.branches:
            parts.append(f"branch at {b.at_step}: {b.decay_steps}-step {b.shape} decay")
    elif c.family in ("wsd", "cosine", "linear") and s.decay_start is not None and end:
        shape = c.shape if c.family == "wsd" else c.family
        parts.append(f"{shape} decay from step {math.floor(s.decay_start + 1e-9)} to {end}")
    if c.min_ratio:
        parts.append(f"min={c.min_ratio:g}")
    if end is not None:
        parent = c.branches and c.total_steps is not None and c.total_steps != end
        parts.append(f"ends at step {end}" + (f" (parent T={c.total_steps})" if parent else ""))
    if c.units_per_step != 1:
        parts.append(f"units/step={c.units_per_step}")
    if c.compat is not None:
        parts.append(f"compat={c.compat}")
    return ", ".join(parts)


def key_rows(s) -> list[tuple[int, str]]:
    """The schedule's key steps, with "decay start" on the last step at the peak LR: a decay
    that starts between two steps (a 20% decay of 4769 starts at 3815.2) showed its first
    step below the peak under that name."""
    rows = dict(s.key_steps())
    for step, label in list(rows.items()):
        if label == "decay start" and s.decay_start is not None:
            del rows[step]
            rows.setdefault(math.floor(s.decay_start + 1e-9), label)
    return sorted(rows.items())


# -- output ------------------------------------------------------------------------------


def _print_table(schedules: list) -> None:
    from rich.console import Console
    from rich.table import Table

    rows: dict[int, str] = {}
    for i, (_, s) in enumerate(schedules):
        for step, label in key_rows(s):
            rows.setdefault(step, label if i == 0 else f"{label} (#{i + 1})")
    with_lr = all(s.peak_lr is not None for _, s in schedules)
    table = Table(
        title="LR at key steps" + ("" if with_lr else " (factor of the peak LR)"),
        show_edge=False,
        pad_edge=False,
    )
    table.add_column("step", justify="right")
    table.add_column("phase")
    for name, _ in schedules:
        table.add_column(name, justify="right", overflow="fold")
    for step in sorted(rows):
        cells = [f"{(s.lr_at(step) if with_lr else s.factor(step)):.4g}" for _, s in schedules]
        table.add_row(str(step), rows[step], *cells)
    Console(width=max(100, 30 + 28 * len(schedules))).print(table)


def _plot(schedules: list, out: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ends = [s.total_steps for _, s in schedules if s.total_steps is not None]
    last = max(ends) if ends else max(step for _, s in schedules for step, _ in s.key_steps()) * 2
    last = max(int(last * 1.05), 10)
    stride = max(1, last // 4000)
    steps = list(range(0, last + 1, stride))
    with_lr = all(s.peak_lr is not None for _, s in schedules)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, s in schedules:
        ys = [s.lr_at(k) if with_lr else s.factor(k) for k in steps]
        ax.plot(steps, ys, label=name, linewidth=1.6)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("learning rate" if with_lr else "LR / peak LR")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(out)
    if path.parent and not path.parent.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


__all__ = ["add_arguments", "run", "ConfigError"]
