"""The suite's verdict, computed from its tables and written as text: never by hand.

``build_verdict(samples, summary, ...)`` compares every offline-preference family with every on-policy and
reranking family (registry kinds; peers and oracles left out) by their frontiers (``frontier.compare``): gold
against KL to the reference, and gold against log10 of compute, each over the range where both families have
configurations, with a two-level (seeds, prompts) bootstrap. It adds the tuning budget of each family (how many
configurations, over which axes), its sensitivity (how gold and KL move over them), and how close each arm with a
target KL landed to it. ``verdict_text`` turns that record into the paragraph the report opens with and
``make bench`` ends with.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from benchmarks.arms.registry import config_id, method
from benchmarks.evaluators import frontier

HPARAMS = ("beta", "bon_n", "kl_coef", "target_kl")
COMPARED_KINDS = ("offline_preference", "on_policy_rl", "reranking")
KL_LANDING_TOL = 0.25  # an arm lands when |eval KL / target - 1| <= 25 %


def compared_families(summary: pd.DataFrame) -> list[str]:
    """Methods whose frontiers the verdict compares (registry kinds in COMPARED_KINDS, peers left out), in order."""
    ms = [m for m in summary.method.unique() if method(m).kind in COMPARED_KINDS and not method(m).peer_of]
    return sorted(ms, key=lambda m: (method(m).order, m))


def compared_pairs(summary: pd.DataFrame) -> list[tuple[str, str]]:
    """(offline family, on-policy or reranking family) pairs the verdict compares: on-policy RL first (the headline
    question: DPO or RLHF), then reranking."""
    fams = compared_families(summary)
    offline = [f for f in fams if method(f).kind == "offline_preference"]
    others = sorted((f for f in fams if method(f).kind != "offline_preference"),
                    key=lambda f: (method(f).kind != "on_policy_rl", method(f).order, f))
    return [(a, b) for a in offline for b in others]


def _per_prompt(samples: pd.DataFrame, arm: str, col: str) -> pd.Series:
    return samples[samples.arm == arm].groupby("prompt_id")[col].mean()


def _configs(summary: pd.DataFrame) -> pd.DataFrame:
    """Rows with a ``config`` column (the arm id without its seed) and a ``seed`` column."""
    out = summary.copy()
    if "config" not in out:
        out["config"] = out.arm.map(config_id)
    if "seed" not in out:
        out["seed"] = 0
    return out


def family_configs(samples: pd.DataFrame, summary: pd.DataFrame, fam: str, axis: str) -> list[frontier.Config]:
    """A family's configurations as ``frontier.Config`` (axis "kl": per-prompt KL; "flops": log10 FLOPs per seed)."""
    summary = _configs(summary)
    rows = summary[summary.method == fam]
    prompts = np.sort(samples.prompt_id.unique())
    out = []
    for cfg, g in rows.groupby("config", sort=True):
        g = g.sort_values("seed")
        gold = np.stack([_per_prompt(samples, a, "gold").reindex(prompts).to_numpy() for a in g.arm])
        if np.isnan(gold).any():
            raise ValueError(f"{cfg}: some arms of this configuration lack evaluation samples for some prompts")
        if axis == "kl":
            x = np.stack([_per_prompt(samples, a, "seq_kl").reindex(prompts).to_numpy() for a in g.arm])
        else:
            f = pd.to_numeric(g.get("flops"), errors="coerce").to_numpy(float)
            if not (np.isfinite(f).all() and (f > 0).all()):
                raise ValueError(f"{cfg}: no compute record")
            x = np.log10(f)
        out.append(frontier.Config(str(cfg), gold, x))
    return out


def kl_landing(summary: pd.DataFrame, tol: float = KL_LANDING_TOL) -> dict:
    """Per method with a target KL: how many seeds' eval KL landed within ``tol`` of the target, and which did not."""
    if "target_kl" not in summary:
        return {}
    rows = summary[pd.to_numeric(summary.target_kl, errors="coerce") > 0]
    out = {}
    for m, g in rows.groupby("method"):
        err = g.kl / g.target_kl - 1
        out[m] = {"within": int((err.abs() <= tol).sum()), "total": int(len(g)), "tolerance": tol,
                  "arms": [{"arm": r.arm, "target_kl": float(r.target_kl), "kl": float(r.kl), "error": float(e),
                            "landed": bool(abs(e) <= tol)} for r, e in zip(g.itertuples(), err, strict=True)]}
    return out


