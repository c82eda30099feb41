"""Tests for methods/rlhf/ppo_core.py: hand-computed examples, limits and masking (tiny CPU tensors)."""

from __future__ import annotations

import math

import pytest
import torch

from methods.rlhf.ppo_core import (
    AdaptiveKLController,
    FixedKLController,
    check_finite,
    compute_gae,
    compute_rewards,
    entropy_from_logits,
    explained_variance,
    kl_estimate,
    masked_mean,
    masked_var,
    masked_whiten,
    policy_loss,
    validate_ppo_hparams,
    value_loss,
)

D = torch.float64


def t(x, dtype=D):
    return torch.tensor(x, dtype=dtype)


def close(a, b, tol=1e-9):
    torch.testing.assert_close(torch.as_tensor(a, dtype=D), torch.as_tensor(b, dtype=D), rtol=0, atol=tol)


# ------------------------------------------------------------------------------------------ masked stats
def test_masked_mean_ignores_padding_even_nan():
    x = t([[1.0, 2.0, 3.0, float("nan")], [4.0, 100.0, float("inf"), -5.0]])
    mask = t([[1, 1, 1, 0], [1, 0, 0, 0]])
    close(masked_mean(x, mask), (1 + 2 + 3 + 4) / 4)
    close(masked_mean(x, mask, dim=1), [2.0, 4.0])
    close(masked_mean(x, mask.bool(), dim=1), [2.0, 4.0])  # bool masks too


def test_masked_var_matches_torch_var_on_selected():
    x = t([[1.0, 5.0, 2.0, 9.0], [3.0, 7.0, -1.0, 50.0]])
    mask = t([[1, 1, 1, 0], [1, 1, 0, 0]])
    sel = t([1.0, 5.0, 2.0, 3.0, 7.0])
    close(masked_var(x, mask), sel.var(unbiased=True))
    close(masked_var(x, mask, unbiased=False), sel.var(unbiased=False))
    with pytest.raises(ValueError, match="no entries"):
        masked_var(x, torch.zeros_like(mask))
    with pytest.raises(ValueError, match="at least 2"):
        masked_var(x, t([[1, 0, 0, 0], [0, 0, 0, 0]]))


def test_masked_whiten_mean0_var1_and_ignores_masked():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 6, generator=g, dtype=D) * 3 + 7
    mask = torch.ones(4, 6, dtype=D)
    mask[0, 4:] = 0
    mask[2, 1:] = 0
    x_garbage = x.clone()
    x_garbage[mask == 0] = 1e6  # padding garbage must not change the result
    w = masked_whiten(x_garbage, mask)
    sel = w[mask.bool()]
    close(sel.mean(), 0.0, tol=1e-9)
    close(sel.var(unbiased=True), 1.0, tol=1e-6)
    assert (w[mask == 0] == 0).all()
    torch.testing.assert_close(w, masked_whiten(x, mask))
    # Expected values by hand from the selected entries.
    raw = x[mask.bool()]
    close(sel, (raw - raw.mean()) / torch.sqrt(raw.var() + 1e-8), tol=1e-9)


def test_masked_whiten_shift_mean_false_keeps_mean():
    x = t([[1.0, 2.0, 3.0, 99.0], [4.0, 5.0, 6.0, -99.0]])
    mask = t([[1, 1, 1, 0], [1, 1, 1, 0]])
    w = masked_whiten(x, mask, shift_mean=False)
    sel = w[mask.bool()]
    close(sel.mean(), 3.5, tol=1e-9)  # mean of 1..6 is kept
    close(sel.var(), 1.0, tol=1e-6)  # but the scale is normalised
    # (x - 3.5)/std + 3.5 with std = sqrt(var(1..6)) = sqrt(3.5)
    close(sel, (t([1, 2, 3, 4, 5, 6]) - 3.5) / math.sqrt(3.5 + 1e-8) + 3.5, tol=1e-9)


