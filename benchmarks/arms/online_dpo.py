"""Online DPO on the reward model (``methods/online_dpo``): our DPO loss on fresh pairs, the best and the worst of
``k`` samples per prompt labelled by the RM every iteration, from a sampling policy refreshed every ``s`` iterations;
a grid over the sync interval ``s`` and beta, trained at every suite seed.

Configured under the suite's ``arms`` mapping (plug-in style, ``config_cls``)::

    arms:
      online_dpo: {sync_intervals: [1, null], betas: [0.1]}

``s = 1`` is fully online (the sampler is the policy of the previous iteration); ``s = null`` samples from pi_ref
forever (offline-like, but fresh RM-labelled pairs). Everything not given comes from ``rlhf.ppo`` so that the family
shares PPO's budget: ``prompts_per_iteration * k == rlhf.ppo.rollout_batch_size`` (episodes = completions) and the
same ``iterations``, ``max_new_tokens``, ``temperature``, ``grad_clip``, ``anneal_lr`` and batch sizes of the
sampler / forwards; ``minibatch_size`` (pairs) defaults to half PPO's (the same sequences per optimiser step); the
learning rate to the offline DPO arms' ``dpo.lr`` (the same loss; ``rlhf.ppo.lr`` when the suite has no dpo section).
The same SFT policy / reference, the same reward model stage (``arm/rm``), the same LoRA adapters as PPO and DPO;
evaluated by the shared evaluation stage. Arm ids: ``odpo-s1-b0.1-s0``, ``odpo-sinf-b0.1-s0``; typed hyper-parameter
column ``beta``; ``sync_interval`` in the arm's summary.

Family kind: ``on_policy_rl``, not ``offline_preference``. Its loss is DPO's, but what the verdict asks, by kind, is
whether learning from a fixed preference data set (offline) is as good as learning from the RM on the policy's own
samples at PPO's episode budget. Online DPO is on the second side: it needs the RM stage, samples ``episodes``
completions during training, spends PPO's compute on sampling and RM calls, and (s = 1) learns from its own
samples. As ``offline_preference`` it would be compared with PPO / RLOO / GRPO as if it were an offline method;
as ``on_policy_rl`` the verdict compares the offline DPO arms with it: the same loss, offline vs online, which is
the comparison this family is here for. (The s = null arms sample from pi_ref, not from the policy, but still
train on fresh RM-labelled samples within the on-policy budget; they stay in the family as its s -> inf end.)
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from benchmarks.arms.common import compute_record, on_policy_setup, run_on_policy_arm, stage_flops, token_sums
from benchmarks.arms.registry import ArmFamily, ArmPlan, Method, fmt, register
from benchmarks.arms.reward_model import RM_STAGE, rm_stage
from benchmarks.errors import ConfigError, check
from benchmarks.harness import Harness, Stage
from benchmarks.stages import lora_key
from benchmarks.tasks import models
from methods.dpo.losses import LOSS_TYPES
from methods.online_dpo import PAIR_LABELS, OnlineDPOConfig

FAMILY = "online_dpo"


@dataclass
class OnlineDPOArmConfig:
    """``arms.online_dpo``: the sync-interval and beta grids, plus trainer fields; null = the shared value."""

    sync_intervals: list[int | None] = field(default_factory=lambda: [1, None])
    """Sampler refresh intervals: one trained policy per (s, beta, seed). 1 = fully online; null = sample from
    pi_ref forever."""
    betas: list[float] = field(default_factory=lambda: [0.1])
    """DPO's beta grid (> 0)."""
    loss_type: str = "sigmoid"
    """One of methods.dpo.losses.LOSS_TYPES (sigmoid = DPO)."""
    labels: str = "best_worst"
    """best_worst: the higher-RM-score completion is chosen (TRL's rule) | bradley_terry: chosen with the RM's
    preference probability (targets pi*; best_worst does not, see methods/online_dpo.py)."""
    bt_temperature: float = 1.0
    """Bradley-Terry temperature on raw RM scores (labels: bradley_terry)."""
    k: int = 4
    """Completions per prompt (>= 2): one pair per prompt, the best and the worst."""
    prompts_per_iteration: int | None = None
    """null = rlhf.ppo.rollout_batch_size / k (the same episodes per iteration as PPO; must divide)."""
    iterations: int | None = None
    """null = rlhf.ppo.iterations (the same episode budget as PPO)."""
    lr: float | None = None
    """null = dpo.lr (the offline DPO arms'), or rlhf.ppo.lr without a dpo section."""
    minibatch_size: int | None = None
    """Pairs per optimiser step; null = rlhf.ppo.minibatch_size / 2 (PPO's sequences per step)."""
    epochs: int = 1
    """Passes over each iteration's pairs."""
    reward_norm: bool | None = None
    """Logging only (objective/scores on PPO's scale); null = rlhf.ppo.reward_norm."""
    max_new_tokens: int | None = None
    """null = rlhf.ppo.max_new_tokens."""

    def validate(self, key: str) -> None:
        check(len(self.sync_intervals) > 0, f"{key}.sync_intervals", "give at least one, e.g. [1, null]")
        for i, s in enumerate(self.sync_intervals):
            check(s is None or (isinstance(s, int) and not isinstance(s, bool) and s >= 1), f"{key}.sync_intervals[{i}]",
                  f"must be an integer >= 1 or null (never: sample from pi_ref), got {s!r}")
        check(len(set(self.sync_intervals)) == len(self.sync_intervals), f"{key}.sync_intervals",
              f"duplicate sync intervals in {self.sync_intervals}")
        check(len(self.betas) > 0, f"{key}.betas", "give at least one beta, e.g. [0.1]")
        for i, b in enumerate(self.betas):
            check(math.isfinite(b) and b > 0, f"{key}.betas[{i}]", f"beta must be > 0, got {b}")
        check(len(set(self.betas)) == len(self.betas), f"{key}.betas", f"duplicate betas in {self.betas}")
        check(self.loss_type in LOSS_TYPES, f"{key}.loss_type", f"must be one of {LOSS_TYPES}, got {self.loss_type!r}")
        check(self.labels in PAIR_LABELS, f"{key}.labels", f"must be one of {PAIR_LABELS}, got {self.labels!r}")
        check(math.isfinite(self.bt_temperature) and self.bt_temperature > 0, f"{key}.bt_temperature",
              f"must be > 0, got {self.bt_temperature}")
        check(self.k >= 2, f"{key}.k", f"must be >= 2 (a pair needs two samples), got {self.k}")
        for name in ("prompts_per_iteration", "iterations", "minibatch_size", "max_new_tokens"):
            v = getattr(self, name)
            check(v is None or v >= 1, f"{key}.{name}", f"must be >= 1 or null (the shared value), got {v}")
        check(self.lr is None or (math.isfinite(self.lr) and self.lr > 0), f"{key}.lr", f"must be > 0 or null, got {self.lr}")
        check(self.epochs >= 1, f"{key}.epochs", f"must be >= 1, got {self.epochs}")


