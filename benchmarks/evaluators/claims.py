"""Published findings checked on every run: each claim is a small function over the run's tables.

A claim returns ``holds`` / ``fails`` / ``inconclusive`` with its statistic, a 95 % CI and one plain sentence,
and the arms it used. The rule is the same for every claim whose statistic is a difference "A - B" the paper
says is positive: **holds** when the CI lies above 0, **fails** when it lies below, **inconclusive** when it
contains 0 or when the run lacks the arms the claim needs (the sentence says which). Claims name the methods the
papers name; a method absent from the suite makes its claims inconclusive, never an error.

``run_claims(tables)`` runs every registered claim; ``make check`` can require chosen ones to hold
(``prefbench check --require-claims dpo_sanity,bon_kl_bound``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from benchmarks.evaluators import frontier
from benchmarks.evaluators.stats import bootstrap_ci

HOLDS, FAILS, INCONCLUSIVE = "holds", "fails", "inconclusive"


@dataclass
class Tables:
    """What a claim may read: the run's summary rows (every temperature), evaluation samples, training curves by
    arm, each arm stage's own summary, the verdict record, the headline temperature and the autocast dtype."""

    summary: pd.DataFrame
    samples: pd.DataFrame
    curves: dict[str, list[dict]] = field(default_factory=dict)
    arm_summaries: dict[str, dict] = field(default_factory=dict)
    temperature: float = 1.0
    dtype: str = "float32"
    labelling: str | None = None
    """How the preference pairs were labelled (``prefs.labelling``; None = unknown)."""
    n_boot: int = 2000
    seed: int = 0

    def at_t(self) -> pd.DataFrame:
        return self.summary[np.isclose(self.summary.temperature, self.temperature)]


@dataclass(frozen=True)
class Claim:
    id: str
    claim: str
    source: str
    fn: Callable[[Tables], dict]


CLAIMS: dict[str, Claim] = {}


def claim(id: str, text: str, source: str):
    def deco(fn):
        CLAIMS[id] = Claim(id, text, source, fn)
        return fn
    return deco


def result(status: str, sentence: str, stat: float | None = None, low: float | None = None,
           high: float | None = None, arms: list[str] | None = None, **extra) -> dict:
    return {"status": status, "sentence": sentence, "statistic": stat, "low": low, "high": high,
            "arms": sorted(arms or []), **extra}


def by_ci(stat: float, low: float, high: float) -> str:
    """The shared rule for a difference the claim says is positive."""
    return HOLDS if low > 0 else FAILS if high < 0 else INCONCLUSIVE


def missing(what: str) -> dict:
    return result(INCONCLUSIVE, f"not testable on this run: {what}.")


def run_claims(t: Tables, only: list[str] | None = None) -> list[dict]:
    out = []
    for c in CLAIMS.values():
        if only and c.id not in only:
            continue
        try:
            r = c.fn(t)
        except Exception as e:  # a claim that cannot be computed is inconclusive, with the reason
            r = result(INCONCLUSIVE, f"could not be computed: {type(e).__name__}: {e}")
        out.append({"id": c.id, "claim": c.claim, "source": c.source, **r})
    return out


def count(claims: list[dict]) -> dict:
    """How many claims hold / fail / are inconclusive, and the ids of those that fail."""
    return {**{s: sum(c["status"] == s for c in claims) for s in (HOLDS, FAILS, INCONCLUSIVE)},
            "failed": [c["id"] for c in claims if c["status"] == FAILS]}


# ------------------------------------------------------------------------------------------------ helpers
def _frontier_claim(t: Tables, a: str, b: str, what: str, keep=None, a_label: str | None = None) -> dict:
    """"a's frontier >= b's at matched KL", from the verdict's envelopes (mean gap over the KL overlap).
    ``keep(summary) -> bool mask``: only those rows (e.g. one end of a family's grid)."""
    from benchmarks.arms.registry import method
    from benchmarks.evaluators.verdict import family_configs, gap_sentence

    s = t.at_t()
    if keep is not None and not s.empty:
        s = s[keep(s)]
    smp = t.samples[np.isclose(t.samples.temperature, t.temperature)]
    have = set(s.method)
    if a not in have or b not in have:
        return missing(f"needs {method(a).label} and {method(b).label} arms ({what})")
    c = frontier.compare(family_configs(smp, s, a, "kl"), family_configs(smp, s, b, "kl"), n_boot=t.n_boot, seed=t.seed)
    arms = s[s.method.isin([a, b])].arm.tolist()
    la = a_label or method(a).label
    if c["gap"] is None:
        return result(INCONCLUSIVE, gap_sentence(la, method(b).label, c, "kl"), arms=arms)
    return result(by_ci(c["gap"], c["low"], c["high"]), gap_sentence(la, method(b).label, c, "kl"),
                  c["gap"], c["low"], c["high"], arms, overlap=c["overlap"])