def sensitivity(summary: pd.DataFrame, fam: str) -> dict:
    """A family's tuning budget and how its outcome moves over it: one row per configuration (means and seed sd)."""
    g = _configs(summary)
    g = g[g.method == fam]
    axes = [c for c in (*HPARAMS, "epochs", "sync_interval") if c in g and g[c].nunique(dropna=False) > 1]
    if "loss_type" in g and g.loss_type.nunique() > 1:
        axes.append("loss_type")
    rows = []
    for cfg, c in g.groupby("config", sort=False):
        rows.append({"config": cfg, "seeds": int(len(c)), **{a: c[a].iloc[0] for a in axes},
                     "gold": float(c.gold.mean()), "gold_sd": float(c.gold.std(ddof=1)) if len(c) > 1 else None,
                     "kl": float(c.kl.mean()), "kl_sd": float(c.kl.std(ddof=1)) if len(c) > 1 else None,
                     "length": float(c.length.mean()) if "length" in c else None})
    rows.sort(key=lambda r: r["kl"])
    golds = [r["gold"] for r in rows]
    kls = [r["kl"] for r in rows]
    return {"configs": len(rows), "axes": axes, "rows": rows, "gold_range": [min(golds), max(golds)],
            "kl_range": [min(kls), max(kls)]}


def build_verdict(samples: pd.DataFrame, summary: pd.DataFrame, *, suite: str, temperature: float,
                  commit: str | None = None, n_boot: int = 2000, seed: int = 0) -> dict:
    """The verdict record of one run at one temperature (samples and summary rows of that temperature)."""
    samples = samples[np.isclose(samples.temperature, temperature)]
    summary = _configs(summary[np.isclose(summary.temperature, temperature)])
    fams = compared_families(summary)
    comps = []
    for a, b in compared_pairs(summary):
        rec = {"a": a, "b": b, "a_label": method(a).label, "b_label": method(b).label}
        for axis in ("kl", "flops"):
            try:
                rec[axis] = frontier.compare(family_configs(samples, summary, a, axis),
                                             family_configs(samples, summary, b, axis), n_boot=n_boot, seed=seed)
            except ValueError as e:
                rec[axis] = {"gap": None, "reason": str(e)}
        comps.append(rec)
    seeds = sorted({int(s) for s in summary[summary.method.isin(fams)].seed})
    return {"suite": suite, "temperature": float(temperature), "commit": commit,
            "n_prompts": int(samples.prompt_id.nunique()), "seeds": seeds,
            "families": {f: {"label": method(f).label, **sensitivity(summary, f)} for f in fams},
            "comparisons": comps, "kl_landing": kl_landing(summary)}


# ------------------------------------------------------------------------------------------------------ text
def _r(lo: float, hi: float, axis: str) -> str:
    if axis == "flops":
        a, b = f"{10 ** lo:.1e}", f"{10 ** hi:.1e}"
        return f"{a} FLOPs" if a == b else f"{a}\u2013{b} FLOPs"
    a, b = f"{lo:.1f}", f"{hi:.1f}"
    return f"KL {a}" if a == b else f"KL {a}\u2013{b}"


def gap_sentence(a: str, b: str, c: dict, axis: str) -> str:
    """One comparison as a sentence: direction decided by the 95 % CI (level when it contains 0)."""
    if c.get("gap") is None:
        if "reason" in c:
            return f"{a} vs {b} by {'compute' if axis == 'flops' else 'KL'}: not compared ({c['reason']})."
        return (f"{a} ({_r(*c['a_range'], axis)}) and {b} ({_r(*c['b_range'], axis)}) have no "
                f"{'compute' if axis == 'flops' else 'KL'} range in common: no comparison at matched "
                f"{'compute' if axis == 'flops' else 'KL'}.")
    gap, lo, hi, p = c["gap"], c["low"], c["high"], c["p_a_better"]
    rng = _r(*c["overlap"], axis)
    where = f"over {rng}" if "\u2013" in rng else f"at {rng} (the only {'cost' if axis == 'flops' else 'KL'} both reach)"
    if lo > 0:
        s = f"{where} {a}'s frontier lies {gap:.2f} [{lo:.2f}, {hi:.2f}] gold above {b}'s"
    elif hi < 0:
        s = f"{where} {a}'s frontier lies {-gap:.2f} [{-hi:.2f}, {-lo:.2f}] gold below {b}'s"
    else:
        s = f"{where} {a}'s and {b}'s frontiers are level: gap {gap:+.2f} [{lo:+.2f}, {hi:+.2f}] gold"
    s += f" (P({a} > {b}) = {p:.2f})"
    if c.get("crossings"):
        first, second = (a, b) if c.get("a_above_at_start") else (b, a)
        at = ", ".join(_r(x, x, axis).replace("KL ", "") for x in c["crossings"])
        s += (f"; the envelopes cross at {'KL ' if axis == 'kl' else ''}{at}: {first} is above before"
              f"{' the first crossing' if len(c['crossings']) > 1 else ''}, {second} after")
    only = [f"only {b} has points at {_r(*r, axis)}" for r in c["only_b"]] + \
           [f"only {a} has points at {_r(*r, axis)}" for r in c["only_a"]]
    if only:
        s += "; " + "; ".join(only)
    return s + "."


