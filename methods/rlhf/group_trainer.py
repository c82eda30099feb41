"""RLOO and GRPO, the group-sampled policy-gradient methods (math: ``methods.rlhf.group``): their config and their
step of the on-policy engine (``methods.onpolicy``, where the iteration is described: rollout, scoring, no-grad
forwards, minibatch updates, NaN guard, checkpoints, data parallelism).

The step (``GroupRLStep``): ``prompts_per_iteration`` prompts, ``k`` completions each (rows ``p * k + j``), so
``prompts_per_iteration * k`` episodes per iteration; no value model (the other samples of a prompt are the baseline).
  RLOO  reward R = score - beta * sum_t (log pi - log pi_ref) (k1 in the reward, as PPO's per-token KL reward sums
        to), leave-one-out advantage A_i = R_i - mean_{j != i} R_j; loss REINFORCE on the sequence log-probability
        (PPO-clipped on the sequence ratio when ``clip_eps`` is set), mean over sequences [Ahmadian24; TRL-rloo]
  GRPO  advantages (r - group mean) / (group std + eps) (``scale_rewards=False``: the mean baseline only, Dr. GRPO
        [Liu25]); loss the clipped ratio per token + beta * (k3 | ratio * k3) in the loss, token mean over the
        minibatch [Shao24; TRL-grpo]. ``kl_grad``: ``k3`` (DeepSeekMath; its gradient is that of KL(pi_ref || pi))
        or ``k3_ratio`` (the unbiased gradient of KL(pi || pi_ref), the KL the frontier measures)
Under data parallelism a minibatch's ranks weigh RLOO's loss by their sequences and GRPO's by their tokens.

What each targets on a bandit with a closed-form optimum: ``tests/test_bandit_optimum.py``. Budget: with
``prompts_per_iteration * k == PPOConfig.rollout_batch_size`` and the same ``iterations`` an RLOO/GRPO arm samples
exactly as many completions as the PPO arm.

Sources: [Ahmadian24] "Back to Basics", arXiv:2402.14740; [Shao24] DeepSeekMath, arXiv:2402.03300; [Liu25]
"Understanding R1-Zero-Like Training" (Dr. GRPO), arXiv:2503.20783; [TRL-grpo] / [TRL-rloo] trl 1.16
``grpo_trainer.py`` / ``rloo_trainer.py`` (cited in ``methods.rlhf.group``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from methods import onpolicy as op
from methods.rlhf.group import (
    KL_GRADS,
    grpo_advantages,
    grpo_loss,
    kl_penalised_rewards,
    rloo_advantages,
    rloo_loss,
)
from methods.rlhf.ppo_core import check_finite

ALGORITHMS = ("rloo", "grpo")
GRPO_DEFAULT_CLIP = 0.2
"""TRL 1.16 GRPOConfig.epsilon."""


@dataclass
class GroupRLConfig(op.OnPolicyConfig):
    algorithm: str
    """'rloo' (leave-one-out baseline, KL in the reward) | 'grpo' (group-normalised advantages, k3 KL in the loss)."""
    beta: float = 0.05
    """KL coefficient: RLOO's k1 penalty in the reward (>= 0), GRPO's k3 term in the loss (> 0: the arm must be
    KL-regularised to sit on the KL frontier)."""
    k: int = 4
    """Completions sampled per prompt (the group); >= 2."""
    prompts_per_iteration: int = 16
    """Prompts per iteration; episodes per iteration = prompts_per_iteration * k (PPO's rollout_batch_size)."""
    minibatch_size: int = 16
    """Completions per optimiser step; must divide prompts_per_iteration * k."""
    epochs: int = 1
    """Passes over each rollout batch. RLOO needs clip_eps for > 1 (repeated unclipped importance weights)."""
    clip_eps: float | None = None
    """Ratio clipping: GRPO per token (None = 0.2, TRL's epsilon); RLOO per sequence (None = unclipped REINFORCE)."""
    scale_rewards: bool = True
    """GRPO: divide by the group's std (TRL's scale_rewards='group'); False = mean baseline only (Dr. GRPO)."""
    adv_eps: float = 1e-4
    """GRPO: the std's epsilon (TRL: 1e-4)."""
    kl_grad: str = "k3_ratio"
    """GRPO: the KL term's gradient (``methods.rlhf.group.KL_GRADS``). ``k3_ratio`` (default; TRL 1.16's
    ``use_bias_correction_kl=True``): the unbiased gradient of the reverse KL(pi || pi_ref), the KL the frontier
    measures and PPO / RLOO penalise; ``k3``: DeepSeekMath's term, whose gradient is that of KL(pi_ref || pi)."""
    reward_norm: bool = False
    """Normalise reward_fn scores to mean 0 / std 1 with the first rollouts' statistics (from pi_ref), as PPO's
    reward_norm with reward_norm_stats='first' (matters for RLOO, whose beta weighs the KL against the score)."""

    @property
    def rollout_batch_size(self) -> int:
        """Completions (= episodes) per iteration."""
        return self.prompts_per_iteration * self.k

    @property
    def effective_clip(self) -> float | None:
        return self.clip_eps if self.clip_eps is not None or self.algorithm == "rloo" else GRPO_DEFAULT_CLIP

    def validate(self) -> None:
        """Raise one ValueError listing every invalid field, each by name."""

        grpo = self.algorithm == "grpo"
        checks = [
            (self.algorithm in ALGORITHMS, "algorithm", f"must be one of {ALGORITHMS}"),
            (op.is_num(self.beta) and (self.beta > 0 if grpo else self.beta >= 0), "beta",
             "must be > 0 for GRPO (its KL term keeps the arm on the KL frontier)" if grpo else "must be >= 0"),
            (op.is_pos_int(self.k) and self.k >= 2, "k", "must be an integer >= 2 (a group needs another sample as baseline)"),
            (op.is_pos_int(self.prompts_per_iteration), "prompts_per_iteration", "must be an integer >= 1"),
            (op.is_pos_int(self.minibatch_size), "minibatch_size", "must be an integer >= 1"),
            (op.is_pos_int(self.epochs), "epochs", "must be an integer >= 1"),
            (self.clip_eps is None or (op.is_num(self.clip_eps) and 0 < self.clip_eps < 1), "clip_eps",
             "must be in (0, 1) or null (GRPO: 0.2; RLOO: unclipped)"),
            (isinstance(self.scale_rewards, bool), "scale_rewards", "must be true or false"),
            (op.is_num(self.adv_eps) and self.adv_eps >= 0, "adv_eps", "must be >= 0"),
            (self.kl_grad in KL_GRADS, "kl_grad", f"must be one of {KL_GRADS}"),
            (isinstance(self.reward_norm, bool), "reward_norm", "must be true or false"),
        ]
        errors = op.field_errors(self, checks + op.loop_checks(self))
        if not errors:
            n = self.rollout_batch_size
            if self.minibatch_size > n or n % self.minibatch_size:
                errors.append(f"minibatch_size must divide prompts_per_iteration * k = {n}, got {self.minibatch_size}")
            if self.algorithm == "rloo" and self.epochs > 1 and self.clip_eps is None:
                errors.append(f"epochs > 1 needs clip_eps for RLOO (unclipped REINFORCE is on-policy), got epochs="
                              f"{self.epochs} with clip_eps=None")
        op.raise_invalid(errors, f"{self.algorithm} config")


class GroupRLStep(op.OnPolicyStep):
    """RLOO's / GRPO's part of the engine's iteration (module docstring)."""

    rows_field = "rollout batch (prompts_per_iteration * k)"
    mean_stats = ("loss", "pg_loss", "kl_loss", "clipfrac", "ratio")
    finite_checks = (("policy_loss", "loss"),)

    @property
    def label(self) -> str:
        return self.cfg.algorithm

    def loop_config(self) -> op.LoopConfig:
        c = self.cfg
        return op.LoopConfig.of(c, prompts_per_iteration=c.prompts_per_iteration, k=c.k, logp_temperature=c.temperature,
                             epochs=c.epochs, minibatch_size=c.minibatch_size, anneal_lr=False,
                             reward_norm=None if not c.reward_norm else "given" if self.given_scale else "first")

    def __init__(self, cfg: GroupRLConfig, given_scale: bool = False) -> None:
        super().__init__(cfg)
        self.given_scale = given_scale

    def reward_scale_error(self, reward_scale) -> str:
        return f"reward_scale={reward_scale!r} needs reward_norm and a finite (mean, std > 0)"

    def optimizer(self, policy_params, extra_params):
        return torch.optim.Adam(policy_params, lr=self.cfg.lr, eps=self.cfg.adam_eps)

    def experience(self, ro) -> op.Experience:
        cfg = self.cfg
        P, k = cfg.prompts_per_iteration, cfg.k
        if cfg.algorithm == "rloo":
            rewards, _ = kl_penalised_rewards(ro.scores, ro.logprobs, ro.ref_logprobs, ro.mask, cfg.beta)
            advantages = rloo_advantages(rewards.view(P, k)).flatten()
        else:
            advantages = grpo_advantages(ro.scores.view(P, k), eps=cfg.adv_eps, scale=cfg.scale_rewards).flatten()
        check_finite("advantages", advantages, phase="advantages", step=ro.it)
        inspect = {"input_ids": ro.ids, "attention_mask": ro.attn, "labels": ro.labels, "mask": ro.mask,
                   "logprobs": ro.logprobs, "ref_logprobs": ro.ref_logprobs, "scores": ro.scores,
                   "raw_scores": ro.raw, "advantages": advantages, "prompt_indices": ro.slots,
                   "completions": ro.completions}
        return op.Experience(n=cfg.rollout_batch_size, data={"advantages": advantages}, inspect=inspect)

    def units(self, exp, idx, rows):
        if self.cfg.algorithm == "rloo":  # a mean over sequences
            return super().units(exp, idx, rows)
        return exp.inspect["mask"][rows].sum()  # GRPO: a token mean

    def minibatch(self, exp, mb) -> op.MinibatchLoss:
        cfg, ro, adv = self.cfg, exp.inspect, exp.data["advantages"]
        T, r = mb.ids.shape[1], mb.rows
        lp = self.engine.forward(self.engine.policy, mb.ids, mb.attn, mb.labels).logps
        mm = ro["mask"][r, : T - 1]
        if cfg.algorithm == "rloo":
            loss, st = rloo_loss(lp, ro["logprobs"][r, : T - 1], adv[r], mm, clip_eps=cfg.effective_clip)
            pg, kl_loss = loss.detach(), 0.0
        else:
            loss, st = grpo_loss(lp, ro["logprobs"][r, : T - 1], ro["ref_logprobs"][r, : T - 1], adv[r], mm,
                                 clip_eps=cfg.effective_clip, beta=cfg.beta, kl_grad=cfg.kl_grad)
            pg, kl_loss = st["pg_loss"], st["kl"]
        return op.MinibatchLoss(loss, {"loss": loss.detach(), "pg_loss": pg, "kl_loss": kl_loss,
                                    "clipfrac": st["clipfrac"], "ratio": st["ratio_mean"]})

    def record(self, ro, exp, upd) -> dict:
        cfg = self.cfg
        mean_kl = float(ro.kl_seq.mean())
        return {
            "objective/kl": mean_kl,
            "objective/rlhf_reward": float(ro.scores.mean()) - cfg.beta * mean_kl,
            "objective/kl_coef": cfg.beta,
            "objective/zero_std_groups": float((ro.scores.view(cfg.prompts_per_iteration, cfg.k).std(1) == 0).float().mean()),
            "policy/loss": upd.mean("loss"),
            "policy/pg_loss": upd.mean("pg_loss"),
            "policy/kl_loss": upd.mean("kl_loss"),
            "policy/clipfrac": upd.mean("clipfrac"),
            "policy/ratio": upd.mean("ratio"),
            "policy/advantage_abs": float(exp.data["advantages"].abs().mean()),
        }


class GroupRLTrainer(op.OnPolicyEngine):
    """RLOO / GRPO for a causal-LM policy against a reward callable (no value model): the on-policy engine with
    ``GroupRLStep``. Arguments as ``methods.onpolicy.OnPolicyEngine``; ``reward_scale`` needs ``reward_norm``."""

    def __init__(self, policy, ref_model, reward_fn: Callable, tokenizer, prompts: Sequence[Sequence[int]],
                 cfg: GroupRLConfig, device: str | torch.device, autocast=None, monitor: Callable | None = None,
                 reward_scale: tuple[float, float] | None = None, accelerator=None):
        super().__init__(GroupRLStep(cfg, given_scale=reward_scale is not None), policy, ref_model, reward_fn,
                         tokenizer, prompts, device, autocast=autocast, accelerator=accelerator, monitor=monitor,
                         reward_scale=reward_scale)
