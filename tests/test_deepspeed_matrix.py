"""DeepSpeed's option space for schedule-free: every cell exact against the one-process
reference, or refused at initialize by a ConfigError that names the option.

The cells and their declared outcomes are tests/workers/ds_matrix_cells.py (``ROWS``), which
also renders the support table of docs/deepspeed.md. Runs:

- default: every refusal (each refused option alone, and through a callable / object / stock
  optimizer) and four exact cells combining the options most likely to regress, all in ONE
  2-rank launch (about a minute on an idle 2-core box);
- ``-m slow``: the cross product (dtype x accumulation x clipping x optimizer source, each
  saved -> reloaded inside eval_mode -> continued; every ZeRO switch on every dtype), one
  2-rank launch per ZeRO stage.

Every launch runs as on a CPU without fp16 kernels (``MEGAWSD_TEST_MASK_CPU_FP16=1``): DeepSpeed
refuses fp16 on such CPUs, the worker patches the capability DeepSpeed asks, and the fp16
cells must still be exact, on any x86-64 CPU.

"Exact" means, against the reference (megawsd's ScheduleFreeAdamW, one process, whole batch):
losses to 1e-4 (fp32; 2e-2 for bf16/fp16 working weights), step counters k equal, the loss
at x in eval_mode to the same tolerance and unchanged by a nested block, y restored
bit-exactly, the exported x to 1e-4 (fp32), and a reload of the step-3 checkpoint inside
eval_mode evaluating the same x and continuing bit-exactly.
"""

from __future__ import annotations

import math
import tempfile

import pytest

from megawsd.errors import ConfigError
from megawsd.integrations.deepspeed import split_config
from tests.dist_helpers import run_ranks
from tests.workers.ds_matrix import MASK_FP16_ENV, enable_cpu_fp16
from tests.workers.ds_matrix_cells import (
    DOCS,
    EXACT,
    ROWS,
    STAGES,
    cells,
    docs_table,
    expected,
    support_table,
)

WORKER = "tests/workers/ds_matrix.py"
REL = {"fp32": 1e-4, "lowp": 2e-2}
X_LOWP_ABS = 5e-3  # exported x of bf16/fp16 runs vs the fp32 reference (weights ~0.02-1)


def run_cells(selected, timeout=1800):
    """One 2-rank launch for ``selected`` cells: (results by cell name, references).

    Exact cells run first, refusals after, PipelineModule cells last: building a
    PipelineModule sets DeepSpeed's process-global topology, which later plain engines in
    the same process would pick up.
    """
    selected = sorted(selected, key=lambda c: (c.model == "pipeline", expected(c) != EXACT))
    with tempfile.TemporaryDirectory(prefix="megawsd-ds-matrix-") as tmp:
        args = {
            "tmp": tmp,
            "references": sorted({c.clip for c in selected}),
            "cells": [{"stage": c.stage, "rows": list(c.rows)} for c in selected],
        }
        # As on a CPU without fp16 kernels, whatever this one has: the fp16 cells must run
        # on every CPU the suite meets (tests/workers/ds_matrix.py, enable_cpu_fp16).
        res = run_ranks(WORKER, 2, args, timeout=timeout, env={MASK_FP16_ENV: "1"})
    return res[0], res[0]["reference"]


def close(a, b, rel):
    return len(a) == len(b) and all(math.isclose(x, y, rel_tol=rel) for x, y in zip(a, b))


