"""DeepSpeed's load options through megawsd.deepspeed.load_checkpoint, same vs other world size.

The oracle is DeepSpeed's own same-size loader: for every load option, a checkpoint loaded on
another number of ranks (megawsd's resharding path) must restore exactly what DeepSpeed
restores on the same number of ranks (module, optimizer state and group scalars, LR
scheduler, step counters, fp16 loss scaler, client_state keys), and continue the same way.

Spawns (process start-up dominates on 2 cores):
  A. 2 ranks: save at ZeRO 1 and 3 (and fp16 ZeRO-1); DeepSpeed same-size loads of them.
  B. 1 rank: save; same-size loads of those; 2 -> 1 resharded loads of A's checkpoints.
  C. 2 ranks: 1 -> 2 resharded loads of B's checkpoints.
Also: the accessors before the first step (no hang on any rank), 2 -> 4 (slow), and pins of
the DeepSpeed internals the resharding path relies on.
"""

from __future__ import annotations

import inspect
import math
import tempfile

import pytest
import torch

from tests.dist_helpers import run_ranks

WORKER = "tests/workers/ds_ckpt_options.py"
REL = 1e-4  # fp32, 1 process vs 2 gloo ranks (reduction order)
OPTIONS = {
    "default": {},
    "no_optim": {"load_optimizer_states": False},
    "module_only": {"load_module_only": True},
    "no_sched": {"load_lr_scheduler_states": False},
}
# (name, stage, dtype, options): the load matrix; MORE_CASES run under -m slow.
CASES = [("s1", 1, "fp32", o) for o in OPTIONS]
CASES += [("s3", 3, "fp32", o) for o in ("default", "module_only")]
CASES += [("fp16s1", 1, "fp16", o) for o in ("default", "no_optim")]
MORE_CASES = [("s3", 3, "fp32", o) for o in ("no_optim", "no_sched")]
SAVE_STEPS = 3


def _jobs(prefix: str, ck: dict, cases, tag: int = SAVE_STEPS, **extra):
    return [
        {
            "kind": "load",
            "name": f"{prefix}_{c}_{o}",
            "stage": s,
            "dtype": d,
            "load_dir": ck[c],
            "tag": f"step{tag}",
            "options": OPTIONS[o],
            **extra,
        }
        for c, s, d, o in cases
    ]


def _saves(prefix: str, ck: dict, cases):
    seen = {}
    for c, s, d, _ in cases:
        seen.setdefault(
            c,
            {
                "kind": "save",
                "name": f"{prefix}_{c}",
                "stage": s,
                "dtype": d,
                "steps": SAVE_STEPS,
                "save_dir": ck[c],
                # ZeRO-3 also at step 2: a tag that is not "latest".
                "save_at": [2, SAVE_STEPS] if s == 3 else [SAVE_STEPS],
            },
        )
    return list(seen.values())


@pytest.fixture(scope="module")
def runs():
    # Not tmp_path_factory: concurrent pytest sessions rotate its base directories away.
    tmp_dir = tempfile.TemporaryDirectory(prefix="megawsd-ds-ckopt-")
    tmp = tmp_dir.name
    names = sorted({c for c, *_ in CASES})
    ck2 = {c: f"{tmp}/ck2_{c}" for c in names}
    ck1 = {c: f"{tmp}/ck1_{c}" for c in names}
    fp16 = [c for c in CASES if c[2] == "fp16"]
    extra = _jobs("alw2", ck2, fp16, reshard="always")
    # ZeRO-3 same-size loads DeepSpeed gets wrong: its own loader, and megawsd's reroute.
    s3 = [("s3", 3, "fp32", "module_only")]
    extra += _jobs("ds2", ck2, s3, direct=True)
    s3 = [("s3", 3, "fp32", "no_optim")]
    extra += _jobs("ds2tag2", ck2, s3, tag=2, direct=True) + _jobs("same2tag2", ck2, s3, tag=2)
    a = run_ranks(
        WORKER,
        2,
        {"tmp": tmp, "jobs": _saves("save2", ck2, CASES) + _jobs("same2", ck2, CASES) + extra},
        timeout=600,
    )
    b = run_ranks(
        WORKER,
        1,
        {
            "tmp": tmp,
            "jobs": _saves("save1", ck1, CASES)
            + _jobs("same1", ck1, CASES)
            + _jobs("r21", ck2, CASES)
            + _jobs("fn21", ck2, CASES[:1], custom_load_fn=True),
        },
        timeout=600,
    )
    c = run_ranks(WORKER, 2, {"tmp": tmp, "jobs": _jobs("r12", ck1, CASES)}, timeout=600)
    yield {
        "tmp": tmp,
        "ck1": ck1,
        "ck2": ck2,
        **{f"w2_{k}": v for k, v in a[0].items()},
        **{f"w1_{k}": v for k, v in b[0].items()},
        **{f"w2b_{k}": v for k, v in c[0].items()},
    }
    tmp_dir.cleanup()


