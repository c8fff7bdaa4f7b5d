"""The pure stability logic: groups, skipped batches, running statistics, rules, faults."""

import json
import math
import random

import numpy as np
import pytest
import torch

from megawsd.errors import ConfigError
from megawsd.train import faults
from megawsd.train.stability import (
    RunningStat,
    SkipMap,
    StabilityConfig,
    StabilityError,
    StabilityMonitor,
    StepStats,
    decision,
    param_group,
    rollback_skip_range,
)


def test_param_groups_of_llama_names():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=64,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
            tie_word_embeddings=False,
        )
    )
    got = {n: param_group(n) for n, _ in model.named_parameters()}
    assert got == {
        "model.embed_tokens.weight": "embedding",
        "model.layers.0.self_attn.q_proj.weight": "attention",
        "model.layers.0.self_attn.k_proj.weight": "attention",
        "model.layers.0.self_attn.v_proj.weight": "attention",
        "model.layers.0.self_attn.o_proj.weight": "attention",
        "model.layers.0.mlp.gate_proj.weight": "mlp",
        "model.layers.0.mlp.up_proj.weight": "mlp",
        "model.layers.0.mlp.down_proj.weight": "mlp",
        "model.layers.0.input_layernorm.weight": "norm",
        "model.layers.0.post_attention_layernorm.weight": "norm",
        "model.norm.weight": "norm",
        "lm_head.weight": "head",
    }
    # GPT-2 / NeoX spellings
    assert param_group("transformer.wte.weight") == "embedding"
    assert param_group("transformer.h.0.attn.c_attn.weight") == "attention"
    assert param_group("transformer.h.0.mlp.c_fc.weight") == "mlp"
    assert param_group("transformer.h.0.ln_1.weight") == "norm"
    assert param_group("transformer.ln_f.bias") == "norm"
    assert param_group("embed_out.weight") == "head"


def test_skip_map_matches_brute_force():
    rng = random.Random(0)
    for _ in range(200):
        ranges = []
        for _ in range(rng.randint(0, 5)):
            lo = rng.randint(0, 60)
            ranges.append((lo, lo + rng.randint(1, 6)))
        sm = SkipMap(ranges)
        skipped = {i for lo, hi in ranges for i in range(lo, hi)}
        allowed = [i for i in range(200) if i not in skipped]
        assert [sm.index(s) for s in range(100)] == allowed[:100]
        assert all(sm.skipped(i) == (i in skipped) for i in range(100))
        # ranges are merged, sorted, disjoint
        assert all(a[1] < b[0] for a, b in zip(sm.ranges, sm.ranges[1:]))


def test_running_stat_equals_weighted_moments():
    """EMA mean/var recurrence == mean/variance under weights d^n, (1-d) d^(n-i)."""
    rng = np.random.default_rng(1)
    xs = rng.normal(3.0, 0.5, size=40)
    d = 0.9
    st = RunningStat()
    for x in xs:
        st.update(float(x), d)
    n = len(xs) - 1
    w = np.array([d**n] + [(1 - d) * d ** (n - i) for i in range(1, n + 1)])
    mean = float((w * xs).sum())
    var = float((w * (xs - mean) ** 2).sum())
    assert st.mean == pytest.approx(mean, rel=1e-12)
    assert st.var == pytest.approx(var, rel=1e-9)
    assert st.count == len(xs)


def _feed(mon, values, start=1, grad=1.0):
    out = []
    for i, v in enumerate(values):
        out += mon.observe(start + i, StepStats(loss=v, grad_norm=grad, lr=1e-3, batch=i))
    return out


def test_spike_detected_once_and_warmup_respected():
    rng = random.Random(2)
    cfg = StabilityConfig(warmup_steps=10, loss_spike={"k": 5, "min_rel": 0.05, "action": "skip"})
    mon = StabilityMonitor(cfg)
    noise = [3.0 + rng.gauss(0, 0.01) for _ in range(30)]
    # a spike during warm-up is not an event (statistics are not ready) ...
    events = _feed(mon, noise[:5] + [10.0] + noise[5:])
    assert events == []
    # ... after warm-up it is, once, with its numbers
    events = _feed(mon, [10.0] + noise[:5], start=100)
    assert [(e.step, e.type, e.action) for e in events] == [(100, "loss_spike", "skip")]
    e = events[0]
    assert e.value == 10.0 and e.threshold == pytest.approx(e.mean + max(5 * e.std, 0.05 * e.mean))
    assert 2.9 < e.mean < 3.1 and e.lr == 1e-3 and e.batch == 0
    # the skipped spike did not move the statistics
    before = mon.loss.mean
    mon2 = StabilityMonitor(cfg)
    mon2.load_state_dict(json.loads(json.dumps(mon.state_dict())))
    assert mon2.loss.mean == before