def check_cell(cell, got, refs):
    """Assert ``got`` (rank 0's report for ``cell``) is the declared outcome; every
    disagreement is listed (one cell can break in several independent ways)."""
    want = expected(cell)
    if want != EXACT:
        field = want.split(": ", 1)[1]
        assert got["outcome"] == "refused", f"{cell.name}: expected {want}, got {got}"
        assert got["message"].startswith(f"{field} ="), got["message"]
        return
    assert got["outcome"] == "initialized" and "losses" in got, got
    ref = refs[str(float(cell.clip))]
    rel = REL["fp32" if cell.dtype == "fp32" else "lowp"]
    bad = []

    def want_true(ok, what):
        if not ok:
            bad.append(what)

    off = got["offload"]
    offloads_opt = "offload_opt" in cell.rows or "offload_auto" in cell.rows
    want_true(
        off["optimizer"] == offloads_opt and off["param"] == ("offload_param" in cell.rows),
        f"DeepSpeed's offload flags {off} for rows {cell.rows}",
    )
    if offloads_opt:  # the offloaded step: CPU masters, the C++ CPU kernel
        want_true(
            off["master_devices"] == ["cpu"] and off["auto_backends"] == ["cpp"],
            f"offloaded masters {off}",
        )
    # What the step really ran: "auto" on CPU tensors is the C++ kernel (no fallback).
    ran = {"auto": "cpp"}.get(cell.backend, cell.backend)
    want_true(
        got["ran_backends"] == [ran],
        f"ScheduleFreeAdamW ran {got['ran_backends']}, expected {ran!r} ({cell.backend!r})",
    )
    want_true(
        close(got["losses"], ref["losses"], rel),
        f"losses {got['losses']} != reference {ref['losses']}",
    )
    want_true(got["k"] == ref["k"] == [6, 6], f"k {got['k']} != reference {ref['k']}")
    want_true(
        got["lr_step"] == 6 and got["skipped"] == 0,
        f"lr_step {got['lr_step']}, skipped {got['skipped']}",
    )
    outer, inner, outer_after = got["eval"]
    want_true(
        math.isclose(outer, ref["eval_loss"], rel_tol=rel),
        f"eval loss at x {outer} != reference {ref['eval_loss']}",
    )
    want_true(
        inner == outer == outer_after,
        f"nested eval_mode: outer {outer}, inner {inner}, outer after inner {outer_after}",
    )
    before, after = got["train_around_eval"]
    want_true(
        before == after and outer != before and got["restored_exact"],
        f"y around eval_mode: {before} -> {after}, restored {got['restored_exact']}",
    )
    want_true("x_error" not in got, f"exported x: {got.get('x_error')}")
    want_true(got.get("x_names_ok"), "exported x: parameter names differ")
    if cell.dtype == "fp32":
        want_true(got["x_close_fp32"], f"exported x off the reference by {got['x_maxabs']}")
    else:
        want_true(got["x_maxabs"] <= X_LOWP_ABS, f"exported x off by {got['x_maxabs']}")
    if cell.ckpt:
        want_true(got["ckpt_loaded_step"] == 3, f"loaded step {got['ckpt_loaded_step']}")
        # The loaded x, not y, not the reverted stash; then the same trajectory, bit for bit.
        want_true(
            got["ckpt_eval_loss"] == outer,
            f"eval after load in eval_mode {got['ckpt_eval_loss']} != {outer}",
        )
        want_true(
            got["ckpt_losses"] == got["losses"][3:],
            f"continued {got['ckpt_losses']} != straight {got['losses'][3:]}",
        )
        want_true(got["ckpt_k"] == got["k"], f"k after reload {got['ckpt_k']}")
        want_true(
            got.get("ckpt_offline_x_equal"),
            f"consolidate_checkpoint(x) != live export {got.get('ckpt_offline_error', '')}",
        )
    if cell.ckpt and any(r.startswith("offload") for r in cell.rows):
        # The same checkpoint through megawsd's resharding path: the same x and trajectory.
        want_true(
            got["reshard_loaded_step"] == 3 and got["reshard_k"] == got["k"],
            f"resharded load: step {got['reshard_loaded_step']}, k {got['reshard_k']}",
        )
        want_true(
            got["reshard_eval_loss"] == outer,
            f"eval after resharded load {got['reshard_eval_loss']} != {outer}",
        )
        want_true(
            got["reshard_losses"] == got["losses"][3:],
            f"continued after resharded load {got['reshard_losses']} != {got['losses'][3:]}",
        )
    assert not bad, f"{cell.name}:\n  " + "\n  ".join(bad)


# ------------------------------------------------------------------------------------------
# fast: the table in the docs, and the config-level refusals without ranks


def test_docs_support_table_is_the_rendered_matrix():
    text = DOCS.read_text()
    assert docs_table(text) == support_table(), (
        "docs/deepspeed.md is out of date: run `python -m tests.workers.ds_matrix_cells --write`"
    )