# ------------------------------------------------------------------------------------------ GAE
def test_gae_hand_computed_three_steps_with_padding():
    gamma, lam = 0.9, 0.8  # gamma * lam = 0.72
    # Row 0: 3 valid steps then 2 padded positions holding garbage (including NaN).
    # Row 1: a 1-step episode (garbage after it), to check that rows don't interact.
    rewards = t([[-0.1, -0.1, 1.0, 5.0, float("nan")], [2.0, 9.0, 9.0, 9.0, 9.0]])
    values = t([[0.2, 0.4, 0.5, 100.0, float("nan")], [0.5, 7.0, 7.0, 7.0, 7.0]])
    mask = t([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0]])
    adv, ret = compute_gae(rewards, values, mask, gamma=gamma, lam=lam)
    # Row 0, V after the last valid token (t=2) is 0:
    #   delta_2 = 1.0  + 0.9*0   - 0.5 = 0.5
    #   delta_1 = -0.1 + 0.9*0.5 - 0.4 = -0.05
    #   delta_0 = -0.1 + 0.9*0.4 - 0.2 = 0.06
    #   A_2 = delta_2                 = 0.5
    #   A_1 = delta_1 + 0.72 * A_2    = -0.05 + 0.36   = 0.31
    #   A_0 = delta_0 + 0.72 * A_1    = 0.06 + 0.2232  = 0.2832
    #   returns = A + V = [0.4832, 0.71, 1.0]
    close(adv[0], [0.2832, 0.31, 0.5, 0.0, 0.0])
    close(ret[0], [0.4832, 0.71, 1.0, 0.0, 0.0])
    # Row 1: single step, A_0 = 2.0 + 0.9*0 - 0.5 = 1.5, return = 2.0
    close(adv[1], [1.5, 0, 0, 0, 0])
    close(ret[1], [2.0, 0, 0, 0, 0])
    assert torch.isfinite(adv).all() and torch.isfinite(ret).all()


def _random_batch(seed, B=3, T=6):
    g = torch.Generator().manual_seed(seed)
    rewards = torch.randn(B, T, generator=g, dtype=D)
    values = torch.randn(B, T, generator=g, dtype=D)
    lengths = [T, 3, 1][:B]
    mask = torch.zeros(B, T, dtype=D)
    for b, n in enumerate(lengths):
        mask[b, :n] = 1
    return rewards, values, mask, lengths


def test_gae_lambda0_is_one_step_td_error():
    rewards, values, mask, lengths = _random_batch(1)
    gamma = 0.95
    adv, ret = compute_gae(rewards, values, mask, gamma=gamma, lam=0.0)
    for b, n in enumerate(lengths):
        for s in range(n):
            v_next = values[b, s + 1] if s + 1 < n else 0.0
            close(adv[b, s], rewards[b, s] + gamma * v_next - values[b, s])
            close(ret[b, s], rewards[b, s] + gamma * v_next)
        assert (adv[b, n:] == 0).all() and (ret[b, n:] == 0).all()


def test_gae_lambda1_gamma1_is_reward_to_go_minus_value():
    rewards, values, mask, lengths = _random_batch(2)
    adv, ret = compute_gae(rewards, values, mask, gamma=1.0, lam=1.0)
    for b, n in enumerate(lengths):
        for s in range(n):
            reward_to_go = rewards[b, s:n].sum()
            close(adv[b, s], reward_to_go - values[b, s])
            close(ret[b, s], reward_to_go)  # Monte-Carlo return


def test_gae_padding_does_not_leak():
    rewards, values, mask, lengths = _random_batch(3)
    adv, ret = compute_gae(rewards, values, mask, gamma=0.99, lam=0.95)
    r2, v2 = rewards.clone(), values.clone()
    r2[mask == 0] = 1e9
    v2[mask == 0] = float("nan")
    adv2, ret2 = compute_gae(r2, v2, mask, gamma=0.99, lam=0.95)
    torch.testing.assert_close(adv, adv2)
    torch.testing.assert_close(ret, ret2)
    # Each row equals the same row computed alone at its own (cropped) length.
    for b, n in enumerate(lengths):
        a_b, r_b = compute_gae(
            rewards[b : b + 1, :n], values[b : b + 1, :n], torch.ones(1, n), gamma=0.99, lam=0.95
        )
        torch.testing.assert_close(adv[b, :n], a_b[0])
        torch.testing.assert_close(ret[b, :n], r_b[0])


