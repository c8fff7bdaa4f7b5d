"""Chinchilla-style parametric scaling fits with confidence intervals and residuals.

    L(D)    = E + B / D^beta                   at a fixed model size (data scaling)
    L(N, D) = E + A / N^alpha + B / D^beta     several model sizes (Hoffmann et al. 2022, eq. 2)

Why this shape of code: the fit is nonlinear only in the exponents. For a fixed exponent the
coefficients (E, B[, A]) are a linear least-squares problem, so a grid over the exponents with
the linear solve inside (variable projection) finds the basin robustly; scipy's
``least_squares`` then polishes all parameters together (bounds keep E, A, B >= 0 and the
exponents in (0, 3)). Inputs are normalised (D / median D) so the Jacobian is well scaled;
B and A are reported in the original units.

Uncertainty: the covariance of the least-squares estimate, s^2 (J^T J)^-1 with s^2 the residual
variance on n - p degrees of freedom, gives Student-t intervals (what ``curve_fit`` reports);
with ``bootstrap > 0`` a residual bootstrap refits resampled data and gives percentile
intervals as well. With n <= p points there are no degrees of freedom and no intervals:
the fit interpolates and says so (``dof == 0``).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import numpy as np
from scipy import optimize, stats

from megawsd.errors import ConfigError


@dataclass
class FitResult:
    law: str  # "L(D)" | "L(N,D)"
    params: dict[str, float]
    stderr: dict[str, float | None]
    ci: dict[str, tuple[float, float] | None]  # covariance (t) intervals at `level`
    level: float
    residuals: list[float]  # observed - predicted, in input order
    n: int
    dof: int
    rmse: float
    bootstrap_ci: dict[str, tuple[float, float]] = field(default_factory=dict)
    success: bool = True
    message: str = ""

    def predict(self, D, N=None) -> np.ndarray:
        p = self.params
        D = np.asarray(D, dtype=float)
        out = p["E"] + p["B"] / D ** p["beta"]
        if self.law == "L(N,D)":
            out = out + p["A"] / np.asarray(N, dtype=float) ** p["alpha"]
        return out

    def to_json(self) -> dict:
        return {
            "law": self.law,
            "params": self.params,
            "stderr": self.stderr,
            "ci": {k: list(v) if v else None for k, v in self.ci.items()},
            "level": self.level,
            "bootstrap_ci": {k: list(v) for k, v in self.bootstrap_ci.items()},
            "residuals": self.residuals,
            "n": self.n,
            "dof": self.dof,
            "rmse": self.rmse,
            "success": self.success,
            "message": self.message,
        }


def _check(name: str, values: np.ndarray, positive: bool = True) -> None:
    if values.ndim != 1 or not np.all(np.isfinite(values)) or (positive and np.any(values <= 0)):
        raise ConfigError(
            f"{name} = {values.tolist()!r}: give finite"
            + (" positive" if positive else "")
            + " numbers"
        )


def fit_loss_vs_data(
    D, L, *, level: float = 0.95, bootstrap: int = 0, seed: int = 0, loss: str = "linear"
) -> FitResult:
    """Fit L = E + B / D^beta to losses L at token counts D (>= 3 distinct D)."""
    D = np.asarray(D, dtype=float)
    L = np.asarray(L, dtype=float)
    _check("D", D)
    _check("L", L, positive=False)
    if len(D) != len(L) or len(np.unique(D)) < 3:
        raise ConfigError(
            f"D = {D.tolist()!r}: need >= 3 distinct token counts (one loss each) "
            "to fit E, B and beta; add budgets"
        )
    return _fit("L(D)", [D], L, level=level, bootstrap=bootstrap, seed=seed, loss=loss)


def fit_loss_vs_params_data(
    N, D, L, *, level: float = 0.95, bootstrap: int = 0, seed: int = 0, loss: str = "linear"
) -> FitResult:
    """Fit L = E + A / N^alpha + B / D^beta (>= 2 model sizes, >= 6 points)."""
    N, D, L = (np.asarray(x, dtype=float) for x in (N, D, L))
    _check("N", N)
    _check("D", D)
    _check("L", L, positive=False)
    if not len(N) == len(D) == len(L) or len(np.unique(N)) < 2 or len(L) < 5:
        raise ConfigError(
            f"N = {N.tolist()!r}: an L(N, D) fit needs >= 2 model sizes and >= 5 "
            "points; add models or budgets"
        )
    return _fit("L(N,D)", [D, N], L, level=level, bootstrap=bootstrap, seed=seed, loss=loss)


def _design(xs: list[np.ndarray], exps: tuple[float, ...]) -> np.ndarray:
    """Columns [1, x_D^-beta, (x_N^-alpha)] for the linear part (x normalised)."""
    return np.column_stack([np.ones_like(xs[0])] + [x**-e for x, e in zip(xs, exps)])


def _solve(xs, L, loss, scales, exp0=None):
    """Variable projection grid for the exponents, then a joint bounded least-squares."""
    k = len(xs)
    if exp0 is None:
        grid = np.linspace(0.05, 2.0, 40)
        best = (math.inf, None)
        for exps in itertools.product(grid, repeat=k):
            X = _design(xs, exps)
            coef, *_ = np.linalg.lstsq(X, L, rcond=None)
            if np.any(coef < 0):
                coef = optimize.nnls(X, L)[0]
            r = float(np.sum((X @ coef - L) ** 2))
            if r < best[0]:
                best = (r, (coef, exps))
        coef, exps = best[1]
    else:
        coef, exps = exp0
    theta0 = np.concatenate([coef, exps])
    lo = np.concatenate([np.zeros(k + 1), np.full(k, 1e-4)])
    hi = np.concatenate([np.full(k + 1, np.inf), np.full(k, 3.0)])
    theta0 = np.clip(theta0, lo + 1e-12, hi - 1e-12)

    def resid(theta):
        return _design(xs, theta[k + 1 :]) @ theta[: k + 1] - L

    sol = optimize.least_squares(
        resid,
        theta0,
        bounds=(lo, hi),
        loss=loss,
        x_scale="jac",
        xtol=1e-14,
        ftol=1e-14,
        gtol=1e-14,
        max_nfev=20000,
    )
    return sol


def _to_params(theta, scales, law) -> dict[str, float]:
    """Normalised coefficients -> original units: b (D/D0)^-beta = (b D0^beta) D^-beta."""
    if law == "L(D)":
        E, b, beta = theta
        return {"E": float(E), "B": float(b * scales[0] ** beta), "beta": float(beta)}
    E, b, a, beta, alpha = theta
    return {
        "E": float(E),
        "A": float(a * scales[1] ** alpha),
        "alpha": float(alpha),
        "B": float(b * scales[0] ** beta),
        "beta": float(beta),
    }


def _fit(law, raw_xs, L, *, level, bootstrap, seed, loss) -> FitResult:
    scales = [float(np.median(x)) for x in raw_xs]
    xs = [x / s for x, s in zip(raw_xs, scales)]
    sol = _solve(xs, L, loss, scales)
    k = len(xs)
    theta = sol.x
    params = _to_params(theta, scales, law)
    resid = L - (_design(xs, theta[k + 1 :]) @ theta[: k + 1])
    n, p = len(L), len(theta)
    dof = n - p
    names = ["E", "B", "A", "beta", "alpha"] if law == "L(N,D)" else ["E", "B", "beta"]
    stderr: dict[str, float | None] = {m: None for m in names}
    ci: dict[str, tuple[float, float] | None] = {m: None for m in names}
    if dof > 0:
        s2 = float(resid @ resid) / dof
        # Covariance in normalised units, mapped through the Jacobian of _to_params (delta method).
        try:
            cov_n = s2 * np.linalg.pinv(sol.jac.T @ sol.jac)
        except np.linalg.LinAlgError:
            cov_n = None
        if cov_n is not None:
            G = _param_jacobian(theta, scales, law, names)
            cov = G @ cov_n @ G.T
            t = stats.t.ppf(0.5 + level / 2, dof)
            for i, m in enumerate(names):
                se = math.sqrt(max(cov[i, i], 0.0))
                stderr[m] = se
                ci[m] = (float(params[m] - t * se), float(params[m] + t * se))
    result = FitResult(
        law=law,
        params=params,
        stderr=stderr,
        ci=ci,
        level=level,
        residuals=[float(r) for r in resid],
        n=n,
        dof=dof,
        rmse=float(math.sqrt(np.mean(resid**2))),
        success=bool(sol.success),
        message=str(sol.message),
    )
    if bootstrap > 0 and dof > 0:
        rng = np.random.default_rng(seed)
        fitted = L - resid
        centred = resid - resid.mean()
        draws = []
        start = (theta[: k + 1], theta[k + 1 :])
        for _ in range(bootstrap):
            Lb = fitted + rng.choice(centred, size=n, replace=True)
            sb = _solve(xs, Lb, loss, scales, exp0=start)
            draws.append([_to_params(sb.x, scales, law)[m] for m in names])
        arr = np.asarray(draws)
        lo, hi = 100 * (0.5 - level / 2), 100 * (0.5 + level / 2)
        result.bootstrap_ci = {
            m: (float(np.percentile(arr[:, i], lo)), float(np.percentile(arr[:, i], hi)))
            for i, m in enumerate(names)
        }
    return result


def _param_jacobian(theta, scales, law, names) -> np.ndarray:
    """d(reported params)/d(theta), numerically (central differences), rows in `names` order."""
    p = len(theta)
    G = np.zeros((len(names), p))
    for j in range(p):
        h = 1e-6 * max(1.0, abs(theta[j]))
        up, dn = theta.copy(), theta.copy()
        up[j] += h
        dn[j] -= h
        pu, pd = _to_params(up, scales, law), _to_params(dn, scales, law)
        for i, m in enumerate(names):
            G[i, j] = (pu[m] - pd[m]) / (2 * h)
    return G
