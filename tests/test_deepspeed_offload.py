"""ZeRO-Offload with ScheduleFreeAdamW, without ranks: the flags initialize() hands DeepSpeed,
the refusals by name, and the DeepSpeed 0.19.8 internals this relies on. The offloaded runs
themselves are the ``offload_*`` cells of tests/test_deepspeed_matrix.py (one by default,
ZeRO 1-3 x fp32/bf16/fp16 x offload_optimizer/offload_param under ``-m slow``)."""

from __future__ import annotations

import inspect

import pytest
import torch

from megawsd.errors import ConfigError
from megawsd.integrations.deepspeed import (
    _GroupRecord,
    _prepare_client_optimizer,
    _wrap_optimizer_callable,
    split_config,
)
from megawsd.kernels import resolve_backend
from megawsd.optim import ScheduleFreeAdamW

SF = {"type": "ScheduleFreeAdamW", "params": {"lr": 1e-3}}
CPU_OPT = {"offload_optimizer": {"device": "cpu"}}


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))


@pytest.mark.parametrize(
    "stage, zero",
    [(1, CPU_OPT), (2, CPU_OPT), (3, CPU_OPT), (3, {"offload_param": {"device": "cpu"}})],
)
def test_cpu_offload_lifts_deepspeeds_cpu_adam_requirement(stage, zero):
    out, spec, _ = split_config({"optimizer": SF, "zero_optimization": {"stage": stage, **zero}})
    assert spec is not None and "optimizer" not in out
    assert out["zero_force_ds_cpu_optimizer"] is False
    assert out["zero_allow_untested_optimizer"] is True


def test_client_optimizer_object_gets_the_flag_too():
    model = _model()
    cfg = {"zero_optimization": {"stage": 2, **CPU_OPT}}
    _prepare_client_optimizer(ScheduleFreeAdamW(model.parameters()), cfg, model, _GroupRecord())
    assert cfg["zero_force_ds_cpu_optimizer"] is False


def test_users_explicit_false_is_kept_and_true_is_refused_by_name():
    zero = {"stage": 2, **CPU_OPT}
    out, _, _ = split_config(
        {"optimizer": SF, "zero_optimization": zero, "zero_force_ds_cpu_optimizer": False}
    )
    assert out["zero_force_ds_cpu_optimizer"] is False
    with pytest.raises(ConfigError, match="^zero_force_ds_cpu_optimizer = True: .*CPU Adam"):
        split_config(
            {"optimizer": SF, "zero_optimization": zero, "zero_force_ds_cpu_optimizer": True}
        )
    # Without offload the flag does nothing in DeepSpeed: the user's value stays.
    out, _, _ = split_config(
        {"optimizer": SF, "zero_optimization": {"stage": 2}, "zero_force_ds_cpu_optimizer": True}
    )
    assert out["zero_force_ds_cpu_optimizer"] is True


@pytest.mark.parametrize(
    "zero, field",
    [
        (
            {"stage": 3, "offload_optimizer": {"device": "cpu", "ratio": 0.5}},
            "zero_optimization.offload_optimizer.ratio",
        ),
        ({"stage": 2, "cpu_offload": True}, "zero_optimization.cpu_offload"),
        ({"stage": 3, "cpu_offload_param": True}, "zero_optimization.cpu_offload_param"),
        (
            {"stage": 1, "offload_optimizer": {"device": "nvme", "nvme_path": "/tmp"}},
            "zero_optimization.offload_optimizer.device",
        ),
    ],
)
def test_untested_offload_forms_are_refused_by_name(zero, field):
    with pytest.raises(ConfigError, match=f"^{field} = "):
        split_config({"optimizer": SF, "zero_optimization": zero})


def test_callable_sets_the_flag_before_deepspeed_parses_the_config(monkeypatch):
    """DeepSpeed reads the config before it calls the callable, so the flag must be set
    when wrapping; a non-schedule-free result still meets DeepSpeed's own check."""
    import deepspeed.runtime.zero.utils as zero_utils
    from deepspeed.runtime.zero.utils import ZeRORuntimeException

    # DeepSpeed's supported-optimizer check logs on rank 0 (no process group here).
    monkeypatch.setattr(zero_utils.dist, "get_rank", lambda *a, **k: 0)

    model = _model()
    cfg = {"zero_optimization": {"stage": 2, **CPU_OPT}}
    build = _wrap_optimizer_callable(lambda ps: ScheduleFreeAdamW(ps), cfg, model, _GroupRecord())
    assert cfg["zero_force_ds_cpu_optimizer"] is False
    assert isinstance(build(list(model.parameters())), ScheduleFreeAdamW)

    cfg = {"zero_optimization": {"stage": 2, **CPU_OPT}}
    build = _wrap_optimizer_callable(lambda ps: torch.optim.AdamW(ps), cfg, model, _GroupRecord())
    with pytest.raises(ZeRORuntimeException, match="zero_force_ds_cpu_optimizer"):
        build(list(model.parameters()))
    cfg = {"zero_optimization": {"stage": 2, **CPU_OPT}, "zero_force_ds_cpu_optimizer": False}
    build = _wrap_optimizer_callable(lambda ps: torch.optim.AdamW(ps), cfg, model, _GroupRecord())
    assert isinstance(build(list(model.parameters())), torch.optim.AdamW)