def test_gae_matches_trl_reference_loop_on_right_padding():
    rewards, values, mask, _ = _random_batch(4)
    gamma, lam = 0.97, 0.9
    # TRL legacy PPOTrainer.compute_advantages (values*mask, rewards*mask, next value 0 at the end).
    v, r = values * mask, rewards * mask
    last, out = 0.0, []
    T = r.shape[1]
    for s in reversed(range(T)):
        nv = v[:, s + 1] if s < T - 1 else 0.0
        delta = r[:, s] + gamma * nv - v[:, s]
        last = delta + gamma * lam * last
        out.append(last)
    ref_adv = torch.stack(out[::-1], dim=1)
    adv, ret = compute_gae(rewards, values, mask, gamma=gamma, lam=lam)
    torch.testing.assert_close(adv, ref_adv * mask)
    torch.testing.assert_close(ret, (ref_adv + v) * mask)


@pytest.mark.parametrize(
    "field,kw",
    [
        ("gamma", {"gamma": 1.5, "lam": 0.9}),
        ("lam", {"gamma": 0.9, "lam": -0.1}),
        ("gamma", {"gamma": float("nan"), "lam": 0.9}),
    ],
)
def test_gae_validates_gamma_lam(field, kw):
    r, v, m, _ = _random_batch(5)
    with pytest.raises(ValueError, match=field):
        compute_gae(r, v, m, **kw)


# ------------------------------------------------------------------------------------------ KL estimators
def test_kl_estimators_unbiasedness_against_exact_categorical_kl():
    p = t([0.5, 0.2, 0.2, 0.1])  # policy (samples are drawn from it)
    q = t([0.25, 0.25, 0.25, 0.25])  # reference
    exact = float((p * (p / q).log()).sum())  # KL(p || q) ~= 0.1657
    g = torch.Generator().manual_seed(1234)
    draws = torch.multinomial(p, 200_000, replacement=True, generator=g)
    lp, lq = p.log()[draws].unsqueeze(0), q.log()[draws].unsqueeze(0)  # [1, N]
    k1 = kl_estimate(lp, lq, "k1").mean().item()
    k3 = kl_estimate(lp, lq, "k3").mean().item()
    # std(logr) ~ 0.6 -> standard error ~ 0.0013 with 200k draws; 0.01 is ~7 sigma.
    assert abs(k1 - exact) < 0.01, (k1, exact)
    assert abs(k3 - exact) < 0.01, (k3, exact)  # the wrong-direction k3 would give ~0.194
    # k2 is biased but close for nearby distributions, and nonnegative.
    assert kl_estimate(lp, lq, "k2").min() >= 0


def test_kl_estimators_signs_and_zero():
    g = torch.Generator().manual_seed(0)
    lp = torch.randn(4, 50, generator=g, dtype=torch.float32) * 3
    lq = torch.randn(4, 50, generator=g, dtype=torch.float32) * 3
    tiny = torch.tensor([[1e-9, -1e-9, 1e-7, -1e-7, 3e-5, -3e-5]])  # rounding-sensitive region for k3
    assert (kl_estimate(lp, lq, "k3") >= 0).all()
    assert (kl_estimate(tiny, torch.zeros_like(tiny), "k3") >= 0).all()
    assert (kl_estimate(lp, lq, "k2") >= 0).all()
    assert (kl_estimate(lp, lq, "k1") < 0).any()  # k1 is not nonnegative per token
    for kind in ("k1", "k2", "k3"):
        assert (kl_estimate(lp, lp.clone(), kind) == 0).all(), kind
    # exact formulas at one point: logr = 0.5
    a, b = t([[0.5]]), t([[0.0]])
    close(kl_estimate(a, b, "k1"), [[0.5]])
    close(kl_estimate(a, b, "k2"), [[0.125]])
    close(kl_estimate(a, b, "k3"), [[math.exp(-0.5) - 1 + 0.5]])


