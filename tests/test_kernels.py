"""Every fast path of the schedule-free AdamW step against the plain-torch reference.

Triton kernels run under TRITON_INTERPRET=1 here (set by conftest.py when there is no CUDA), so
this file exercises the kernels' code on CPU; on a CUDA machine the same tests run them on GPU.
torch.compile costs a few seconds per graph: the compiled path keeps one graph per (entry,
dtypes) for the whole session, so the tests reuse them.

Tolerances: fp32 paths differ from the reference only by the rounding of fused vs separate
multiply-adds (a few ulps per step), so after 25 steps they agree to 2e-6 relative. With bf16
params y is rounded to bf16 every step; a few-ulp fp32 difference occasionally lands on the
other side of a bf16 rounding boundary, so y may differ by one bf16 ulp (2^-8 relative) in
rare elements; z and v stay fp32 and only feel those flips through λ·y, hence 1e-5. fp16
likewise with one fp16 ulp (2^-10); fp64 params keep fp64 z, v and every backend that takes
them computes in fp64 (the others pass them on), so they agree to 1e-12.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from megawsd.errors import ConfigError
from megawsd.kernels import BACKENDS, resolve_backend, triton_runs_on, write_x
from megawsd.kernels import sf_adamw_compiled as compiled_mod
from megawsd.kernels import sf_adamw_cpu as cpu_mod
from megawsd.optim import ScheduleFreeAdamW, advance_group_scalars, sf_adamw_update
from megawsd.optim.reference import sf_adamw_reference_, x_from_yz_reference

FAST = ["cpp", "compiled", "foreach", "triton"]
SIZES = [2047, 5000]  # odd sizes: partial Triton blocks, vector tails in the C++ loop
STEPS = 25
HP = dict(beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1)


def _skip_if_no_triton(backend: str) -> None:
    if backend == "triton" and not triton_runs_on(torch.device("cpu")):
        pytest.skip("Triton needs CUDA or TRITON_INTERPRET=1")


def _run(backend, size, ydtype, steps=STEPS, grad_scale=1.0, lowp=False, seed=0, mu=0.0, ran=None):
    """Drive sf_adamw_update for `steps` steps; returns (y, z, v, last lowp copy, exp_avg).
    ``mu``: inner momentum (exp_avg is None without it). ``ran``: the backend expected to run
    (``backend`` by default). States are fp32, fp64 for fp64 params (the optimizer's rule)."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.randn(size, generator=gen).to(ydtype)
    sd = torch.float64 if ydtype == torch.float64 else torch.float32
    z = y.to(sd).clone()
    v = torch.zeros(size, dtype=sd)
    m = torch.zeros(size, dtype=sd) if mu else None
    out = torch.empty(size, dtype=torch.bfloat16) if lowp else None
    k, lr_max, ws = 0, -1.0, 0.0
    for i in range(steps):
        g = torch.randn(size, generator=gen).to(ydtype)
        lr = 0.01 * (1 + 0.5 * (i % 3))  # a changing (scheduled) lr
        s = advance_group_scalars(
            k=k,
            lr=lr,
            lr_max=lr_max,
            weight_sum=ws,
            beta2=HP["beta2"],
            warmup_steps=5,
            r=0.5,
            weight_lr_power=2.0,
            inner_momentum=mu,
        )
        k, lr_max, ws = s.k, s.lr_max, s.weight_sum
        coef = dict(lr=s.lr, ckp1=s.ckp1, bias_correction2=s.bias_correction2, **HP)
        if mu:
            coef.update(exp_avg=m, inner_momentum=mu, bias_correction1=s.bias_correction1)
        if backend == "reference":
            sf_adamw_reference_(y, g, z, v, grad_scale=grad_scale, lowp_out=out, **coef)
        else:
            got = sf_adamw_update(
                y, g, z, v, grad_scale=grad_scale, lowp_out=out, backend=backend, **coef
            )
            assert got == (ran or backend)
    return y, z, v, out, m


def _close(a, b, rtol):
    torch.testing.assert_close(a.float(), b.float(), rtol=rtol, atol=rtol * b.abs().max().item())


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("size", SIZES)
def test_fast_path_matches_reference_fp32(backend, size):
    _skip_if_no_triton(backend)
    got = _run(backend, size, torch.float32, grad_scale=0.37)
    ref = _run("reference", size, torch.float32, grad_scale=0.37)
    for a, b in zip(got[:3], ref[:3]):
        _close(a, b, 2e-6)


@pytest.mark.parametrize("backend", FAST)
def test_fast_path_matches_reference_bf16_params(backend):
    _skip_if_no_triton(backend)
    y, z, v, *_ = _run(backend, 5000, torch.bfloat16)
    ry, rz, rv, *_ = _run("reference", 5000, torch.bfloat16)
    assert y.dtype == torch.bfloat16 and z.dtype == torch.float32
    _close(y, ry, 2.0**-8)
    assert (y != ry).float().mean() < 0.01  # flips are rare, not systematic
    _close(z, rz, 1e-5)
    _close(v, rv, 2e-6)


DTYPE_TOL = {  # y's tolerance against the reference, and the rate of one-ulp flips allowed
    torch.float32: (2e-6, 1.0),
    torch.bfloat16: (2.0**-8, 0.01),
    torch.float16: (2.0**-10, 0.01),
    torch.float64: (1e-12, 1.0),
}


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("dtype", list(DTYPE_TOL), ids=str)
def test_every_dtype_matches_reference_on_every_backend(backend, dtype):
    """Each parameter dtype on each backend, with clipping and a bf16 copy out: fp64 runs in
    fp64 (the C++ kernel and Triton compute in fp32, so they hand fp64 on to ``compiled``;
    before, ``compiled`` computed it in fp32, 1e-7 off), the others in fp32."""
    _skip_if_no_triton(backend)
    ran = "compiled" if dtype == torch.float64 and backend in ("cpp", "triton") else backend
    scale = torch.tensor(0.37)
    got = _run(backend, 257, dtype, steps=8, grad_scale=scale, lowp=True, ran=ran)
    ref = _run("reference", 257, dtype, steps=8, grad_scale=scale, lowp=True)
    tol, flips = DTYPE_TOL[dtype]
    y, z, v, out, _ = got
    assert z.dtype == v.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    _close(y, ref[0], tol)
    assert (y != ref[0]).float().mean() <= flips
    for a, b in zip((z, v), ref[1:3]):
        _close(a, b, 1e-12 if dtype == torch.float64 else 1e-5)
    if dtype in (torch.float32, torch.float64):  # the copy is y rounded once
        assert torch.equal(out, y.to(torch.bfloat16))
    else:  # rounded from the fp32 new y, as the reference's copy
        _close(out, ref[3], 2.0**-7)


def test_compiled_serves_many_shapes_and_dtypes(monkeypatch):
    """A model's mix of sizes (0, 1, odd, views at an offset) and dtypes through the compiled
    path: every call runs compiled, no fallback warning. Before, Dynamo specialised sizes 0
    and 1 and recompiled per dtype on one code object, hit its recompile limit (8) at the
    ninth variant, and the rest of the process ran foreach."""
    from megawsd.optim import sf_adamw

    monkeypatch.setattr(compiled_mod, "_BROKEN", None)
    monkeypatch.setattr(compiled_mod, "_WARNED", False)
    gen = torch.Generator().manual_seed(12)
    coef = dict(lr=0.01, ckp1=0.6, bias_correction2=0.01, **HP)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
            sd = torch.float64 if dtype == torch.float64 else torch.float32
            for n in (0, 1, 7, 33, 2, 100):
                y = torch.randn(n + 1, generator=gen).to(dtype)[1:]  # a view at an offset
                g = torch.randn(n, generator=gen).to(dtype)
                z, v = torch.randn(n, generator=gen).to(sd), torch.rand(n, generator=gen).to(sd)
                ry, rz, rv = y.clone(), z.clone(), v.clone()
                assert sf_adamw([y], [g], [z], [v], backend="compiled", **coef) == "compiled"
                sf_adamw_reference_(ry, g, rz, rv, **coef)
                if n:
                    _close(y, ry, DTYPE_TOL[dtype][0])
                    _close(z, rz, 1e-12 if sd == torch.float64 else 1e-5)
    assert not [w for w in caught if "megawsd: torch.compile" in str(w.message)]
    assert compiled_mod._BROKEN is None


_LEVELS = ["DEFAULT", "AVX2", "AVX512"]
_ISA_CHECK = """
import torch
from tests.test_kernels import _close, _run
cap = torch.backends.cpu.get_cpu_capability()
assert cap == {level!r}, cap
for dtype in (torch.float32, torch.bfloat16):
    got = _run("compiled", 2047, dtype, steps=3, grad_scale=0.37, lowp=True)
    ref = _run("reference", 2047, dtype, steps=3, grad_scale=0.37, lowp=True)
    for a, b in zip(got[:4], ref[:4]):
        _close(a, b, 2e-6 if dtype == torch.float32 else 2.0**-7)
print("ok", cap)
"""


@pytest.mark.parametrize("level", ["AVX2", "DEFAULT"])
def test_compiled_follows_aten_cpu_capability(level):
    """ATEN_CPU_CAPABILITY below what the CPU has (as on a CPU that lacks AVX-512, or AVX2):
    the compiled path still matches the reference. Before, with Inductor's vector width
    picked from the CPU and ATen's set lower, y came out 0.05 off at AVX2 (a wrong number,
    no error) and the loop did not compile at DEFAULT."""
    import os
    import subprocess
    import sys

    here = torch.backends.cpu.get_cpu_capability()
    if here not in _LEVELS or _LEVELS.index(level) >= _LEVELS.index(here):
        pytest.skip(f"this CPU's ATen level is {here}: {level} is not below it")
    env = {**os.environ, "ATEN_CPU_CAPABILITY": level.lower()}
    out = subprocess.run(
        [sys.executable, "-c", _ISA_CHECK.format(level=level)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]


@pytest.mark.parametrize("backend", FAST)
def test_bf16_copy_output_equals_y_rounded(backend):
    _skip_if_no_triton(backend)
    y, _, _, out, _ = _run(backend, 2047, torch.float32, steps=3, lowp=True)
    assert torch.equal(out, y.to(torch.bfloat16))
    ry, *_ = _run("reference", 2047, torch.float32, steps=3)
    _close(y, ry, 2e-6)


@pytest.mark.parametrize("backend", FAST)
def test_fast_path_matches_reference_with_inner_momentum(backend):
    """Inner momentum through every fused path: fp32 y with clipping and a bf16 copy out, and
    bf16 y (fp32 z, v, exp_avg), same tolerances as without it."""
    _skip_if_no_triton(backend)
    got = _run(backend, 5000, torch.float32, grad_scale=0.37, lowp=True, mu=0.9)
    ref = _run("reference", 5000, torch.float32, grad_scale=0.37, lowp=True, mu=0.9)
    for a, b in zip(got[:3] + got[4:], ref[:3] + ref[4:]):
        _close(a, b, 2e-6)
    assert torch.equal(got[3], got[0].to(torch.bfloat16))
    y, z, v, _, m = _run(backend, 2047, torch.bfloat16, mu=0.5)
    ry, rz, rv, _, rm = _run("reference", 2047, torch.bfloat16, mu=0.5)
    _close(y, ry, 2.0**-8)
    assert (y != ry).float().mean() < 0.01
    _close(z, rz, 1e-5)
    _close(m, rm, 2e-6)
    assert m.dtype == torch.float32


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_write_x_equals_formula_and_leaves_y_z(backend, dtype):
    _skip_if_no_triton(backend)
    gen = torch.Generator().manual_seed(4)
    y, z = torch.randn(3, 1001, generator=gen), torch.randn(3, 1001, generator=gen)
    y0, z0 = y.clone(), z.clone()
    out = torch.empty(3003, dtype=dtype)
    write_x(y, z, 0.9, out, backend=backend)
    expected = x_from_yz_reference(y, z, 0.9).reshape(-1)
    assert torch.equal(y, y0) and torch.equal(z, z0)
    if dtype == torch.float32:
        torch.testing.assert_close(out, expected, rtol=2e-7, atol=1e-7)
    else:  # at most one bf16 rounding step away from the fp32 value
        torch.testing.assert_close(out.float(), expected, rtol=2.0**-8, atol=0)


@pytest.mark.parametrize("backend", FAST)
def test_optimizer_fast_backend_matches_reference_on_mixed_params(backend):
    """Through the optimizer: several shapes, one non-contiguous param (reference route)."""
    _skip_if_no_triton(backend)

    def make():
        gen = torch.Generator().manual_seed(0)
        ps = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in [(64, 33), (257,)]]
        ps.append(torch.nn.Parameter(torch.randn(16, 12, generator=gen).t()))  # non-contiguous
        return ps

    results = []
    for be in (backend, "reference"):
        ps = make()
        opt = ScheduleFreeAdamW(ps, lr=0.01, warmup_steps=3, weight_decay=0.1, backend=be)
        opt.train()
        gen = torch.Generator().manual_seed(1)
        for _ in range(10):
            for p in ps:
                p.grad = torch.randn(p.shape, generator=gen)
            opt.step()
        opt.eval()
        results.append(ps)
    for a, b in zip(*results):
        _close(a.detach(), b.detach(), 2e-6)


@pytest.mark.parametrize("mu", [0.0, 0.9])
def test_compile_failure_falls_back_to_foreach_with_one_warning(monkeypatch, mu):
    def broken(name, dtypes):
        def fn(*args, **kwargs):
            raise RuntimeError("no C++ compiler (simulated)")

        return fn

    monkeypatch.setattr(compiled_mod, "_get", broken)
    monkeypatch.setattr(compiled_mod, "_BROKEN", None)
    monkeypatch.setattr(compiled_mod, "_WARNED", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = []
        ran = set()
        gen = torch.Generator().manual_seed(2)
        y, z, v = torch.randn(300, generator=gen), torch.randn(300), torch.zeros(300)
        ry, rz, rv = y.clone(), z.clone(), v.clone()
        m, rm = torch.zeros(300), torch.zeros(300)
        coef = dict(lr=0.01, ckp1=0.5, bias_correction2=0.01, inner_momentum=mu, **HP)
        coef["bias_correction1"] = 0.19 if mu else 1.0
        for _ in range(3):
            g = torch.randn(300, generator=gen)
            ran.add(sf_adamw_update(y, g, z, v, backend="compiled", exp_avg=m, **coef))
            sf_adamw_reference_(ry, g, rz, rv, exp_avg=rm, **coef)
        got = [w for w in caught if "torch.compile" in str(w.message)]
    assert ran == {"foreach"}
    assert len(got) == 1
    assert torch.equal(y, ry) and torch.equal(z, rz) and torch.equal(v, rv)
    assert torch.equal(m, rm) and (m.abs().sum() > 0) == (mu != 0)


def test_resolve_backend():
    cpu = torch.device("cpu")
    assert resolve_backend("auto", cpu) == "cpp"
    assert resolve_backend("foreach", cpu) == "foreach"
    assert resolve_backend("auto", torch.device("meta")) == "compiled"  # neither CPU nor CUDA
    with pytest.raises(ConfigError, match="backend.*CPU tensors only"):
        resolve_backend("cpp", torch.device("meta"))
    if torch.cuda.is_available():
        assert resolve_backend("auto", torch.device("cuda")) == "triton"


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_bf16_rounding_matches_torch_on_special_values(backend):
    """The Triton kernels round fp32 -> bf16 by hand (the interpreter's cast truncates): check
    ties to even, carries into the exponent, overflow to inf, NaN, inf, signed zero and
    subnormals against torch's conversion. beta1 = 1 makes x = y exactly."""
    _skip_if_no_triton(backend)
    bits = (
        torch.tensor(
            [0x3F808000, 0x3F818000, 0x3F80FFFF, 0x3FFF8000, 0x7F7FFFFF, 0x00008000, 0x80018000],
            dtype=torch.int64,
        )
        .to(torch.int32)
        .view(torch.float32)
    )
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1e-40])
    gen = torch.Generator().manual_seed(9)
    y = torch.cat([bits, special, torch.randn(1000, generator=gen) * 100])
    out = torch.empty_like(y, dtype=torch.bfloat16)
    write_x(y, torch.zeros_like(y), 1.0, out, backend=backend)
    expected = y.to(torch.bfloat16)
    assert torch.equal(out.isnan(), expected.isnan())
    keep = ~expected.isnan()
    assert torch.equal(out[keep].view(torch.int16), expected[keep].view(torch.int16))


