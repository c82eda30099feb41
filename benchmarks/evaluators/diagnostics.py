"""Diagnostics: flags with a reason, computed from training curves and evaluation samples.

Each check is a small pure function over plain numbers so it can be tested on hand-made curves.
"""

from __future__ import annotations

import numpy as np


def _ends(values: list[float], frac: float = 0.2) -> tuple[float, float]:
    """Mean of the first and of the last ``frac`` of a curve (robust to per-step noise)."""
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], float)
    if v.size == 0:
        return float("nan"), float("nan")
    k = max(1, int(len(v) * frac))
    return float(v[:k].mean()), float(v[-k:].mean())


def chosen_logp_falling(curve: list[dict], *, min_drop: float = 1.0) -> str | None:
    """DPO: the chosen completions' log-prob falls while the margin rises (both pushed down, rejected faster)."""
    c0, c1 = _ends([r.get("logps/chosen") for r in curve])
    m0, m1 = _ends([r.get("rewards/margins") for r in curve])
    if np.isfinite(c0) and c1 < c0 - min_drop and m1 > m0:
        return (f"logps/chosen fell from {c0:.1f} to {c1:.1f} while rewards/margins rose from {m0:.2f} to {m1:.2f}: "
                "the policy lowers both responses (likelihood displacement); check length drift and samples")
    return None


def length_drift(arm_len: float, ref_len: float, *, rel: float = 0.25) -> str | None:
    if ref_len > 0 and abs(arm_len - ref_len) > rel * ref_len:
        return f"mean completion length {arm_len:.1f} vs pi_ref {ref_len:.1f} ({(arm_len / ref_len - 1) * 100:+.0f} %)"
    return None


def negative_kl(kl_mean: float, negative_share: float) -> str | None:
    """KL(pi || pi_ref) >= 0: a negative sample mean means too few samples or a log-prob mismatch."""
    if kl_mean < 0:
        return (f"mean sequence KL estimate is negative ({kl_mean:.3f}; {negative_share:.0%} of samples < 0): "
                "the estimate is noise-dominated or policy/reference log-probs are inconsistent")
    return None


def proxy_gold_gap(curve: list[dict], *, min_rise: float = 0.1) -> str | None:
    """PPO: the reward model's score keeps rising while the gold reward stalls or falls (over-optimisation)."""
    s0, s1 = _ends([r.get("objective/raw_scores", r.get("objective/scores")) for r in curve])
    g0, g1 = _ends([r.get("objective/gold") for r in curve])
    if np.isfinite(g0) and s1 - s0 > min_rise and g1 <= g0:
        return (f"proxy RM score rose {s0:.2f} -> {s1:.2f} while gold went {g0:.3f} -> {g1:.3f}: "
                "reward over-optimisation (Gao et al. 2022)")
    return None


def diversity_collapse(distinct2: float, ref_distinct2: float, *, rel: float = 0.85) -> str | None:
    if ref_distinct2 > 0 and distinct2 < rel * ref_distinct2:
        return (f"distinct-2 {distinct2:.3f} vs pi_ref {ref_distinct2:.3f}: collapsed diversity, likely lexicon "
                "hacking of the gold scorer (compare at matched KL)")
    return None


def run_diagnostics(arms: list[dict], curves: dict[str, list[dict]]) -> list[dict]:
    """Flags for every arm row (one temperature) given its training curve (may be empty)."""
    ref = next((a for a in arms if a["arm"] == "sft"), None)
    out = []
    for a in arms:
        if a["arm"] == "sft":
            continue
        checks = [("negative_kl", negative_kl(a["kl"], a.get("negative_kl_share", 0.0)))]
        if ref is not None:
            checks += [("length_drift", length_drift(a["length"], ref["length"])),
                       ("diversity_collapse", diversity_collapse(a["distinct_2"], ref["distinct_2"]))]
        curve = curves.get(a["arm"], [])
        if curve:
            checks += [("chosen_logp_falling", chosen_logp_falling(curve)), ("proxy_gold_gap", proxy_gold_gap(curve))]
        out += [{"arm": a["arm"], "flag": f, "reason": r} for f, r in checks if r]
    return out
