"""RLOO and GRPO on the reward model (``methods/rlhf/group_trainer``): two on-policy RL families without a value
model, each a grid over its KL coefficient beta, trained at every suite seed.

Configured under the suite's ``arms`` mapping (plug-in style, ``config_cls``)::

    arms:
      rloo: {betas: [0.02, 0.05, 0.1]}
      grpo: {betas: [0.02, 0.05, 0.1], epochs: 1}

Everything not given comes from ``rlhf.ppo`` so that the families share PPO's budget: ``prompts_per_iteration *
k == rlhf.ppo.rollout_batch_size`` (episodes = completions) and the same ``iterations``, ``lr``, ``minibatch_size``,
``max_new_tokens``, ``temperature`` and ``reward_norm``. The same SFT policy / reference, the same reward model
stage (``arm/rm``) and the same LoRA adapters as PPO; evaluated by the shared evaluation stage. Arm ids:
``rloo-kl0.05-s0``, ``grpo-kl0.05-s0``; typed hyper-parameter column ``kl_coef`` (= beta).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from benchmarks.arms.common import compute_record, on_policy_setup, run_on_policy_arm, stage_flops, token_sums
from benchmarks.arms.registry import ArmFamily, ArmPlan, Method, fmt, register
from benchmarks.arms.reward_model import (
    RM_SCALE_STAGE,
    RM_STAGE,
    rm_scale,
    rm_scale_stage,
    rm_stage,
    scaled_by_stage,
)
from benchmarks.errors import ConfigError, check
from benchmarks.harness import Harness, Stage
from benchmarks.stages import lora_key
from benchmarks.tasks import models
from methods.rlhf.group_trainer import GroupRLConfig


@dataclass
class GroupArmConfig:
    """``arms.rloo`` / ``arms.grpo``: the beta grid, plus trainer fields; null = PPO's value (``rlhf.ppo``)."""

    betas: list[float] = field(default_factory=lambda: [0.05])
    """The KL-coefficient grid: one trained policy per beta and seed. RLOO: k1 penalty in the reward (>= 0);
    GRPO: k3 term in the loss (> 0)."""
    k: int = 4
    """Completions per prompt (>= 2)."""
    prompts_per_iteration: int | None = None
    """null = rlhf.ppo.rollout_batch_size / k (the same episodes per iteration as PPO; must divide)."""
    iterations: int | None = None
    """null = rlhf.ppo.iterations (the same episode budget as PPO)."""
    lr: float | None = None
    """null = rlhf.ppo.lr."""
    minibatch_size: int | None = None
    """Completions per optimiser step; null = rlhf.ppo.minibatch_size."""
    epochs: int = 1
    """Passes over each rollout batch (RLOO: > 1 needs clip_eps)."""
    clip_eps: float | None = None
    """null: GRPO clips at 0.2 (TRL), RLOO is unclipped REINFORCE."""
    scale_rewards: bool = True
    """GRPO: divide advantages by the group's std (TRL's default); false = Dr. GRPO's mean baseline."""
    reward_norm: bool | None = None
    """null = rlhf.ppo.reward_norm (normalise RM scores: with the ``arm/rm-scale`` stage's gain and bias when PPO's
    ``reward_norm_stats`` is ``given``, else with the first rollouts' statistics)."""
    kl_grad: str = "k3_ratio"
    """GRPO: the KL term's gradient, ``k3_ratio`` (reverse KL(pi || pi_ref), TRL's default) or ``k3`` (forward KL,
    DeepSeekMath); see ``methods.rlhf.group.KL_GRADS``."""
    max_new_tokens: int | None = None
    """null = rlhf.ppo.max_new_tokens."""
    trl_peer: bool = False
    """Also train TRL 1.16's trainer for this algorithm (GRPOTrainer / RLOOTrainer, ``benchmarks/arms/trl_group.py``)
    at the first beta and every seed, configured to match ours (a parity and speed peer, shown beside ours)."""

    def validate(self, key: str) -> None:
        check(len(self.betas) > 0, f"{key}.betas", "give at least one beta, e.g. [0.05]")
        grpo = key.rsplit(".", 1)[-1] == "grpo"  # GRPO's KL term must be on: the arm sits on the KL frontier
        for i, b in enumerate(self.betas):
            check(math.isfinite(b) and (b > 0 if grpo else b >= 0), f"{key}.betas[{i}]",
                  f"beta must be {'> 0 (GRPO needs its KL term)' if grpo else '>= 0'}, got {b}")
        check(len(set(self.betas)) == len(self.betas), f"{key}.betas", f"duplicate betas in {self.betas}")
        check(self.k >= 2, f"{key}.k", f"must be >= 2 (a group needs another sample), got {self.k}")
        for name in ("prompts_per_iteration", "iterations", "minibatch_size", "max_new_tokens"):
            v = getattr(self, name)
            check(v is None or v >= 1, f"{key}.{name}", f"must be >= 1 or null (PPO's value), got {v}")
        check(self.lr is None or (math.isfinite(self.lr) and self.lr > 0), f"{key}.lr", f"must be > 0 or null, got {self.lr}")
        check(self.epochs >= 1, f"{key}.epochs", f"must be >= 1, got {self.epochs}")
        check(self.clip_eps is None or 0 < self.clip_eps < 1, f"{key}.clip_eps", f"must be in (0, 1) or null, got {self.clip_eps}")


def group_arm_id(algorithm: str, beta: float, seed: int) -> str:
    return f"{algorithm}-kl{fmt(beta)}-s{seed}"


