"""The reward model (``methods/rlhf/reward_model``): Bradley-Terry on the same pairs DPO trains on, initialised
from pi_ref. Not an arm of its own: a stage the RM-based families (PPO, best-of-N) depend on. Its held-out
accuracy and gold correlation sit beside every PPO row: the RM is the main confound between the families."""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path

from benchmarks import progress, utils
from benchmarks.arms.common import compute_record, heldout_fraction, train_and_heldout_pairs
from benchmarks.harness import Harness, Stage
from benchmarks.stages import load_model, load_prompts, lora_key, sample_texts
from benchmarks.tasks import models
from methods import lora

RM_STAGE = "arm/rm"
RM_SCALE_STAGE = "arm/rm-scale"


def _rm(h: Harness, out: Path) -> dict:
    from benchmarks.tasks.registry import task_gold
    from methods.rlhf.reward_model import ScalarRewardModel, gold_correlation, train_reward_model

    cfg = h.cfg.rlhf.rm
    sft_dir = h.path("sft")
    _, tok = load_model(sft_dir, "cpu")
    rm = ScalarRewardModel.from_causal_lm(str(sft_dir / "model"), pooling=cfg.pooling, init_seed=cfg.seed).to(h.device)
    rm.backbone = lora.add_adapters(rm.backbone, h.cfg.lora, seed=cfg.seed)  # the head always trains in full
    train, held = train_and_heldout_pairs(h)
    t = utils.Timer()
    with progress.bar(None, RM_STAGE) as b:
        hist, metrics = train_reward_model(rm, tok, train, held or None, cfg, h.device, autocast=h.autocast(),
                                           on_log=lambda r: b.to(r.get("step", 0), loss=r.get("loss"), acc=r.get("accuracy")))
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
    corr = gold_correlation(scores, task_gold(h.cfg.task, cs, ps))
    rm.backbone = lora.merged(rm.backbone)
    rm.save_pretrained(out / "rm", tokenizer=tok)
    utils.write_jsonl(out / "train_curve.jsonl", hist)
    n_rm = models.n_params(rm)
    trained = max((r["tokens_seen"] for r in hist if "tokens_seen" in r), default=0)  # eval records carry none
    return {**compute_record(trained=[(n_rm, trained)]), "params": n_rm,
            "rm_accuracy": metrics.get("eval/accuracy", float("nan")), "rm_gold_pearson": corr["pearson"], "rm_gold_spearman": corr["spearman"],
            "train_pairs": len(train), "heldout_pairs": len(held), "time/train_s": train_s,
            "rm_score_mean": float(sum(scores) / len(scores)), **{k: v for k, v in metrics.items() if k.startswith("eval/")}}


def rm_stage() -> Stage:
    return Stage(RM_STAGE, ("sft", "prefs", "prompts"), lambda c: {
        "rm": asdict(c.rlhf.rm), "dtype": c.dtype, "heldout": heldout_fraction(c), "eval_max_new": c.eval.max_new_tokens,
        "gold": c.task.gold} | lora_key(c), _rm, version=2)


def _rm_scale(h: Harness, out: Path) -> dict:
    """The RM's gain and bias under pi_ref ([N-details] reward normalisation): pi_ref's completions of
    ``rlhf.rm_scale_samples`` training prompts, sampled as the on-policy rollouts are (shared sampler, the PPO
    config's temperature and max_new_tokens, EOS appended where the sample stopped) and scored through the same
    ``reward_fn`` the rollouts are scored with. Every on-policy arm that normalises rewards divides by these."""
    import numpy as np
    import torch

    from methods.rlhf.reward_model import load_reward_model, make_reward_fn
    from methods.sampling import derive_seed, sample

    r, ppo = h.cfg.rlhf, h.cfg.rlhf.ppo
    ref, tok = load_model(h.path("sft"), h.device)
    rm = load_reward_model(h.path(RM_STAGE) / "rm").to(h.device).eval()
    rows = load_prompts(h, "train")
    idx = np.random.default_rng(derive_seed(h.cfg.seed, 17)).permutation(len(rows))[: r.rm_scale_samples]
    prompts = [rows[int(i)]["prompt_ids"] for i in idx]
    with torch.inference_mode():
        s = sample(ref, prompts, max_new_tokens=ppo.max_new_tokens, temperature=ppo.temperature,
                   seeds=[derive_seed(h.cfg.seed, 18, int(i)) for i in idx], eos_token_id=tok.eos_token_id,
                   pad_token_id=tok.pad_token_id, autocast=h.autocast())
    comps = [c + [tok.eos_token_id] if e else list(c) for c, e in zip(s.completions, s.ended, strict=True)]
    scores = make_reward_fn(rm, pad_id=tok.pad_token_id, autocast=h.autocast())(prompts, comps).double()
    mean, std = float(scores.mean()), float(scores.std())
    if not (math.isfinite(mean) and std > 1e-6):
        raise ValueError(f"{RM_SCALE_STAGE}: the RM scores pi_ref's {len(comps)} samples with mean {mean} and std {std}; "
                         "a reward model that does not separate pi_ref's samples cannot be normalised (retrain it)")
    return {"rm_scale_mean": mean, "rm_scale_std": std, "samples": len(comps),
            "length_mean": float(np.mean([len(c) for c in comps])), "eos_frac": float(np.mean(s.ended))}


def rm_scale_stage() -> Stage:
    return Stage(RM_SCALE_STAGE, ("sft", "prompts", RM_STAGE), lambda c: {
        "n": c.rlhf.rm_scale_samples, "T": c.rlhf.ppo.temperature, "max_new_tokens": c.rlhf.ppo.max_new_tokens,
        "seed": c.seed, "dtype": c.dtype}, _rm_scale)


def rm_scale(h: Harness) -> tuple[float, float]:
    """(mean, std) of the RM on pi_ref's samples (stage ``arm/rm-scale``)."""
    s = h.results[RM_SCALE_STAGE].summary
    return float(s["rm_scale_mean"]), float(s["rm_scale_std"])


def scaled_by_stage(ppo_cfg) -> bool:
    """Whether on-policy arms normalise rewards with the ``arm/rm-scale`` stage's gain and bias (the suite's
    ``rlhf.ppo`` has ``reward_norm`` with ``reward_norm_stats: given``): one scale for every RL family."""
    return bool(ppo_cfg.reward_norm and ppo_cfg.reward_norm_stats == "given")