# ------------------------------------------------------------------------------------------------- claims
@claim("dpo_sanity", "DPO's loss at step 0 is ln 2 and its held-out implicit-reward accuracy rises",
       "Rafailov et al. 2023 (the loss at pi = pi_ref)")
def dpo_sanity(t: Tables) -> dict:
    s = t.at_t()
    from benchmarks.arms.registry import method

    # offline arms only (ours and the TRL peer): online DPO shares the loss but logs its first iteration's mean,
    # after that iteration's steps
    offline = s.method.map(lambda m: method(m).kind == "offline_preference")
    arms = s[offline & (s.get("loss_type") == "sigmoid") & s.arm.isin(list(t.curves))].arm.tolist() \
        if "loss_type" in s else []
    if not arms:
        return missing("no sigmoid-DPO arm with a training curve")
    first = [next((r["loss"] for r in t.curves[a] if r.get("loss") is not None), math.nan) for a in arms]
    dev = float(np.nanmax(np.abs(np.asarray(first) - math.log(2))))
    tol = 1e-3 if t.dtype == "float32" else 1e-2
    gains = [t.arm_summaries[a]["heldout_acc_after"] - t.arm_summaries[a]["heldout_acc_before"] for a in arms
             if {"heldout_acc_after", "heldout_acc_before"} <= set(t.arm_summaries.get(a, {}))]
    if not gains:
        return result(INCONCLUSIVE, f"step-0 loss within {dev:.1e} of ln 2, but no held-out accuracy recorded", dev, arms=arms)
    g, lo, hi = bootstrap_ci(gains, n_boot=t.n_boot, seed=t.seed)
    if dev > tol:
        status = FAILS
    elif len(gains) == 1:
        status = HOLDS if g > 0 else FAILS
    else:
        status = by_ci(g, lo, hi)
    return result(status, f"first logged loss within {dev:.1e} of ln 2 (tolerance {tol:g}) on {len(arms)} arm(s); held-out "
                          f"implicit-reward accuracy moved {g:+.3f} [{lo:+.3f}, {hi:+.3f}] from before to after training",
                  g, lo, hi, arms, loss_deviation=dev)


@claim("bon_kl_bound", "Best-of-N's KL to pi_ref is at most log N - (N-1)/N (an upper bound, not its value)",
       "Beirami et al. 2024")
def bon_kl_bound(t: Tables) -> dict:
    """Holds unless an arm's KL, estimated from its candidates' rewards with ties counted, lies above the bound by
    more than its CI (which would mean the estimator or the sampler is wrong). The statistic is the smallest
    bound - estimate over the arms: how much ties (repeated completions) pull the KL under the bound."""
    s = t.at_t()
    rows = s[s.method == "best_of_n"]
    if rows.empty:
        return missing("no best-of-N arm")
    margins, arms = [], []
    for r in rows.itertuples():
        n = int(r.bon_n) if not pd.isna(getattr(r, "bon_n", np.nan)) else None
        if n is None:
            continue
        bound = math.log(n) - (n - 1) / n
        margins.append((bound - r.kl_high, bound - r.kl, bound - r.kl_low, n))
        arms.append(r.arm)
    if not margins:
        return missing("best-of-N rows carry no N")
    worst = min(margins, key=lambda m: m[1])
    status = FAILS if any(m[2] < -1e-9 for m in margins) else HOLDS
    return result(status, f"bound minus estimated KL, smallest over {len(arms)} arm(s) (N = {worst[3]}): {worst[1]:+.4f} "
                          f"[{worst[0]:+.4f}, {worst[2]:+.4f}] nats (0 = no ties among the candidates)",
                  worst[1], worst[0], worst[2], arms)


