import math

import numpy as np
import pytest
import torch

from benchmarks.evaluators.metrics import arm_metrics, distinct_n, exact_token_kl, unigram_entropy
from benchmarks.evaluators.stats import (
    bootstrap_ci,
    paired_bootstrap_diff,
    seeds_prompts_ci,
    win_rate,
    win_rate_ci,
)


def test_win_rate_counts_ties_as_half():
    assert win_rate([1, 2, 3, 4], [0, 2, 5, 4]) == pytest.approx((1 + 0.5 + 0 + 0.5) / 4)
    assert win_rate([1.0], [1.0]) == 0.5
    with pytest.raises(ValueError):
        win_rate([1, 2], [1])


def test_bootstrap_ci_hand_worked_and_degenerate():
    p, lo, hi = bootstrap_ci([2.0, 2.0, 2.0])
    assert (p, lo, hi) == (2.0, 2.0, 2.0)  # no spread, no interval
    p, lo, hi = bootstrap_ci([0.0, 1.0], n_boot=4000, seed=0)
    assert p == 0.5 and lo == 0.0 and hi == 1.0  # resamples of 2 points: means 0, .5, 1


def test_bootstrap_ci_covers_true_mean_at_least_90_percent():
    rng = np.random.default_rng(0)
    hits = 0
    for r in range(200):
        x = rng.normal(loc=0.3, scale=1.0, size=50)
        _, lo, hi = bootstrap_ci(x, n_boot=500, seed=r)
        hits += lo <= 0.3 <= hi
    assert hits / 200 >= 0.90


def test_seeds_prompts_ci_and_paired_diff():
    m = np.array([[1.0, 1.0, 1.0], [3.0, 3.0, 3.0]])
    p, lo, hi = seeds_prompts_ci(m, seed=0)
    assert p == 2.0 and lo == 1.0 and hi == 3.0  # only seed-level spread
    d = paired_bootstrap_diff([1, 2, 3], [0, 1, 2])
    assert d["diff"] == 1.0 and d["low"] == 1.0 and d["p_positive"] == 1.0
    w, wlo, whi = win_rate_ci([1, 1, 1, 1], [0, 0, 0, 0])
    assert (w, wlo, whi) == (1.0, 1.0, 1.0)


def test_distinct_n_and_entropy():
    assert distinct_n(["a b a b"], 1) == 0.5
    assert distinct_n(["a b a b"], 2) == pytest.approx(2 / 3)
    assert distinct_n([""], 2) == 0.0
    assert unigram_entropy(["a b"]) == pytest.approx(math.log(2))
    assert unigram_entropy(["a a a"]) == 0.0


def test_exact_kl_of_identical_models_is_zero_and_positive_otherwise(tiny_lm):
    import copy

    from methods.data import collate

    model, tok = tiny_lm
    batch = collate([tok("The cat")["input_ids"]] * 2, [tok(" is good", add_special_tokens=False)["input_ids"],
                                                        tok(" dog", add_special_tokens=False)["input_ids"]], tok.pad_token_id)
    assert torch.allclose(exact_token_kl(model, model, batch), torch.zeros(2), atol=1e-6)
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn_like(p))
    assert (exact_token_kl(other, model, batch) > 0).all()


def test_arm_metrics_against_hand_values():
    m = arm_metrics([0.5, 0.0, 1.0], [0.0, 0.0, 0.5], [1.0, 0.0, 0.0], [1.0, -1.0, 3.0], [3, 4, 5],
                    ["good day", "good good", "day"])
    assert m["gold"] == pytest.approx(0.5) and m["win_vs_sft"] == pytest.approx((1 + 0.5 + 1) / 3)
    assert m["win_vs_chosen"] == pytest.approx((0 + 0.5 + 1) / 3)
    assert m["kl"] == pytest.approx(1.0) and m["negative_kl_share"] == pytest.approx(1 / 3)
    assert m["length"] == 4.0 and m["distinct_1"] == pytest.approx(2 / 5)


# ------------------------------------------------------------------------------------------ on-policy health
def _curve(n=40, clip=0.1, akl=0.01, ev=0.5, beta=(0.3, 0.3), kl=(0.0, 6.0), length=(18.0, 18.0)):
    lin = lambda a, b, i: a + (b - a) * i / (n - 1)  # noqa: E731
    return [{"policy/clipfrac": clip, "policy/approxkl": akl, "val/explained_variance": ev if i >= 5 else -3.0,
             "objective/kl_coef": lin(*beta, i), "objective/kl": lin(*kl, i), "objective/completion_len": lin(*length, i)}
            for i in range(n)]


def test_rl_health_healthy_run_raises_no_flag():
    from benchmarks.evaluators.diagnostics import rl_health

    h = rl_health(_curve(), target_kl=6.0)
    assert h["flags"] == []
    assert h["clipfrac"] == pytest.approx(0.1) and h["explained_variance"] == pytest.approx(0.5)  # warm-up excluded
    assert h["kl_final"] == pytest.approx(np.median([6.0 * i / 39 for i in range(36, 40)]))


@pytest.mark.parametrize(("kw", "flag"), [
    ({"clip": 0.4}, "clipfrac_high"),
    ({"akl": 0.2}, "approxkl_high"),
    ({"ev": -0.5}, "critic_poor"),
    ({"kl": (0.0, 25.0)}, "kl_off_target"),
    ({"length": (18.0, 6.0)}, "length_collapse"),
    ({"length": (18.0, 24.0)}, "length_growth"),
    ({"beta": (0.3, 0.04)}, "beta_runaway"),
])
def test_rl_health_flags_each_range(kw, flag):
    """The default suite's PPO at 16d4824 (clipfrac 0.49, explained variance -6, length 18 -> 6, beta 0.3 -> 4.06)
    would raise these; each range on its own."""
    from benchmarks.evaluators.diagnostics import rl_health

    flags = [f for f, _ in rl_health(_curve(**kw), target_kl=6.0)["flags"]]
    assert flags == [flag]


def test_rl_health_table_reads_only_ppo_style_curves():
    from benchmarks.evaluators.diagnostics import rl_health_table

    arms = [{"arm": "ppo-tkl6-s0", "target_kl": 6.0}, {"arm": "dpo-sigmoid-b0.1-s0", "target_kl": float("nan")}]
    rows = rl_health_table(arms, {"ppo-tkl6-s0": _curve(clip=0.3), "dpo-sigmoid-b0.1-s0": [{"loss": 0.6}]})
    assert [r["arm"] for r in rows] == ["ppo-tkl6-s0"] and rows[0]["flags"] == ["clipfrac_high"]
