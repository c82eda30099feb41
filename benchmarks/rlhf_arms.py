"""RLHF arms as cached stages: the reward model, PPO (a grid), strong PPO, PPO-GT, best-of-N, Preferred-FT.

PPO never sees the gold reward except in the arm explicitly named ``ppogt`` (the paper's upper bound).
The reward model's held-out accuracy and its correlation with gold are reported next to every PPO result:
the RM is the main confound between the two families.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict
from pathlib import Path

import torch

from benchmarks import utils
from benchmarks.arms import _fmt, split_pairs
from benchmarks.config import SuiteConfig
from benchmarks.harness import Harness, Stage
from benchmarks.stages import load_model, load_pairs, load_prompts, lora_key, sample_texts
from methods import lora


def _pairs(h: Harness) -> tuple[list[dict], list[dict]]:
    frac = h.cfg.dpo.heldout_pairs_fraction if h.cfg.dpo is not None else 0.1
    return split_pairs([dict(r) for r in load_pairs(h)], frac)


# ------------------------------------------------------------------------------------------------ reward model
def _rm(h: Harness, out: Path) -> dict:
    from benchmarks.tasks.sentiment import gold_reward
    from methods.rlhf.reward_model import ScalarRewardModel, gold_correlation, train_reward_model

    cfg = h.cfg.rlhf.rm
    sft_dir = h.path("sft")
    _, tok = load_model(sft_dir, "cpu")
    rm = ScalarRewardModel.from_causal_lm(str(sft_dir / "model"), pooling=cfg.pooling, init_seed=cfg.seed).to(h.device)
    rm.backbone = lora.add_adapters(rm.backbone, h.cfg.lora, seed=cfg.seed)  # the head always trains in full
    train, held = _pairs(h)
    t = utils.Timer()
    hist, metrics = train_reward_model(rm, tok, train, held or None, cfg, h.device, autocast=h.autocast())
    if not held:
        h.log("[arm/rm] warning: no held-out pairs, the RM's accuracy is unknown (raise task.n_train_prompts)")
    train_s = t.elapsed
    # correlation with gold on fresh pi_ref samples of held-out prompts (not the pairs it was trained on)
    policy, _ = load_model(sft_dir, h.device)
    prompts = load_prompts(h, "eval")
    texts, _ = sample_texts(h, policy, tok, prompts, n=2, temperature=1.0, max_new_tokens=h.cfg.eval.max_new_tokens,
                            seed=h.cfg.seed + 31)
    ps = [p["prompt"] for p in prompts for _ in range(2)]
    cs = [c for pair in texts for c in pair]
    scores = rm.score(ps, cs, tokenizer=tok, autocast=h.autocast()).tolist()
    corr = gold_correlation(scores, gold_reward(cs, h.cfg.task.target, h.cfg.task.gold, prompts=ps))
    rm.backbone = lora.merged(rm.backbone)
    rm.save_pretrained(out / "rm", tokenizer=tok)
    utils.write_jsonl(out / "train_curve.jsonl", hist)
    return {"rm_accuracy": metrics.get("eval/accuracy", float("nan")), "rm_gold_pearson": corr["pearson"], "rm_gold_spearman": corr["spearman"],
            "train_pairs": len(train), "heldout_pairs": len(held), "time/train_s": train_s,
            "rm_score_mean": float(sum(scores) / len(scores)), **{k: v for k, v in metrics.items() if k.startswith("eval/")}}


# ------------------------------------------------------------------------------------------------ PPO
def ppo_arm_id(kind: str, c: SuiteConfig, kl_coef: float | None, target_kl: float | None, seed: int) -> str:
    hp = f"tkl{_fmt(target_kl)}" if target_kl is not None else f"kl{_fmt(kl_coef)}"
    return f"{kind}-{hp}-s{seed}"


def _ppo_config(c: SuiteConfig, kind: str, kl_coef: float | None, target_kl: float | None, seed: int):
    base = c.rlhf.ppo
    kw = {"seed": seed}
    if kl_coef is not None:
        kw["init_kl_coef"] = kl_coef
    kw["target_kl"] = target_kl
    if kind == "sppo":  # Xu et al. 2024: large batch, advantage normalisation, EMA reference
        # the same episode budget as paper PPO (4x the batch, 1/4 of the iterations): identical budgets
        kw.update(rollout_batch_size=base.rollout_batch_size * 4, minibatch_size=base.minibatch_size * 4,
                  iterations=max(1, base.iterations // 4), whiten_advantages=True, ema_ref_decay=c.rlhf.strong_ema_decay)
    return dataclasses.replace(base, **kw)


def _make_ppo_stage(kind: str, kl_coef: float | None, target_kl: float | None, seed: int) -> Stage:
    def run(h: Harness, out: Path) -> dict:
        from benchmarks.tasks.sentiment import gold_reward
        from methods.rlhf.ppo import KLBlowupError, PPOTrainer
        from methods.rlhf.reward_model import load_reward_model, make_reward_fn, value_model_from_reward_model

        cfg = _ppo_config(h.cfg, kind, kl_coef, target_kl, seed)
        utils.seed_everything(seed)
        policy, tok = load_model(h.path("sft"), h.device)
        ref, _ = load_model(h.path("sft"), h.device)
        rm = load_reward_model(h.path("arm/rm") / "rm").to(h.device).eval()
        prompt_text = {tuple(p["prompt_ids"]): p["prompt"] for p in load_prompts(h, "train")}

        def prompts_of(prompt_ids):  # the judge of the dialogue task scores (prompt, response)
            return [prompt_text.get(tuple(x)) or tok.decode(x, skip_special_tokens=True) for x in prompt_ids]

        if kind == "ppogt":  # the explicitly named upper-bound arm: PPO on the gold reward itself
            def reward_fn(prompt_ids, completion_ids):
                texts = tok.batch_decode(completion_ids, skip_special_tokens=True)
                return torch.tensor(gold_reward(texts, h.cfg.task.target, h.cfg.task.gold, prompts=prompts_of(prompt_ids)))
        else:
            reward_fn = make_reward_fn(rm, pad_id=tok.pad_token_id, autocast=h.autocast())
        gold_log: list[float] = []
        rm_fn = reward_fn

        def reward_fn(prompt_ids, completion_ids):  # noqa: F811 - monitor only: gold is logged, never returned
            scores = rm_fn(prompt_ids, completion_ids)
            texts = tok.batch_decode(completion_ids, skip_special_tokens=True)
            gold = gold_reward(texts, h.cfg.task.target, h.cfg.task.gold, prompts=prompts_of(prompt_ids))
            gold_log.append(float(sum(gold) / max(1, len(texts))))  # this rank's rollouts (all of them in one process)
            return scores
        value = value_model_from_reward_model(rm) if cfg.value_model == "separate" else None
        policy = lora.add_adapters(policy, h.cfg.lora, seed=seed)  # same adapters as the DPO policy
        if value is not None:
            value.backbone = lora.add_adapters(value.backbone, h.cfg.lora, seed=seed)
        prompts = [p["prompt_ids"] for p in load_prompts(h, "train")]
        tr = PPOTrainer(policy, ref, reward_fn, value, tok, prompts, cfg, h.device, autocast=h.autocast(),
                        accelerator=h.accelerator)  # None = one process; else rollouts sharded over the ranks
        t = utils.Timer()
        status = "ok"
        try:
            hist = tr.train(on_log=lambda rec: rec.__setitem__("objective/gold", gold_log[-1]), checkpoint_path=h.checkpoint_path(f"arm/{ppo_arm_id(kind, None, kl_coef, target_kl, seed)}"),
                            checkpoint_every=h.cfg.checkpoint_every_iterations)
        except KLBlowupError as e:
            hist, status = tr.history, f"stopped: {e}"
        train_s = t.elapsed
        policy = lora.merged(policy)
        policy.save_pretrained(out / "model")
        tok.save_pretrained(out / "model")
        utils.write_jsonl(out / "train_curve.jsonl", hist)
        utils.atomic_write_json(out / "train_config.json", asdict(cfg))
        phases = {k: sum(r.get(k, 0.0) for r in hist) for k in ("time/generation", "time/reward", "time/ref_value_forward", "time/update")}
        rm_sum = h.results["arm/rm"].summary
        last = hist[-1] if hist else {}
        return {"arm": ppo_arm_id(kind, h.cfg, kl_coef, target_kl, seed), "method": {"ppo": "ppo", "sppo": "strong_ppo", "ppogt": "ppo_gt"}[kind],
                "loss_type": "", "beta": cfg.init_kl_coef, "target_kl": target_kl, "seed": seed, "status": status,
                "iterations": len(hist), "time/train_s": train_s, **{k + "_s": v for k, v in phases.items()},
                "tokens_seen": last.get("tokens_seen"), "episodes_seen": last.get("episodes_seen"),
                "tokens_per_s": (last.get("tokens_seen") or 0) / max(train_s, 1e-9),
                "rm_accuracy": rm_sum["rm_accuracy"], "rm_gold_pearson": rm_sum["rm_gold_pearson"],
                "final": {k: v for k, v in last.items() if k.startswith(("objective/", "policy/", "val/"))}}

    key = lambda c: {"ppo": asdict(_ppo_config(c, kind, kl_coef, target_kl, seed)), "kind": kind, "dtype": c.dtype,  # noqa: E731
                     "target": c.task.target, "gold": c.task.gold} | lora_key(c)
    return Stage(f"arm/{ppo_arm_id(kind, None, kl_coef, target_kl, seed)}", ("sft", "prompts", "arm/rm"), key, run, version=2)


# ------------------------------------------------------------------------------------------------ Preferred-FT
def _make_pft_stage(seed: int) -> Stage:
    def run(h: Harness, out: Path) -> dict:
        import random

        from methods.data import collate, tokenize_prompt_completions
        from methods.sft import train_lm

        d = h.cfg.dpo
        policy, tok = load_model(h.path("sft"), h.device)
        train, _ = _pairs(h)
        data = []
        for r in train:
            p, (c,) = tokenize_prompt_completions(tok, r["prompt"], [r["chosen"]])
            data.append((p, c))
        bs = d.batch_size if d is not None else 32
        lr = d.lr if d is not None else 1e-4

        def batches():
            rng = random.Random(seed)
            while True:
                rng.shuffle(data)
                for i in range(0, len(data) - bs + 1, bs):
                    b = collate([x[0] for x in data[i : i + bs]], [x[1] for x in data[i : i + bs]], tok.pad_token_id)
                    yield b["input_ids"], b["attention_mask"], b["labels"]

        utils.seed_everything(seed)
        t = utils.Timer()
        policy = lora.add_adapters(policy, h.cfg.lora, seed=seed)
        hist = train_lm(policy, batches(), steps=h.cfg.rlhf.preferred_ft_steps, lr=lr, warmup_steps=5, weight_decay=0.0,
                        grad_clip=1.0, device=h.device, autocast=h.autocast(), desc="preferred-ft")
        policy = lora.merged(policy)
        policy.save_pretrained(out / "model")
        tok.save_pretrained(out / "model")
        utils.write_jsonl(out / "train_curve.jsonl", hist)
        return {"arm": f"pft-s{seed}", "method": "preferred_ft", "loss_type": "", "seed": seed, "time/train_s": t.elapsed,
                "tokens_per_s": hist[-1]["tokens_per_s"], "final_loss": hist[-1]["loss"]}

    key = lambda c: {"steps": c.rlhf.preferred_ft_steps, "dpo": asdict(c.dpo) if c.dpo else None, "seed": seed, "dtype": c.dtype} | lora_key(c)  # noqa: E731
    return Stage(f"arm/pft-s{seed}", ("sft", "prefs"), key, run)


# ------------------------------------------------------------------------------------------------ best-of-N
def _make_bon_eval_stage(n: int) -> Stage:
    """Best-of-N is a sampling procedure, not a trained policy: its eval samples N from pi_ref per prompt and
    keeps the RM's favourite; its KL is the analytic log N - (N-1)/N (no sample estimate exists)."""
    arm = f"bon-n{n}"

    def run(h: Harness, out: Path) -> dict:
        import pandas as pd

        from benchmarks.tasks.sentiment import gold_reward
        from methods.baselines.best_of_n import best_of_n, best_of_n_kl
        from methods.rlhf.reward_model import load_reward_model, make_reward_fn

        e = h.cfg.eval
        model, tok = load_model(h.path("sft"), h.device)
        rm = load_reward_model(h.path("arm/rm") / "rm").to(h.device).eval()
        reward_fn = make_reward_fn(rm, pad_id=tok.pad_token_id, autocast=h.autocast())
        prompts = load_prompts(h, "eval")
        rows, gen_s = [], 0.0
        for temp in e.temperatures:
            t = utils.Timer()
            res = best_of_n(model, tok, [p["prompt_ids"] for p in prompts], n, reward_fn, e.max_new_tokens,
                            max(temp, 1e-6) if n > 1 else temp, e.seed + int(temp * 1000), autocast=h.autocast(),
                            return_details=True)
            gen_s += t.elapsed
            texts = tok.batch_decode(res.completions, skip_special_tokens=True)
            gold = gold_reward(texts, h.cfg.task.target, h.cfg.task.gold, prompts=[p["prompt"] for p in prompts])
            for p, text, g, c in zip(prompts, texts, gold, res.completions, strict=True):
                rows.append({"prompt_id": p["prompt_id"], "prompt": p["prompt"], "temperature": temp, "sample_index": 0,
                             "completion": text, "gold": g, "policy_logp": float("nan"), "ref_logp": float("nan"),
                             "seq_kl": best_of_n_kl(n), "length": len(c), "ended": None})
        df = pd.DataFrame(rows)
        df.insert(0, "arm", arm)
        df.to_parquet(out / "samples.parquet", index=False)
        return {"arm": arm, "method": "best_of_n", "beta": float(n), "n": n, "samples": len(df), "generation_s": gen_s,
                "new_tokens": res.tokens_generated * len(e.temperatures), "kl_analytic": best_of_n_kl(n)}

    key = lambda c: {"eval": asdict(c.eval), "n": n, "target": c.task.target, "gold": c.task.gold, "dtype": c.dtype}  # noqa: E731
    return Stage(f"eval/{arm}", ("sft", "prompts", "arm/rm"), key, run)


