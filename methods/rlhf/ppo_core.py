"""Pure-tensor PPO building blocks for RLHF (no model code, no import side effects).

Conventions used throughout this module
---------------------------------------
* ``[B, T]`` tensors are token-level quantities over the *completion* tokens of ``B`` sequences padded to
  length ``T``.
* ``mask`` is ``[B, T]`` (bool, int or float): 1 for completion tokens, 0 for padding after EOS. Every
  masked reduction uses ``torch.where`` rather than ``x * mask``, so NaN/inf garbage in padded positions
  cannot leak into a result (``nan * 0 == nan``).
* ``logprobs`` are log-probabilities of the *sampled* tokens (one per position), not full distributions.

Sources followed (cited again on the implementing lines):
  [TRL-core]   huggingface/trl ``trl/core.py`` (masked_mean / masked_var / masked_whiten / entropy_from_logits)
  [TRL-ppo]    huggingface/trl PPO trainers: ``compute_rewards`` / ``compute_advantages`` of the legacy
               ``PPOTrainer`` and the loss block of the N-details-style ``PPOTrainer`` (pg/vf clipfrac,
               ``approxkl = 0.5 * mean(logr**2)``)
  [TRL-kl]     huggingface/trl ``AdaptiveKLController`` / ``FixedKLController`` (ported from
               openai/lm-human-preferences ``train_policy.py``)
  [OpenRLHF]   OpenRLHF ``openrlhf/models/utils.py`` (``compute_approx_kl`` k1/k2/k3, ``compute_reward``
               eos-index scatter, ``masked_mean``)
  [CleanRL]    vwxyzjn/cleanrl ``ppo.py`` (GAE recursion, explained variance)
  [N-details]  Huang et al., "The N Implementation Details of RLHF with PPO" (HF blog, 2023)
  [Schulman-KL] J. Schulman, "Approximating KL Divergence", http://joschu.net/blog/kl-approx.html
  [PPO]        Schulman et al. 2017, "Proximal Policy Optimization Algorithms", arXiv:1707.06347
  [GAE]        Schulman et al. 2016, "High-Dimensional Continuous Control Using GAE", arXiv:1506.02438
  [Ziegler19]  Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences", arXiv:1909.08593
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "KL_KINDS",
    "AdaptiveKLController",
    "FixedKLController",
    "check_finite",
    "compute_gae",
    "compute_rewards",
    "entropy_from_logits",
    "explained_variance",
    "kl_estimate",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "policy_loss",
    "validate_ppo_hparams",
    "value_loss",
]

KL_KINDS = ("k1", "k2", "k3")


# ------------------------------------------------------------------------------------------ helpers
def _upcast(x: Tensor) -> Tensor:
    """Half-precision inputs are computed in float32 (as OpenRLHF does with ``.float()``); float32/64 kept."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _bool_mask(mask: Tensor) -> Tensor:
    return mask if mask.dtype == torch.bool else mask != 0


def _check_same_shape(**tensors: Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) > 1:
        desc = ", ".join(f"{k}={list(v)}" for k, v in shapes.items())
        raise ValueError(f"shape mismatch: {desc}; all must be the same [B, T] token-level shape")


def _check_unit_interval(name: str, value: float) -> None:
    # `not (0 <= v <= 1)` is also True for NaN.
    if not (0.0 <= float(value) <= 1.0):
        raise ValueError(f"{name} must be in [0, 1], got {value!r}; set {name} to a value between 0 and 1")


