"""Tests for methods/dpo/losses.py: pure tensor math, no models.

Expected values are computed by hand with ``math`` (scalar formulas written independently of the
vectorised torch code), plus a few literal constants, limits, and a parity check against TRL 1.16's own
loss code where that code can be called without building a trainer or a model.
"""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from methods.dpo.losses import (
    LOSS_TYPES,
    preference_loss,
    simpo_loss,
    uses_average_logps,
    validate_dpo_hparams,
)

LOG2 = math.log(2.0)

# Three pairs; h = (pi_c - pi_r) - (ref_c - ref_r) is 1.5, 0.5 and -2.0.
PI_C = [-1.0, -2.0, -4.0]
PI_R = [-3.0, -1.0, -2.0]
REF_C = [-1.5, -2.5, -3.0]
REF_R = [-2.0, -1.0, -3.0]
H = [(pc - pr) - (rc - rr) for pc, pr, rc, rr in zip(PI_C, PI_R, REF_C, REF_R, strict=True)]


def _t(xs, requires_grad=False):
    return torch.tensor(xs, dtype=torch.float64, requires_grad=requires_grad)


def _inputs(requires_grad=False):
    return (_t(PI_C, requires_grad), _t(PI_R, requires_grad), _t(REF_C), _t(REF_R))


# Scalar reference formulas (softplus(x) = log(1 + e^x) = -log sigmoid(-x)).
def _softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def _dpo(h, b):
    return _softplus(-b * h)


def _cdpo(h, b, e):
    return (1 - e) * _softplus(-b * h) + e * _softplus(b * h)


def _ipo(h, b):
    return (h - 1 / (2 * b)) ** 2


def _hinge(h, b):
    return max(0.0, 1 - b * h)


def _robust(h, b, e):
    return ((1 - e) * _softplus(-b * h) - e * _softplus(b * h)) / (1 - 2 * e)


def _loss(loss_type, beta, eps=0.0, inputs=None):
    losses, _, _ = preference_loss(
        *(inputs or _inputs()), beta=beta, loss_type=loss_type, label_smoothing=eps
    )
    return losses


def _assert_close(actual: torch.Tensor, expected: list[float], tol=1e-12):
    assert actual.shape == (len(expected),)
    torch.testing.assert_close(actual, _t(expected), rtol=tol, atol=tol)


def test_h_is_what_the_hand_values_assume():
    assert H == [1.5, 0.5, -2.0]


# --------------------------------------------------------------------------- hand-computed values


@pytest.mark.parametrize("beta", [0.1, 0.5, 2.0])
def test_sigmoid_matches_hand_values(beta):
    _assert_close(_loss("sigmoid", beta), [_dpo(h, beta) for h in H])


def test_sigmoid_literal_values():
    # beta = 1: log(1 + e^-1.5), log(1 + e^-0.5), log(1 + e^2)
    _assert_close(_loss("sigmoid", 1.0), [0.2014132779827524, 0.47407698418010663, 2.1269280110429727])


@pytest.mark.parametrize("beta,eps", [(0.1, 0.1), (1.0, 0.25), (2.0, 0.45)])
def test_cdpo_matches_hand_values(beta, eps):
    _assert_close(_loss("sigmoid", beta, eps), [_cdpo(h, beta, eps) for h in H])


@pytest.mark.parametrize("beta", [0.1, 0.5, 2.0])
def test_ipo_matches_hand_values(beta):
    _assert_close(_loss("ipo", beta), [_ipo(h, beta) for h in H])


def test_ipo_literal_values():
    # beta = 0.5 -> target margin 1/(2*0.5) = 1: (1.5-1)^2, (0.5-1)^2, (-2-1)^2
    _assert_close(_loss("ipo", 0.5), [0.25, 0.25, 9.0])


@pytest.mark.parametrize("beta", [0.1, 0.5, 1.0, 2.0])
def test_hinge_matches_hand_values(beta):
    _assert_close(_loss("hinge", beta), [_hinge(h, beta) for h in H])