def test_sf_adamw_update_rejects_mismatched_buffers():
    y, z, v = torch.zeros(10), torch.zeros(10), torch.zeros(10)
    coef = dict(lr=0.01, ckp1=0.5, bias_correction2=0.01, **HP)
    with pytest.raises(ValueError, match="elements"):
        sf_adamw_update(y, torch.zeros(9), z, v, backend="reference", **coef)
    with pytest.raises(ValueError, match="dtype"):
        sf_adamw_update(y, y, z.double(), v, backend="reference", **coef)
    with pytest.raises(ValueError, match="exp_avg"):
        sf_adamw_update(y, y, z, v, backend="reference", inner_momentum=0.9, **coef)
    with pytest.raises(ValueError, match="elements"):
        sf_adamw_update(y, y, z, v, exp_avg=torch.zeros(3), inner_momentum=0.9, **coef)


def test_every_backend_has_one_signature():
    """torch/optim/adam.py's rule: one signature for every implementation in the table."""
    import inspect

    from megawsd.kernels.sf_adamw_triton import sf_adamw_triton_
    from megawsd.optim import schedule_free as sf

    impls = {**sf._IMPLEMENTATIONS, "triton": sf_adamw_triton_}
    want = ["ys", "grads", "zs", "vs", "lowp_outs", "exp_avgs"]
    for name, fn in impls.items():
        params = list(inspect.signature(fn).parameters)
        assert params[:6] == want, (name, params)
    assert set(sf._IMPLEMENTATIONS) == set(BACKENDS) - {"auto"}
    assert all(b in sf._IMPLEMENTATIONS for b in sf._FALLBACK.values())