@claim("dpo_frontier_dominates_ppo", "DPO's reward-KL frontier dominates PPO's", "Rafailov et al. 2023, Fig. 2")
def dpo_frontier(t: Tables) -> dict:
    return _frontier_claim(t, "dpo", "ppo", "the sentiment frontier")


@claim("ppo_falls_faster_with_temperature", "PPO's win rate falls faster with sampling temperature than DPO's",
       "Rafailov et al. 2023, Fig. 3")
def temperature_claim(t: Tables) -> dict:
    s = t.summary
    if s.temperature.nunique() < 2:
        return missing(f"evaluated at one temperature only (T = {s.temperature.iloc[0]:g}); the full suite sweeps T")
    slopes = {}
    for m in ("dpo", "ppo"):
        g = s[s.method == m]
        if g.empty:
            return missing(f"no {m} arm")
        slopes[m] = [float(np.polyfit(a.temperature, a.win_vs_sft, 1)[0]) for _, a in g.groupby("arm") if a.temperature.nunique() > 1]
    rng = np.random.default_rng(t.seed)
    d, p = np.asarray(slopes["dpo"]), np.asarray(slopes["ppo"])
    boots = [rng.choice(d, d.size).mean() - rng.choice(p, p.size).mean() for _ in range(t.n_boot)]
    stat = float(d.mean() - p.mean())
    lo, hi = (float(x) for x in np.quantile(boots, [0.025, 0.975]))
    return result(by_ci(stat, lo, hi), f"win-vs-SFT slope over temperature: DPO {d.mean():+.3f}, PPO {p.mean():+.3f} per unit T; "
                                       f"difference {stat:+.3f} [{lo:+.3f}, {hi:+.3f}]", stat, lo, hi,
                  s[s.method.isin(["dpo", "ppo"])].arm.unique().tolist())


def _fit_gao(d: np.ndarray, y: np.ndarray, kind: str) -> tuple[float, float]:
    """Least squares of y = d (alpha - beta log d) (RL) or y = d (alpha - beta d) (best-of-N): (alpha, beta)."""
    f2 = d * np.log(np.maximum(d, 1e-9)) if kind == "rl" else d * d
    A = np.stack([d, -f2], axis=1)
    (alpha, beta), *_ = np.linalg.lstsq(A, y, rcond=None)
    return float(alpha), float(beta)


@claim("gao_overoptimisation", "Gold reward bends over with distance from pi_ref (over-optimisation): the fitted "
       "beta of gold = d (alpha - beta log d), d = sqrt(KL), is positive for PPO on the reward model",
       "Gao et al. 2022")
def gao(t: Tables) -> dict:
    s = t.at_t()
    sft = s[s.method == "sft"]
    fits = {}
    for m, kind in (("ppo", "rl"), ("best_of_n", "bon")):
        g = s[(s.method == m) & (s.kl > 0)]
        if len(g) >= 3 and not sft.empty:
            d = np.sqrt(g.kl.to_numpy(float))
            y = g.gold.to_numpy(float) - float(sft.gold.iloc[0])
            a, b = _fit_gao(d, y, kind)
            rng = np.random.default_rng(t.seed)
            boots = []
            for _ in range(t.n_boot):
                i = rng.integers(0, len(d), len(d))
                if np.unique(d[i]).size >= 2:
                    boots.append(_fit_gao(d[i], y[i], kind)[1])
            lo, hi = (float(x) for x in np.quantile(boots, [0.025, 0.975]))
            fits[m] = {"alpha": a, "beta": b, "beta_low": lo, "beta_high": hi, "points": int(len(d))}
    if "ppo" not in fits:
        return missing("needs >= 3 PPO arms (configurations x seeds) and the reference")
    f = fits["ppo"]
    text = "; ".join(f"{m}: alpha {v['alpha']:.3f}, beta {v['beta']:.3f} [{v['beta_low']:.3f}, {v['beta_high']:.3f}] "
                     f"({v['points']} points)" for m, v in fits.items())
    return result(by_ci(f["beta"], f["beta_low"], f["beta_high"]), f"fits of gold - gold(SFT): {text}", f["beta"],
                  f["beta_low"], f["beta_high"], s[s.method.isin(list(fits))].arm.tolist(), fits=fits)


@claim("strong_ppo_ge_ppo", "Strong PPO (large batch, advantage whitening, EMA reference) reaches at least PPO's "
       "gold at matched KL", "Xu et al. 2024")