def test_hinge_literal_values():
    # beta = 1: relu(1-1.5), relu(1-0.5), relu(1+2)
    _assert_close(_loss("hinge", 1.0), [0.0, 0.5, 3.0])


@pytest.mark.parametrize("beta,eps", [(0.1, 0.1), (1.0, 0.25), (2.0, 0.45)])
def test_robust_matches_hand_values(beta, eps):
    _assert_close(_loss("robust", beta, eps), [_robust(h, beta, eps) for h in H], tol=1e-10)


def test_robust_literal_value():
    # beta = 1, eps = 0.25, h = 1.5: (0.75*log(1+e^-1.5) - 0.25*log(1+e^1.5)) / 0.5
    expected = (0.75 * 0.2014132779827524 - 0.25 * 1.7014132779827524) / 0.5
    torch.testing.assert_close(_loss("robust", 1.0, 0.25)[0], _t(expected), rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------- limits and identities


def test_sigmoid_beta_to_zero_gives_log2():
    _assert_close(_loss("sigmoid", 1e-9), [LOG2] * 3, tol=1e-8)


def test_cdpo_eps_to_zero_is_plain_dpo():
    plain = _loss("sigmoid", 0.7)
    torch.testing.assert_close(_loss("sigmoid", 0.7, 1e-12), plain, rtol=1e-10, atol=1e-10)
    _assert_close(plain, [_dpo(h, 0.7) for h in H])


def test_robust_eps_zero_equals_sigmoid_exactly():
    assert torch.equal(_loss("robust", 0.3, 0.0), _loss("sigmoid", 0.3))


def test_robust_is_unbiased_under_label_flips():
    # rDPO's defining property: E_flip[robust(noisy label)] = clean DPO loss, i.e.
    # (1-eps) * robust(h) + eps * robust(-h) == -log sigmoid(beta h). A sign slip in either term breaks it.
    beta, eps = 0.8, 0.2
    inputs = _inputs()
    swapped = (inputs[1], inputs[0], inputs[3], inputs[2])  # chosen <-> rejected, so h -> -h
    mixed = (1 - eps) * _loss("robust", beta, eps, inputs) + eps * _loss("robust", beta, eps, swapped)
    torch.testing.assert_close(mixed, _loss("sigmoid", beta, inputs=inputs), rtol=1e-12, atol=1e-12)


def test_cdpo_is_minimised_at_finite_margin():
    # d/dh cDPO = beta * (sigmoid(beta h) - (1 - eps)) = 0 at h* = log((1-eps)/eps) / beta.
    beta, eps = 0.5, 0.1
    h_star = math.log((1 - eps) / eps) / beta
    pc = torch.tensor([h_star], dtype=torch.float64, requires_grad=True)
    zero = torch.zeros(1, dtype=torch.float64)
    losses, _, _ = preference_loss(pc, zero, zero, zero, beta=beta, loss_type="sigmoid", label_smoothing=eps)
    (grad,) = torch.autograd.grad(losses.sum(), pc)
    assert abs(grad.item()) < 1e-12
    # and past h* the smoothed loss pushes the margin back down (plain DPO never does)
    pc2 = torch.tensor([2 * h_star], dtype=torch.float64, requires_grad=True)
    losses, _, _ = preference_loss(pc2, zero, zero, zero, beta=beta, loss_type="sigmoid", label_smoothing=eps)
    (grad,) = torch.autograd.grad(losses.sum(), pc2)
    assert grad.item() > 0


@pytest.mark.parametrize("beta", [0.1, 0.5, 3.0])
def test_zero_margin_values(beta):
    zeros = torch.zeros(2, dtype=torch.float64)
    same = (_t([-1.0, -7.0]), _t([-2.0, -3.0]), _t([-1.0, -7.0]), _t([-2.0, -3.0]))  # h = 0
    for inputs in [(zeros, zeros, zeros, zeros), same]:
        _assert_close(_loss("sigmoid", beta, inputs=inputs), [LOG2] * 2)
        _assert_close(_loss("sigmoid", beta, 0.2, inputs=inputs), [LOG2] * 2)
        _assert_close(_loss("robust", beta, 0.2, inputs=inputs), [LOG2] * 2)
        _assert_close(_loss("ipo", beta, inputs=inputs), [1 / (4 * beta**2)] * 2)
        _assert_close(_loss("hinge", beta, inputs=inputs), [1.0] * 2)


def test_ipo_is_zero_at_its_target_margin():
    beta = 0.25  # target h = 1/(2 beta) = 2
    pc, zero = _t([2.0]), _t([0.0])
    assert _loss("ipo", beta, inputs=(pc, zero, zero, zero)).item() == 0.0


def test_losses_depend_only_on_h():
    # Shifting chosen policy and chosen reference log-probs by the same amount leaves h (and the loss) unchanged.
    pc, pr, rc, rr = _inputs()
    for lt, eps in [("sigmoid", 0.0), ("sigmoid", 0.1), ("ipo", 0.0), ("hinge", 0.0), ("robust", 0.1)]:
        torch.testing.assert_close(
            _loss(lt, 0.6, eps, (pc + 3.0, pr - 1.0, rc + 3.0, rr - 1.0)),
            _loss(lt, 0.6, eps, (pc, pr, rc, rr)),
        )


# --------------------------------------------------------------------------- rewards and gradients


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_rewards_are_detached_and_equal_beta_times_logratio(loss_type):
    beta = 0.3
    eps = 0.1 if loss_type in ("sigmoid", "robust") else 0.0
    pc, pr, rc, rr = _inputs(requires_grad=True)
    losses, chosen_rewards, rejected_rewards = preference_loss(
        pc, pr, rc, rr, beta=beta, loss_type=loss_type, label_smoothing=eps
    )
    assert losses.requires_grad
    assert not chosen_rewards.requires_grad and not rejected_rewards.requires_grad
    assert chosen_rewards.grad_fn is None and rejected_rewards.grad_fn is None
    _assert_close(chosen_rewards, [beta * (p - r) for p, r in zip(PI_C, REF_C, strict=True)])
    _assert_close(rejected_rewards, [beta * (p - r) for p, r in zip(PI_R, REF_R, strict=True)])


def test_sigmoid_gradient_signs():
    pc, pr, rc, rr = _inputs(requires_grad=True)
    losses, _, _ = preference_loss(pc, pr, rc, rr, beta=0.5, loss_type="sigmoid")
    g_c, g_r = torch.autograd.grad(losses.sum(), (pc, pr))
    assert (g_c < 0).all()  # raising the chosen log-prob lowers the loss
    assert (g_r > 0).all()  # raising the rejected log-prob raises the loss
    # exact: d/d pi_c of -log sigmoid(beta h) = -beta * sigmoid(-beta h)
    _assert_close(g_c, [-0.5 / (1 + math.exp(0.5 * h)) for h in H])
    _assert_close(g_r, [0.5 / (1 + math.exp(0.5 * h)) for h in H])


def test_other_loss_gradient_signs():
    beta = 0.5  # ipo target margin 1; hinge active while beta*h < 1, i.e. h < 2
    pc, pr, rc, rr = _inputs(requires_grad=True)
    for lt, eps in [("ipo", 0.0), ("hinge", 0.0), ("robust", 0.2)]:
        losses, _, _ = preference_loss(pc, pr, rc, rr, beta=beta, loss_type=lt, label_smoothing=eps)
        (g_c,) = torch.autograd.grad(losses.sum(), pc)
        if lt == "ipo":  # 2 (h - 1): h = 1.5 above target -> pushes back; 0.5 and -2 below -> pushes up
            _assert_close(g_c, [2 * (h - 1) for h in H])
        elif lt == "hinge":  # -beta where active
            _assert_close(g_c, [-beta if beta * h < 1 else 0.0 for h in H])
        else:  # robust: gradient points the same way as DPO's for eps < 1/2
            assert (g_c < 0).all()


# --------------------------------------------------------------------------- SimPO


def test_simpo_matches_hand_values():
    beta, gamma = 2.0, 0.5
    c, r = [-0.8, -1.2, -0.3], [-1.0, -0.9, -2.0]  # mean log-probs
    losses, cr, rr = simpo_loss(_t(c, True), _t(r, True), beta=beta, gamma=gamma)
    _assert_close(losses, [_softplus(-(beta * (a - b) - gamma)) for a, b in zip(c, r, strict=True)])
    # literal: beta=2, gamma=0.5, c-r=0.2 -> log(1 + e^{0.1})
    assert losses[0].item() == pytest.approx(math.log(1 + math.exp(0.1)), abs=1e-12)
    assert not cr.requires_grad and not rr.requires_grad
    _assert_close(cr, [beta * a for a in c])
    _assert_close(rr, [beta * b for b in r])


def test_simpo_gamma_zero_is_reference_free_dpo():
    c, r = _t([-0.8, -1.2]), _t([-1.0, -0.9])
    zero = torch.zeros(2, dtype=torch.float64)
    torch.testing.assert_close(
        simpo_loss(c, r, beta=1.5, gamma=0.0)[0], _loss("sigmoid", 1.5, inputs=(c, r, zero, zero))
    )


def test_simpo_margin_raises_loss_and_gradient_sign():
    c = _t([-1.0], requires_grad=True)
    r = _t([-1.0])
    low = simpo_loss(c, r, beta=2.0, gamma=0.0)[0]
    high = simpo_loss(c, r, beta=2.0, gamma=1.0)[0]
    assert low.item() == pytest.approx(LOG2, abs=1e-12)
    assert high.item() > low.item()
    (g,) = torch.autograd.grad(high.sum(), c)
    assert g.item() < 0


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"beta": 0.0, "gamma": 0.5}, "beta"),
        ({"beta": -1.0, "gamma": 0.5}, "beta"),
        ({"beta": float("nan"), "gamma": 0.5}, "beta"),
        ({"beta": 2.0, "gamma": -0.1}, "gamma"),
        ({"beta": 2.0, "gamma": float("inf")}, "gamma"),
    ],
)
def test_simpo_validation(kwargs, field):
    with pytest.raises(ValueError, match=field):
        simpo_loss(_t([-1.0]), _t([-2.0]), **kwargs)


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize("beta", [0.0, -0.1, float("nan"), float("inf"), True])
def test_bad_beta_raises(beta):
    with pytest.raises(ValueError, match=r"beta must be > 0"):
        validate_dpo_hparams(beta=beta, loss_type="sigmoid")
    with pytest.raises(ValueError, match="beta"):
        preference_loss(*_inputs(), beta=beta)