@pytest.mark.parametrize("backend", FAST + ["reference"])
def test_grad_scale_tensor_equals_the_same_float(backend):
    """DeepSpeed's clip coefficient arrives as a one-element device tensor (no host sync):
    the step must equal the one with that fp32 value as a float, bit for bit."""
    _skip_if_no_triton(backend)
    scale = torch.tensor([0.3712])
    got, ref = (
        _run(backend, 2047, torch.float32, steps=3, grad_scale=scale),
        _run(backend, 2047, torch.float32, steps=3, grad_scale=float(scale)),
    )
    for a, b in zip(got[:3], ref[:3]):
        assert torch.equal(a, b)


def test_compile_failure_midway_finishes_the_rest_with_foreach(monkeypatch):
    """The fallback chain: tensors the compiled loop already updated are not stepped again."""
    from megawsd.optim import sf_adamw

    real_get, calls = compiled_mod._get, []

    def flaky(name, dtypes):
        fn = real_get(name, dtypes)

        def run(*args):
            calls.append(name)
            if len(calls) > 1:
                raise RuntimeError("compiler crashed (simulated)")
            return fn(*args)

        return run

    monkeypatch.setattr(compiled_mod, "_get", flaky)
    monkeypatch.setattr(compiled_mod, "_BROKEN", None)
    monkeypatch.setattr(compiled_mod, "_WARNED", True)
    gen = torch.Generator().manual_seed(5)
    ys = [torch.randn(n, generator=gen) for n in (300, 301, 302)]
    gs = [torch.randn(y.numel(), generator=gen) for y in ys]
    zs, vs = [y.clone() for y in ys], [torch.zeros_like(y) for y in ys]
    ref = [(y.clone(), z.clone(), v.clone()) for y, z, v in zip(ys, zs, vs)]
    coef = dict(lr=0.01, ckp1=0.3, bias_correction2=0.01, grad_scale=1.0, **HP)
    ran = sf_adamw(ys, gs, zs, vs, backend="compiled", **coef)
    assert ran == "foreach" and calls == ["step", "step"]
    for (y, g, z, v), (ry, rz, rv) in zip(zip(ys, gs, zs, vs), ref):
        sf_adamw_reference_(ry, g, rz, rv, **coef)
        _close(y, ry, 2e-6)  # each tensor stepped exactly once
        _close(z, rz, 2e-6)
        _close(v, rv, 2e-6)