def test_log_action_winsorises_and_nan_is_always_an_event():
    cfg = StabilityConfig(warmup_steps=3, loss_spike={"k": 3, "min_rel": 0.0, "action": "log"})
    mon = StabilityMonitor(cfg)
    _feed(mon, [1.0, 1.1, 0.9, 1.0, 1.05])
    limit = mon.loss.threshold(cfg.loss_spike)
    mean0 = mon.loss.mean
    events = _feed(mon, [100.0], start=6)
    assert [e.type for e in events] == ["loss_spike"] and decision(events) == "apply"
    # updated with the threshold, not with 100
    assert mon.loss.mean == pytest.approx(mean0 + (1 - cfg.ema_decay) * (limit - mean0))
    # NaN in the loss or the grad norm: an event even in warm-up, default action skip
    fresh = StabilityMonitor(cfg)
    ev = fresh.observe(1, StepStats(loss=float("nan"), grad_norm=1.0))
    ev += fresh.observe(2, StepStats(loss=1.0, grad_norm=float("inf")))
    assert [(e.type, e.action, e.detail["nonfinite"]) for e in ev] == [
        ("nan", "skip", ["loss"]),
        ("nan", "skip", ["grad_norm"]),
    ]
    assert fresh.loss.count == 0  # nothing non-finite entered the statistics
    rec = ev[1].record()
    assert json.loads(json.dumps(rec))["grad_norm"] == "inf" and rec["type"] == "nan"


def test_grad_spike_and_severity():
    cfg = StabilityConfig(
        warmup_steps=4,
        grad_spike={"k": 4, "action": "rollback"},
        loss_spike={"k": 4, "action": "skip"},
    )
    mon = StabilityMonitor(cfg)
    for s in range(1, 9):
        assert (
            mon.observe(s, StepStats(loss=2.0 + 0.01 * (s % 2), grad_norm=1.0 + 0.01 * (s % 3)))
            == []
        )
    ev = mon.observe(9, StepStats(loss=9.0, grad_norm=50.0))
    assert sorted(e.type for e in ev) == ["grad_spike", "loss_spike"]
    assert decision(ev) == "rollback"
    assert decision([]) == "apply"


def test_rollback_budget_and_skip_range():
    cfg = StabilityConfig(rollback={"max_rollbacks": 2, "window": 100, "skip_batches": 3})
    mon = StabilityMonitor(cfg)
    mon.check_rollback_budget(10)
    mon.record_rollback(10)
    mon.check_rollback_budget(50)
    mon.record_rollback(50)
    with pytest.raises(StabilityError, match="max_rollbacks = 2: 3 rollbacks within 100 steps"):
        mon.check_rollback_budget(90)
    mon.check_rollback_budget(151)  # 10 and 50 are out of the window by then
    # the offending batch and the B-1 before it, never before the checkpoint
    assert rollback_skip_range(20, 15, 3) == (18, 21)
    assert rollback_skip_range(16, 15, 3) == (15, 17)
    # a rollback keeps history; a resume restores it
    state = mon.state_dict()
    other = StabilityMonitor(cfg)
    other.seq, other.rollbacks = 99, [7]
    other.load_state_dict(state, history=False)
    assert other.seq == 99 and other.rollbacks == [7]
    other.load_state_dict(state)
    assert other.rollbacks == [10, 50] and other.seq == mon.seq


def test_config_is_strict():
    with pytest.raises(Exception, match="extra"):
        StabilityConfig(loss_spyke={"k": 3})
    with pytest.raises(Exception, match="action"):
        StabilityConfig(nan={"action": "ignore"})
    with pytest.raises(Exception, match="empty or negative"):
        StabilityConfig(skip_batches=[(5, 5)])
    assert StabilityConfig(skip_batches=[[3, 7]]).skip_batches == [(3, 7)]


def test_fault_spec_and_effects():
    fs = faults.parse("nan_grad@5, loss_spike@9:50/1,kill@7/1,enospc@4")
    assert fs[1] == faults.Fault("loss_spike", 9, 50.0, 1)
    with pytest.raises(ConfigError, match="KIND@N"):
        faults.parse("nan@x")
    with pytest.raises(ConfigError, match="KIND@N"):
        faults.parse("explode@3")
    f0, f1 = faults.Faults(fs, rank=0), faults.Faults(fs, rank=1)
    assert f0.save_error(4).errno == 28 and f1.save_error(4) is None
    w = torch.ones(3, requires_grad=True)
    loss = f0.loss((w * 2).sum(), 5)
    assert math.isfinite(loss.item())  # finite loss ...
    loss.backward()
    assert torch.isnan(w.grad).all()  # ... NaN gradient
    assert f1.loss(torch.tensor(2.0), 9).item() == 100.0
    assert f0.loss(torch.tensor(2.0), 9).item() == 2.0  # rank 0 is not poisoned
    assert not faults.Faults([], 0)