def strong(t: Tables) -> dict:
    return _frontier_claim(t, "strong_ppo", "ppo", "the full suite has both")


@claim("oracle_ge_proxy", "PPO on the gold reward reaches at least PPO-on-the-RM's gold at matched KL (the oracle "
       "bound)", "the oracle upper bound (Gao et al. 2022 setting)")
def oracle(t: Tables) -> dict:
    return _frontier_claim(t, "ppo_gt", "ppo", "the full suite has both")


@claim("online_dpo_ge_offline_dpo", "Online DPO (sampler refreshed every s < inf iterations, RM-labelled pairs) reaches at "
       "least offline DPO's gold at matched KL", "Lanchantin et al. 2025; Tajwar et al. 2024")
def online_vs_offline(t: Tables) -> dict:
    # the online end of the family only: s = inf samples pi_ref forever (its offline-like end)
    return _frontier_claim(t, "online_dpo", "dpo", "the ladder suite has both", a_label="Online DPO (s < inf)",
                           keep=lambda s: ~((s.method == "online_dpo") & s.arm.str.contains("-sinf-", regex=False)))


@claim("rloo_ge_ppo", "RLOO reaches at least PPO's gold at matched KL on the same episode budget",
       "Ahmadian et al. 2024")
def rloo_vs_ppo(t: Tables) -> dict:
    return _frontier_claim(t, "rloo", "ppo", "the ladder suite has both")


def _kl_growth(smp: pd.DataFrame, arms_lo: list[str], arms_hi: list[str], rng, n_boot: int) -> tuple[float, np.ndarray]:
    """Mean per-prompt KL of the seeds at the higher epoch count minus that at the lower one, and its bootstrap draws
    (seeds resampled within each epoch count, prompts resampled once and shared: the design is paired)."""
    prompts = np.sort(smp.prompt_id.unique())

    def mat(arms):
        return np.stack([smp[smp.arm == a].groupby("prompt_id").seq_kl.mean().reindex(prompts).to_numpy() for a in arms])

    lo, hi = mat(arms_lo), mat(arms_hi)
    stat = float(hi.mean() - lo.mean())
    draws = np.empty(n_boot)
    for i in range(n_boot):
        p = rng.integers(0, len(prompts), len(prompts))
        draws[i] = hi[rng.integers(0, len(hi), len(hi))][:, p].mean() - lo[rng.integers(0, len(lo), len(lo))][:, p].mean()
    return stat, draws


@claim("ipo_kl_levels_off", "With deterministic (argmax) labels DPO's KL keeps growing with epochs at every beta, while "
       "IPO's levels off", "Azar et al. 2024 (IPO)")