# ------------------------------------------------------------------------------------------------ registry
def rlhf_stages(c: SuiteConfig) -> tuple[dict[str, Stage], list[str], list[str]]:
    """(stages, trained arm ids, eval-only arm ids) of the RLHF section."""
    if c.rlhf is None:
        return {}, [], []
    r = c.rlhf
    stages = {"arm/rm": Stage("arm/rm", ("sft", "prefs", "prompts"), lambda c: {"rm": asdict(c.rlhf.rm), "dtype": c.dtype,
                          "heldout": c.dpo.heldout_pairs_fraction if c.dpo else 0.1, "eval_max_new": c.eval.max_new_tokens,
                          "gold": c.task.gold} | lora_key(c), _rm)}
    trained: list[str] = []
    grid = [(k, None) for k in r.kl_coefs] + [(None, t) for t in r.target_kls]
    if not grid:
        grid = [(r.ppo.init_kl_coef, r.ppo.target_kl)]
    for seed in c.seeds:
        kinds = [("ppo", g) for g in grid]
        if r.strong_ppo:
            kinds.append(("sppo", grid[0]))
        if r.ppo_gt:
            kinds.append(("ppogt", grid[0]))
        for kind, (kl, tkl) in kinds:
            st = _make_ppo_stage(kind, kl, tkl, seed)
            stages[st.name] = st
            trained.append(st.name[4:])
        if r.preferred_ft:
            st = _make_pft_stage(seed)
            stages[st.name] = st
            trained.append(st.name[4:])
    eval_only = []
    for n in r.best_of_n:
        st = _make_bon_eval_stage(n)
        stages[st.name] = st
        eval_only.append(f"bon-n{n}")
    return stages, trained, eval_only