def test_kl_estimate_unknown_kind_names_valid_ones():
    with pytest.raises(ValueError, match="k1.*k2.*k3"):
        kl_estimate(t([[0.0]]), t([[0.0]]), "k4")


# ------------------------------------------------------------------------------------------ rewards
def test_compute_rewards_score_on_last_valid_token_uneven_lengths():
    # Row lengths 3, 1, 4 (T = 4); k1 KL = logprobs - ref_logprobs.
    logprobs = t([[-1.0, -2.0, -0.5, 7.0], [-0.3, 5.0, 5.0, 5.0], [-1.0, -1.0, -1.0, -1.0]])
    ref = t([[-1.5, -1.0, -0.5, 0.0], [-0.1, 0.0, 0.0, 0.0], [-2.0, -0.5, -1.0, -3.0]])
    mask = t([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]])
    scores = t([10.0, 20.0, 30.0])
    rewards, kl = compute_rewards(scores, logprobs, ref, mask, kl_coef=0.1)
    # kl per token (0 on padding):
    close(kl, [[0.5, -1.0, 0.0, 0.0], [-0.2, 0, 0, 0], [1.0, -0.5, 0.0, 2.0]])
    # rewards = -0.1 * kl, + score at the last valid token (index 2, 0, 3)
    close(
        rewards,
        [[-0.05, 0.1, 0.0 + 10.0, 0.0], [0.02 + 20.0, 0, 0, 0], [-0.1, 0.05, 0.0, -0.2 + 30.0]],
    )
    # kl_kind is honoured
    _, kl3 = compute_rewards(scores, logprobs, ref, mask, kl_coef=0.1, kl_kind="k3")
    assert (kl3 >= 0).all() and (kl3[mask == 0] == 0).all()


def test_compute_rewards_rejects_empty_rows_and_bad_inputs():
    lp = torch.zeros(2, 3)
    mask = t([[1, 1, 0], [0, 0, 0]])
    with pytest.raises(ValueError, match=r"rows \[1\]"):
        compute_rewards(torch.zeros(2), lp, lp, mask, kl_coef=0.1)
    with pytest.raises(ValueError, match="scores"):
        compute_rewards(torch.zeros(2, 1), lp, lp, torch.ones(2, 3), kl_coef=0.1)
    with pytest.raises(ValueError, match="kl_coef"):
        compute_rewards(torch.zeros(2), lp, lp, torch.ones(2, 3), kl_coef=-1.0)


# ------------------------------------------------------------------------------------------ policy loss
def _pg(ratio, adv, eps=0.2, mask=None):
    n = len(ratio)
    old = torch.zeros(1, n, dtype=D)
    logp = torch.log(t([ratio])).requires_grad_(True)
    mask = torch.ones(1, n, dtype=D) if mask is None else t([mask])
    loss, stats = policy_loss(logp, old, t([adv]), mask, clip_range=eps)
    loss.backward()
    return loss, stats, logp.grad


def test_policy_loss_inside_clip_range_is_unclipped_with_gradient():
    loss, stats, grad = _pg([1.1, 0.9], [2.0, -1.0])
    close(loss, (-2.0 * 1.1 + 1.0 * 0.9) / 2)
    close(stats["clipfrac"], 0.0)
    # d/dlogp of -A * exp(logp - old) = -A * r, averaged over 2 tokens
    close(grad, [[-2.0 * 1.1 / 2, 1.0 * 0.9 / 2]])


def test_policy_loss_positive_advantage_beyond_upper_bound_is_clipped():
    loss, stats, grad = _pg([1.5], [1.0])
    close(loss, -1.2)  # -A * (1 + eps)
    close(grad, [[0.0]])
    close(stats["clipfrac"], 1.0)
    # Below the lower bound with A > 0 the unclipped (pessimistic) term is chosen: gradient flows.
    loss, stats, grad = _pg([0.5], [1.0])
    close(loss, -0.5)
    close(grad, [[-0.5]])
    close(stats["clipfrac"], 0.0)