def test_callable_with_users_true_is_refused_by_name():
    model = _model()
    cfg = {"zero_optimization": {"stage": 3, **CPU_OPT}, "zero_force_ds_cpu_optimizer": True}
    build = _wrap_optimizer_callable(lambda ps: ScheduleFreeAdamW(ps), cfg, model, _GroupRecord())
    with pytest.raises(ConfigError, match="^zero_force_ds_cpu_optimizer = True"):
        build(list(model.parameters()))


def test_auto_backend_resolves_per_tensor_device():
    """On a GPU machine the offloaded masters are CPU tensors: 'auto' must pick the C++ CPU
    kernel for them (Triton only for CUDA tensors; no GPU needed to build the device)."""
    assert resolve_backend("auto", torch.device("cpu")) == "cpp"
    assert resolve_backend("auto", torch.device("cuda", 0)) in ("triton", "compiled")


def test_step_resolves_the_backend_on_the_partitions_device(monkeypatch):
    """ScheduleFreeAdamW asks for the backend per device of the tensors it steps."""
    import megawsd.optim.schedule_free as sf

    seen = []
    real = sf.resolve_backend

    def spy(backend, device):
        seen.append((backend, device.type))
        return "foreach" if backend == "auto" else real(backend, device)  # skip compiling

    monkeypatch.setattr(sf, "resolve_backend", spy)
    p = torch.nn.Parameter(torch.ones(8))
    p.grad = torch.full_like(p, 0.1)
    opt = ScheduleFreeAdamW([p], lr=1e-2)
    opt.train()
    opt.step()
    assert seen == [("auto", "cpu")]


def test_deepspeed_internals_offload_relies_on():
    """DeepSpeed 0.19.8: the client-optimizer offload check and its default, the stage 1/2
    offloaded step (client optimizer.step() on CPU fp32 partitions, copy back through a bit16
    CPU buffer), and stage 3's separate fp32 masters under offload. A change fails here."""
    from deepspeed.runtime import constants
    from deepspeed.runtime.engine import DeepSpeedEngine
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    assert constants.ZERO_FORCE_DS_CPU_OPTIMIZER == "zero_force_ds_cpu_optimizer"
    assert constants.ZERO_FORCE_DS_CPU_OPTIMIZER_DEFAULT is True
    src = inspect.getsource(DeepSpeedEngine._configure_optimizer)
    assert "self.zero_force_ds_cpu_optimizer()" in src and "ZeRORuntimeException" in src
    step = inspect.getsource(DeepSpeedZeroOptimizer.step)
    assert "self._optimizer_step(i)" in step
    assert "param_buffer_of_bit16_for_cpu_offload_groups" in step
    assert "self.optimizer.step()" in inspect.getsource(DeepSpeedZeroOptimizer._optimizer_step)
    fp32 = inspect.getsource(DeepSpeedZeroOptimizer_Stage3._create_fp32_partitions)
    assert "elif self.offload_optimizer:" in fp32 and "converted.clone().detach()" in fp32


# ------------------------------------------------------------------------------------------
# resharding an offloaded checkpoint onto another number of ranks (slow: two launches)

OFFLOAD_CASES = {  # case -> (stage, zero options); both saved and loaded with offload
    "off2": (2, {"offload_optimizer": {"device": "cpu"}}),
    "off3": (3, {"offload_optimizer": {"device": "cpu"}, "offload_param": {"device": "cpu"}}),
}


@pytest.mark.slow
@pytest.mark.dist
def test_offloaded_checkpoint_reshards_2_to_1_like_deepspeeds_same_size_load():
    """The oracle of tests/test_ds_checkpoint_options.py: an offloaded checkpoint loaded on
    1 rank (megawsd's resharding writes the CPU partitions) restores and continues exactly
    as DeepSpeed's own loader does on the 2 ranks that saved it."""
    import tempfile

    from tests.dist_helpers import run_ranks
    from tests.test_ds_checkpoint_options import (
        SAVE_STEPS,
        WORKER,
        assert_loaded_what_was_saved,
        assert_same_load,
    )

    with tempfile.TemporaryDirectory(prefix="megawsd-ds-offload-") as tmp:

        def job(kind, name, case, **extra):
            stage, zero = OFFLOAD_CASES[case]
            return {
                "kind": kind,
                "name": name,
                "stage": stage,
                "dtype": "fp32",
                "zero": zero,
                **extra,
            }

        ck = {c: f"{tmp}/ck_{c}" for c in OFFLOAD_CASES}
        load = {"tag": f"step{SAVE_STEPS}", "options": {}}
        two = run_ranks(
            WORKER,
            2,
            {
                "tmp": tmp,
                "jobs": [
                    *(job("save", f"save2_{c}", c, steps=SAVE_STEPS, save_dir=ck[c]) for c in ck),
                    *(job("load", f"same2_{c}_default", c, load_dir=ck[c], **load) for c in ck),
                ],
            },
            timeout=900,
        )[0]
        one = run_ranks(
            WORKER,
            1,
            {
                "tmp": tmp,
                "jobs": [job("load", f"r21_{c}_default", c, load_dir=ck[c], **load) for c in ck],
            },
            timeout=900,
        )[0]
        for c in ck:
            case = f"{c}_default"
            assert_loaded_what_was_saved(tmp, f"r21_{case}", f"save2_{c}", case)
            assert_same_load(
                tmp, two[f"same2_{case}"], one[f"r21_{case}"], f"same2_{case}", f"r21_{case}"
            )
