"""Pairwise preference losses for the DPO family, as pure functions of per-sequence log-probs.

Everything here is tensor math on already-reduced log-probabilities: no model code, no I/O, and nothing
runs at import. Every tensor argument has shape ``[B]`` (one entry per preference pair) and every returned
tensor has shape ``[B]``; reduce (e.g. ``.mean()``) in the caller.

Notation used in the comments::

    pi_c, pi_r   = log pi_theta(y_chosen | x), log pi_theta(y_rejected | x)    (policy)
    ref_c, ref_r = log pi_ref(y_chosen | x),   log pi_ref(y_rejected | x)      (frozen reference)
    h            = (pi_c - pi_r) - (ref_c - ref_r)                            ("logits" in TRL)
    reward_c     = beta * (pi_c - ref_c),  reward_r = beta * (pi_r - ref_r)   (implicit DPO rewards, detached)

Parity with TRL 1.16 (``trl/trainer/dpo_trainer.py``, ``DPOTrainer._compute_loss``, ``f_divergence_type =
"reverse_kl"``, no ``ld_alpha``, no ``use_weighting``): for the same inputs ``sigmoid`` (with
``label_smoothing=0``), ``hinge``, ``robust`` and ``ipo`` (given mean log-probs, see below) compute the
same per-pair losses TRL does. Known differences, all deliberate:

* ``sigmoid`` with ``label_smoothing > 0``: TRL 1.16 ignores ``label_smoothing`` for ``"sigmoid"`` (it only
  uses it for ``robust``/``exo_pair``/``aot``). Here it gives conservative DPO (cDPO, Mitchell 2023), as
  older TRL releases and the cDPO note do. With ``label_smoothing=0`` the two are identical.
* ``ipo``: TRL 1.16 receives token-*summed* log-probs and divides each log-ratio by the number of completion
  tokens itself. This function is pure, so the caller must pass length-*averaged* log-probs
  (see :func:`uses_average_logps`); the result is then the same number TRL computes.
* Validation: TRL only logs a warning when ``label_smoothing`` is outside ``[0, 0.5)`` for ``robust``; here
  :func:`validate_dpo_hparams` raises, and it also rejects a non-zero ``label_smoothing`` for the losses that
  would silently ignore it (``ipo``, ``hinge``).

SimPO (:func:`simpo_loss`) is reference-free and has its own signature.
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F

__all__ = [
    "LOSS_TYPES",
    "preference_loss",
    "simpo_loss",
    "uses_average_logps",
    "validate_dpo_hparams",
]

LOSS_TYPES: tuple[str, ...] = ("sigmoid", "ipo", "hinge", "robust")  # SimPO is separate (reference-free)

# Loss types that use `label_smoothing`; for the others a non-zero value would be silently ignored.
_SMOOTHED_LOSS_TYPES = frozenset({"sigmoid", "robust"})


def _is_real_number(x: object) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def validate_dpo_hparams(*, beta: float, loss_type: str, label_smoothing: float = 0.0) -> None:
    """Raise ``ValueError`` (naming the offending field and the fix) for invalid DPO hyper-parameters.

    * ``beta`` must be a finite number > 0.
    * ``loss_type`` must be one of :data:`LOSS_TYPES`.
    * ``label_smoothing`` must lie in ``[0, 0.5)``: it is the assumed label-flip probability of cDPO / rDPO,
      and rDPO divides by ``1 - 2 * label_smoothing``. It must be 0 for ``ipo`` and ``hinge``, which do not
      use it. (``robust`` with ``label_smoothing=0`` is allowed: it is then plain DPO.)
    """
    if not _is_real_number(beta) or not math.isfinite(beta) or beta <= 0:
        raise ValueError(
            f"beta must be > 0 (got {beta!r}): it is the KL-penalty strength of DPO (tau in IPO); "
            "set beta to a finite positive number such as 0.1."
        )
    if loss_type not in LOSS_TYPES:
        raise ValueError(
            f"loss_type must be one of {', '.join(repr(t) for t in LOSS_TYPES)} (got {loss_type!r}); "
            "use simpo_loss() for SimPO."
        )
    if not _is_real_number(label_smoothing) or not (0.0 <= label_smoothing < 0.5):
        raise ValueError(
            f"label_smoothing must be in [0, 0.5) (got {label_smoothing!r}): it is the assumed probability that a "
            "preference label is flipped; set label_smoothing to e.g. 0.0 (plain DPO) or 0.1."
        )
    if label_smoothing != 0.0 and loss_type not in _SMOOTHED_LOSS_TYPES:
        raise ValueError(
            f"label_smoothing={label_smoothing!r} has no effect for loss_type={loss_type!r}; set "
            f"label_smoothing=0.0, or use loss_type 'sigmoid' (cDPO) or 'robust' (rDPO)."
        )


def uses_average_logps(loss_type: str) -> bool:
    """Whether ``loss_type`` expects length-averaged (mean per-token) log-probs rather than summed ones.

    True for ``"ipo"`` (Azar et al. 2023 as implemented by TRL 1.16 and confirmed with the IPO authors) and for
    ``"simpo"`` (Meng et al. 2024, Eq. 6 uses ``log pi(y|x) / |y|``); False for the other DPO losses.
    """
    if loss_type not in LOSS_TYPES and loss_type != "simpo":
        raise ValueError(f"loss_type must be one of {LOSS_TYPES + ('simpo',)} (got {loss_type!r}).")
    return loss_type in ("ipo", "simpo")


def _check_same_shape(**tensors: torch.Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) != 1:
        # Silent broadcasting of e.g. [B] against [B, 1] would give a [B, B] "loss"; refuse it.
        raise ValueError(f"log-prob tensors must all have the same shape [B]; got {shapes}.")


def preference_loss(
    policy_chosen_logps: torch.Tensor,  # [B]
    policy_rejected_logps: torch.Tensor,  # [B]
    ref_chosen_logps: torch.Tensor,  # [B]
    ref_rejected_logps: torch.Tensor,  # [B]
    *,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair DPO-family loss from per-sequence log-probs.

    Args:
        policy_chosen_logps, policy_rejected_logps: ``[B]`` policy log-probs of the chosen / rejected
            completions. Summed over completion tokens for ``sigmoid``, ``hinge`` and ``robust``; for ``ipo``
            callers MUST pass length-averaged (mean per-token) log-probs, see :func:`uses_average_logps`.
            This function does not know sequence lengths and uses whatever it is given.
        ref_chosen_logps, ref_rejected_logps: ``[B]`` reference-model log-probs, reduced the same way.
        beta: KL-penalty strength (DPO's beta; IPO's tau; for ``hinge`` the margin is ``1 / beta``).
        loss_type: one of :data:`LOSS_TYPES`:

            * ``"sigmoid"``: DPO, ``-log sigmoid(beta * h)`` (Rafailov et al. 2023, Eq. 7). With
              ``label_smoothing = eps > 0`` it is conservative DPO (cDPO, Mitchell 2023):
              ``-(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)``. TRL 1.16 ignores
              ``label_smoothing`` for this loss type.
            * ``"ipo"``: ``(h - 1 / (2 beta))**2`` (Azar et al. 2023, Eq. 17). Defined on length-averaged
              log-probs: pass mean log-probs. TRL 1.16 does the averaging inside its trainer; the result is
              identical.
            * ``"hinge"``: ``relu(1 - beta * h)``; SLiC's rank-calibration hinge (Zhao et al. 2023, Eq. 1, margin
              ``delta = 1 / beta``, scaled by ``beta``) applied to reference-normalised log-ratios as in RSO's
              "hinge-norm" loss (Liu et al. 2023). SLiC itself has no reference model; pass zero reference
              log-probs to get it. Same formula as TRL.
            * ``"robust"``: rDPO (Chowdhury et al. 2024),
              ``((1 - eps) * (-log sigmoid(beta h)) + eps * log sigmoid(-beta h)) / (1 - 2 eps)``, an unbiased
              estimate of the clean-label DPO loss when labels flip with probability ``eps``. Same as TRL.

        label_smoothing: assumed label-flip probability ``eps`` in ``[0, 0.5)``; only for ``sigmoid`` and
            ``robust`` (must be 0 otherwise).

    Returns:
        ``(losses, chosen_rewards, rejected_rewards)``, each ``[B]``. ``losses`` is differentiable;
        the rewards are ``beta * (policy - ref)`` and detached (for logging / reward accuracy).
    """
    validate_dpo_hparams(beta=beta, loss_type=loss_type, label_smoothing=label_smoothing)
    _check_same_shape(
        policy_chosen_logps=policy_chosen_logps,
        policy_rejected_logps=policy_rejected_logps,
        ref_chosen_logps=ref_chosen_logps,
        ref_rejected_logps=ref_rejected_logps,
    )
    eps = label_smoothing

    chosen_logratios = policy_chosen_logps - ref_chosen_logps  # [B] log pi/pi_ref (chosen)
    rejected_logratios = policy_rejected_logps - ref_rejected_logps  # [B] log pi/pi_ref (rejected)
    logits = chosen_logratios - rejected_logratios  # [B] h = (pi_c - pi_r) - (ref_c - ref_r)

    if loss_type == "sigmoid":
        if eps == 0.0:
            losses = -F.logsigmoid(beta * logits)  # [B] DPO, Rafailov et al. 2023, Eq. 7 (= TRL's op order)
        else:
            # cDPO: Mitchell 2023, "A note on DPO with noisy preferences & relationship to IPO"
            pos_term = -(1.0 - eps) * F.logsigmoid(beta * logits)  # [B] label as given, weight 1 - eps
            neg_term = -eps * F.logsigmoid(-beta * logits)  # [B] label flipped, weight eps
            losses = pos_term + neg_term  # [B] cDPO, Mitchell 2023, Eq. 3
    elif loss_type == "ipo":
        # Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human Preferences"
        losses = (logits - 1.0 / (2.0 * beta)) ** 2  # [B] IPO, Azar et al. 2023, Eq. 17 (tau = beta)
    elif loss_type == "hinge":
        # SLiC-HF calibration hinge (margin 1/beta, scaled by beta) on reference-normalised ratios (RSO hinge-norm)
        losses = torch.relu(1.0 - beta * logits)  # [B] SLiC-HF, Zhao et al. 2023, Eq. 1 (+ RSO norm.)
    else:  # "robust" (validated above)
        # rDPO: Chowdhury, Kini & Natarajan 2024, "Provably Robust DPO" (ICML 2024, arXiv:2403.00409): the
        # de-biased loss [(1-eps) l(y_w, y_l) - eps l(y_l, y_w)] / (1-2eps), Eq. 8 (number not re-checked vs PDF).
        clean_term = -(1.0 - eps) * F.logsigmoid(beta * logits)  # [B] loss if the label is right
        flipped_term = -eps * F.logsigmoid(-beta * logits)  # [B] loss if the label is flipped
        losses = (clean_term - flipped_term) / (1.0 - 2.0 * eps)  # [B] rDPO, Chowdhury et al. 2024, Eq. 8

    chosen_rewards = beta * chosen_logratios.detach()  # [B]
    rejected_rewards = beta * rejected_logratios.detach()  # [B]
    return losses, chosen_rewards, rejected_rewards