def test_policy_loss_negative_advantage_clipping():
    loss, stats, grad = _pg([0.5], [-1.0])
    close(loss, 0.8)  # -A * (1 - eps)
    close(grad, [[0.0]])
    close(stats["clipfrac"], 1.0)
    loss, stats, grad = _pg([1.5], [-1.0])  # above the upper bound with A < 0: unclipped
    close(loss, 1.5)
    close(grad, [[1.5]])
    close(stats["clipfrac"], 0.0)


def test_policy_loss_mask_and_approxkl():
    # Token 3 is padding with an absurd ratio; it must not affect loss, clipfrac or gradients.
    loss, stats, grad = _pg([1.1, 1.5, 0.5, 1e30], [1.0, 1.0, -1.0, 5.0], mask=[1, 1, 1, 0])
    close(loss, (-1.1 - 1.2 + 0.8) / 3)
    close(stats["clipfrac"], 2 / 3)
    close(grad[0, 3], 0.0)
    logr = torch.log(t([1.1, 1.5, 0.5]))
    close(stats["approxkl"], 0.5 * (logr**2).mean())


# ------------------------------------------------------------------------------------------ value loss
def test_value_loss_clipping_example():
    old = t([[1.0, 1.0, 1.0, 0.0]])
    ret = t([[2.0, 2.0, 2.0, 0.0]])
    vals = t([[1.5, 1.1, 0.5, 123.0]]).requires_grad_(True)
    mask = t([[1, 1, 1, 0]])
    loss, stats = value_loss(vals, old, ret, mask, clip_range_value=0.2)
    # token 0: V=1.5 -> V_clip=1.2; (1.5-2)^2=0.25, (1.2-2)^2=0.64 -> max 0.64 (clipped, no grad)
    # token 1: V=1.1 inside; both 0.81
    # token 2: V=0.5 -> V_clip=0.8; 2.25 vs 1.44 -> max 2.25 (unclipped)
    close(loss, 0.5 * (0.64 + 0.81 + 2.25) / 3)
    close(stats["clipfrac"], 1 / 3)
    loss.backward()
    # d/dV 0.5 * mean((V-R)^2) = (V - R)/3 on unclipped tokens
    close(vals.grad, [[0.0, (1.1 - 2.0) / 3, (0.5 - 2.0) / 3, 0.0]])


# ------------------------------------------------------------------------------------------ diagnostics
def test_explained_variance():
    ret = t([[1.0, 2.0, 3.0, 0.0], [4.0, 5.0, 0.0, 0.0]])
    mask = t([[1, 1, 1, 0], [1, 1, 0, 0]])
    garbage = ret.clone()
    garbage[mask == 0] = 1e6
    assert explained_variance(ret, garbage, mask) == pytest.approx(1.0)
    mean_pred = torch.full_like(ret, 3.0)  # constant prediction = mean of returns
    assert explained_variance(mean_pred, ret, mask) == pytest.approx(0.0, abs=1e-12)
    # V = R - noise with Var(noise)/Var(R) = known: noise = [1,-1,1,-1,0] -> var 0.8 (biased), Var(R)=2
    noise = t([[1.0, -1.0, 1.0, 0.0], [-1.0, 0.0, 0.0, 0.0]])
    assert explained_variance(ret - noise, ret, mask) == pytest.approx(1 - 0.8 / 2.0)
    assert math.isnan(explained_variance(ret, torch.ones_like(ret), mask))
    assert math.isnan(explained_variance(ret, ret, torch.zeros_like(mask)))