def close(a, b, rel=REL):
    return len(a) == len(b) and all(
        math.isclose(x, y, rel_tol=rel, abs_tol=1e-12) for x, y in zip(a, b)
    )


def assert_loaded_what_was_saved(tmp: str, name: str, saved_name: str, case: str):
    """y is the saved master (to working precision without optimizer states), z when loaded."""
    saved = torch.load(f"{tmp}/{saved_name}_saved.pt")
    got = torch.load(f"{tmp}/{name}_loaded.pt")
    opts = OPTIONS[case.split("_", 1)[1]]
    with_opt = opts.get("load_optimizer_states", True) and not opts.get("load_module_only")
    exact = with_opt or not case.startswith("fp16")
    tol = {"rtol": 0, "atol": 0} if exact else {"rtol": 1e-3, "atol": 1e-3}  # fp16 masters
    assert got["y"].keys() == saved["y"].keys()
    for n in saved["y"]:
        torch.testing.assert_close(
            got["y"][n], saved["y"][n], **tol, msg=lambda m, n=n: f"{n}: {m}"
        )
    if with_opt:
        for n in saved["z"]:
            torch.testing.assert_close(got["z"][n], saved["z"][n], rtol=0, atol=0)
    else:
        assert got["z"] == {}


def assert_same_load(
    tmp: str, same: dict, other: dict, same_name: str, other_name: str, continuation: bool = True
):
    """A resharded load restored and continued exactly like DeepSpeed's same-size load.

    ``continuation=False`` (fp16 across world sizes): whether a step overflows at the restored
    scale depends on how the gradient is summed (1 rank accumulates micro-batches in fp16, 2
    ranks all-reduce), so only what the load restored is compared.
    """
    exact = ("global_steps", "global_samples", "skipped_steps", "lr_step", "k", "has_z", "scaler")
    for when in ("after_load", "after_cont") if continuation else ("after_load",):
        for key in exact:
            assert other[when].get(key) == same[when].get(key), (when, key, other[when], same[when])
        assert close(other[when]["weight_sum"], same[when]["weight_sum"], 1e-12)
        assert close(other[when]["lr"], same[when]["lr"], 1e-12)
    assert other["client_keys"] == same["client_keys"]
    if continuation:
        assert close(other["losses"], same["losses"]), (other["losses"], same["losses"])
    a = torch.load(f"{tmp}/{same_name}_loaded.pt")
    b = torch.load(f"{tmp}/{other_name}_loaded.pt")
    for part in ("y", "z"):
        assert a[part].keys() == b[part].keys(), part
        for n in a[part]:
            torch.testing.assert_close(b[part][n], a[part][n], rtol=REL, atol=1e-6)


# (saved on, same-size load, resharded load, the two loads' spawns) for 2 -> 1 and 1 -> 2.
DIRECTIONS = {
    "2_to_1": ("save2", "same2", "r21", "w2", "w1"),
    "1_to_2": ("save1", "same1", "r12", "w1", "w2b"),
}


@pytest.mark.dist
@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("case", [f"{c}_{o}" for c, _, _, o in CASES])
def test_reshard_honours_load_option(runs, case, direction):
    save, same, resharded, same_spawn, reshard_spawn = DIRECTIONS[direction]
    saved = f"{save}_{case.split('_')[0]}"
    assert_loaded_what_was_saved(runs["tmp"], f"{same}_{case}", saved, case)
    assert_loaded_what_was_saved(runs["tmp"], f"{resharded}_{case}", saved, case)
    assert_same_load(
        runs["tmp"],
        runs[f"{same_spawn}_{same}_{case}"],
        runs[f"{reshard_spawn}_{resharded}_{case}"],
        f"{same}_{case}",
        f"{resharded}_{case}",
        continuation=not case.startswith("fp16"),
    )


@pytest.mark.dist
def test_load_options_mean_what_deepspeed_says(runs):
    """Guards the oracle itself: the options restore different things on the same size."""
    full, no_opt = runs["w2_same2_s1_default"], runs["w2_same2_s1_no_optim"]
    mod, no_sched = runs["w2_same2_s1_module_only"], runs["w2_same2_s1_no_sched"]
    assert full["after_load"]["k"] == [SAVE_STEPS] * 2 and full["after_load"]["has_z"]
    assert full["after_load"]["lr_step"] == SAVE_STEPS
    assert no_opt["after_load"]["k"] == [0, 0] and not no_opt["after_load"]["has_z"]
    assert no_opt["after_load"]["global_steps"] == SAVE_STEPS
    assert mod["after_load"]["global_steps"] == 0 and mod["after_load"]["lr_step"] == 0
    assert no_sched["after_load"]["lr_step"] == 0 and no_sched["after_load"]["k"] == [3, 3]