@pytest.mark.parametrize("loss_type", ["simpo", "kto", "SIGMOID", ""])
def test_unknown_loss_type_raises_and_lists_valid_ones(loss_type):
    with pytest.raises(ValueError, match="loss_type") as exc:
        preference_loss(*_inputs(), beta=0.1, loss_type=loss_type)
    for valid in LOSS_TYPES:
        assert repr(valid) in str(exc.value)


@pytest.mark.parametrize("eps", [0.5, 0.7, -0.01, float("nan")])
@pytest.mark.parametrize("loss_type", ["sigmoid", "robust"])
def test_bad_label_smoothing_raises(eps, loss_type):
    with pytest.raises(ValueError, match="label_smoothing"):
        validate_dpo_hparams(beta=0.1, loss_type=loss_type, label_smoothing=eps)


@pytest.mark.parametrize("loss_type", ["ipo", "hinge"])
def test_label_smoothing_rejected_where_it_would_be_ignored(loss_type):
    with pytest.raises(ValueError, match="label_smoothing"):
        preference_loss(*_inputs(), beta=0.1, loss_type=loss_type, label_smoothing=0.1)


def test_valid_hparams_pass():
    for lt in LOSS_TYPES:
        validate_dpo_hparams(beta=0.1, loss_type=lt)
    validate_dpo_hparams(beta=0.1, loss_type="robust", label_smoothing=0.0)
    validate_dpo_hparams(beta=1, loss_type="robust", label_smoothing=0.49)


