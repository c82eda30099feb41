"""TRL 1.16's ``GRPOTrainer`` and ``RLOOTrainer`` as peers of our GRPO and RLOO (``methods/baselines/trl_group``):
the same SFT policy, prompts, reward model stage and budget, configured to match ours (beta > 0, the same k,
completions per step, lr, temperature, completion length), at the first beta of ``arms.<algorithm>`` and every
suite seed when its ``trl_peer`` is true: unlike the DPO peer (whose numbers equal ours, so one seed suffices), an RL
peer samples with its own random streams (``model.generate``), so only seed distributions can be compared. Rewards
are normalised as ours: with the ``arm/rm-scale`` stage's (mean, std) when ``rlhf.ppo.reward_norm_stats`` is
``given`` (``benchmarks.arms.reward_model.scaled_by_stage``), else with the first round's statistics. The stage key holds
TRL's objective flags (``methods.baselines.trl_group.objective_flags``), so a change of the mapping reruns the peer.
Arm ids ``trl-grpo-kl<beta>-s<seed>``, ``trl-rloo-...``."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from benchmarks import utils
from benchmarks.arms.common import compute_record, gold_monitor, stage_flops
from benchmarks.arms.group_rl import group_arm_id, group_config
from benchmarks.arms.registry import ArmFamily, ArmPlan, Method, register
from benchmarks.arms.reward_model import (
    RM_SCALE_STAGE,
    RM_STAGE,
    rm_scale,
    rm_scale_stage,
    rm_stage,
    scaled_by_stage,
)
from benchmarks.errors import check
from benchmarks.harness import Harness, Stage
from benchmarks.stages import load_model, load_prompts, lora_key
from benchmarks.tasks import models


def _make_stage(algorithm: str, beta: float, seed: int, scaled: bool) -> Stage:
    arm = "trl-" + group_arm_id(algorithm, beta, seed)

    def run(h: Harness, out: Path) -> dict:
        import shutil
        import warnings

        from methods.baselines.trl_group import retokenised_prompts, train_trl_group
        from methods.rlhf.reward_model import load_reward_model, make_reward_fn

        cfg = group_config(h.cfg, algorithm, beta, seed)
        utils.seed_everything(seed)
        policy, tok = load_model(h.path("sft"), h.device)
        rm = load_reward_model(h.path(RM_STAGE) / "rm").to(h.device).eval()
        rows = load_prompts(h, "train")

        gold_fn = gold_monitor(h, tok, rows)
        reward_fn = make_reward_fn(rm, pad_id=tok.pad_token_id, autocast=h.autocast())
        t = utils.Timer()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            hist = train_trl_group(policy, tok, rows, reward_fn, cfg, device=h.device, output_dir=str(out / "trl_tmp"),
                                   dtype=h.cfg.dtype, monitor=gold_fn, reward_scale=rm_scale(h) if scaled else None)
        train_s = t.elapsed
        shutil.rmtree(out / "trl_tmp", ignore_errors=True)
        policy.save_pretrained(out / "model")
        tok.save_pretrained(out / "model")
        utils.write_jsonl(out / "train_curve.jsonl", hist)
        utils.atomic_write_json(out / "train_config.json", asdict(cfg))
        # compute as ours: sampling, reference + reward-model forwards, the update (TRL's num_tokens: prompt + completion)
        seq = int(max((r.get("num_tokens", 0) for r in hist), default=0))
        n_pol, n_rm = models.n_params(policy), models.n_params(rm)
        episodes = cfg.iterations * cfg.prompts_per_iteration * cfg.k
        return {"arm": arm, "method": f"trl_{algorithm}", "loss_type": "", "kl_coef": beta, "target_kl": None,
                "seed": seed, "status": "ok", "k": cfg.k, "steps": len(hist), "time/train_s": train_s,
                # prompts whose text TRL re-tokenises into other ids than the RM scores (0: the same prompts as ours)
                "prompts_retokenised": retokenised_prompts(tok, rows),
                "episodes_seen": episodes, "tokens_seen": seq, "tokens_per_s": seq / max(train_s, 1e-9), "params": n_pol,
                **compute_record(generated=[(n_pol, seq)], forward=[(n_pol, seq), (n_rm, seq)],
                                 trained=[(n_pol, seq * cfg.epochs)], shared={RM_STAGE: stage_flops(h, RM_STAGE)}),
                "final": {k: v for k, v in (hist[-1] if hist else {}).items() if k in ("loss", "kl", "reward", "objective/gold")}}

    def key(c) -> dict:
        from methods.baselines.trl_group import objective_flags

        cfg = group_config(c, algorithm, beta, seed)
        return ({"group": asdict(cfg), "dtype": c.dtype, "peer": "trl", "trl_objective": objective_flags(cfg),
                 "target": c.task.target, "gold": c.task.gold} | lora_key(c)
                | ({"reward_scale": RM_SCALE_STAGE} if scaled else {}))

    deps = ("sft", "prompts", RM_STAGE) + ((RM_SCALE_STAGE,) if scaled else ())
    return Stage(f"arm/{arm}", deps, key, run)


class _TRLGroupFamily(ArmFamily):
    algorithm = ""

    def plan(self, c) -> ArmPlan:
        p = ArmPlan()
        a = self.section(c, self.algorithm)
        if a is None or not a.trl_peer:
            return p
        check(c.lora is None, f"arms.{self.algorithm}.trl_peer", "the TRL peer trains full weights: set it to false "
              "with LoRA adapters")
        p.need(rm_stage())
        # rewards on the RM's pi_ref scale (stage arm/rm-scale) whenever ours (and PPO's) are: as group_rl's plan
        scaled = bool(scaled_by_stage(c.rlhf.ppo) and group_config(c, self.algorithm, a.betas[0], c.seeds[0]).reward_norm)
        if scaled:
            p.need(rm_scale_stage())
        for seed in c.seeds:
            p.add_arm(_make_stage(self.algorithm, a.betas[0], seed, scaled))
        return p


@register
class TRLGRPO(_TRLGroupFamily):
    name = "trl_grpo"
    algorithm = "grpo"
    methods = (Method("trl_grpo", "TRL GRPO", "#d4c200", "H", "on_policy_rl", order=55, peer_of="grpo", curves="rl"),)


@register
class TRLRLOO(_TRLGroupFamily):
    name = "trl_rloo"
    algorithm = "rloo"
    methods = (Method("trl_rloo", "TRL RLOO", "#e78ac3", "P", "on_policy_rl", order=53, peer_of="rloo", curves="rl"),)