def group_config(c, algorithm: str, beta: float, seed: int) -> GroupRLConfig:
    """The trainer config of one arm: the family's section, PPO's values where it leaves a field null."""
    a, ppo = c.arms[algorithm], c.rlhf.ppo
    key = f"arms.{algorithm}"
    ppi = a.prompts_per_iteration
    if ppi is None:
        check(ppo.rollout_batch_size % a.k == 0, f"{key}.k", f"k={a.k} must divide rlhf.ppo.rollout_batch_size="
              f"{ppo.rollout_batch_size} (the same episodes per iteration as PPO), or set {key}.prompts_per_iteration")
        ppi = ppo.rollout_batch_size // a.k
    pick = lambda v, default: default if v is None else v  # noqa: E731
    cfg = GroupRLConfig(
        algorithm=algorithm, beta=beta, k=a.k, prompts_per_iteration=ppi,
        minibatch_size=pick(a.minibatch_size, ppo.minibatch_size), epochs=a.epochs, clip_eps=a.clip_eps,
        lr=pick(a.lr, ppo.lr), iterations=pick(a.iterations, ppo.iterations),
        max_new_tokens=pick(a.max_new_tokens, ppo.max_new_tokens), temperature=ppo.temperature,
        scale_rewards=a.scale_rewards, kl_grad=a.kl_grad, reward_norm=pick(a.reward_norm, ppo.reward_norm), grad_clip=ppo.grad_clip,
        adam_eps=ppo.adam_eps, generation_batch_size=ppo.generation_batch_size,
        forward_batch_size=ppo.forward_batch_size, seed=seed)
    try:
        cfg.validate()
    except ValueError as e:  # name the suite's key: each listed error starts with the trainer's field name
        errors = str(e).split("\n  - ")[1:] or [str(e)]
        first = errors[0].split()[0]
        fields = {f.name for f in dataclasses.fields(GroupArmConfig)}
        where = f"{key}.{first}" if first in fields else (f"{key}.betas" if first == "beta" else key)
        raise ConfigError(f"config key '{where}': " + "; ".join(errors)) from None
    return cfg


def _make_stage(algorithm: str, beta: float, seed: int, scaled: bool) -> Stage:
    arm = group_arm_id(algorithm, beta, seed)

    def run(h: Harness, out: Path) -> dict:
        from methods.rlhf.group_trainer import GroupRLTrainer

        cfg = group_config(h.cfg, algorithm, beta, seed)
        policy, ref, tok, rm, reward_fn, rows, gold_fn = on_policy_setup(h, seed)
        tr = GroupRLTrainer(policy, ref, reward_fn, tok, [p["prompt_ids"] for p in rows], cfg, h.device,
                            autocast=h.autocast(), monitor=gold_fn,
                            reward_scale=rm_scale(h) if scaled and cfg.reward_norm else None,
                            accelerator=h.accelerator)  # accelerator None = one process
        hist, policy, summary = run_on_policy_arm(h, arm, tr, policy, tok, out)
        last = hist[-1] if hist else {}
        ntok = token_sums(hist)
        n_pol, n_rm = models.n_params(policy), models.n_params(rm)
        # rollout forwards: old policy log-probs, reference log-probs, reward model; no value model
        compute = compute_record(generated=[(n_pol, ntok["prompt"] + ntok["generated"])],
                                 forward=[(n_pol, ntok["sequence"]), (n_pol, ntok["sequence"]), (n_rm, ntok["sequence"])],
                                 trained=[(n_pol, ntok["update"])], shared={RM_STAGE: stage_flops(h, RM_STAGE)})
        return {"arm": arm, "method": algorithm, "loss_type": "", "kl_coef": beta, "target_kl": None, "seed": seed,
                "k": cfg.k, **summary, "params": n_pol, **compute,
                "final": {k: v for k, v in last.items() if k.startswith(("objective/", "policy/"))}}

    key = lambda c: {"group": asdict(group_config(c, algorithm, beta, seed)), "dtype": c.dtype,  # noqa: E731
                     "target": c.task.target, "gold": c.task.gold} | lora_key(c)
    deps = ("sft", "prompts", RM_STAGE) + ((RM_SCALE_STAGE,) if scaled else ())
    key_v = (lambda c: key(c) | {"reward_scale": "arm/rm-scale"}) if scaled else key  # noqa: E731
    return Stage(f"arm/{arm}", deps, key_v, run)


class _GroupFamily(ArmFamily):
    config_cls = GroupArmConfig

    def plan(self, c) -> ArmPlan:
        p = ArmPlan()
        a = self.section(c, self.name)
        if a is None:
            return p
        check(c.rlhf is not None, f"arms.{self.name}", "needs the rlhf section (its reward model rlhf.rm and the PPO "
              "budget rlhf.ppo it shares)")
        for b in a.betas:
            group_config(c, self.name, b, c.seeds[0])  # every grid point's trainer config is valid, before any stage
        p.need(rm_stage())
        # rewards on the RM's pi_ref scale (stage arm/rm-scale) whenever PPO's are: one scale for every RL family
        scaled = scaled_by_stage(c.rlhf.ppo) and group_config(c, self.name, a.betas[0], c.seeds[0]).reward_norm
        if scaled:
            p.need(rm_scale_stage())
        for seed in c.seeds:
            for b in a.betas:
                p.add_arm(_make_stage(self.name, b, seed, scaled))
        return p


@register
class RLOO(_GroupFamily):
    """RLOO (Ahmadian et al. 2024): k samples per prompt, leave-one-out baseline, k1 KL penalty in the reward."""

    name = "rloo"
    methods = (Method("rloo", "RLOO", "#fbafe4", "p", "on_policy_rl", order=52, curves="rl"),)


@register
class GRPO(_GroupFamily):
    """GRPO (Shao et al. 2024): k samples per prompt, group-normalised advantages, k3 KL term in the loss."""

    name = "grpo"
    methods = (Method("grpo", "GRPO", "#ece133", "h", "on_policy_rl", order=54, curves="rl"),)