def _cpp_or_skip() -> None:
    if not cpu_mod.available():
        pytest.skip(f"the C++ CPU kernel does not build here: {cpu_mod._BROKEN}")


@pytest.mark.parametrize("ydtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mu", [0.0, 0.9])
def test_cpp_kernel_equals_compiled_bitwise(ydtype, mu):
    """The C++ loop is the compiled path's math operation for operation (no FMA contraction),
    so the two agree bit for bit: y, z, v, the bf16 copy and exp_avg, clipped, odd size."""
    _cpp_or_skip()
    scale = torch.tensor(0.37)
    got = _run("cpp", 5000, ydtype, steps=5, grad_scale=scale, lowp=True, mu=mu)
    ref = _run("compiled", 5000, ydtype, steps=5, grad_scale=scale, lowp=True, mu=mu)
    for a, b in zip(got, ref):
        assert (a is None and b is None) or torch.equal(a, b)


@pytest.mark.parametrize(
    "ydtype, gdtype, rtol",
    [(torch.float16, torch.float16, 2.0**-10), (torch.bfloat16, torch.float32, 2.0**-8)],
)
def test_cpp_kernel_other_dtypes_match_reference(ydtype, gdtype, rtol):
    """fp16 params, and bf16 params with fp32 grads (mixed precision with fp32 grad
    accumulation): the kernel's other instantiations, against the reference."""
    _cpp_or_skip()
    gen = torch.Generator().manual_seed(3)
    y = torch.randn(2047, generator=gen).to(ydtype)
    z, v = y.float(), torch.zeros(2047)
    ry, rz, rv = y.clone(), z.clone(), v.clone()
    coef = dict(lr=0.01, ckp1=0.7, bias_correction2=0.01, **HP)
    for _ in range(5):
        g = torch.randn(2047, generator=gen).to(gdtype)
        assert sf_adamw_update(y, g, z, v, backend="cpp", **coef) == "cpp"
        sf_adamw_reference_(ry, g, rz, rv, **coef)
    _close(y, ry, rtol)
    assert (y != ry).float().mean() < 0.01
    _close(z, rz, 1e-5)
    _close(v, rv, 2e-6)


