"""Bootstrap statistics in plain numpy (in the spirit of google-research/rliable).

Everything takes arrays and a seed; nothing here knows about models.
"""

from __future__ import annotations

import numpy as np


def bootstrap_ci(values, *, stat=np.mean, n_boot: int = 2000, alpha: float = 0.05, seed: int = 0) -> tuple[float, float, float]:
    """(point estimate, low, high): percentile bootstrap CI of ``stat`` over the entries of ``values``."""
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        raise ValueError("bootstrap_ci: no values")
    point = float(stat(x))
    if x.size == 1:
        return point, point, point
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, x.size, size=(n_boot, x.size))  # [n_boot, N] resamples
    boots = np.apply_along_axis(stat, 1, x[idx]) if stat is not np.mean else x[idx].mean(axis=1)
    lo, hi = np.quantile(boots, [alpha / 2, 1 - alpha / 2])
    return point, float(lo), float(hi)


def paired_bootstrap_diff(a, b, *, n_boot: int = 2000, alpha: float = 0.05, seed: int = 0) -> dict:
    """Mean of a - b over paired units (e.g. prompts) with a bootstrap CI and P(mean diff > 0)."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    if a.shape != b.shape:
        raise ValueError(f"paired arrays differ in shape: {a.shape} vs {b.shape}")
    d = a - b
    point, lo, hi = bootstrap_ci(d, n_boot=n_boot, alpha=alpha, seed=seed)
    rng = np.random.default_rng(seed + 1)
    boots = d[rng.integers(0, d.size, size=(n_boot, d.size))].mean(axis=1)
    return {"diff": point, "low": lo, "high": hi, "p_positive": float((boots > 0).mean())}


def seeds_prompts_ci(matrix, *, n_boot: int = 2000, alpha: float = 0.05, seed: int = 0) -> tuple[float, float, float]:
    """Two-level bootstrap over a [seeds, prompts] matrix: resample seeds, then prompts within each."""
    m = np.asarray(matrix, float)
    if m.ndim != 2:
        raise ValueError("seeds_prompts_ci expects a [seeds, prompts] matrix")
    S, P = m.shape
    rng = np.random.default_rng(seed)
    si = rng.integers(0, S, size=(n_boot, S))
    pi = rng.integers(0, P, size=(n_boot, S, P))
    boots = m[si[:, :, None], pi].mean(axis=(1, 2))
    lo, hi = np.quantile(boots, [alpha / 2, 1 - alpha / 2])
    return float(m.mean()), float(lo), float(hi)


def win_rate(a, b) -> float:
    """Share of paired units where a beats b; ties count 1/2."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    if a.shape != b.shape or a.size == 0:
        raise ValueError(f"win_rate needs two non-empty arrays of one shape, got {a.shape} and {b.shape}")
    return float(((a > b) + 0.5 * (a == b)).mean())


def win_rate_ci(a, b, *, n_boot: int = 2000, alpha: float = 0.05, seed: int = 0) -> tuple[float, float, float]:
    a, b = np.asarray(a, float), np.asarray(b, float)
    per_unit = (a > b) + 0.5 * (a == b)
    return bootstrap_ci(per_unit, n_boot=n_boot, alpha=alpha, seed=seed)