def test_shape_mismatch_raises():
    pc, pr, rc, rr = _inputs()
    with pytest.raises(ValueError, match="same shape"):
        preference_loss(pc, pr, rc, rr[:, None], beta=0.1)


def test_uses_average_logps():
    assert uses_average_logps("ipo") and uses_average_logps("simpo")
    assert not any(uses_average_logps(t) for t in ("sigmoid", "hinge", "robust"))
    with pytest.raises(ValueError, match="loss_type"):
        uses_average_logps("nope")


# --------------------------------------------------------------------------- parity with TRL 1.16
#
# TRL 1.16 has no standalone DPO loss function: the loss lives inside DPOTrainer._compute_loss, which also
# runs the model. That method only touches the model through `model(...)` and a handful of `self`
# attributes, so we call TRL's real (unbound) method with a duck-typed `self` and a stub model that returns
# fixed per-token log-probs, and precomputed reference log-probs. No model, tokenizer or Trainer is built.
# This is tied to TRL's private internals on purpose: when they differ from the pinned TRL (pyproject.toml; see
# tests/test_trl_parity.py::test_trl_is_the_pinned_version) these tests fail, they never skip.


def _trl_dpo_loss(loss_type, beta, eps, tok_c, tok_r, ref_c_sum, ref_r_sum):
    """Run TRL's DPOTrainer._compute_loss for ONE pair. tok_*: per-completion-token policy log-probs."""
    from trl.trainer import dpo_trainer

    compute = dpo_trainer.DPOTrainer._compute_loss
    prompt_len = 2
    t_len = prompt_len + max(len(tok_c), len(tok_r))
    completion_mask = torch.zeros(2, t_len, dtype=torch.long)
    completion_mask[0, prompt_len : prompt_len + len(tok_c)] = 1
    completion_mask[1, prompt_len : prompt_len + len(tok_r)] = 1
    # per-token log-probs aligned with shifted labels (position t predicts token t+1); zero where masked
    log_probs = torch.zeros(2, t_len - 1, dtype=torch.float64)
    log_probs[0, prompt_len - 1 : prompt_len - 1 + len(tok_c)] = torch.tensor(tok_c, dtype=torch.float64)
    log_probs[1, prompt_len - 1 : prompt_len - 1 + len(tok_r)] = torch.tensor(tok_r, dtype=torch.float64)

    def model(**_):
        return SimpleNamespace(
            log_probs=log_probs,
            entropy=torch.zeros_like(log_probs),
            mean_logits=torch.zeros_like(log_probs),
            is_top1=torch.zeros_like(log_probs, dtype=torch.bool),
        )

    identity = lambda x: x
    stub = SimpleNamespace(
        model=SimpleNamespace(training=True),
        accelerator=SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=identity, gather=identity),
        aux_loss_enabled=False,
        precompute_ref_logps=True,
        ld_alpha=None,
        f_divergence_type="reverse_kl",
        loss_types=[loss_type],
        loss_weights=[1.0],
        beta=beta,
        label_smoothing=eps,
        use_weighting=False,
        _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0,
        _tp_size=1,
    )
    inputs = {
        "input_ids": torch.ones(2, t_len, dtype=torch.long),
        "attention_mask": torch.ones(2, t_len, dtype=torch.long),
        "completion_mask": completion_mask,
        "ref_chosen_logps": torch.tensor([ref_c_sum], dtype=torch.float64),
        "ref_rejected_logps": torch.tensor([ref_r_sum], dtype=torch.float64),
    }
    return compute(stub, model, inputs, False)  # an AttributeError / KeyError / TypeError here: TRL's API moved