@pytest.mark.dist
def test_fp16_reshard_restores_dynamic_loss_scale(runs):
    saved = runs["w2_save2_fp16s1"]
    assert saved["scaler"]["cur_scale"] < 2.0**20  # overflows happened before the save
    got = runs["w1_r21_fp16s1_default"]["after_load"]["scaler"]
    assert got == saved["scaler"] == runs["w2_same2_fp16s1_default"]["after_load"]["scaler"]
    # Without optimizer states DeepSpeed does not restore the scaler either.
    assert runs["w1_r21_fp16s1_no_optim"]["after_load"]["scaler"]["cur_scale"] == 2.0**20
    # megawsd's loader forced on the same world size continues exactly like DeepSpeed's
    # (skipped steps included): the restored scaler is the whole fp16 state.
    for o in ("default", "no_optim"):
        assert_same_load(
            runs["tmp"],
            runs[f"w2_same2_fp16s1_{o}"],
            runs[f"w2_alw2_fp16s1_{o}"],
            f"same2_fp16s1_{o}",
            f"alw2_fp16s1_{o}",
        )


@pytest.mark.dist
def test_custom_load_fn_refused_when_resharding(runs):
    err = runs["w1_fn21_s1_default"]["error"]
    assert err.startswith("ConfigError: custom_load_fn = "), err
    assert "load on 2 ranks" in err


@pytest.mark.dist
def test_zero3_same_size_loads_deepspeed_gets_wrong_are_rerouted(runs):
    """Pins two DeepSpeed 0.19.8 ZeRO-3 bugs, and that megawsd.load_checkpoint avoids them."""
    tmp = runs["tmp"]
    saved = torch.load(f"{tmp}/save2_s3_saved.pt")["y"]
    saved2 = torch.load(f"{tmp}/save2_s3_step2_saved.pt")["y"]
    # load_module_only: DeepSpeed keeps the initial weights (the saved module is partitioned).
    ds = torch.load(f"{tmp}/ds2_s3_module_only_loaded.pt")["y"]
    assert not all(torch.equal(ds[n], saved[n]) for n in saved)
    assert_loaded_what_was_saved(tmp, "same2_s3_module_only", "save2_s3", "s3_module_only")
    # load_optimizer_states=False, tag step2: DeepSpeed loads the weights of latest (step3).
    ds = torch.load(f"{tmp}/ds2tag2_s3_no_optim_loaded.pt")["y"]
    assert all(torch.equal(ds[n], saved[n]) for n in saved)
    assert runs["w2_ds2tag2_s3_no_optim"]["after_load"]["global_steps"] == 2
    assert_loaded_what_was_saved(tmp, "same2tag2_s3_no_optim", "save2_s3_step2", "s3_no_optim")
    assert not all(torch.equal(saved2[n], saved[n]) for n in saved)


@pytest.fixture(scope="module")
def runs_more(runs):
    """MORE_CASES on the checkpoints of ``runs``: same-size and resharded loads."""
    a = run_ranks(
        WORKER,
        2,
        {
            "tmp": runs["tmp"],
            "jobs": _jobs("same2", runs["ck2"], MORE_CASES) + _jobs("r12", runs["ck1"], MORE_CASES),
        },
        timeout=900,
    )
    b = run_ranks(
        WORKER,
        1,
        {
            "tmp": runs["tmp"],
            "jobs": _jobs("same1", runs["ck1"], MORE_CASES) + _jobs("r21", runs["ck2"], MORE_CASES),
        },
        timeout=900,
    )
    return {**{f"w2_{k}": v for k, v in a[0].items()}, **{f"w1_{k}": v for k, v in b[0].items()}}


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.parametrize("case", [f"{c}_{o}" for c, _, _, o in MORE_CASES])
def test_reshard_more_load_options(runs, runs_more, case):
    tmp, more = runs["tmp"], runs_more
    for same, other, save in (("same2", "r21", "save2"), ("same1", "r12", "save1")):
        assert_loaded_what_was_saved(tmp, f"{same}_{case}", f"{save}_s3", case)
        assert_loaded_what_was_saved(tmp, f"{other}_{case}", f"{save}_s3", case)
    assert_same_load(
        tmp, more[f"w2_same2_{case}"], more[f"w1_r21_{case}"], f"same2_{case}", f"r21_{case}"
    )
    assert_same_load(
        tmp, more[f"w1_same1_{case}"], more[f"w2_r12_{case}"], f"same1_{case}", f"r12_{case}"
    )