def simpo_loss(
    policy_chosen_logps: torch.Tensor,  # [B], length-averaged
    policy_rejected_logps: torch.Tensor,  # [B], length-averaged
    *,
    beta: float,
    gamma: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SimPO loss (Meng, Xia & Chen 2024, Eq. 6): reference-free, on length-normalised log-probs.

    ``losses = -log sigmoid(beta * (pi_c - pi_r) - gamma)`` where ``pi_*`` are MEAN per-token log-probs
    (``log pi(y|x) / |y|``) and ``gamma >= 0`` is the absolute target reward margin. Note that the SimPO
    reference code is configured with ``gamma_beta_ratio = gamma / beta``; convert before calling. Numerically
    identical to TRL 1.16's ``CPOTrainer.cpo_loss`` with ``loss_type="simpo"``, ``simpo_gamma=gamma``,
    ``label_smoothing=0`` and ``alpha=0`` (``trl/experimental/cpo/cpo_trainer.py``).

    Returns:
        ``(losses, chosen_rewards, rejected_rewards)``, each ``[B]``; rewards are ``beta * pi`` (detached).
    """
    if not _is_real_number(beta) or not math.isfinite(beta) or beta <= 0:
        raise ValueError(
            f"beta must be > 0 (got {beta!r}); set beta to a finite positive number (SimPO uses 2-10)."
        )
    if not _is_real_number(gamma) or not math.isfinite(gamma) or gamma < 0:
        raise ValueError(
            f"gamma must be >= 0 (got {gamma!r}); set gamma to the target reward margin, e.g. 0.5."
        )
    _check_same_shape(policy_chosen_logps=policy_chosen_logps, policy_rejected_logps=policy_rejected_logps)

    logits = policy_chosen_logps - policy_rejected_logps  # [B] difference of mean log-probs
    # Meng, Xia & Chen 2024, "SimPO: Simple Preference Optimization with a Reference-Free Reward"
    losses = -F.logsigmoid(beta * logits - gamma)  # [B] SimPO, Meng et al. 2024, Eq. 6
    chosen_rewards = beta * policy_chosen_logps.detach()  # [B]
    rejected_rewards = beta * policy_rejected_logps.detach()  # [B]
    return losses, chosen_rewards, rejected_rewards