# ------------------------------------------------------------------------------------------ masked statistics
def masked_mean(x: Tensor, mask: Tensor, dim: int | tuple[int, ...] | None = None) -> Tensor:
    """Mean of ``x`` over entries where ``mask`` is nonzero ([TRL-core] / [OpenRLHF] ``masked_mean``).

    ``x``, ``mask``: same shape (e.g. [B, T]). ``dim=None`` -> scalar; ``dim=1`` -> [B] per-row means.
    An all-zero mask (over the reduced dims) gives NaN (0/0), as in the references.
    """
    m = _bool_mask(mask)
    x = _upcast(x)
    num = torch.where(m, x, torch.zeros((), dtype=x.dtype, device=x.device))  # not x*mask: nan*0 == nan
    den = m.to(x.dtype)
    if dim is None:
        return num.sum() / den.sum()  # [TRL-core] (values * mask).sum() / mask.sum()
    return num.sum(dim=dim) / den.sum(dim=dim)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of the masked entries of ``x`` (all dims reduced, scalar), [TRL-core] ``masked_var``.

    ``unbiased=True`` applies Bessel's correction n/(n-1). Raises ValueError if the mask selects no entry,
    or only one entry with ``unbiased=True`` (TRL notes that case divides by zero).
    """
    m = _bool_mask(mask)
    n = int(m.sum().item())
    if n == 0:
        raise ValueError("masked_var: mask selects no entries (all padding); cannot compute a variance")
    if unbiased and n < 2:
        raise ValueError(
            "masked_var: unbiased variance needs at least 2 unmasked entries, got 1; "
            "use a larger (mini)batch or unbiased=False"
        )
    mean = masked_mean(x, m)
    var = masked_mean((_upcast(x) - mean) ** 2, m)  # [TRL-core] centered_values**2, masked mean
    if unbiased:
        var = var * (n / (n - 1))  # [TRL-core] bessel_correction = mask_sum / (mask_sum - 1)
    return var


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """Whiten the masked entries of ``x``: ``(x - mean) / sqrt(var + eps)`` with the (unbiased) masked
    mean/var over all of them ([TRL-core] ``masked_whiten``; [N-details] "advantage whitening").

    ``shift_mean=False`` adds the mean back, i.e. only rescales (TRL / N-details convention used for reward
    whitening). Returns the same shape as ``x``; masked positions are set to 0 (TRL leaves them as garbage).
    """
    m = _bool_mask(mask)
    x = _upcast(x)
    mean, var = masked_mean(x, m), masked_var(x, m)
    whitened = (x - mean) * torch.rsqrt(var + eps)  # [TRL-core] (values - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean  # [TRL-core] whitened += mean
    return torch.where(m, whitened, torch.zeros((), dtype=whitened.dtype, device=whitened.device))


# ------------------------------------------------------------------------------------------ KL and rewards
def kl_estimate(logprobs: Tensor, ref_logprobs: Tensor, kind: str = "k1") -> Tensor:
    """Per-token estimator of KL(pi || pi_ref) from tokens sampled from the policy pi ([Schulman-KL]).

    ``logprobs``, ``ref_logprobs``: [B, T] log-probs of the sampled tokens under pi and pi_ref.
    With ``logr = logprobs - ref_logprobs`` (= log pi/pi_ref):
      k1 = logr                           unbiased, can be negative per token
      k2 = 0.5 * logr**2                  biased, >= 0, low variance
      k3 = exp(-logr) - 1 + logr          unbiased, >= 0
    Returns [B, T] (no masking: callers mask). Layout follows [OpenRLHF] ``compute_approx_kl``.
    """
    if kind not in KL_KINDS:
        raise ValueError(f"unknown KL estimator kind {kind!r}; valid kinds are {', '.join(KL_KINDS)}")
    _check_same_shape(logprobs=logprobs, ref_logprobs=ref_logprobs)
    # [B, T]; [OpenRLHF] log_ratio = log_probs.float() - log_probs_base.float()
    logr = _upcast(logprobs) - _upcast(ref_logprobs)
    if kind == "k1":
        return logr  # [Schulman-KL] k1 = -log r with r = p_ref/p, i.e. log(p/p_ref)
    if kind == "k2":
        return 0.5 * logr**2  # [Schulman-KL] k2 = (log r)^2 / 2; [OpenRLHF] log_ratio**2 / 2.0
    # [Schulman-KL] k3 = (r - 1) - log r with r = p_ref/p = exp(-logr); [OpenRLHF] exp(-lr) - 1 + lr.
    # expm1 keeps precision near logr=0; clamp_min(0) only removes float rounding below 0 (true value >= 0).
    return (torch.expm1(-logr) + logr).clamp_min(0.0)


def compute_rewards(
    scores: Tensor,
    logprobs: Tensor,
    ref_logprobs: Tensor,
    mask: Tensor,
    *,
    kl_coef: float,
    kl_kind: str = "k1",
) -> tuple[Tensor, Tensor]:
    """Per-token RLHF reward ([Ziegler19] Eq. 2; [N-details] "reward = score - kl_coef * KL"; [TRL-ppo]).

    ``scores``: [B] reward-model score per sequence. ``logprobs``/``ref_logprobs``/``mask``: [B, T].
    Returns ``(rewards, kl)``, both [B, T], 0 on padding:
      kl[b, t]      = KL_t estimate (``kl_kind``) at completion tokens
      rewards[b, t] = -kl_coef * kl[b, t], plus scores[b] at the LAST unmasked token of row b.
    Inputs are detached (rewards are targets, not differentiated through).
    """
    if not (float(kl_coef) >= 0.0):
        raise ValueError(f"kl_coef must be >= 0, got {kl_coef!r}; use 0 to disable the KL penalty")
    _check_same_shape(logprobs=logprobs, ref_logprobs=ref_logprobs, mask=mask)
    if logprobs.dim() != 2:
        raise ValueError(f"logprobs must be [B, T], got shape {list(logprobs.shape)}")
    B, T = logprobs.shape
    if scores.dim() != 1 or scores.shape[0] != B:
        raise ValueError(f"scores must be [B]=[{B}] (one scalar per sequence), got {list(scores.shape)}")
    m = _bool_mask(mask)
    empty = (~m.any(dim=1)).nonzero().flatten().tolist()
    if empty:
        raise ValueError(
            f"compute_rewards: rows {empty} have an all-zero mask (no completion token to put the score on); "
            "drop empty completions or keep at least the EOS token unmasked"
        )
    kl = kl_estimate(logprobs.detach(), ref_logprobs.detach(), kl_kind)  # [B, T]
    kl = torch.where(m, kl, torch.zeros((), dtype=kl.dtype, device=kl.device))
    rewards = -float(kl_coef) * kl  # [TRL-ppo] non_score_reward = -self.kl_ctl.value * kl
    # Index of the last unmasked token per row, [B, 1] ([OpenRLHF] compute_reward eos_indices):
    last = T - 1 - m.long().fliplr().argmax(dim=1, keepdim=True)
    # [TRL-ppo] reward[last_non_masked_index] += score ; [N-details] score added to the last token
    rewards = rewards.scatter_add(1, last, scores.detach().to(rewards.dtype).unsqueeze(1))
    return rewards, kl


# ------------------------------------------------------------------------------------------ advantages
def compute_gae(
    rewards: Tensor, values: Tensor, mask: Tensor, *, gamma: float, lam: float
) -> tuple[Tensor, Tensor]:
    """Generalized Advantage Estimation ([GAE] Eq. 16), backward recursion as in [TRL-ppo]/[CleanRL]:

        delta_t = r_t + gamma * V_{t+1} - V_t
        A_t     = delta_t + gamma * lam * A_{t+1}

    ``rewards``, ``values``, ``mask``: [B, T]. V after the last valid token is 0 (episode ends at EOS).
    Returns ``(advantages, returns)``, both [B, T], ``returns = advantages + values``, both 0 on masked
    positions. Not whitened: whiten advantages with ``masked_whiten`` ([N-details]). Inputs are detached.

    Masked positions are skipped (they carry V_{t+1} and A_{t+1} through unchanged and contribute nothing),
    so for the usual right-padded mask this equals TRL's ``values*mask, rewards*mask`` recursion, while
    garbage (even NaN) in padding cannot leak into valid positions.
    """
    _check_unit_interval("gamma", gamma)
    _check_unit_interval("lam", lam)
    _check_same_shape(rewards=rewards, values=values, mask=mask)
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [B, T], got shape {list(rewards.shape)}")
    m = _bool_mask(mask)
    rewards, values = _upcast(rewards.detach()), _upcast(values.detach())
    dtype = torch.promote_types(rewards.dtype, values.dtype)
    rewards, values = rewards.to(dtype), values.to(dtype)
    B, T = rewards.shape
    zero = torch.zeros((), dtype=dtype, device=rewards.device)
    next_value = torch.zeros(B, dtype=dtype, device=rewards.device)  # [B]; V after last valid token = 0
    last_gae = torch.zeros(B, dtype=dtype, device=rewards.device)  # [B]; A_{t+1}
    advantages = torch.zeros(B, T, dtype=dtype, device=rewards.device)
    for t in reversed(range(T)):
        mt = m[:, t]  # [B]
        delta = rewards[:, t] + gamma * next_value - values[:, t]  # [TRL-ppo]/[CleanRL] delta
        gae = delta + gamma * lam * last_gae  # [TRL-ppo] lastgaelam = delta + gamma * lam * lastgaelam
        last_gae = torch.where(mt, gae, last_gae)
        next_value = torch.where(mt, values[:, t], next_value)
        advantages[:, t] = torch.where(mt, gae, zero)
    returns = torch.where(m, advantages + values, zero)  # [TRL-ppo]/[CleanRL] returns = advantages + values
    return advantages, returns


# ------------------------------------------------------------------------------------------ losses
def policy_loss(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, *, clip_range: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped surrogate ([PPO] Eq. 7), token-level masked mean as in [TRL-ppo] / [N-details].

    ``logprobs`` (current policy, with grad), ``old_logprobs`` (rollout policy), ``advantages``, ``mask``:
    [B, T]. Loss = masked_mean(max(-A * r, -A * clip(r, 1 - eps, 1 + eps))), r = exp(logprobs - old).
    Stats (detached scalars): ``approxkl`` = 0.5 * masked_mean(logr**2) ([N-details]), ``clipfrac`` =
    fraction of tokens where the clipped branch is active, ``ratio_mean``.
    """
    if not (float(clip_range) > 0.0):
        raise ValueError(f"clip_range must be > 0, got {clip_range!r}; PPO uses e.g. clip_range=0.2")
    _check_same_shape(logprobs=logprobs, old_logprobs=old_logprobs, advantages=advantages, mask=mask)
    m = _bool_mask(mask)
    logprobs = _upcast(logprobs)
    zero = torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)
    # Zero the log-ratio on padding *before* exp so padded garbage cannot overflow into NaN gradients.
    logr = torch.where(m, logprobs - _upcast(old_logprobs).detach(), zero)  # [B, T]
    ratio = torch.exp(logr)  # [TRL-ppo] ratio = torch.exp(logprobs_diff)
    adv = _upcast(advantages).detach().to(logprobs.dtype)
    pg_losses = -adv * ratio  # [TRL-ppo] pg_losses = -mb_advantage * ratio
    pg_losses2 = -adv * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)  # [TRL-ppo] pg_losses2
    loss = masked_mean(torch.max(pg_losses, pg_losses2), m)  # [TRL-ppo] masked_mean(pg_loss_max, ~padding)
    with torch.no_grad():
        stats = {
            # [N-details]/[TRL-ppo] approxkl = 0.5 * (logprobs_diff**2).mean(), here on the mask
            "approxkl": 0.5 * masked_mean(logr**2, m),
            "clipfrac": masked_mean((pg_losses2 > pg_losses).to(logr.dtype), m),  # [TRL-ppo] pg_clipfrac
            "ratio_mean": masked_mean(ratio, m),
        }
    return loss, stats


