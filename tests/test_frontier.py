"""Frontiers (Pareto envelope), the two-level bootstrap of their gap, and the verdict written from tables."""

import numpy as np
import pandas as pd
import pytest

from benchmarks.evaluators.frontier import Config, compare, envelope, envelope_band, pareto_front
from benchmarks.evaluators.verdict import build_verdict, kl_landing, verdict_text


def test_pareto_front_drops_dominated_and_over_optimised_points():
    # (KL, gold): b is dominated by a (more KL, less gold); e over-optimised (more KL than d, less gold)
    x = [1.0, 2.0, 3.0, 5.0, 9.0]
    y = [0.30, 0.20, 0.50, 0.60, 0.55]
    assert pareto_front(x, y).tolist() == [0, 2, 3]
    # identical points: one kept; same KL: the higher gold only
    assert pareto_front([1, 1, 2], [0.5, 0.5, 0.4]).tolist() == [0]
    assert pareto_front([1, 1], [0.2, 0.4]).tolist() == [1]


def test_envelope_interpolates_the_front_and_is_flat_after_the_best_point():
    x = [1.0, 3.0, 5.0, 9.0]
    y = [0.3, 0.5, 0.6, 0.55]
    e = envelope(x, y, [0.5, 1.0, 2.0, 4.0, 5.0, 7.0, 9.0, 10.0])
    assert np.isnan(e[0]) and np.isnan(e[-1])  # outside the family's range: undefined
    assert e[1:-1].tolist() == pytest.approx([0.3, 0.4, 0.55, 0.6, 0.6, 0.6])  # never down to the 0.55 point


def _const_x(gold):
    return np.ones_like(np.asarray(gold, float))


def test_two_level_bootstrap_resamples_seeds_by_hand():
    # A: two seeds, gold 1 and 3 on every prompt; B: gold 2. Seed resamples {1,1}, {1,3}, {3,1}, {3,3} -> gap
    # -1, 0, 0, +1 with probabilities 1/4, 1/2, 1/4: P(A > B) = 1/4, the 95 % CI [-1, 1], the point 0.
    a = [Config("a", [[1, 1], [3, 3]], _const_x([[1, 1], [3, 3]]))]
    b = [Config("b", [[2, 2]], _const_x([[2, 2]]))]
    r = compare(a, b, n_boot=8000, seed=1)
    assert r["gap"] == pytest.approx(0.0)
    assert r["p_a_better"] == pytest.approx(0.25, abs=0.02)
    assert (r["low"], r["high"]) == (pytest.approx(-1.0), pytest.approx(1.0))


def test_two_level_bootstrap_resamples_prompts_by_hand_and_pairs_them():
    # one seed, gold 0 and 2 on two prompts against a flat 1: prompt resamples give -1 / 0 / +1 w.p. 1/4, 1/2, 1/4
    a = [Config("a", [[0, 2]], _const_x([[0, 2]]))]
    r = compare(a, [Config("b", [[1, 1]], _const_x([[1, 1]]))], n_boot=8000, seed=2)
    assert r["p_a_better"] == pytest.approx(0.25, abs=0.02)
    assert (r["low"], r["high"]) == (pytest.approx(-1.0), pytest.approx(1.0))
    # the same per-prompt gold in both families: every draw resamples the same prompts for both, gap exactly 0
    r = compare(a, [Config("b", [[0, 2]], _const_x([[0, 2]]))], n_boot=500, seed=3)
    assert (r["gap"], r["low"], r["high"], r["p_a_better"]) == (0.0, 0.0, 0.0, 0.0)


def test_compare_uses_the_overlap_and_says_where_one_family_is_alone():
    # A at KL 1 and 4 (gold 0.2, 0.5); B at KL 2 and 8 (gold 0.2, 0.8): overlap [2, 4]
    def fam(name, pts):
        return [Config(f"{name}{i}", np.full((2, 3), g), np.full((2, 3), k)) for i, (k, g) in enumerate(pts)]

    r = compare(fam("a", [(1, 0.2), (4, 0.5)]), fam("b", [(2, 0.2), (8, 0.8)]), n_boot=200)
    assert r["overlap"] == [2.0, 4.0]
    assert r["only_a"] == [[1.0, 2.0]] and r["only_b"] == [[4.0, 8.0]]
    # on [2, 4]: A = 0.2 + 0.1 (x - 1), B = 0.2 + 0.1 (x - 2): A is 0.1 above everywhere, no noise
    assert r["gap"] == pytest.approx(0.1) and r["low"] == pytest.approx(0.1) and r["p_a_better"] == 1.0
    none = compare(fam("a", [(1, 0.2)]), fam("b", [(5, 0.3)]), n_boot=10)
    assert none["gap"] is None and none["only_b"] == [[5.0, 5.0]]
    band = envelope_band(fam("b", [(2, 0.2), (8, 0.8), (9, 0.1)]), n_boot=50)
    assert band["front"] == ["b0", "b1"] and band["low"][0] == pytest.approx(0.2)