@pytest.mark.dist
@pytest.mark.slow
def test_reshard_2_to_4_honours_load_options(runs, runs_more):
    """4 ranks (micro-batch 1 instead of 2: the same global batch, summed differently)."""
    cases = [(f"s{s}", s, "fp32", o) for s in (1, 3) for o in OPTIONS]
    got = run_ranks(
        WORKER, 4, {"tmp": runs["tmp"], "jobs": _jobs("r24", runs["ck2"], cases)}, timeout=900
    )[0]
    same = {**runs, **runs_more}
    for c, _, _, o in cases:
        case = f"{c}_{o}"
        assert_loaded_what_was_saved(runs["tmp"], f"r24_{case}", f"save2_{c}", case)
        assert_same_load(
            runs["tmp"],
            same[f"w2_same2_{case}"],
            got[f"r24_{case}"],
            f"same2_{case}",
            f"r24_{case}",
        )


# --------------------------------------------------------------------------------------------
# accessors before the first step


@pytest.mark.dist
def test_full_tensors_before_first_step_no_hang():
    """None entries for z / exp_avg_sq, x == y (z starts as y), the same on both ranks."""
    jobs = [
        {"kind": "prestep", "name": n, "stage": s, "dtype": d}
        for n, s, d in (
            ("s0", 0, "fp32"),
            ("s1", 1, "fp32"),
            ("s3", 3, "fp32"),
            ("bf16acc", 1, "bf16_fp32acc"),
        )
    ]
    with tempfile.TemporaryDirectory(prefix="megawsd-ds-prestep-") as tmp:
        res = run_ranks(WORKER, 2, {"tmp": tmp, "jobs": jobs}, timeout=240)
    for name in ("s0", "s1", "s3", "bf16acc"):
        for rank in (0, 1):
            got = res[rank][name]
            assert got["z_all_none"] and got["exp_avg_sq_all_none"], (name, rank, got)
            assert got["z_after_step"], (name, rank)
            assert got["unknown_key"].startswith("ConfigError: key = 'exp_avg'"), got
        assert res[0][name]["x_is_y"] and res[0][name]["y_is_init"], (name, res[0][name])
        assert res[1][name]["x_empty"]


# --------------------------------------------------------------------------------------------
# DeepSpeed internals the resharding path relies on (fast, no ranks)


def test_deepspeed_internals_pinned():
    from deepspeed.checkpoint import constants as C
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
    from deepspeed.runtime.engine import DeepSpeedEngine
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    from megawsd.integrations import ds_checkpoint as dc

    # Checkpoint file keys read by read_full_checkpoint.
    assert (
        C.OPTIMIZER_STATE_DICT,
        C.FP32_FLAT_GROUPS,
        C.BASE_OPTIMIZER_STATE,
        C.SINGLE_PARTITION_OF_FP32_GROUPS,
        C.GROUP_PADDINGS,
        C.ZERO_STAGE,
        C.LOSS_SCALER,
        C.CLIP_GRAD,
    ) == (
        "optimizer_state_dict",
        "fp32_flat_groups",
        "base_optimizer_state",
        "single_partition_of_fp32_groups",
        "group_paddings",
        "zero_stage",
        "loss_scaler",
        "clip_grad",
    )
    # The loss scaler's state, and the wrapper attributes DeepSpeed's loaders restore.
    s = DynamicLossScaler(
        init_scale=2.0**16,
        scale_window=1000,
        min_scale=1.0,
        delayed_shift=2,
        consecutive_hysteresis=False,
    )
    for attr in ("cur_scale", "cur_iter", "last_overflow_iter", "cur_hysteresis", "dynamic"):
        assert hasattr(s, attr), attr
    for cls, loader in (
        (DeepSpeedZeroOptimizer, "_load_global_state"),
        (DeepSpeedZeroOptimizer_Stage3, "_rigid_load_state_dict"),
        (BF16_Optimizer, "_load_legacy_checkpoint"),
    ):
        src = inspect.getsource(getattr(cls, loader))
        for attr in dc.WRAPPER_STATE[cls.__name__]:
            assert f"self.{attr} =" in src, (cls.__name__, attr)
    # The load options and the engine states DeepSpeed leaves out of client_state.
    params = inspect.signature(DeepSpeedEngine.load_checkpoint).parameters
    for opt in (
        "load_module_strict",
        "load_optimizer_states",
        "load_lr_scheduler_states",
        "load_module_only",
        "custom_load_fn",
    ):
        assert opt in params, opt
    src = inspect.getsource(DeepSpeedEngine._load_checkpoint)
    assert "deepspeed_states = ['module']" in src
    assert (
        "'module', 'skipped_steps', 'global_steps', 'dp_world_size', 'mp_world_size', "
        "'data_sampler',\n                'random_ltd'"
    ) in src
    # ZeRO-3 without optimizer states reads the fp32 weights of the *latest* tag.
    assert "get_fp32_state_dict_from_zero_checkpoint(load_dir)" in src