def odpo_arm_id(sync_interval: int | None, beta: float, seed: int) -> str:
    return f"odpo-s{'inf' if sync_interval is None else sync_interval}-b{fmt(beta)}-s{seed}"


def odpo_config(c, sync_interval: int | None, beta: float, seed: int) -> OnlineDPOConfig:
    """The trainer config of one arm: the family's section, the shared values where it leaves a field null."""
    a, ppo = c.arms[FAMILY], c.rlhf.ppo
    key = f"arms.{FAMILY}"
    ppi = a.prompts_per_iteration
    if ppi is None:
        check(ppo.rollout_batch_size % a.k == 0, f"{key}.k", f"k={a.k} must divide rlhf.ppo.rollout_batch_size="
              f"{ppo.rollout_batch_size} (the same episodes per iteration as PPO), or set {key}.prompts_per_iteration")
        ppi = ppo.rollout_batch_size // a.k
    pick = lambda v, default: default if v is None else v  # noqa: E731
    lr_default = c.dpo.lr if c.dpo is not None else ppo.lr
    cfg = OnlineDPOConfig(
        beta=beta, loss_type=a.loss_type, k=a.k, sync_interval=sync_interval, labels=a.labels,
        bt_temperature=a.bt_temperature, prompts_per_iteration=ppi, iterations=pick(a.iterations, ppo.iterations),
        lr=pick(a.lr, lr_default), minibatch_size=pick(a.minibatch_size, max(1, ppo.minibatch_size // 2)),
        epochs=a.epochs, max_new_tokens=pick(a.max_new_tokens, ppo.max_new_tokens), temperature=ppo.temperature,
        reward_norm=pick(a.reward_norm, ppo.reward_norm), anneal_lr=ppo.anneal_lr, grad_clip=ppo.grad_clip,
        generation_batch_size=ppo.generation_batch_size, forward_batch_size=ppo.forward_batch_size, seed=seed)
    try:
        cfg.validate()
    except ValueError as e:  # name the suite's key: each listed error starts with the trainer's field name
        errors = str(e).split("\n  - ")[1:] or [str(e)]
        first = errors[0].split()[0]
        fields = {f.name for f in dataclasses.fields(OnlineDPOArmConfig)}
        where = (f"{key}.{first}" if first in fields else f"{key}.betas" if first == "beta"
                 else f"{key}.sync_intervals" if first == "sync_interval" else key)
        raise ConfigError(f"config key '{where}': " + "; ".join(errors)) from None
    return cfg


def _make_stage(sync_interval: int | None, beta: float, seed: int) -> Stage:
    arm = odpo_arm_id(sync_interval, beta, seed)

    def run(h: Harness, out: Path) -> dict:
        from methods.online_dpo import OnlineDPOTrainer

        cfg = odpo_config(h.cfg, sync_interval, beta, seed)
        policy, ref, tok, rm, reward_fn, rows, gold_fn = on_policy_setup(h, seed)
        tr = OnlineDPOTrainer(policy, ref, reward_fn, tok, [p["prompt_ids"] for p in rows], cfg, h.device,
                              autocast=h.autocast(), monitor=gold_fn, accelerator=h.accelerator)
        hist, policy, summary = run_on_policy_arm(h, arm, tr, policy, tok, out, bar_keys=("loss",))
        last = hist[-1] if hist else {}
        ntok = token_sums(hist, ("prompt", "generated", "sequence", "forward", "update"))
        n_pol, n_rm = models.n_params(policy), models.n_params(rm)
        # rollout forwards: pi_ref and the trained policy over every completion (plus the sampler's while it lags the
        # policy: tokens/forward counts them all), the reward model over every completion; no value model
        compute = compute_record(generated=[(n_pol, ntok["prompt"] + ntok["generated"])],
                                 forward=[(n_pol, ntok["forward"]), (n_rm, ntok["sequence"])],
                                 trained=[(n_pol, ntok["update"])], shared={RM_STAGE: stage_flops(h, RM_STAGE)})
        return {"arm": arm, "method": FAMILY, "loss_type": cfg.loss_type, "beta": beta, "kl_coef": None,
                "target_kl": None, "sync_interval": sync_interval, "labels": cfg.labels, "seed": seed, "k": cfg.k,
                **summary, "pairs_seen": last.get("examples_seen"), "params": n_pol, **compute,
                "final": {k: v for k, v in last.items() if k.startswith(("objective/", "rewards/", "sampler/")) or k == "loss"}}

    key = lambda c: {"odpo": asdict(odpo_config(c, sync_interval, beta, seed)), "dtype": c.dtype,  # noqa: E731
                     "target": c.task.target, "gold": c.task.gold} | lora_key(c)
    return Stage(f"arm/{arm}", ("sft", "prompts", RM_STAGE), key, run)


@register
class OnlineDPO(ArmFamily):
    """Online DPO (Guo et al. 2024; TRL's OnlineDPOTrainer) with our DPO loss: best vs worst of k RM-scored samples
    per prompt, a sampler refreshed every s iterations (s = 1 fully online; s = null: pi_ref's samples)."""

    name = FAMILY
    methods = (Method(FAMILY, "Online DPO", "#882255", "8", "on_policy_rl", order=56, curves="rl"),)
    config_cls = OnlineDPOArmConfig

    def plan(self, c) -> ArmPlan:
        p = ArmPlan()
        a = self.section(c, self.name)
        if a is None:
            return p
        check(c.rlhf is not None, f"arms.{self.name}", "needs the rlhf section (its reward model rlhf.rm and the PPO "
              "budget rlhf.ppo it shares)")
        for s in a.sync_intervals:
            for b in a.betas:
                odpo_config(c, s, b, c.seeds[0])  # every grid point's trainer config is valid, before any stage
        p.need(rm_stage())
        for seed in c.seeds:
            for s in a.sync_intervals:
                for b in a.betas:
                    p.add_arm(_make_stage(s, b, seed))
        return p