def test_entropy_from_logits():
    logits = torch.zeros(2, 3, 5)
    close(entropy_from_logits(logits), torch.full((2, 3), math.log(5)), tol=1e-6)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 7, generator=g) * 4
    expected = torch.distributions.Categorical(logits=logits).entropy()
    torch.testing.assert_close(entropy_from_logits(logits), expected)
    peaked = torch.tensor([[[100.0, 0.0, 0.0]]])
    assert entropy_from_logits(peaked).item() == pytest.approx(0.0, abs=1e-6)
    assert entropy_from_logits(torch.zeros(1, 1, 4, dtype=torch.bfloat16)).dtype == torch.float32


# ------------------------------------------------------------------------------------------ KL controllers
def test_adaptive_kl_controller_direction_and_clipping():
    init, target, horizon, n = 0.1, 6.0, 10_000, 256
    ctl = AdaptiveKLController(init, target, horizon)
    ctl.update(12.0, n)  # error = 12/6 - 1 = 1.0 -> clipped to +0.2
    assert ctl.value == pytest.approx(init * (1 + 0.2 * n / horizon))
    assert ctl.value > init
    ctl = AdaptiveKLController(init, target, horizon)
    ctl.update(torch.tensor(0.0), n)  # error = -1 -> clipped to -0.2
    assert ctl.value == pytest.approx(init * (1 - 0.2 * n / horizon))
    ctl = AdaptiveKLController(init, target, horizon)
    ctl.update(6.6, n)  # error = 0.1, inside the clip range
    assert ctl.value == pytest.approx(init * (1 + 0.1 * n / horizon))
    ctl = AdaptiveKLController(init, target, horizon)
    assert ctl.update(6.0, n) == pytest.approx(init)  # on target: unchanged
    with pytest.raises(ValueError, match="current_kl"):
        ctl.update(float("nan"), n)
    with pytest.raises(ValueError, match="target"):
        AdaptiveKLController(0.1, 0.0, 100)


def test_adaptive_kl_controller_bounds_and_hold_by_hand():
    # bounds: beta never leaves [coef_min, coef_max]
    ctl = AdaptiveKLController(0.3, 6.0, 128, coef_min=0.25, coef_max=0.33)
    ctl.update(0.0, 64)  # 0.3 * (1 - 0.2 * 0.5) = 0.27
    assert ctl.value == pytest.approx(0.27)
    ctl.update(0.0, 64)  # 0.243 -> clamped to 0.25
    assert ctl.value == pytest.approx(0.25)
    for _ in range(5):
        ctl.update(100.0, 64)  # x1.1 each, clamped to 0.33
    assert ctl.value == pytest.approx(0.33)
    # hold: below target and climbing (above the EMA by > rise_tol * target) -> no decrease
    ctl = AdaptiveKLController(0.3, 6.0, 128, hold_while_rising=True, ema=0.5, rise_tol=0.02)
    assert ctl.update(1.0, 64) == pytest.approx(0.3) and ctl.held  # first measurement: climbing from 0
    assert ctl.kl_ema == pytest.approx(1.0)
    assert ctl.update(2.0, 64) == pytest.approx(0.3) and ctl.held  # 2.0 - 1.0 > 0.12
    assert ctl.kl_ema == pytest.approx(1.5)
    ctl.update(1.55, 64)
    # 1.55 - 1.5 = 0.05 <= 0.12: arrived, the decrease is taken (error clipped to -0.2)
    assert ctl.value == pytest.approx(0.27) and not ctl.held
    # above target: an increase is never held, climbing or not
    assert ctl.update(9.0, 64) == pytest.approx(0.27 * 1.1) and not ctl.held
    state = ctl.state_dict()
    again = AdaptiveKLController(0.3, 6.0, 128, hold_while_rising=True)
    again.load_state_dict(state)
    assert (again.value, again.kl_ema) == (ctl.value, ctl.kl_ema)
    with pytest.raises(ValueError, match="coef_min <= init_kl_coef"):
        AdaptiveKLController(0.3, 6.0, 128, coef_min=0.5)


