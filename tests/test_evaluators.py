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