def ipo_epochs(t: Tables) -> dict:
    """From an epochs sweep on the same pairs (``dpo.epochs_grid``): per beta, each loss's KL growth over the last
    step of the sweep (E_prev -> E_max). **Holds** when DPO's growth is above 0 and above IPO's (both CIs) at every
    beta; **fails** when, at some beta, DPO's growth is below 0 or below IPO's; else inconclusive. The statistic is
    DPO's growth minus IPO's at the beta where that difference is smallest."""
    s = t.at_t()
    if t.labelling not in (None, "argmax"):
        return missing(f"the pairs are labelled by {t.labelling!r}; the claim is about deterministic (argmax) labels "
                       f"(the ipo suite uses them)")
    if "epochs" not in s or "loss_type" not in s:
        return missing("no epochs sweep (dpo.epochs_grid)")
    d = s[(s.method == "dpo") & s.loss_type.isin(["sigmoid", "ipo"]) & s.epochs.notna()]
    smp = t.samples[np.isclose(t.samples.temperature, t.temperature)]
    rng = np.random.default_rng(t.seed)
    per_beta, arms = [], []
    for beta, g in d.groupby("beta"):
        growth = {}
        for lt, gl in g.groupby("loss_type"):
            es = sorted(gl.epochs.unique())
            if len(es) < 2:
                continue
            lo_arms, hi_arms = gl[gl.epochs == es[-2]].arm.tolist(), gl[gl.epochs == es[-1]].arm.tolist()
            growth[lt] = (*_kl_growth(smp, lo_arms, hi_arms, rng, t.n_boot), es[-2], es[-1],
                          {float(e): float(gl[gl.epochs == e].kl.mean()) for e in es})
            arms += gl.arm.tolist()
        if {"sigmoid", "ipo"} <= set(growth):
            (gd, bd, *_, kd), (gi, bi, *_, ki) = growth["sigmoid"], growth["ipo"]
            diff = bd - bi
            per_beta.append({"beta": float(beta), "dpo_growth": gd, "ipo_growth": gi,
                             "dpo_low": float(np.quantile(bd, 0.025)), "dpo_high": float(np.quantile(bd, 0.975)),
                             "diff": gd - gi, "diff_low": float(np.quantile(diff, 0.025)),
                             "diff_high": float(np.quantile(diff, 0.975)), "epochs": [growth["sigmoid"][2], growth["sigmoid"][3]],
                             "dpo_kl_by_epochs": kd, "ipo_kl_by_epochs": ki})
    if not per_beta:
        return missing("needs sigmoid-DPO and IPO arms at >= 2 epoch counts of dpo.epochs_grid, at one beta at least")
    st = [HOLDS if r["dpo_low"] > 0 and r["diff_low"] > 0 else FAILS if r["dpo_high"] < 0 or r["diff_high"] < 0
          else INCONCLUSIVE for r in per_beta]
    status = FAILS if FAILS in st else HOLDS if all(x == HOLDS for x in st) else INCONCLUSIVE
    w = min(per_beta, key=lambda r: r["diff"])
    text = "; ".join(f"beta {r['beta']:g}, epochs {r['epochs'][0]:g} -> {r['epochs'][1]:g}: KL grows by {r['dpo_growth']:+.2f} "
                     f"[{r['dpo_low']:+.2f}, {r['dpo_high']:+.2f}] under DPO, {r['ipo_growth']:+.2f} under IPO (difference "
                     f"{r['diff']:+.2f} [{r['diff_low']:+.2f}, {r['diff_high']:+.2f}]); KL by epochs DPO "
                     + ", ".join(f"{e:g}: {k:.2f}" for e, k in r["dpo_kl_by_epochs"].items()) + ", IPO "
                     + ", ".join(f"{e:g}: {k:.2f}" for e, k in r["ipo_kl_by_epochs"].items()) for r in per_beta)
    return result(status, text, w["diff"], w["diff_low"], w["diff_high"], arms, per_beta=per_beta)


@claim("ordering_survives_length_control", "The DPO-vs-PPO ordering at matched KL survives when gold is compared at "
       "matched completion length", "length-controlled win rates (Dubois et al. 2024)")
def length_control(t: Tables) -> dict:
    from benchmarks.evaluators.verdict import family_configs

    s = t.at_t()
    smp = t.samples[np.isclose(t.samples.temperature, t.temperature)]
    if not {"dpo", "ppo", "sft"} <= set(s.method):
        return missing("needs DPO, PPO and the reference")
    ref = smp[smp.arm.isin(s[s.method == "sft"].arm)]
    slope = float(np.polyfit(ref.length.astype(float), ref.gold.astype(float), 1)[0]) if ref.length.nunique() > 1 else 0.0
    adj = smp.assign(gold=smp.gold - slope * (smp.length - ref.length.mean()))
    raw = frontier.compare(family_configs(smp, s, "dpo", "kl"), family_configs(smp, s, "ppo", "kl"), n_boot=t.n_boot, seed=t.seed)
    ctl = frontier.compare(family_configs(adj, s, "dpo", "kl"), family_configs(adj, s, "ppo", "kl"), n_boot=t.n_boot, seed=t.seed)
    arms = s[s.method.isin(["dpo", "ppo"])].arm.tolist()
    if raw["gap"] is None:
        return result(INCONCLUSIVE, "DPO and PPO share no KL range", arms=arms)
    raw_sign = by_ci(raw["gap"], raw["low"], raw["high"])
    ctl_sign = by_ci(ctl["gap"], ctl["low"], ctl["high"])
    text = (f"gold per token of length under the reference: {slope:+.4f}; DPO - PPO gap {raw['gap']:+.3f} "
            f"[{raw['low']:+.3f}, {raw['high']:+.3f}] raw, {ctl['gap']:+.3f} [{ctl['low']:+.3f}, {ctl['high']:+.3f}] "
            f"at matched length")
    if raw_sign == INCONCLUSIVE:
        return result(INCONCLUSIVE, text + " (no ordering to survive)", ctl["gap"], ctl["low"], ctl["high"], arms)
    return result(HOLDS if ctl_sign == raw_sign else FAILS, text, ctl["gap"], ctl["low"], ctl["high"], arms)