def verdict_text(v: dict) -> str:
    """The verdict paragraph, from ``build_verdict``'s record only."""
    fams = v["families"]
    if not v["comparisons"]:
        return (f"On {v['suite']}: no offline-preference family and on-policy or reranking family to compare "
                f"(families: {', '.join(f['label'] for f in fams.values()) or 'none'}).")
    n_seeds = len(v["seeds"])
    head = (f"On {v['suite']} ({n_seeds} seed{'s' if n_seeds != 1 else ''} per configuration, {v['n_prompts']} held-out "
            f"prompts, T = {v['temperature']:g}{', commit ' + v['commit'][:7] if v.get('commit') else ''}):")
    parts = [head]
    for c in v["comparisons"]:
        s = gap_sentence(c["a_label"], c["b_label"], c["kl"], "kl")
        parts.append(s[0].upper() + s[1:])
        f = c.get("flops") or {}
        if f.get("gap") is not None:
            s = gap_sentence(c["a_label"], c["b_label"], f, "flops")
            parts.append("At matched compute, " + s)
        elif f.get("a_range") and f.get("b_range"):
            (a0, a1), (b0, b1) = f["a_range"], f["b_range"]
            ratio = 10 ** (b0 - a1) if b0 > a1 else 10 ** (a0 - b1)
            cheaper, dearer = (c["a_label"], c["b_label"]) if b0 > a1 else (c["b_label"], c["a_label"])
            parts.append(f"No matched-compute comparison with {c['b_label']}: {dearer}'s cheapest configuration costs "
                         f"{ratio:.1f}x {cheaper}'s dearest.")
    budget = ", ".join(f"{f['label']} {f['configs']} ({', '.join(f['axes']) or 'one setting'})" for f in fams.values())
    counts = {f["configs"] for f in fams.values()}
    parts.append(f"Tuning budget, configurations per family: {budget}"
                 + ("." if len(counts) <= 1 else "; the families were NOT given the same number."))
    if v.get("claims"):
        k = v["claims"]
        failed = f" ({', '.join(k['failed'])})" if k.get("failed") else ""
        parts.append(f"Paper claims checked on this run: {k['holds']} hold, {k['fails']} fail{failed}, "
                     f"{k['inconclusive']} inconclusive.")
    j = v.get("judge")
    if j and j.get("status") != "holds" and j.get("comparisons"):
        flips = [r for r in j["comparisons"] if r["gold_order"] != r["judge_order"]]
        if flips:
            r = flips[0]
            la, lb = fams.get(r["a"], {}).get("label", r["a"]), fams.get(r["b"], {}).get("label", r["b"])
            parts.append(f"Under a second judge ({r['judge']}) the {la}-vs-{lb} gap at matched KL is {r['judge_gap']:+.3f} "
                         f"[{r['judge_low']:+.3f}, {r['judge_high']:+.3f}] against {r['gold_gap']:+.3f} under gold: "
                         + ("the ordering reverses." if j["status"] == "fails" else "the ordering does not survive.")
                         + (f" ({len(flips) - 1} more comparison(s) change.)" if len(flips) > 1 else ""))
    for m, k in v.get("kl_landing", {}).items():
        lab = fams.get(m, {}).get("label", m)
        parts.append(f"{lab} seeds landing within \u00b1{k['tolerance']:.0%} of their target KL: {k['within']}/{k['total']}.")
    return " ".join(parts)