@pytest.mark.parametrize(
    "cell",
    [c for c in cells() if expected(c) != EXACT and c.opt == "config" and c.model == "plain"],
    ids=lambda c: c.name,
)
def test_config_refusals_without_ranks(cell):
    from tests.workers.ds_matrix import ds_config

    field = expected(cell).split(": ", 1)[1]
    with pytest.raises(ConfigError, match=f"^{field} ="):
        split_config(ds_config(cell, world=2))


def test_every_row_and_stage_is_covered_by_the_full_matrix():
    full = cells(full=True)
    for row in ROWS:
        for s in STAGES:
            if row.outcome.get(s) is not None:
                hit = [
                    c
                    for c in full
                    if c.stage == s
                    and (row.key in c.rows or (row.key == "fp32" and c.dtype == "fp32"))
                ]
                assert hit, (row.key, s)


class _PastDtypeChecks(Exception):
    pass


class _SanityCheckSelf:
    """What DeepSpeedEngine._do_sanity_check reads of the engine before and at its dtype
    checks, for an fp16 config; the next check raises _PastDtypeChecks."""

    def fp16_enabled(self):
        return True

    def bfloat16_enabled(self):
        return False

    def _assert_valid_mixed_precision_config(self):
        raise _PastDtypeChecks


def test_deepspeed_fp16_check_is_the_capability_the_worker_patches(monkeypatch):
    """DeepSpeed 0.19.8 refuses fp16 on a CPU through the accelerator's is_fp16_supported(),
    which reads oneDNN's fp16 support; enable_cpu_fp16 patches exactly that (patching
    supported_dtypes() only, as before, let the engine refuse fp16 on CPUs without fp16
    kernels, AMD EPYC among them). Fails loudly if an upgrade moves the check."""
    import deepspeed.accelerator
    import deepspeed.runtime.engine as ds_engine
    import torch
    from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator

    mkldnn = torch.ops.mkldnn
    monkeypatch.setattr(mkldnn, "_is_mkldnn_fp16_supported", lambda: True)
    acc = CPU_Accelerator()
    assert acc.is_fp16_supported() and torch.float16 in acc.supported_dtypes()
    monkeypatch.setattr(mkldnn, "_is_mkldnn_fp16_supported", lambda: False)
    assert not acc.is_fp16_supported() and torch.float16 not in acc.supported_dtypes()
    monkeypatch.setattr(ds_engine, "get_accelerator", lambda: acc)
    with pytest.raises(ValueError, match="fp16 is not supported"):
        ds_engine.DeepSpeedEngine._do_sanity_check(_SanityCheckSelf())

    # The worker's patch, with the mask its launches set: DeepSpeed's check now passes.
    monkeypatch.setattr(deepspeed.accelerator, "get_accelerator", lambda: acc)
    monkeypatch.setenv(MASK_FP16_ENV, "1")
    assert enable_cpu_fp16() == {"native": False, "masked": True}
    with pytest.raises(_PastDtypeChecks):
        ds_engine.DeepSpeedEngine._do_sanity_check(_SanityCheckSelf())
    assert torch.float16 in acc.supported_dtypes()


# ------------------------------------------------------------------------------------------
# real ranks


@pytest.fixture(scope="module")
def default_runs():
    return run_cells(cells(), timeout=900)


@pytest.mark.dist
def test_matrix_ran_without_cpu_fp16(default_runs):
    """The launch ran as on a CPU without fp16 kernels (so its fp16 cells below prove fp16
    runs, exactly, on any x86-64 CPU)."""
    got, _ = default_runs
    assert got["cpu_fp16"] == {"native": False, "masked": True}, got["cpu_fp16"]
    assert any(c.dtype == "fp16" and expected(c) == EXACT for c in cells())


@pytest.mark.dist
@pytest.mark.parametrize("cell", cells(), ids=lambda c: c.name)
def test_matrix_default(default_runs, cell):
    got, refs = default_runs
    check_cell(cell, got[cell.name], refs)


_FULL: dict[int, tuple] = {}


def _full_stage(stage):
    if stage not in _FULL:
        _FULL[stage] = run_cells([c for c in cells(full=True) if c.stage == stage], timeout=3600)
    return _FULL[stage]


@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.parametrize("cell", cells(full=True), ids=lambda c: c.name)
def test_matrix_full(cell):
    # The full product (~6 min) is deselected by default (pyproject: -m 'not slow').
    got, refs = _full_stage(cell.stage)
    check_cell(cell, got[cell.name], refs)
