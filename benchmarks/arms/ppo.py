"""PPO on the reward model (``methods/rlhf/ppo``): a grid over the KL coefficient or the controller's target KL,
"strong PPO" (Xu et al. 2024) and PPO on the gold reward (the oracle upper bound, the only arm that sees gold).

Typed hyper-parameter columns: ``kl_coef`` (the fixed or initial KL coefficient) and ``target_kl``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict
from pathlib import Path

import torch

from benchmarks import utils
from benchmarks.arms.common import compute_record, gold_monitor, run_on_policy_arm, stage_flops, token_sums
from benchmarks.arms.registry import ArmFamily, ArmPlan, Method, fmt, register
from benchmarks.arms.reward_model import (
    RM_SCALE_STAGE,
    RM_STAGE,
    rm_scale,
    rm_scale_stage,
    rm_stage,
    scaled_by_stage,
)
from benchmarks.harness import Harness, Stage
from benchmarks.stages import load_model, load_prompts, lora_key
from benchmarks.tasks import models
from methods import lora

KIND_METHOD = {"ppo": "ppo", "sppo": "strong_ppo", "ppogt": "ppo_gt"}


def ppo_arm_id(kind: str, kl_coef: float | None, target_kl: float | None, seed: int) -> str:
    hp = f"tkl{fmt(target_kl)}" if target_kl is not None else f"kl{fmt(kl_coef)}"
    return f"{kind}-{hp}-s{seed}"


def ppo_config(c, kind: str, kl_coef: float | None, target_kl: float | None, seed: int):
    base = c.rlhf.ppo
    kw = {"seed": seed}
    if kl_coef is not None:
        kw["init_kl_coef"] = kl_coef
    kw["target_kl"] = target_kl
    if kind == "sppo":  # Xu et al. 2024: large batch, advantage normalisation, EMA reference
        # the same episode budget as paper PPO (4x the batch, 1/4 of the iterations): identical budgets
        kw.update(rollout_batch_size=base.rollout_batch_size * 4, minibatch_size=base.minibatch_size * 4,
                  iterations=max(1, base.iterations // 4), whiten_advantages=True, ema_ref_decay=c.rlhf.strong_ema_decay)
    if kind == "ppogt" and base.reward_norm_stats == "given":
        kw["reward_norm_stats"] = "first"  # PPO-GT trains on gold: the RM's gain and bias do not apply to it
    return dataclasses.replace(base, **kw)


def _make_ppo_stage(kind: str, kl_coef: float | None, target_kl: float | None, seed: int, scaled: bool) -> Stage:
    arm = ppo_arm_id(kind, kl_coef, target_kl, seed)

    def run(h: Harness, out: Path) -> dict:
        from methods.rlhf.ppo import KLBlowupError, PPOTrainer
        from methods.rlhf.reward_model import load_reward_model, make_reward_fn, value_model_from_reward_model

        cfg = ppo_config(h.cfg, kind, kl_coef, target_kl, seed)
        utils.seed_everything(seed)
        policy, tok = load_model(h.path("sft"), h.device)
        ref, _ = load_model(h.path("sft"), h.device)
        rm = load_reward_model(h.path(RM_STAGE) / "rm").to(h.device).eval()
        rows = load_prompts(h, "train")
        gold_fn = gold_monitor(h, tok, rows)  # logged as objective/gold, never trained on
        if kind == "ppogt":  # the explicitly named upper-bound arm: PPO on the gold reward itself
            def reward_fn(prompt_ids, completion_ids):
                return torch.tensor(gold_fn(prompt_ids, completion_ids))
        else:
            reward_fn = make_reward_fn(rm, pad_id=tok.pad_token_id, autocast=h.autocast())
        scale = rm_scale(h) if scaled_by_stage(cfg) else None
        # the critic starts on the returns' scale: a copy of the RM normalised as the scores are (N-details)
        value = (value_model_from_reward_model(rm, **({"mean": scale[0], "std": scale[1]} if scale else {}))
                 if cfg.value_model == "separate" else None)
        policy = lora.add_adapters(policy, h.cfg.lora, seed=seed)  # same adapters as the DPO policy
        if value is not None:
            value.backbone = lora.add_adapters(value.backbone, h.cfg.lora, seed=seed)
        prompts = [p["prompt_ids"] for p in rows]
        tr = PPOTrainer(policy, ref, reward_fn, value, tok, prompts, cfg, h.device, autocast=h.autocast(),
                        accelerator=h.accelerator, reward_scale=scale, monitor=gold_fn)  # accelerator None = one process
        hist, policy, summary = run_on_policy_arm(h, arm, tr, policy, tok, out, stop_on=(KLBlowupError,))
        last = hist[-1] if hist else {}
        tok = token_sums(hist)
        n_pol, n_rm = models.n_params(policy), models.n_params(rm)
        n_val = models.n_params(value) if value is not None else 0
        # rollout forwards: old policy log-probs, reference, value (separate model), reward model (not for PPO-GT)
        fwd = [(n_pol, tok["sequence"]), (n_pol, tok["sequence"])] + ([(n_val, tok["sequence"])] if n_val else []) \
            + ([(n_rm, tok["sequence"])] if kind != "ppogt" else [])
        compute = compute_record(generated=[(n_pol, tok["prompt"] + tok["generated"])], forward=fwd,
                                 trained=[(n_pol + n_val, tok["update"])],
                                 shared={RM_STAGE: stage_flops(h, RM_STAGE)})  # PPO-GT's value model is the RM's too
        return {"arm": arm, "method": KIND_METHOD[kind], "loss_type": "", "kl_coef": cfg.init_kl_coef,
                "target_kl": target_kl, "seed": seed, **summary, "params": n_pol, **compute,
                "final": {k: v for k, v in last.items() if k.startswith(("objective/", "policy/", "val/"))}}

    key = lambda c: {"ppo": asdict(ppo_config(c, kind, kl_coef, target_kl, seed)), "kind": kind, "dtype": c.dtype,  # noqa: E731
                     "target": c.task.target, "gold": c.task.gold} | lora_key(c)
    deps = ("sft", "prompts", RM_STAGE) + ((RM_SCALE_STAGE,) if scaled else ())
    return Stage(f"arm/{arm}", deps, key, run, version=4)


@register
class PPO(ArmFamily):
    """PPO over ``rlhf.kl_coefs`` / ``rlhf.target_kls``; strong PPO and PPO-GT at the first grid point."""

    name = "ppo"
    methods = (Method("ppo", "PPO", "#d55e00", "^", "on_policy_rl", order=50, curves="rl"),
               Method("strong_ppo", "PPO (strong)", "#de8f05", "v", "on_policy_rl", order=60, curves="rl"),
               Method("ppo_gt", "PPO (gold reward)", "#029e73", "X", "oracle", order=70, curves="rl"))

    def plan(self, c) -> ArmPlan:
        p = ArmPlan()
        if c.rlhf is None:
            return p
        r = c.rlhf
        p.need(rm_stage())
        scaled = scaled_by_stage(r.ppo)
        if scaled:
            p.need(rm_scale_stage())
        grid = [(k, None) for k in r.kl_coefs] + [(None, t) for t in r.target_kls] or [(r.ppo.init_kl_coef, r.ppo.target_kl)]
        for seed in c.seeds:
            kinds = [("ppo", g) for g in grid] + ([("sppo", grid[0])] if r.strong_ppo else []) \
                + ([("ppogt", grid[0])] if r.ppo_gt else [])
            for kind, (kl, tkl) in kinds:
                p.add_arm(_make_ppo_stage(kind, kl, tkl, seed, scaled))
        return p