# (per-token chosen log-probs, per-token rejected log-probs, ref chosen SUM, ref rejected SUM); varied lengths
_TRL_CASES = [
    ([-0.5, -1.0, -0.25], [-2.0, -1.5], -2.5, -2.5),
    ([-3.0], [-0.1, -0.2, -0.3, -0.4], -1.0, -2.0),
    ([-0.2, -0.2], [-0.2, -0.2], -0.8, -0.1),
]


@pytest.mark.parametrize("case", _TRL_CASES)
@pytest.mark.parametrize(
    "loss_type,beta,eps",
    [
        ("sigmoid", 0.1, 0.0),
        ("sigmoid", 2.0, 0.0),
        ("hinge", 0.5, 0.0),
        ("robust", 0.3, 0.2),
        ("robust", 1.0, 0.0),
        ("ipo", 0.1, 0.0),
        ("ipo", 1.0, 0.0),
    ],
)
def test_parity_with_trl_dpo_trainer(loss_type, beta, eps, case):
    tok_c, tok_r, ref_c, ref_r = case
    trl_loss = _trl_dpo_loss(loss_type, beta, eps, tok_c, tok_r, ref_c, ref_r)
    if uses_average_logps(loss_type):  # TRL averages inside the trainer; our pure function takes means
        n_c, n_r = len(tok_c), len(tok_r)
        ours_in = (_t([sum(tok_c) / n_c]), _t([sum(tok_r) / n_r]), _t([ref_c / n_c]), _t([ref_r / n_r]))
    else:
        ours_in = (_t([sum(tok_c)]), _t([sum(tok_r)]), _t([ref_c]), _t([ref_r]))
    ours = _loss(loss_type, beta, eps, ours_in)
    torch.testing.assert_close(ours[0], trl_loss.to(torch.float64), rtol=1e-12, atol=1e-12)