@claim("judge_robustness", "The verdict's ordering of the headline families at matched KL is the same under a second, "
       "independent judge of the same property", "judge robustness (a verdict that holds for one lexicon only is "
       "about that lexicon)")
def judge_robustness(t: Tables) -> dict:
    """Every pair the verdict compares (``verdict.compared_pairs``) is compared again with gold replaced by each
    second judge's score (samples' ``judge:<name>`` columns, ``task.judges``). **Holds** when every ordering that
    is significant under gold is significant and of the same sign under every judge; **fails** when a judge
    reverses one (significant, opposite sign); **inconclusive** when a judge only weakens an ordering to a tie, or
    gold orders nothing. The statistic is the first pair's gap under the first judge. Where they disagree: the
    share of samples on which the judges' signs differ and their rank correlation over all samples."""
    from benchmarks.arms.registry import method
    from benchmarks.evaluators.verdict import compared_pairs, family_configs

    s = t.at_t()
    smp = t.samples[np.isclose(t.samples.temperature, t.temperature)]
    judges = [c for c in smp.columns if c.startswith("judge:")]
    if not judges:
        return missing("no second judge scored the samples (task.judges is empty)")
    pairs = compared_pairs(s)
    if not pairs:
        return missing("the verdict compares no families")
    rows, worst, first = [], HOLDS, None
    for a, b in pairs:
        ref = frontier.compare(family_configs(smp, s, a, "kl"), family_configs(smp, s, b, "kl"), n_boot=t.n_boot, seed=t.seed)
        if ref["gap"] is None:
            continue
        g_status = by_ci(ref["gap"], ref["low"], ref["high"])
        for j in judges:
            c = frontier.compare(family_configs(smp.assign(gold=smp[j]), s, a, "kl"),
                                 family_configs(smp.assign(gold=smp[j]), s, b, "kl"), n_boot=t.n_boot, seed=t.seed)
            j_status = by_ci(c["gap"], c["low"], c["high"])
            if g_status != INCONCLUSIVE:
                agree = HOLDS if j_status == g_status else FAILS if j_status != INCONCLUSIVE else INCONCLUSIVE
                worst = FAILS if FAILS in (worst, agree) else INCONCLUSIVE if INCONCLUSIVE in (worst, agree) else HOLDS
            rows.append({"a": a, "b": b, "judge": j[6:], "gold_gap": ref["gap"], "gold_low": ref["low"],
                         "gold_high": ref["high"], "judge_gap": c["gap"], "judge_low": c["low"], "judge_high": c["high"],
                         "gold_order": g_status, "judge_order": j_status})
            first = first or rows[-1]
    if not rows:
        return result(INCONCLUSIVE, "the compared families share no KL range")
    if all(r["gold_order"] == INCONCLUSIVE for r in rows):
        worst = INCONCLUSIVE
    dis = {}
    for j in judges:
        both = smp[(smp.gold != 0) | (smp[j] != 0)]
        dis[j[6:]] = {"sign_disagreement": float((np.sign(both.gold) != np.sign(both[j])).mean()) if len(both) else 0.0,
                      "spearman": float(smp.gold.rank().corr(smp[j].rank())) if smp[j].nunique() > 1 else float("nan")}
    word = {HOLDS: "above", FAILS: "below", INCONCLUSIVE: "level with"}
    parts = [f"{method(r['a']).label} {word[r['gold_order']]} {method(r['b']).label} under gold "
             f"({r['gold_gap']:+.3f} [{r['gold_low']:+.3f}, {r['gold_high']:+.3f}]), {word[r['judge_order']]} under "
             f"{r['judge']} ({r['judge_gap']:+.3f} [{r['judge_low']:+.3f}, {r['judge_high']:+.3f}])" for r in rows]
    where = "; ".join(f"{j}: signs differ on {d['sign_disagreement']:.0%} of samples scored by either, rank "
                      f"correlation {d['spearman']:.2f}" for j, d in dis.items())
    arms = s[s.method.isin({x for p in pairs for x in p})].arm.tolist()
    return result(worst, "; ".join(parts) + f". Where the judges disagree: {where}", first["judge_gap"],
                  first["judge_low"], first["judge_high"], arms, comparisons=rows, disagreement=dis)