def test_cpp_kernel_routes_other_dtypes_to_compiled(monkeypatch):
    """fp64 params are not built into the kernel: the call goes to the compiled path whole
    (never a silent wrong result), which then matches the fp64 reference."""
    from megawsd.optim import schedule_free as sf

    called = []
    real = sf._IMPLEMENTATIONS["compiled"]
    monkeypatch.setitem(
        sf._IMPLEMENTATIONS, "compiled", lambda *a, **k: called.append(1) or real(*a, **k)
    )
    gen = torch.Generator().manual_seed(6)
    y = torch.randn(300, generator=gen, dtype=torch.float64)
    z, v = y.clone(), torch.zeros(300, dtype=torch.float64)
    ry, rz, rv = y.clone(), z.clone(), v.clone()
    g = torch.randn(300, generator=gen, dtype=torch.float64)
    coef = dict(lr=0.01, ckp1=0.2, bias_correction2=0.01, **HP)
    ran = sf_adamw_update(y, g, z, v, backend="cpp", **coef)
    sf_adamw_reference_(ry, g, rz, rv, **coef)
    assert called == [1] and ran == "compiled"
    _close(y, ry, 1e-12)  # the compiled loop computes fp64 in fp64, as the reference
    _close(z, rz, 1e-12)


@pytest.mark.parametrize("compiled_works", [True, False])
def test_cpp_build_failure_falls_back_with_one_warning(monkeypatch, compiled_works):
    """No compiler: one warning, then the compiled path (or foreach when that fails too) runs
    every tensor once, with the reference's numbers."""

    def no_compiler():
        raise RuntimeError("g++ not found (simulated)")

    monkeypatch.setattr(cpu_mod, "_load", no_compiler)
    monkeypatch.setattr(cpu_mod, "_LOADED", False)
    monkeypatch.setattr(cpu_mod, "_BROKEN", None)
    if not compiled_works:
        monkeypatch.setattr(compiled_mod, "_BROKEN", "no compiler (simulated)")
    from megawsd.optim import sf_adamw

    gen = torch.Generator().manual_seed(8)
    ys = [torch.randn(n, generator=gen) for n in (300, 301)]
    zs, vs = [y.clone() for y in ys], [torch.zeros_like(y) for y in ys]
    ref = [(y.clone(), z.clone(), v.clone()) for y, z, v in zip(ys, zs, vs)]
    coef = dict(lr=0.01, ckp1=0.3, bias_correction2=0.01, **HP)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ran = set()
        for _ in range(2):
            gs = [torch.randn(y.numel(), generator=gen) for y in ys]
            ran.add(sf_adamw(ys, gs, zs, vs, backend="auto", **coef))
            for (ry, rz, rv), g in zip(ref, gs):
                sf_adamw_reference_(ry, g, rz, rv, **coef)
    assert ran == {"compiled" if compiled_works else "foreach"}
    assert len([w for w in caught if "C++ CPU kernel" in str(w.message)]) == 1
    for (y, z, v), (ry, rz, rv) in zip(zip(ys, zs, vs), ref):
        _close(y, ry, 2e-6)
        _close(z, rz, 2e-6)
        _close(v, rv, 2e-6)