def test_trl_sigmoid_ignores_label_smoothing_but_ours_is_cdpo():
    # Documented divergence: TRL 1.16's "sigmoid" ignores label_smoothing; ours applies cDPO.
    tok_c, tok_r, ref_c, ref_r = _TRL_CASES[0]
    trl_smoothed = _trl_dpo_loss("sigmoid", 0.5, 0.2, tok_c, tok_r, ref_c, ref_r)
    ours_in = (_t([sum(tok_c)]), _t([sum(tok_r)]), _t([ref_c]), _t([ref_r]))
    torch.testing.assert_close(_loss("sigmoid", 0.5, 0.0, ours_in)[0], trl_smoothed.to(torch.float64))
    assert not torch.allclose(_loss("sigmoid", 0.5, 0.2, ours_in)[0], trl_smoothed.to(torch.float64))


def test_parity_with_trl_cpo_simpo():
    """TRL 1.16 keeps SimPO in trl.experimental CPOTrainer.cpo_loss, which only reads attributes of self."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from trl.experimental.cpo import cpo_trainer
    cpo_loss = cpo_trainer.CPOTrainer.cpo_loss
    beta, gamma = 2.5, 0.7
    c, r = _t([-0.8, -1.2, -0.3]), _t([-1.0, -0.9, -2.0])
    stub = SimpleNamespace(
        alpha=0.0,
        loss_type="simpo",
        simpo_gamma=gamma,
        beta=beta,
        label_smoothing=0.0,
        accelerator=SimpleNamespace(device=torch.device("cpu")),
    )
    trl_losses, trl_cr, trl_rr = cpo_loss(stub, c, r)
    losses, cr, rr = simpo_loss(c, r, beta=beta, gamma=gamma)
    torch.testing.assert_close(losses, trl_losses, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(cr, trl_cr)
    torch.testing.assert_close(rr, trl_rr)
