"""Reward-KL (or reward-compute) frontiers of method families and their comparison, in plain numpy.

A *family* is one method (DPO, PPO, best-of-N ...) over its configurations (a beta grid, a target-KL grid, N).
Each configuration is a point (x, gold) averaged over its seeds, x being its KL to the reference (or log10 of its
compute). A family's frontier is the upper envelope of its points:

* ``pareto_front``: the configurations no other one beats on both axes (x no larger, gold no smaller). An
  over-optimised point (more KL, less gold than another configuration) is dropped.
* ``envelope``: gold along x through the front points, linearly between them (as the DPO paper draws it), flat
  from the best point up to the family's largest x (a budget that large still allows the best configuration),
  undefined below the family's smallest x.

Two families are compared only where both exist, over the overlap of their x ranges, by the mean gap between
their envelopes on an even grid. Uncertainty comes from a two-level bootstrap: every draw resamples the seeds of
each configuration (with replacement, independently per configuration: they are separate runs) and the
evaluation prompts (one draw shared by all arms, which are evaluated on the same prompts: the design is paired).
The x and gold of every configuration are recomputed from the same resample, envelopes rebuilt, and the gap
recomputed, giving a percentile 95 % CI and P(A > B) = the share of draws with a positive gap.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Config:
    """One configuration of a family: per-seed x and gold over the same prompts.

    gold: [seeds, prompts]; x: [seeds, prompts] (per-sample KL, averaged like gold) or [seeds] (a per-run figure
    such as FLOPs, or the analytic KL of best-of-N, which a prompt resample leaves unchanged)."""

    name: str
    gold: np.ndarray
    x: np.ndarray

    def __post_init__(self):
        self.gold = np.asarray(self.gold, float)
        self.x = np.asarray(self.x, float)
        if self.gold.ndim != 2:
            raise ValueError(f"{self.name}: gold must be a [seeds, prompts] matrix, got shape {self.gold.shape}")
        if self.x.shape not in (self.gold.shape, self.gold.shape[:1]):
            raise ValueError(f"{self.name}: x must be [seeds, prompts] or [seeds] like gold {self.gold.shape}, "
                             f"got {self.x.shape}")

    def point(self, seeds=None, prompts=None) -> tuple[float, float]:
        s = slice(None) if seeds is None else seeds
        g = self.gold[s]
        g = g if prompts is None else g[:, prompts]
        x = self.x[s]
        if x.ndim == 2:
            x = x if prompts is None else x[:, prompts]
        return float(x.mean()), float(g.mean())


def pareto_front(x, y) -> np.ndarray:
    """Indices of the non-dominated points (no other point has x <= and y >= with one strict), sorted by x; of
    identical points the first is kept."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    order = np.lexsort((-y, x))  # by x, then the higher y first
    keep, best = [], -np.inf
    for i in order:
        if y[i] > best:
            keep.append(i)
            best = y[i]
    return np.asarray(keep, dtype=int)


def envelope(x, y, grid) -> np.ndarray:
    """The family's frontier evaluated on ``grid``: linear through the Pareto points, flat from the best point
    to max(x), NaN outside [min(x), max(x)]."""
    x, y, grid = np.asarray(x, float), np.asarray(y, float), np.asarray(grid, float)
    f = pareto_front(x, y)
    out = np.interp(grid, x[f], y[f])  # clamps: flat beyond the last front point
    out[(grid < x.min() - 1e-12) | (grid > x.max() + 1e-12)] = np.nan
    return out


def _points(configs: list[Config], draw=None) -> tuple[np.ndarray, np.ndarray]:
    pts = [c.point() if draw is None else c.point(draw[0][i], draw[1]) for i, c in enumerate(configs)]
    a = np.asarray(pts, float)
    return a[:, 0], a[:, 1]


def _draws(families: dict[str, list[Config]], n_boot: int, seed: int):
    """Yield per bootstrap draw {family: (x, gold) of its configurations}, seeds resampled per configuration and
    one prompt resample shared by every configuration."""
    n_prompts = {c.gold.shape[1] for cs in families.values() for c in cs}
    if len(n_prompts) != 1:
        raise ValueError(f"configurations were evaluated on different numbers of prompts: {sorted(n_prompts)}")
    (P,) = n_prompts
    rng = np.random.default_rng(seed)
    for _ in range(n_boot):
        prompts = rng.integers(0, P, P)
        yield {f: _points(cs, ([rng.integers(0, c.gold.shape[0], c.gold.shape[0]) for c in cs], prompts))
               for f, cs in families.items()}