def _plant(ctl, *, rate: float, c: float, iters: int = 40, n: int = 64) -> list[float]:
    """A policy whose KL relaxes towards the equilibrium KL c / beta of its current beta at ``rate`` per iteration
    (small = a slow policy, e.g. a small learning rate). Returns the KL per iteration."""
    kl, out = 0.0, []
    for _ in range(iters):
        kl += rate * (c / ctl.value - kl)
        out.append(kl)
        ctl.update(kl, n)
    return out


@pytest.mark.parametrize("rate", [0.08, 0.15, 0.3])
@pytest.mark.parametrize("c", [1.8, 2.4])
def test_kl_controller_with_hold_lands_within_25_percent(rate, c):
    """The default suites' controller (beta_0 0.3, horizon 128, 64 episodes per iteration, 40 iterations, target 6)
    on a simulated policy: with the hold it ends within +-25 % of the target and never overshoots by more than that;
    Ziegler's controller on a slow policy cuts beta while the KL climbs and then overshoots (the failure seen in the
    default suite at lr 5e-5: beta 0.30 -> 0.04, KL ~25 for target 6), so this test can fail."""
    target = 6.0
    kls = _plant(AdaptiveKLController(0.3, target, 128, hold_while_rising=True), rate=rate, c=c)
    assert abs(kls[-1] / target - 1) <= 0.25
    assert max(kls) <= 1.25 * target
    if rate <= 0.08:  # the slow policy: Ziegler's controller overshoots by more than 25 %
        plain = _plant(AdaptiveKLController(0.3, target, 128), rate=rate, c=c)
        assert max(plain) > 1.3 * target


def test_fixed_kl_controller_is_constant():
    ctl = FixedKLController(0.05)
    ctl.update(100.0, 512)
    ctl.update(0.0, 512)
    assert ctl.value == 0.05


# ------------------------------------------------------------------------------------------ validation
GOOD = dict(clip_range=0.2, clip_range_value=0.2, gamma=1.0, lam=0.95)


def test_validate_ppo_hparams_accepts_good_values():
    validate_ppo_hparams(**GOOD)
    validate_ppo_hparams(**GOOD, target_kl=0.1, batch_size=64, minibatch_size=16)


@pytest.mark.parametrize(
    "override,field",
    [
        ({"clip_range": 0.0}, "clip_range"),
        ({"clip_range": -0.1}, "clip_range"),
        ({"clip_range_value": 0.0}, "clip_range_value"),
        ({"gamma": 1.01}, "gamma"),
        ({"lam": -0.5}, "lam"),
        ({"lam": float("nan")}, "lam"),
        ({"target_kl": 0.0}, "target_kl"),
        ({"batch_size": 8, "minibatch_size": 16}, "minibatch_size"),
        ({"batch_size": 10, "minibatch_size": 4}, "divisible"),
        ({"batch_size": 0, "minibatch_size": 4}, "batch_size"),
    ],
)
def test_validate_ppo_hparams_errors_name_the_field(override, field):
    with pytest.raises(ValueError, match=field):
        validate_ppo_hparams(**{**GOOD, **override})


def test_validate_ppo_hparams_reports_all_problems():
    with pytest.raises(ValueError) as ei:
        validate_ppo_hparams(clip_range=0.0, clip_range_value=0.2, gamma=2.0, lam=0.9)
    msg = str(ei.value)
    assert "clip_range" in msg and "gamma" in msg


def test_check_finite():
    check_finite("loss", torch.tensor([1.0, 2.0]), phase="train", step=3)
    check_finite("count", torch.tensor([1, 2]), phase="train", step=3)
    with pytest.raises(
        FloatingPointError, match="non-finite policy_loss in phase ppo_update at step 17"
    ) as ei:
        check_finite(
            "policy_loss", torch.tensor([1.0, float("nan"), float("inf")]), phase="ppo_update", step=17
        )
    assert "1 NaN" in str(ei.value) and "1 inf" in str(ei.value)
    with pytest.raises(FloatingPointError, match="phase rollout at step 0"):
        check_finite("kl", float("inf"), phase="rollout", step=0)