def test_cpp_kernel_one_call_over_a_mixed_list():
    """The whole list runs in one parallel region split by work units across tensors: sizes
    that do not fill a unit, an empty tensor and mixed dtypes in one call, each tensor
    against the reference (tensor boundaries must neither skip nor repeat elements)."""
    _cpp_or_skip()
    from megawsd.optim import sf_adamw

    gen = torch.Generator().manual_seed(11)
    spec = [
        (5000, torch.float32),
        (2047, torch.bfloat16),
        (0, torch.float32),
        (1, torch.float32),
        (70_000, torch.float32),
    ]
    ys = [torch.randn(n, generator=gen).to(dt) for n, dt in spec]
    zs, vs = [y.float().clone() for y in ys], [torch.zeros(y.numel()) for y in ys]
    ref = [(y.clone(), z.clone(), v.clone()) for y, z, v in zip(ys, zs, vs)]
    coef = dict(lr=0.01, ckp1=0.4, bias_correction2=0.01, **HP)
    for _ in range(3):
        gs = [torch.randn(y.numel(), generator=gen).to(y.dtype) for y in ys]
        assert sf_adamw(ys, gs, zs, vs, backend="cpp", **coef) == "cpp"
        for (ry, rz, rv), g in zip(ref, gs):
            sf_adamw_reference_(ry, g, rz, rv, **coef)
    for (y, z, v), (ry, rz, rv) in zip(zip(ys, zs, vs), ref):
        if y.numel() == 0:
            continue
        _close(y, ry, 2.0**-8 if y.dtype == torch.bfloat16 else 2e-6)
        _close(z, rz, 1e-5)
        _close(v, rv, 2e-6)
