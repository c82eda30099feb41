"""Pure-tensor building blocks of the group-sampled policy-gradient methods RLOO and GRPO (no model code).

Both sample ``k`` completions per prompt and use the other completions of the same prompt as the baseline, so
neither needs a value model. Shapes follow ``methods.rlhf.ppo_core``: ``[P, k]`` are per-completion scalars of
``P`` prompts x ``k`` samples (row-major: completion ``p * k + j`` is sample ``j`` of prompt ``p``); ``[B, T]``
are per-token quantities over the completion tokens of ``B = P * k`` sequences, ``mask`` 1 on completion tokens.

RLOO (Ahmadian et al. 2024, "Back to Basics", arXiv:2402.14740; Kool et al. 2019): the KL penalty is part of the
reward, ``R = score - beta * sum_t (log pi - log pi_ref)`` (the k1 estimator summed over the sequence, as PPO's
per-token reward does), the advantage is ``R_i - mean_{j != i} R_j`` and the loss is REINFORCE on the sequence
log-probability (optionally PPO-clipped on the sequence ratio, as TRL's ``RLOOTrainer``).

GRPO (Shao et al. 2024, DeepSeekMath, arXiv:2402.03300): advantages are the scores normalised within each group,
``(r - mean) / (std + eps)``; the loss is the PPO clipped surrogate per token plus ``beta`` times the k3 estimator
of KL(pi || pi_ref) per token *in the loss* (not in the reward). Aggregation: TRL 1.16's default ``loss_type`` is
``"dapo"``: per-token losses summed over the batch and divided by its number of completion tokens (a token mean
over the whole batch, not a mean of per-sequence means, which is TRL's ``"grpo"`` loss type).

Sources (cited on the lines):
  [TRL-grpo]  trl 1.16 ``trl/trainer/grpo_trainer.py``: ``_generate_and_score_completions`` (group advantages,
              ``advantages / (std_rewards + 1e-4)`` with Bessel-corrected ``nanstd``) and ``_compute_loss``
              (clipped ratio, k3 ``per_token_kl``, ``"dapo"`` aggregation)
  [TRL-rloo]  trl 1.16 ``trl/trainer/rloo_trainer.py``: ``_generate_and_score_completions`` (k1 KL in the reward,
              leave-one-out baseline) and ``_compute_loss`` (sequence-level clipped ratio, mean over sequences)
"""

from __future__ import annotations

import torch
from torch import Tensor

from methods.rlhf.ppo_core import kl_estimate, masked_mean, policy_loss

__all__ = ["grpo_advantages", "grpo_loss", "kl_penalised_rewards", "rloo_advantages", "rloo_loss"]


