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


# The ranges a healthy RLHF PPO run stays in, after Huang et al. 2024 ("The N+ implementation details of RLHF with
# PPO": clipfrac and approx KL small, the critic's explained variance positive once it has warmed up, a KL controller
# that lands) and Ahmadian et al. 2024 (clipping fires in under 5 % of updates on real RLHF tasks). Each is
# (statistic, bound, how it is read); the report prints them beside every on-policy arm's numbers.
RL_RANGES = {
    "clipfrac": 0.2,  # median policy/clipfrac over iterations <= 0.2
    "approxkl": 0.05,  # median policy/approxkl (per-token, between the rollout policy and the updated one) <= 0.05
    "explained_variance": 0.0,  # median val/explained_variance after the first WARMUP iterations > 0
    "target_kl_rel": 0.25,  # |KL of the last iterations / target - 1| <= 0.25 (adaptive controller)
    "length_rel": 0.30,  # |completion length of the last iterations / the first iteration's - 1| <= 0.30
    "beta_ratio": 4.0,  # the controller's beta stays within [beta_0 / 4, 4 beta_0]
}
WARMUP = 5


def _median(xs) -> float:
    v = [float(x) for x in xs if x is not None and np.isfinite(float(x))]
    return float(np.median(v)) if v else float("nan")


def rl_health(curve: list[dict], target_kl: float | None = None) -> dict:
    """An on-policy arm's trust-region and controller statistics from its training curve (one record per iteration)
    and the flags for those outside ``RL_RANGES``. Returns {"clipfrac", "approxkl", "explained_variance", "beta_0",
    "beta_min", "beta_final", "kl_final", "target_kl", "length_first", "length_final", "flags": [(flag, reason)]}."""
    if not curve:
        return {"flags": []}
    last = curve[-max(1, len(curve) // 10):]  # the last tenth of the run
    out = {
        "clipfrac": _median(r.get("policy/clipfrac") for r in curve),
        "approxkl": _median(r.get("policy/approxkl") for r in curve),
        "explained_variance": _median(r.get("val/explained_variance") for r in curve[WARMUP:]),
        "beta_0": curve[0].get("objective/kl_coef"),
        "beta_min": min((r["objective/kl_coef"] for r in curve if r.get("objective/kl_coef") is not None), default=None),
        "beta_final": curve[-1].get("objective/kl_coef_next", curve[-1].get("objective/kl_coef")),
        "kl_final": _median(r.get("objective/kl") for r in last),
        "target_kl": target_kl,
        "length_first": curve[0].get("objective/completion_len"),
        "length_final": _median(r.get("objective/completion_len") for r in last),
    }
    R, flags = RL_RANGES, []
    if out["clipfrac"] > R["clipfrac"]:
        flags.append(("clipfrac_high", f"median clipfrac {out['clipfrac']:.2f} > {R['clipfrac']}: the update leaves its trust "
                      "region (lower the learning rate or the epochs)"))
    if out["approxkl"] > R["approxkl"]:
        flags.append(("approxkl_high", f"median approx KL {out['approxkl']:.3f} > {R['approxkl']} per token per update"))
    if np.isfinite(out["explained_variance"]) and out["explained_variance"] <= R["explained_variance"]:
        flags.append(("critic_poor", f"median explained variance {out['explained_variance']:.2f} <= 0 after iteration "
                      f"{WARMUP}: the critic predicts the returns worse than their mean"))
    if target_kl and np.isfinite(out["kl_final"]) and abs(out["kl_final"] / target_kl - 1) > R["target_kl_rel"]:
        flags.append(("kl_off_target", f"rollout KL {out['kl_final']:.2f} at the end vs target {target_kl:g} "
                      f"({(out['kl_final'] / target_kl - 1) * 100:+.0f} %, range +-{R['target_kl_rel']:.0%})"))
    l0, l1 = out["length_first"], out["length_final"]
    if l0 and np.isfinite(l1) and abs(l1 / l0 - 1) > R["length_rel"]:
        flags.append(("length_collapse" if l1 < l0 else "length_growth",
                      f"completion length {l0:.1f} -> {l1:.1f} tokens over training ({(l1 / l0 - 1) * 100:+.0f} %)"))
    b0 = out["beta_0"]
    if target_kl and b0:
        lo = min(out["beta_min"] or b0, out["beta_final"] or b0)
        hi = max(out["beta_final"] or b0, b0)
        if lo < b0 / R["beta_ratio"] or hi > b0 * R["beta_ratio"]:
            flags.append(("beta_runaway", f"the KL controller moved beta from {b0:.3g} to between {lo:.3g} and {hi:.3g} "
                          f"(range x{R['beta_ratio']:g} either way)"))
    out["flags"] = flags
    return out


def _target_kl(arm: dict) -> float | None:
    """The arm's adaptive-controller target (None for fixed-beta and non-PPO arms; the tables hold NaN there)."""
    tk = arm.get("target_kl")
    return float(tk) if tk is not None and np.isfinite(float(tk)) else None


def rl_health_table(arms: list[dict], curves: dict[str, list[dict]]) -> list[dict]:
    """One row per arm whose curve has PPO-style update statistics (policy/clipfrac), for the report."""
    rows = []
    for a in arms:
        curve = curves.get(a["arm"], [])
        if not curve or "policy/clipfrac" not in curve[0]:
            continue
        h = rl_health(curve, _target_kl(a))
        clean = {k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in h.items() if k != "flags"}
        rows.append({"arm": a["arm"], **clean,
                     "flags": [f for f, _ in h["flags"]]})
    return rows


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
            if "policy/clipfrac" in curve[0]:
                checks += rl_health(curve, _target_kl(a))["flags"]
        out += [{"arm": a["arm"], "flag": f, "reason": r} for f, r in checks if r]
    return out