def value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, *, clip_range_value: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped value loss ([TRL-ppo] / [N-details] "value function clipping"; also openai/baselines ppo2):

        V_clip = clip(V, V_old - eps, V_old + eps)
        loss   = 0.5 * masked_mean(max((V - R)^2, (V_clip - R)^2))

    ``values`` (with grad), ``old_values`` (rollout values), ``returns``, ``mask``: [B, T]. Stats:
    ``clipfrac`` (fraction of tokens where the clipped term is larger), ``vpred_mean``.
    """
    if not (float(clip_range_value) > 0.0):
        raise ValueError(
            f"clip_range_value must be > 0, got {clip_range_value!r}; use e.g. clip_range_value=0.2 "
            "(or a large value to effectively disable value clipping)"
        )
    _check_same_shape(values=values, old_values=old_values, returns=returns, mask=mask)
    m = _bool_mask(mask)
    values = _upcast(values)
    old = _upcast(old_values).detach().to(values.dtype)
    ret = _upcast(returns).detach().to(values.dtype)
    # [TRL-ppo] vpredclipped = torch.clamp(vpred, mb_values - cliprange_value, mb_values + cliprange_value)
    v_clipped = old + torch.clamp(values - old, -clip_range_value, clip_range_value)
    vf_losses1 = (values - ret) ** 2  # [TRL-ppo] torch.square(vpred - mb_return)
    vf_losses2 = (v_clipped - ret) ** 2  # [TRL-ppo] torch.square(vpredclipped - mb_return)
    loss = 0.5 * masked_mean(torch.max(vf_losses1, vf_losses2), m)  # [TRL-ppo] 0.5 * masked_mean(vf_loss_max)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((vf_losses2 > vf_losses1).to(values.dtype), m),  # [TRL-ppo] vf_clipfrac
            "vpred_mean": masked_mean(values, m),
        }
    return loss, stats


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> float:
    """``1 - Var(R - V) / Var(R)`` over masked entries ([CleanRL] ``explained_var``); NaN if Var(R) == 0
    or the mask is empty. 1 = perfect value function, 0 = no better than a constant, < 0 = worse."""
    _check_same_shape(values=values, returns=returns, mask=mask)
    m = _bool_mask(mask)
    if not bool(m.any()):
        return math.nan
    v, r = _upcast(values.detach()).double(), _upcast(returns.detach()).double()
    var_r = masked_var(r, m, unbiased=False)  # biased var, as np.var in CleanRL (ratio is unaffected)
    if float(var_r) == 0.0:
        return math.nan  # [CleanRL] np.nan if var_y == 0
    return float(1.0 - masked_var(r - v, m, unbiased=False) / var_r)


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of softmax(logits) per position: [B, T, V] -> [B, T] ([TRL-core] ``entropy_from_logits``):
    H = logsumexp(z) - sum softmax(z) * z."""
    logits = _upcast(logits)
    pd = torch.softmax(logits, dim=-1)  # [B, T, V]
    return torch.logsumexp(logits, dim=-1) - (pd * logits).sum(dim=-1)  # [TRL-core]