def compare(a: list[Config], b: list[Config], *, n_boot: int = 2000, seed: int = 0, grid_n: int = 64,
            alpha: float = 0.05) -> dict:
    """Mean gap envelope(A) - envelope(B) over the overlap of their x ranges, with a two-level bootstrap CI and
    P(A > B). Also says where only one family has points. ``gap`` is None when the ranges do not overlap."""
    if not a or not b:
        raise ValueError("compare needs at least one configuration in each family")
    xa, ya = _points(a)
    xb, yb = _points(b)
    out = {"a_range": [float(xa.min()), float(xa.max())], "b_range": [float(xb.min()), float(xb.max())],
           "a_front": [a[i].name for i in pareto_front(xa, ya)], "b_front": [b[i].name for i in pareto_front(xb, yb)],
           "a_configs": len(a), "b_configs": len(b), "a_seeds": [c.gold.shape[0] for c in a],
           "b_seeds": [c.gold.shape[0] for c in b]}
    lo, hi = max(xa.min(), xb.min()), min(xa.max(), xb.max())
    out["only_a"] = _outside([xa.min(), xa.max()], lo, hi)
    out["only_b"] = _outside([xb.min(), xb.max()], lo, hi)
    if hi < lo:
        return {**out, "overlap": None, "gap": None, "low": None, "high": None, "p_a_better": None}
    grid = np.linspace(lo, hi, grid_n) if hi > lo else np.array([lo])
    diff = envelope(xa, ya, grid) - envelope(xb, yb, grid)
    gap = float(np.nanmean(diff))
    # where the point-estimate envelopes cross (a mean gap over a range can hide a change of sign)
    sign = np.sign(np.round(diff, 9))
    crossings = [float(np.interp(0.0, [diff[i], diff[i + 1]], [grid[i], grid[i + 1]]) if diff[i] < diff[i + 1]
                       else np.interp(0.0, [diff[i + 1], diff[i]], [grid[i + 1], grid[i]]))
                 for i in range(len(grid) - 1) if sign[i] * sign[i + 1] < 0]
    boots = []
    for d in _draws({"a": a, "b": b}, n_boot, seed):
        (bxa, bya), (bxb, byb) = d["a"], d["b"]
        # the grid stays the point estimate's overlap; a draw's envelope is extended flat at its own ends
        fa = pareto_front(bxa, bya)
        fb = pareto_front(bxb, byb)
        boots.append(float(np.mean(np.interp(grid, bxa[fa], bya[fa]) - np.interp(grid, bxb[fb], byb[fb]))))
    boots = np.asarray(boots)
    low, high = np.quantile(boots, [alpha / 2, 1 - alpha / 2])
    return {**out, "overlap": [float(lo), float(hi)], "gap": gap, "low": float(low), "high": float(high),
            "p_a_better": float((boots > 0).mean()), "n_boot": n_boot, "crossings": crossings,
            "a_above_at_start": bool(diff[0] > 0)}


def _outside(rng: list[float], lo: float, hi: float) -> list[list[float]]:
    """Parts of a family's range [min, max] outside the overlap [lo, hi] (the whole range if there is none)."""
    if hi < lo:
        return [[float(rng[0]), float(rng[1])]]
    parts = []
    if rng[0] < lo - 1e-12:
        parts.append([float(rng[0]), float(lo)])
    if rng[1] > hi + 1e-12:
        parts.append([float(hi), float(rng[1])])
    return parts


def envelope_band(configs: list[Config], *, n_boot: int = 1000, seed: int = 0, grid_n: int = 64,
                  alpha: float = 0.05) -> dict:
    """One family's envelope on a grid over its own x range with a pointwise bootstrap band (for figures)."""
    x, y = _points(configs)
    grid = np.linspace(x.min(), x.max(), grid_n) if x.max() > x.min() else np.array([x.min()])
    mid = envelope(x, y, grid)
    boots = []
    for d in _draws({"f": configs}, n_boot, seed):
        bx, by = d["f"]
        f = pareto_front(bx, by)
        boots.append(np.interp(grid, bx[f], by[f]))
    lo, hi = np.quantile(np.asarray(boots), [alpha / 2, 1 - alpha / 2], axis=0)
    return {"x": grid.tolist(), "gold": mid.tolist(), "low": lo.tolist(), "high": hi.tolist(),
            "points": [[float(a), float(b)] for a, b in zip(x, y, strict=True)], "configs": [c.name for c in configs], "front": [configs[i].name for i in pareto_front(x, y)]}
