"""The runs table: a run tree as JSON records (for scripts) and as a rich table (for people).

The JSON schema is documented in ``megawsd/commands/runs.py`` and versioned by
``SCHEMA``; bump it when a field changes meaning or disappears (adding fields is compatible).
"""

from __future__ import annotations

import math
from typing import Any

from megawsd.analysis.runs_tree import RunNode, schedule_summary

SCHEMA = "megawsd.runs/1"
# The table's train column: the mean train loss over this many last steps (a single batch's
# loss next to a validation loss over many windows read as a gap that was noise).
TRAIN_SMOOTH_STEPS = 20
LOSS_DECIMALS = 3  # every loss in the table, so 3.800 and 3.746 line up

_STATUS_STYLE = {
    "created": "blue",
    "running": "cyan",
    "done": "green",
    "failed": "red",
    "stopped": "yellow",
    "unknown": "dim",
}


def _json_number(x: float | None) -> float | None:
    """JSON has no NaN/inf: a diverged loss is reported as null (and ``diverged`` is set)."""
    if x is None or not math.isfinite(x):
        return None
    return x


def node_record(node: RunNode) -> dict[str, Any]:
    train_loss, val_loss = node.train_loss, node.val_loss
    diverged = any(v is not None and not math.isfinite(v) for v in (train_loss, val_loss))
    return {
        "name": node.name,
        "path": node.rel,
        "abs_path": str(node.path.resolve()),
        "parent": None if node.parent is None else node.parent.rel,
        "depth": node.depth,
        "kind": node.kind,
        "status": node.status,
        "alive": node.alive,
        "step": node.step,
        "total_steps": node.total_steps,
        "tokens": node.tokens,
        "token_budget": node.token_budget,
        "branch_step": node.branch_step,
        "optimizer": node.optimizer,
        "schedule": node.schedule,
        "schedule_summary": schedule_summary(node.schedule),
        "train_loss": _json_number(train_loss),
        "train_loss_smoothed": _json_number(node.smoothed_train_loss(TRAIN_SMOOTH_STEPS)),
        "train_loss_smoothed_steps": TRAIN_SMOOTH_STEPS,
        "val_loss": _json_number(val_loss),
        "val_ppl": _json_number(node.val_ppl),
        "diverged": diverged,
        "checkpoints": list(node.checkpoints),
        "latest_checkpoint": node.latest_checkpoint,
        "stability_events": len(node.events),
        "updated": node.info.get("updated"),
        "warnings": list(node.warnings),
    }


def tree_json(root: RunNode) -> dict[str, Any]:
    """``{"schema", "root", "runs": [record, ...]}``, runs in depth-first tree order."""
    return {
        "schema": SCHEMA,
        "root": str(root.path.resolve()),
        "runs": [node_record(n) for n in root.walk()],
    }


def human_count(n: int | None) -> str:
    """1234567 -> '1.23M' (tokens read better with a unit)."""
    if n is None:
        return "-"
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(n)


def _loss(x: float | None) -> str:
    """A loss with LOSS_DECIMALS decimals (every loss column alike)."""
    if x is None:
        return "-"
    return f"{x:.{LOSS_DECIMALS}f}" if math.isfinite(x) else str(x)


def _fmt(x: float | None, digits: int = 4) -> str:
    if x is None:
        return "-"
    if not math.isfinite(x):
        return str(x)
    return f"{x:.{digits}g}" if abs(x) < 1e4 else f"{x:.3e}"


def _tree_label(node: RunNode) -> str:
    """The name with box-drawing guides so the table reads as a tree."""
    if node.parent is None:
        return node.name
    guides = []
    n = node
    while n.parent is not None:
        siblings = n.parent.branches
        last = siblings[-1] is n
        guides.append(("└─ " if last else "├─ ") if n is node else ("   " if last else "│  "))
        n = n.parent
    return "".join(reversed(guides)) + node.name


def build_table(root: RunNode):
    """A rich Table: one row per run, branches indented under their parent."""
    from rich.table import Table

    table = Table(title=f"runs in {root.path}", title_justify="left", header_style="bold")
    table.add_column("run", no_wrap=True)
    table.add_column("state", no_wrap=True)
    table.add_column("step", justify="right", no_wrap=True)
    table.add_column("tokens", justify="right", no_wrap=True)
    table.add_column("schedule", no_wrap=True)
    table.add_column(f"train (mean, last {TRAIN_SMOOTH_STEPS} steps)", justify="right")
    table.add_column("val", justify="right", no_wrap=True)
    table.add_column("ppl", justify="right", no_wrap=True)
    table.add_column("ckpts", justify="right", no_wrap=True)
    table.add_column("events", justify="right", no_wrap=True)
    for node in root.walk():
        step = "-" if node.step is None else str(node.step)
        if node.total_steps is not None:
            step += f"/{node.total_steps}"
        status = node.status
        state = f"[{_STATUS_STYLE.get(status, '')}]{status}[/]"
        if node.alive is False:
            state = "[red]died[/]"
        if node.warnings:
            state += " [yellow]![/]"
        events = len(node.events)
        table.add_row(
            _tree_label(node),
            state,
            step,
            human_count(node.tokens),
            schedule_summary(node.schedule),
            _loss(node.smoothed_train_loss(TRAIN_SMOOTH_STEPS)),
            _loss(node.val_loss),
            _fmt(node.val_ppl, 5),
            str(len(node.checkpoints)),
            f"[red]{events}[/]" if events else "0",
        )
    return table


def print_table(root: RunNode, console=None) -> None:
    from rich.console import Console

    if console is None:
        console = Console()
        if not console.is_terminal:  # a pipe or a file: do not cut columns at 80 characters
            console = Console(width=160)
    console.print(build_table(root))
    for node in root.walk():
        for w in node.warnings:
            console.print(f"[yellow]warning[/] {node.rel}: {w}")
