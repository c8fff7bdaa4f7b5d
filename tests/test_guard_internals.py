"""DeepSpeed internals the training loop and its stability gate rely on, pinned.

``megawsd.train.guard.StepGate`` wraps the inner (client) optimizer's ``step`` and, at stage 0
in fp32, ``engine.clip_fp32_gradients``; it reads the wrapper's ``_global_grad_norm`` and
``overflow``. The loop calls ``engine.step()`` after every backward because DeepSpeed counts
micro-steps there. None of this is public API: these fast tests (no ranks) read DeepSpeed's
own classes and fail naming the attribute when an upgrade changes one of them. The two tests
on a real engine (1 rank) check what the pins imply: the gate's place among the wrappers at
stage 0, and DeepSpeed's micro-step counters after the loop's steps.
"""

from __future__ import annotations

import ast
import inspect
import textwrap
from types import SimpleNamespace

import pytest

from megawsd.integrations import ds_layout
from megawsd.train.guard import DS_CLIP, DS_GRAD_NORM, DS_OVERFLOW
from tests.dist_helpers import run_ranks


def _source(cls, name: str) -> str:
    """The source of ``cls.name`` as written in DeepSpeed's class (read from the class, so a
    decorator such as ZeRO-3's nvtx wrapper does not hide it)."""
    src = inspect.getsource(cls)
    for node in ast.parse(textwrap.dedent(src)).body[0].body:
        if isinstance(node, ast.FunctionDef) and node.name == name:
            return ast.get_source_segment(textwrap.dedent(src), node)
    raise AssertionError(
        f"DeepSpeed {cls.__name__}.{name} is gone: megawsd.train.guard or "
        "the loop relies on it (see tests/test_guard_internals.py)"
    )


def _in_order(cls, method: str, first: str, then: str) -> None:
    """``first`` occurs in ``cls.method`` before ``then`` (e.g. the norm is stored before the
    inner optimizer runs)."""
    src = _source(cls, method)
    i, j = src.find(first), src.find(then)
    assert i >= 0, f"DeepSpeed {cls.__name__}.{method} no longer contains {first!r}"
    assert j >= 0, f"DeepSpeed {cls.__name__}.{method} no longer contains {then!r}"
    assert i < j, f"DeepSpeed {cls.__name__}.{method}: {first!r} now comes after {then!r}"


def _contains(cls, method: str, text: str) -> None:
    assert text in _source(cls, method), (
        f"DeepSpeed {cls.__name__}.{method} no longer contains {text!r}"
    )


def test_optimizer_wrappers_pinned():
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
    from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    norm, overflow = f"self.{DS_GRAD_NORM} =", f"self.{DS_OVERFLOW} ="
    for cls in (
        DeepSpeedZeroOptimizer,
        DeepSpeedZeroOptimizer_Stage3,
        BF16_Optimizer,
        FP16_Optimizer,
    ):
        # ds_layout names the paths by class name; the gate wraps the client optimizer,
        # which every wrapper keeps as self.optimizer
        assert ds_layout._is_wrapper(_engine_with(cls).optimizer), cls.__name__
        _contains(cls, "__init__", "self.optimizer = init_optimizer")
        _contains(cls, "step", overflow)  # deepspeed_skipped() reads it
    # ZeRO 1/2: the global pre-clip norm is stored, then the inner step runs per group
    _in_order(DeepSpeedZeroOptimizer, "step", norm, "self._optimizer_step(")
    _contains(DeepSpeedZeroOptimizer, "_optimizer_step", "self.optimizer.step()")
    assert ds_layout.path_name(_engine_with(DeepSpeedZeroOptimizer)) == "zero12"
    # ZeRO 3: the same, one inner step per sub-group (the gate decides on the first)
    _in_order(DeepSpeedZeroOptimizer_Stage3, "step", norm, "self._optimizer_step(")
    _contains(DeepSpeedZeroOptimizer_Stage3, "_optimizer_step", "optimizer.step()")
    _contains(
        DeepSpeedZeroOptimizer_Stage3, "_optimizer_step", "step_with_gradscaler(self.optimizer)"
    )
    assert ds_layout.path_name(_engine_with(DeepSpeedZeroOptimizer_Stage3)) == "zero3"
    # BF16_Optimizer: the norm, then the inner step; NaN/Inf: overflow and return
    _in_order(BF16_Optimizer, "step", norm, "self.optimizer.step()")
    _in_order(BF16_Optimizer, "step", f"self.{DS_OVERFLOW} = True", "self.optimizer.step()")
    assert ds_layout.path_name(_engine_with(BF16_Optimizer)) == "bf16_optimizer"
    # FP16_Optimizer (stage 0 fp16): the gate computes the norm itself (path "stage0")
    _in_order(FP16_Optimizer, "step", overflow, "self.optimizer.step()")
    assert ds_layout.path_name(_engine_with(FP16_Optimizer)) == "stage0"


