"""EMA and SWA against a direct computation from the recorded weight history."""

from __future__ import annotations

import pytest
import torch

from megawsd.errors import CheckpointError, ConfigError
from megawsd.optim import EMA, SWA


def _trajectory(steps: int, seed: int = 0):
    """Parameters (fp32 and bf16) moved by random SGD-like steps; yields after each step."""
    gen = torch.Generator().manual_seed(seed)
    params = [
        torch.nn.Parameter(torch.randn(5, 3, generator=gen)),
        torch.nn.Parameter(torch.randn(7, generator=gen).bfloat16()),
    ]
    history = []

    def advance():
        with torch.no_grad():
            for p in params:
                p.add_(torch.randn(p.shape, generator=gen).to(p.dtype), alpha=0.1)
        history.append([p.detach().float().clone() for p in params])

    return params, history, advance


def test_ema_equals_direct_computation_every_2():
    params, history, advance = _trajectory(9)
    ema = EMA(params, decay=0.8, every=2)
    for step in range(9):
        advance()
        ema.update(step)
    snaps = [history[s] for s in range(9) if s % 2 == 0]  # steps 0, 2, 4, 6, 8
    expected = [s.clone() for s in snaps[0]]
    for snap in snaps[1:]:
        expected = [0.8 * e + 0.2 * s for e, s in zip(expected, snap)]
    assert ema.num_updates == 5
    for a, e in zip(ema.averages, expected):
        torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-6)


def test_swa_is_uniform_mean_over_window_and_applied_restores():
    params, history, advance = _trajectory(12)
    swa = SWA(params, start=3, end=10, every=2)
    for step in range(12):
        advance()
        swa.update(step)
    window = [history[s] for s in range(3, 10) if s % 2 == 0]  # steps 4, 6, 8
    expected = [torch.stack(ts).mean(0) for ts in zip(*window)]
    for a, e in zip(swa.averages, expected):
        torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-6)
    current = [p.detach().clone() for p in params]
    with swa.applied():
        torch.testing.assert_close(params[0].detach(), expected[0])
        torch.testing.assert_close(params[1].detach(), expected[1].bfloat16())
    for p, c in zip(params, current):
        assert torch.equal(p, c)


def test_state_dict_resume_continues_same_average():
    params, _, advance = _trajectory(8)
    full = EMA(params, decay=0.9)
    half = EMA(params, decay=0.9)
    for step in range(8):
        advance()
        full.update()
        if step < 4:
            half.update()
        if step == 3:
            resumed = EMA(params, decay=0.5)  # decay comes from the state
            resumed.load_state_dict(half.state_dict())
        if step >= 4:
            resumed.update()
    assert resumed.decay == 0.9 and resumed.num_updates == full.num_updates
    for a, b in zip(resumed.averages, full.averages):
        assert torch.equal(a, b)
    with pytest.raises(CheckpointError):
        SWA(params).load_state_dict(full.state_dict())


def test_bad_arguments_name_the_field():
    with pytest.raises(ConfigError, match="ema.decay"):
        EMA([torch.zeros(2)], decay=1.5)
    with pytest.raises(ConfigError, match="swa.window"):
        SWA([torch.zeros(2)], start=5, end=5)
    with pytest.raises(ConfigError, match="averaging.every"):
        EMA([torch.zeros(2)], every=0)