# ---------------------------------------------------------------------------------------- verdict from tables
def _tables(dpo_shift: float, seeds=(0, 1, 2), n_prompts=64, noise=0.05):
    """Synthetic run tables: DPO and PPO with three configurations each on the same gold-vs-KL curve
    gold = 0.1 * KL, DPO moved by ``dpo_shift``; per-prompt noise; PPO has a target KL."""
    rng = np.random.default_rng(0)
    samples, summary = [], []
    fams = {"dpo": [("dpo-sigmoid-b0.5", {"beta": 0.5}, 2.0), ("dpo-sigmoid-b0.1", {"beta": 0.1}, 5.0),
                    ("dpo-sigmoid-b0.05", {"beta": 0.05}, 8.0)],
            "ppo": [("ppo-tkl3", {"target_kl": 3.0}, 3.0), ("ppo-tkl6", {"target_kl": 6.0}, 6.0),
                    ("ppo-tkl12", {"target_kl": 12.0}, 8.5)]}
    for m, cfgs in fams.items():
        for cfg, hp, kl in cfgs:
            for s in seeds:
                arm = f"{cfg}-s{s}"
                g = 0.1 * kl + (dpo_shift if m == "dpo" else 0.0) + rng.normal(0, noise, n_prompts)
                k = kl + rng.normal(0, 0.3, n_prompts)
                samples += [{"arm": arm, "prompt_id": p, "temperature": 1.0, "sample_index": 0, "gold": g[p],
                             "seq_kl": k[p]} for p in range(n_prompts)]
                summary.append({"arm": arm, "method": m, "config": cfg, "seed": s, "temperature": 1.0,
                                "loss_type": "sigmoid" if m == "dpo" else "", "gold": g.mean(), "kl": k.mean(),
                                "length": 10.0, "flops": (1e11 if m == "dpo" else 4e11) * (1 + 0.01 * s), **hp})
    return pd.DataFrame(samples), pd.DataFrame(summary)


@pytest.mark.parametrize("shift,word", [(0.15, "above"), (-0.15, "below"), (0.0, "level")])
def test_verdict_text_from_synthetic_tables(shift, word):
    samples, summary = _tables(shift)
    v = build_verdict(samples, summary, suite="synthetic", temperature=1.0, commit="abcdef1234", n_boot=400)
    text = verdict_text(v)
    (c,) = v["comparisons"]
    assert (c["a"], c["b"]) == ("dpo", "ppo")
    assert c["kl"]["overlap"] == [pytest.approx(3.0, abs=0.2), pytest.approx(8.0, abs=0.2)]
    if word == "level":
        assert "DPO's and PPO's frontiers are level: gap" in text
    else:
        assert f"DPO's frontier lies {abs(shift):.2f} [" in text and f"gold {word} PPO's" in text
    assert text.startswith("On synthetic (3 seeds per configuration, 64 held-out prompts, T = 1, commit abcdef1):")
    assert "only PPO has points at KL 8.0\u20138.5" in text
    p = c["kl"]["p_a_better"]
    assert p > 0.99 if word == "above" else p < 0.01 if word == "below" else 0.02 < p < 0.98
    # compute ranges do not overlap (PPO's configurations cost 4x): said, with the ratio
    assert "No matched-compute comparison with PPO: PPO's cheapest configuration costs 4.0x DPO's dearest." in text
    assert "Tuning budget, configurations per family: DPO 3 (beta), PPO 3 (target_kl)." in text
    assert "PPO seeds landing within \u00b125% of their target KL: 6/9." in text


def test_verdict_says_when_tuning_budgets_differ_and_lists_kl_landing():
    samples, summary = _tables(0.0, seeds=(0, 1))
    summary = summary[summary.config != "dpo-sigmoid-b0.05"]
    v = build_verdict(samples, summary, suite="x", temperature=1.0, n_boot=50)
    assert "the families were NOT given the same number" in verdict_text(v)
    land = kl_landing(summary)["ppo"]
    assert land["total"] == 6 and land["within"] == 4  # target 12 landed at ~8.5: error -29 %; targets 3 / 6 exact
    assert {a["arm"] for a in land["arms"] if not a["landed"]} == {"ppo-tkl12-s0", "ppo-tkl12-s1"}


def test_compare_reports_where_the_envelopes_cross():
    # A: gold 0.5 flat over KL 1-5; B: 0.2 -> 0.8 along KL 1-5: B crosses A at KL 3
    a = [Config("a0", np.full((1, 4), 0.5), np.full((1, 4), 1.0)), Config("a1", np.full((1, 4), 0.5), np.full((1, 4), 5.0))]
    b = [Config("b0", np.full((1, 4), 0.2), np.full((1, 4), 1.0)), Config("b1", np.full((1, 4), 0.8), np.full((1, 4), 5.0))]
    r = compare(a, b, n_boot=50)
    assert r["crossings"] == [pytest.approx(3.0, abs=0.1)] and r["a_above_at_start"]
    from benchmarks.evaluators.verdict import gap_sentence

    assert "the envelopes cross at KL 3.0: A is above before, B after" in gap_sentence("A", "B", r, "kl")


def test_verdict_says_when_a_second_judge_reverses_the_ordering():
    from benchmarks.evaluators.claims import Tables, run_claims

    samples, summary = _tables(0.15)
    # the second judge scores DPO's samples 0.3 lower: DPO above PPO under gold, below under the judge
    samples["judge:lex"] = samples.gold - 0.3 * samples.arm.str.startswith("dpo")
    v = build_verdict(samples, summary, suite="x", temperature=1.0, n_boot=300)
    (v["judge"],) = run_claims(Tables(summary, samples, n_boot=300), only=["judge_robustness"])
    assert v["judge"]["status"] == "fails"
    text = verdict_text(v)
    assert "Under a second judge (lex) the DPO-vs-PPO gap at matched KL is -0.15" in text
    assert text.endswith("the ordering reverses. PPO seeds landing within \u00b125% of their target KL: 6/9.")
    # an agreeing judge adds nothing to the paragraph
    samples["judge:lex"] = samples.gold
    (v["judge"],) = run_claims(Tables(summary, samples, n_boot=300), only=["judge_robustness"])
    assert v["judge"]["status"] == "holds" and "second judge" not in verdict_text(v)