def test_engine_pinned():
    from deepspeed.runtime.engine import DeepSpeedEngine

    # stage 0 fp32: the engine clips param.grad in place through the attribute the gate wraps,
    # before the optimizer's step, and only then (ZeRO and bf16/fp16 clip inside the wrapper)
    assert list(inspect.signature(getattr(DeepSpeedEngine, DS_CLIP)).parameters) == ["self"]
    _in_order(DeepSpeedEngine, "_take_model_step", f"self.{DS_CLIP}()", "self.optimizer.step()")
    _contains(
        DeepSpeedEngine,
        "_take_model_step",
        "if not (self.fp16_enabled() or self.bfloat16_enabled() or self.zero_optimization()):",
    )
    # the overflow flag makes DeepSpeed count a skipped step; a vetoed step is added by the
    # guard (engine.skipped_steps), and global_steps counts attempts either way
    _contains(DeepSpeedEngine, "_take_model_step", f"overflow = self.optimizer.{DS_OVERFLOW}")
    _contains(DeepSpeedEngine, "_take_model_step", "self.skipped_steps += 1")
    _contains(DeepSpeedEngine, "_take_model_step", "self.global_steps += 1")
    # the loop calls engine.step() after every backward: off the boundary it counts the
    # micro-step, which decides the next boundary (and when backward reduces)
    _contains(DeepSpeedEngine, "step", "self.micro_steps += 1")
    _in_order(
        DeepSpeedEngine,
        "step",
        "if self.is_gradient_accumulation_boundary():",
        "self._take_model_step(",
    )
    _contains(
        DeepSpeedEngine,
        "is_gradient_accumulation_boundary",
        "(self.micro_steps + 1) % self.gradient_accumulation_steps() == 0",
    )


def _engine_with(cls) -> SimpleNamespace:
    """What ds_layout reads of an engine: the type name of its optimizer (DeepSpeed's)."""
    return SimpleNamespace(optimizer=type(cls.__name__, (), {})())


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory):
    from tests.workers.train_common import prepare_data

    data = prepare_data(tmp_path_factory.getbasetemp() / "train-data")
    tmp = tmp_path_factory.mktemp("guard-order")
    return run_ranks(
        "tests/workers/guard_order.py", 1, {"tmp": str(tmp), "data": str(data)}, timeout=300
    )[0]


@pytest.mark.dist
def test_stage0_gate_runs_before_the_step_hook(one_rank):
    """Stage 0, schedule-free: the gate and megawsd's step-id hook wrap the same ``step``;
    the gate is the outer one. A vetoed step returns before the hook (no set_step_id) and
    changes nothing; applied steps get the engine's step id; the counters advance per
    applied step only."""
    r = one_rank["order"]
    assert r["gate_wraps_hook"] and r["hook_installed"]
    assert r["applied"] == [True, False, True]
    assert r["step_ids"] == [[0], [], [2]]  # engine.global_steps before each applied step
    assert r["unchanged_when_vetoed"]
    assert r["k"] == 2 and r["global_steps"] == 3  # DeepSpeed counts attempts


@pytest.mark.dist
def test_loop_steps_the_engine_after_every_backward(one_rank):
    """train(): engine.step() after each of the gas micro-batches, the boundary on the last
    one only; DeepSpeed's counters end at steps x gas micro-steps and steps updates."""
    r = one_rank["loop"]
    gas, steps = r["gas"], r["steps"]
    assert gas > 1
    assert r["boundary"] == ([False] * (gas - 1) + [True]) * steps
    assert r["micro_steps"] == gas * steps and r["global_steps"] == steps