# ------------------------------------------------------------------------------------------ KL controllers
class AdaptiveKLController:
    """Adaptive KL coefficient ([Ziegler19] Sec. 2.2; [TRL-kl], from openai/lm-human-preferences):

    e_t      = clip(KL_t / target - 1, -0.2, 0.2)
    beta_t+1 = clamp(beta_t * (1 + e_t * n_steps / horizon), coef_min, coef_max)

    Two guards, both off by default (Ziegler's controller is the default), both stated in the suite configs:

    * ``coef_min`` / ``coef_max``: bounds on beta. A controller that starts below its target (every run does: the
      policy starts at pi_ref, KL 0) lowers beta at every step until the KL arrives; a slow policy lets it fall by
      10x before then, and the KL then overshoots while beta climbs back.
    * ``hold_while_rising``: a *lower* beta is only taken while the KL has stopped climbing, i.e. when KL_t is not
      above the exponential moving average (weight ``ema``) of the earlier measurements. Below target and still
      climbing (by more than ``rise_tol`` of the target), beta is held: the policy is already on its way, and cutting beta then is what made the KL overshoot
      (Huang et al. 2024's N+ runs: the target as a constraint the KL approaches, not a set point it oscillates
      around). Raising beta (KL above target) is never held.

    ``state_dict`` / ``load_state_dict`` carry the coefficient and the EMA (a resumed run continues exactly).
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float, *, coef_min: float | None = None,
                 coef_max: float | None = None, hold_while_rising: bool = False, ema: float = 0.5,
                 rise_tol: float = 0.02) -> None:
        if not (float(init_kl_coef) >= 0.0):
            raise ValueError(f"init_kl_coef must be >= 0, got {init_kl_coef!r}")
        if not (float(target) > 0.0):
            raise ValueError(
                f"target (KL target) must be > 0, got {target!r}; e.g. target=6.0 as in Ziegler et al."
            )
        if not (float(horizon) > 0.0):
            raise ValueError(f"horizon must be > 0, got {horizon!r}; e.g. horizon=10000 as in Ziegler et al.")
        lo = 0.0 if coef_min is None else float(coef_min)
        hi = math.inf if coef_max is None else float(coef_max)
        if not (0.0 <= lo <= float(init_kl_coef) <= hi):
            raise ValueError(f"KL coefficient bounds must satisfy 0 <= coef_min <= init_kl_coef <= coef_max, got "
                             f"coef_min={coef_min!r}, init_kl_coef={init_kl_coef!r}, coef_max={coef_max!r}")
        if not (0.0 < float(ema) <= 1.0):
            raise ValueError(f"ema must be in (0, 1], got {ema!r}")
        if not (0.0 <= float(rise_tol) < 1.0):
            raise ValueError(f"rise_tol must be in [0, 1), got {rise_tol!r}")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)
        self.coef_min, self.coef_max = lo, hi
        self.hold_while_rising = bool(hold_while_rising)
        self.ema = float(ema)
        self.rise_tol = float(rise_tol)
        self.kl_ema: float | None = None
        """EMA of the KL measurements before the latest one (None before the first update)."""
        self.held = False
        """Whether the last update held a decrease back (the KL was below target and still climbing)."""

    def update(self, current_kl: float | Tensor, n_steps: int) -> float:
        """Update from the measured KL (e.g. mean per-sequence KL of the batch) after ``n_steps`` samples.
        Returns the new coefficient."""
        current = float(current_kl)
        if not math.isfinite(current):
            raise ValueError(
                f"AdaptiveKLController.update: current_kl is not finite ({current}); check the KL"
            )
        if n_steps < 0:
            raise ValueError(f"n_steps must be >= 0, got {n_steps}")
        # [TRL-kl] proportional_error = np.clip(current / self.target - 1, -0.2, 0.2)
        proportional_error = min(max(current / self.target - 1.0, -0.2), 0.2)
        # climbing: above the EMA of the earlier measurements by more than rise_tol of the target (a KL that
        # creeps up by less has arrived where this beta takes it); the first measurement climbs from KL 0
        rising = self.kl_ema is None or current - self.kl_ema > self.rise_tol * self.target
        self.held = self.hold_while_rising and proportional_error < 0 and rising
        if self.held:
            proportional_error = 0.0
        mult = 1.0 + proportional_error * n_steps / self.horizon  # [TRL-kl] mult
        if mult <= 0.0:
            raise ValueError(
                f"AdaptiveKLController: n_steps={n_steps} is too large for horizon={self.horizon} "
                f"(multiplier {mult} <= 0 would flip the KL coefficient's sign); increase horizon"
            )
        self.value = min(max(self.value * mult, self.coef_min), self.coef_max)  # [TRL-kl] self.value *= mult
        self.kl_ema = current if self.kl_ema is None else self.ema * current + (1.0 - self.ema) * self.kl_ema
        return self.value

    def state_dict(self) -> dict:
        return {"value": self.value, "kl_ema": self.kl_ema}

    def load_state_dict(self, d: dict) -> None:
        self.value = float(d["value"])
        self.kl_ema = None if d.get("kl_ema") is None else float(d["kl_ema"])


class FixedKLController:
    """Constant KL coefficient with the AdaptiveKLController interface ([TRL-kl] ``FixedKLController``)."""

    def __init__(self, kl_coef: float) -> None:
        if not (float(kl_coef) >= 0.0):
            raise ValueError(f"kl_coef must be >= 0, got {kl_coef!r}")
        self.value = float(kl_coef)

    held = False

    def update(self, current_kl: float | Tensor, n_steps: int) -> float:
        return self.value

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, d: dict) -> None:
        self.value = float(d["value"])


# ------------------------------------------------------------------------------------------ validation
def validate_ppo_hparams(
    *,
    clip_range: float,
    clip_range_value: float,
    gamma: float,
    lam: float,
    target_kl: float | None = None,
    batch_size: int | None = None,
    minibatch_size: int | None = None,
) -> None:
    """Raise one ValueError listing every invalid PPO hyperparameter, each message naming the field and
    the fix. Comparisons are written so that NaN fails them."""
    errors: list[str] = []
    if not (0.0 < float(clip_range) < 1.0):
        errors.append(
            f"clip_range must be in (0, 1), got {clip_range!r}; the PPO ratio is clipped to "
            "[1 - clip_range, 1 + clip_range], use e.g. clip_range=0.2"
        )
    if not (float(clip_range_value) > 0.0):
        errors.append(
            f"clip_range_value must be > 0, got {clip_range_value!r}; use e.g. clip_range_value=0.2"
        )
    for name, value in (("gamma", gamma), ("lam", lam)):
        if not (0.0 <= float(value) <= 1.0):
            errors.append(f"{name} must be in [0, 1], got {value!r}; set {name} to a value between 0 and 1")
    if target_kl is not None and not (float(target_kl) > 0.0):
        errors.append(f"target_kl must be > 0 when given, got {target_kl!r}; pass None to disable it")
    bs_ok = True
    for name, value in (("batch_size", batch_size), ("minibatch_size", minibatch_size)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
            errors.append(f"{name} must be a positive integer, got {value!r}")
            bs_ok = False
    if bs_ok and batch_size is not None and minibatch_size is not None:
        if minibatch_size > batch_size:
            errors.append(
                f"minibatch_size ({minibatch_size}) must be <= batch_size ({batch_size}); "
                "lower minibatch_size or raise batch_size"
            )
        elif batch_size % minibatch_size != 0:
            errors.append(
                f"batch_size ({batch_size}) must be divisible by minibatch_size ({minibatch_size}); "
                "choose minibatch_size so that batch_size % minibatch_size == 0"
            )
    if errors:
        raise ValueError("invalid PPO hyperparameters:\n  - " + "\n  - ".join(errors))


def check_finite(name: str, tensor: Tensor | float, *, phase: str, step: int) -> None:
    """Raise FloatingPointError if ``tensor`` holds any NaN or inf, naming the quantity, phase and step."""
    t = torch.as_tensor(tensor).detach()
    if not (t.is_floating_point() or t.is_complex()):
        return  # integer/bool tensors cannot hold NaN/inf
    finite = torch.isfinite(t)
    if bool(finite.all()):
        return
    n_nan = int(torch.isnan(t).sum())
    n_inf = int(torch.isinf(t).sum())
    raise FloatingPointError(
        f"non-finite {name} in phase {phase} at step {step} ({n_nan} NaN, {n_inf} inf out of {t.numel()} "
        f"elements, shape {list(t.shape)}); lower the learning rate or check the inputs of this phase"
    )