def _upcast(x: Tensor) -> Tensor:
    """Half precision is computed in float32 (as ``ppo_core``); float32/64 kept."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _bool_mask(mask: Tensor) -> Tensor:
    return mask if mask.dtype == torch.bool else mask != 0


def _check_same_shape(**tensors: Tensor) -> None:
    shapes = {name: list(t.shape) for name, t in tensors.items()}
    if len({tuple(v) for v in shapes.values()}) > 1:
        raise ValueError("shape mismatch: " + ", ".join(f"{k}={v}" for k, v in shapes.items())
                         + "; all must be the same [B, T] token-level shape")


def _check_groups(rewards: Tensor) -> None:
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [P, k] (prompts x samples per prompt), got shape {list(rewards.shape)}")


def rloo_advantages(rewards: Tensor) -> Tensor:
    """Leave-one-out advantages: ``A_i = r_i - mean_{j != i} r_j`` within each prompt's group.

    ``rewards``: [P, k] (the KL-penalised rewards for RLOO). Returns [P, k]. Needs ``k >= 2`` (a one-sample group
    has no other sample to form the baseline): raises ValueError otherwise. Equivalently
    ``A_i = k / (k - 1) * (r_i - mean_j r_j)``. [TRL-rloo] ``baselines = (grouped_sum - grouped_rewards) / (k - 1)``.
    """
    _check_groups(rewards)
    k = rewards.shape[1]
    if k < 2:
        raise ValueError(f"rloo_advantages needs k >= 2 samples per prompt (leave-one-out baseline), got k={k}")
    r = _upcast(rewards)
    baseline = (r.sum(dim=1, keepdim=True) - r) / (k - 1)  # [P, k] mean of the other k - 1 samples
    return r - baseline


def grpo_advantages(rewards: Tensor, eps: float = 1e-4, scale: bool = True) -> Tensor:
    """Group-normalised advantages ``(r_i - mean_j r_j) / (std_j r_j + eps)`` within each prompt's group.

    ``rewards``: [P, k]. ``std`` is the Bessel-corrected (unbiased) standard deviation of the group, ``eps`` = 1e-4
    as in [TRL-grpo]; ``scale=False`` keeps only the mean baseline (TRL's ``scale_rewards="none"``, Dr. GRPO).
    One-sample groups (``k == 1``) get advantage 0 (their mean is themselves). Returns [P, k].
    """
    _check_groups(rewards)
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps!r}")
    r = _upcast(rewards)
    k = r.shape[1]
    adv = r - r.mean(dim=1, keepdim=True)  # [TRL-grpo] rewards - mean_grouped_rewards
    if k == 1:
        return torch.zeros_like(r)
    if scale:
        std = r.std(dim=1, keepdim=True, unbiased=True)  # [TRL-grpo] nanstd: Bessel's correction count/(count-1)
        adv = adv / (std + eps)  # [TRL-grpo] advantages / (std_rewards + 1e-4)
    return adv


def kl_penalised_rewards(scores: Tensor, logp: Tensor, ref_logp: Tensor, mask: Tensor, beta: float) -> tuple[Tensor, Tensor]:
    """RLOO's reward with the KL penalty in it: ``scores - beta * sum_t mask * (logp - ref_logp)`` (k1, summed over
    the completion tokens, as PPO's per-token KL reward sums to). ``scores``: [B]; the rest [B, T].
    Returns ``(rewards [B], kl [B])`` detached (rewards are targets). [TRL-rloo] ``rewards - self.beta * kl``."""
    if not beta >= 0:
        raise ValueError(f"beta must be >= 0, got {beta!r}")
    _check_same_shape(logp=logp, ref_logp=ref_logp, mask=mask)
    if scores.dim() != 1 or scores.shape[0] != logp.shape[0]:
        raise ValueError(f"scores must be [B]=[{logp.shape[0]}], got {list(scores.shape)}")
    m = _bool_mask(mask)
    lr = kl_estimate(logp.detach(), ref_logp.detach(), "k1")
    kl = torch.where(m, lr, torch.zeros((), dtype=lr.dtype, device=lr.device)).sum(1)  # [B] sequence k1 KL
    return _upcast(scores.detach()).to(kl.dtype) - float(beta) * kl, kl


def _seq_advantages(advantages: Tensor, logp: Tensor) -> Tensor:
    if advantages.dim() == 1:  # one advantage per sequence, broadcast over its tokens ([TRL-grpo] unsqueeze(1))
        if advantages.shape[0] != logp.shape[0]:
            raise ValueError(f"advantages must be [B]=[{logp.shape[0]}] or [B, T], got {list(advantages.shape)}")
        return advantages[:, None].expand_as(logp)
    return advantages


KL_GRADS = ("k3", "k3_ratio")
"""GRPO's KL term in the loss. ``k3``: beta * k3_t, whose gradient (on-policy) is beta * (1 - pi_ref / pi) grad log pi:
in expectation beta * grad KL(pi_ref || pi), the *forward* KL (DeepSeekMath's GRPO). ``k3_ratio``: beta * ratio_t *
k3_t (TRL 1.16's ``use_bias_correction_kl=True``, DeepSeek-V3.2), whose gradient is beta * (log pi - log pi_ref) grad
log pi: the unbiased gradient of the *reverse* KL(pi || pi_ref), the KL PPO and RLOO penalise in their rewards and
the frontier measures."""


def grpo_loss(logp: Tensor, old_logp: Tensor, ref_logp: Tensor, advantages: Tensor, mask: Tensor, *,
              clip_eps: float, beta: float, kl_grad: str = "k3") -> tuple[Tensor, dict[str, Tensor]]:
    """GRPO loss, aggregated as a token mean over the minibatch (TRL 1.16's ``loss_type="bnpo"``):

        -min(ratio_t * A, clip(ratio_t, 1 - clip_eps, 1 + clip_eps) * A) + beta * w_t * k3_t,
        ratio_t = exp(logp_t - old_logp_t),  k3_t = exp(ref_t - logp_t) - (ref_t - logp_t) - 1,
        w_t = 1 (``kl_grad="k3"``) or ratio_t (``"k3_ratio"``, TRL's ``use_bias_correction_kl``; see ``KL_GRADS``)

    ``logp`` (current policy, with grad), ``old_logp`` (rollout policy), ``ref_logp``, ``mask``: [B, T];
    ``advantages``: [B] (one per sequence, as ``grpo_advantages`` gives) or [B, T]. The KL term is
    differentiated through ``logp`` (it sits in the loss, not in the reward). Returns ``(loss, stats)`` with
    detached ``kl`` (token mean of k3, unweighted), ``clipfrac``, ``ratio_mean`` and ``pg_loss`` (the surrogate alone).
    """
    if kl_grad not in KL_GRADS:
        raise ValueError(f"kl_grad must be one of {KL_GRADS}, got {kl_grad!r}")
    if not beta >= 0:
        raise ValueError(f"beta must be >= 0, got {beta!r}")
    adv = _seq_advantages(advantages, logp)
    _check_same_shape(logp=logp, old_logp=old_logp, ref_logp=ref_logp, advantages=adv, mask=mask)
    m = _bool_mask(mask)
    # the clipped surrogate is PPO's, token mean ([TRL-grpo] -torch.min(coef_1 * A, coef_2 * A))
    pg, st = policy_loss(logp, old_logp, adv, m, clip_range=clip_eps)
    lp = _upcast(logp)
    zero = torch.zeros((), dtype=lp.dtype, device=lp.device)
    # k3 on padding-zeroed inputs: garbage in padded positions can neither leak nor give NaN gradients
    k3 = kl_estimate(torch.where(m, lp, zero), torch.where(m, _upcast(ref_logp).detach().to(lp.dtype), zero), "k3")
    kl = masked_mean(k3, m)
    if kl_grad == "k3_ratio":  # [TRL-grpo] if use_bias_correction_kl: per_token_kl = per_token_kl * coef_1
        w = torch.exp(torch.where(m, lp - _upcast(old_logp).detach().to(lp.dtype), zero))
        kl_term = masked_mean(k3 * w, m)
    else:
        kl_term = kl
    loss = pg + float(beta) * kl_term  # [TRL-grpo] per_token_loss + beta * per_token_kl, token mean ("bnpo")
    stats = {"kl": kl.detach(), "clipfrac": st["clipfrac"], "ratio_mean": st["ratio_mean"], "pg_loss": pg.detach()}
    return loss, stats


def rloo_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, *,
              clip_eps: float | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """RLOO's policy loss on sequence log-probabilities (the KL penalty is already in the advantages' rewards):

        clip_eps None:  -mean_b(ratio_b * A_b)                          (REINFORCE, importance-weighted)
        clip_eps > 0:   -mean_b(min(ratio_b * A_b, clip(ratio_b, 1 -+ clip_eps) * A_b))   ([TRL-rloo])
        ratio_b = exp(sum_t mask (logp - old_logp))

    On-policy (``old_logp`` = ``logp.detach()``) the ratio is 1 and the gradient is REINFORCE's,
    ``-mean_b(A_b * grad log pi(y_b))``. ``logp``/``old_logp``/``mask``: [B, T], ``advantages``: [B].
    Returns ``(loss, stats)`` with detached ``clipfrac`` and ``ratio_mean``.
    """
    if clip_eps is not None and not clip_eps > 0:
        raise ValueError(f"clip_eps must be > 0 or None (unclipped REINFORCE), got {clip_eps!r}")
    _check_same_shape(logp=logp, old_logp=old_logp, mask=mask)
    if advantages.dim() != 1 or advantages.shape[0] != logp.shape[0]:
        raise ValueError(f"advantages must be [B]=[{logp.shape[0]}] (one per sequence), got {list(advantages.shape)}")
    m = _bool_mask(mask)
    lp = _upcast(logp)
    zero = torch.zeros((), dtype=lp.dtype, device=lp.device)
    # [TRL-rloo] logps = (per_token_logps * completion_mask).sum(1); log_ratio = logps - old_logps
    log_ratio = torch.where(m, lp - _upcast(old_logp).detach().to(lp.dtype), zero).sum(1)  # [B]
    ratio = torch.exp(log_ratio)  # [TRL-rloo] coef_1
    adv = _upcast(advantages).detach().to(lp.dtype)
    surr = ratio * adv
    if clip_eps is None:
        per_seq = -surr
        clipped = torch.zeros_like(surr, dtype=torch.bool)
    else:
        surr2 = torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * adv  # [TRL-rloo] coef_2 * advantages
        per_seq = -torch.min(surr, surr2)  # [TRL-rloo] -torch.min(per_sequence_loss1, per_sequence_loss2)
        clipped = surr2 < surr
    loss = per_seq.mean()  # [TRL-rloo] per_sequence_loss.mean()
    stats = {"clipfrac": clipped.to(lp.dtype).mean().detach(), "ratio_mean": ratio.mean().detach()}
    return loss, stats
