"""Arms of the comparison as cached stages: every arm starts from pi_ref (the SFT stage) and trains on the
same pairs (the prefs stage); every arm is evaluated by the same ``eval/<arm>`` stage.

Runs are named ``method-hparams-seed`` (e.g. ``dpo-sigmoid-b0.1-s0``); seeds are a sweep axis.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from benchmarks import utils
from benchmarks.config import SuiteConfig
from benchmarks.harness import Harness, Stage
from benchmarks.stages import STAGES, load_model, load_pairs, load_prompts, lora_key
from methods import lora

# ------------------------------------------------------------------------------------------------ helpers


def split_pairs(rows: list[dict], heldout_fraction: float) -> tuple[list[dict], list[dict]]:
    """Hold out whole prompts (stable hash of the prompt id), so no held-out prompt is seen in training."""
    train, held = [], []
    for r in rows:
        (held if utils.text_hash("heldout/" + r["prompt_id"]) % 10_000 < heldout_fraction * 10_000 else train).append(r)
    return train, held


def _fmt(x: float) -> str:
    return f"{x:g}"


def dpo_arm_id(loss_type: str, beta: float, seed: int, peer: str = "dpo") -> str:
    return f"{peer}-{loss_type}-b{_fmt(beta)}-s{seed}"


def _dpo_train_config(c: SuiteConfig, loss_type: str, beta: float, seed: int):
    from methods.dpo.trainer import DPOConfig

    d = c.dpo
    return DPOConfig(beta=beta, loss_type=loss_type, label_smoothing=d.label_smoothing if loss_type in ("sigmoid", "robust") else 0.0,
                     lr=d.lr, optimizer=d.optimizer, batch_size=d.batch_size, micro_batch_size=d.micro_batch_size,
                     epochs=d.epochs, warmup_steps=d.warmup_steps, scheduler=d.scheduler, max_length=d.max_length,
                     layout=d.layout, pack_len=max(1024, 2 * d.max_length), seed=seed, log_every=1)


def _pairs_for_training(h: Harness):
    rows = [dict(r) for r in load_pairs(h)]
    return split_pairs(rows, h.cfg.dpo.heldout_pairs_fraction)


# ------------------------------------------------------------------------------------------------ DPO (ours)
def _make_dpo_stage(loss_type: str, beta: float, seed: int) -> Stage:
    def run(h: Harness, out: Path) -> dict:
        from methods.dpo.trainer import (
            DPOTrainer,
            cached_reference_logps,
            compute_reference_logps,
            tokenize_pairs,
        )

        cfg = _dpo_train_config(h.cfg, loss_type, beta, seed)
        utils.seed_everything(seed)
        policy, tok = load_model(h.path("sft"), h.device)
        train_rows, held_rows = _pairs_for_training(h)
        ex, n_cut = tokenize_pairs(tok, train_rows, max_length=cfg.max_length, truncation_mode=cfg.truncation_mode)
        held = tokenize_pairs(tok, held_rows, max_length=cfg.max_length, truncation_mode=cfg.truncation_mode)[0] if held_rows else []
        # reference log-probs: computed once per (reference, pairs, truncation, layout), shared by the whole sweep
        ref_key = utils.stable_hash({"sft": h.stage_hash("sft"), "prefs": h.stage_hash("prefs"), "max_length": cfg.max_length,
                                     "truncation": cfg.truncation_mode, "layout": cfg.layout,
                                     "heldout": h.cfg.dpo.heldout_pairs_fraction, "dtype": h.cfg.dtype})
        t = utils.Timer()
        ref_all, hit = cached_reference_logps(
            h.cache_dir / "reflogps" / f"{ref_key}.pt",
            lambda: compute_reference_logps(policy, ex + held, pad_id=tok.pad_token_id, autocast=h.autocast(), layout=cfg.layout))
        ref_s = t.elapsed
        ref_train = {k: v[: len(ex)] for k, v in ref_all.items()}
        ref_held = {k: v[len(ex):] for k, v in ref_all.items()}
        policy = lora.add_adapters(policy, h.cfg.lora, seed=seed)  # after pi_ref's log-probs: adapters train
        tr = DPOTrainer(policy, ex, ref_train, cfg, pad_id=tok.pad_token_id, autocast=h.autocast(),
                        accelerator=h.accelerator)  # None = single process; else data parallel over the ranks
        nan = {"eval/rewards/accuracies": float("nan"), "eval/rewards/margins": float("nan")}
        before = tr.evaluate(held, ref_held) if held else nan
        t = utils.Timer()
        hist = tr.train(checkpoint_path=h.checkpoint_path(f"arm/{dpo_arm_id(loss_type, beta, seed)}"), checkpoint_every=h.cfg.checkpoint_every_steps)
        train_s = t.elapsed
        after = tr.evaluate(held, ref_held) if held else nan
        if h.cfg.lora is not None:  # adapters merged: a plain model folder like every other arm's
            policy = lora.merged(policy)
            policy.save_pretrained(out / "model")
        elif h.dist.distributed:  # the full weights (gathered under FSDP/ZeRO-3: every rank takes part)
            policy.save_pretrained(out / "model", state_dict=tr.model_state_dict())
            h.accelerator.free_memory()  # drop the accelerator's references to this arm's model/optimiser
        else:
            policy.save_pretrained(out / "model")
        tok.save_pretrained(out / "model")
        utils.write_jsonl(out / "train_curve.jsonl", hist)
        utils.atomic_write_json(out / "train_config.json", asdict(cfg))
        return {"arm": dpo_arm_id(loss_type, beta, seed), "method": "dpo", "loss_type": loss_type, "beta": beta,
                "seed": seed, "train_pairs": len(ex), "heldout_pairs": len(held), "truncated_pairs": n_cut,
                "steps": tr.step, "heldout_acc_before": before["eval/rewards/accuracies"],
                "heldout_acc_after": after["eval/rewards/accuracies"], "heldout_margin_after": after["eval/rewards/margins"],
                "ref_logps_cached": hit, "time/reference_s": ref_s, "time/train_s": train_s,
                "tokens_per_s": hist[-1]["tokens_per_s"], "tokens_seen": hist[-1]["tokens_seen"],
                "final": {k: v for k, v in hist[-1].items() if "/" in k or k == "loss"}}

    key = lambda c: {"dpo": asdict(c.dpo), "loss_type": loss_type, "beta": beta, "seed": seed, "dtype": c.dtype} | lora_key(c)  # noqa: E731
    return Stage(f"arm/{dpo_arm_id(loss_type, beta, seed)}", ("sft", "prefs"), key, run, version=2)


def _make_trl_stage(loss_type: str, beta: float, seed: int) -> Stage:
    def run(h: Harness, out: Path) -> dict:
        import warnings

        from methods.baselines.trl_dpo import train_trl_dpo
        from methods.dpo.trainer import example_order, total_steps_for

        cfg = _dpo_train_config(h.cfg, loss_type, beta, seed)
        utils.seed_everything(seed)
        policy, tok = load_model(h.path("sft"), h.device)
        ref, _ = load_model(h.path("sft"), h.device)
        train_rows, _ = _pairs_for_training(h)
        steps = total_steps_for(len(train_rows), cfg)
        # TRL gets exactly our batches: our seeded per-epoch order, laid out as one sequential pass
        seq_rows = [train_rows[i] for i in example_order(len(train_rows), cfg, steps)]
        cfg.shuffle = False
        t = utils.Timer()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            hist, _ = train_trl_dpo(policy, ref, tok, seq_rows, cfg, device=h.device, total_steps=steps,
                                    dtype=h.cfg.dtype, output_dir=str(out / "trl_tmp"), disable_tqdm=True)
        train_s = t.elapsed
        import shutil

        shutil.rmtree(out / "trl_tmp", ignore_errors=True)
        policy.save_pretrained(out / "model")
        tok.save_pretrained(out / "model")
        utils.write_jsonl(out / "train_curve.jsonl", hist)
        return {"arm": dpo_arm_id(loss_type, beta, seed, "trl"), "method": "trl_dpo", "loss_type": loss_type, "beta": beta,
                "seed": seed, "steps": steps, "time/train_s": train_s,
                "final": {k: v for k, v in hist[-1].items() if "/" in k or k == "loss"} if hist else {}}

    key = lambda c: {"dpo": asdict(c.dpo), "loss_type": loss_type, "beta": beta, "seed": seed, "dtype": c.dtype, "peer": "trl"}  # noqa: E731
    return Stage(f"arm/{dpo_arm_id(loss_type, beta, seed, 'trl')}", ("sft", "prefs"), key, run, version=2)


# ------------------------------------------------------------------------------------------------ evaluation
def _make_eval_stage(arm: str) -> Stage:
    """Samples of arm (or 'sft', the reference itself) on the held-out prompts, scored by gold reward and KL."""
    src = "sft" if arm == "sft" else f"arm/{arm}"

    def run(h: Harness, out: Path) -> dict:
        import pandas as pd

        from benchmarks.evaluators.samples import generate_eval_samples

        e = h.cfg.eval
        model, tok = load_model(h.path(src), h.device)
        ref, _ = load_model(h.path("sft"), h.device)
        prompts = load_prompts(h, "eval")
        utils.reset_peak_rss()
        rows, timing = generate_eval_samples(model, ref, tok, prompts, temperatures=e.temperatures, n=e.samples_per_prompt,
                                             max_new_tokens=e.max_new_tokens, seed=e.seed, target=h.cfg.task.target, gold=h.cfg.task.gold,
                                             autocast=h.autocast())
        df = pd.DataFrame(rows)
        df.insert(0, "arm", arm)
        df.to_parquet(out / "samples.parquet", index=False)
        by_t = {}
        for temp, g in df.groupby("temperature"):
            by_t[_fmt(temp)] = {"gold_mean": float(g.gold.mean()), "gold_sd": float(g.gold.std(ddof=0)),
                                "seq_kl_mean": float(g.seq_kl.mean()), "length_mean": float(g.length.mean())}
        return {"arm": arm, "samples": len(df), "by_temperature": by_t, **timing}

    key = lambda c: {"eval": asdict(c.eval), "target": c.task.target, "gold": c.task.gold, "dtype": c.dtype}  # noqa: E731
    deps = (src, "sft", "prompts") if src != "sft" else ("sft", "prompts")
    return Stage(f"eval/{arm}", deps, key, run)


def _evalref(h: Harness, out: Path) -> dict:
    """The 'chosen' response of every eval prompt: the best of K reference samples by gold reward (the
    preferred response of a held-out pair), for win rate vs chosen; for 'dialogue', the dataset's chosen response."""
    import pandas as pd

    from benchmarks.stages import sample_texts
    from benchmarks.tasks.sentiment import gold_reward

    if h.cfg.task.name == "dialogue":  # the dataset's own chosen response of each eval prompt, scored by the judge
        from benchmarks.stages import dialogue_evalref

        return dialogue_evalref(h, out)
    k = h.cfg.prefs.samples_per_prompt
    model, tok = load_model(h.path("sft"), h.device)
    prompts = load_prompts(h, "eval")
    texts, _ = sample_texts(h, model, tok, prompts, n=k, temperature=h.cfg.prefs.temperature,
                            max_new_tokens=h.cfg.eval.max_new_tokens, seed=h.cfg.seed + 99)
    rows = []
    for p, comps in zip(prompts, texts, strict=True):
        g = gold_reward(comps, h.cfg.task.target, h.cfg.task.gold, prompts=[p["prompt"]] * k)
        best = max(range(k), key=lambda i: g[i])
        rows.append({"prompt_id": p["prompt_id"], "chosen": comps[best], "chosen_gold": g[best]})
    df = pd.DataFrame(rows)
    df.to_parquet(out / "chosen.parquet", index=False)
    return {"prompts": len(df), "chosen_gold_mean": float(df.chosen_gold.mean())}


# ------------------------------------------------------------------------------------------------ registry
def arm_ids(c: SuiteConfig) -> list[str]:
    ids = []
    if c.dpo is not None:
        for seed in c.seeds:
            for beta in c.dpo.betas:
                ids.append(dpo_arm_id(c.dpo.loss_type, beta, seed))
            for lt in c.dpo.variants:
                ids.append(dpo_arm_id(lt, c.dpo.betas[0], seed))
            if c.dpo.trl_peer and seed == c.seeds[0]:  # the peer checks parity and speed: one seed is enough
                ids.append(dpo_arm_id(c.dpo.loss_type, c.dpo.betas[0], seed, "trl"))
    return ids


def build_stages(c: SuiteConfig) -> tuple[dict[str, Stage], list[str]]:
    """All stages of a suite (the foundation plus one train + one eval stage per arm) and the default targets."""
    stages = dict(STAGES)
    stages["evalref"] = Stage("evalref", ("sft", "prompts"), lambda c: {"k": c.prefs.samples_per_prompt,
                              "T": c.prefs.temperature, "max_new_tokens": c.eval.max_new_tokens, "target": c.task.target, "gold": c.task.gold,
                              "seed": c.seed, "dtype": c.dtype}, _evalref)
    arms = ["sft"]
    if c.dpo is not None:
        for seed in c.seeds:
            for beta in c.dpo.betas:
                st = _make_dpo_stage(c.dpo.loss_type, beta, seed)
                stages[st.name] = st
            for lt in c.dpo.variants:
                st = _make_dpo_stage(lt, c.dpo.betas[0], seed)
                stages[st.name] = st
            if c.dpo.trl_peer and seed == c.seeds[0]:
                st = _make_trl_stage(c.dpo.loss_type, c.dpo.betas[0], seed)
                stages[st.name] = st
    arms += arm_ids(c)
    from benchmarks.rlhf_arms import rlhf_stages

    r_stages, r_trained, r_eval_only = rlhf_stages(c)
    stages.update(r_stages)
    arms += r_trained
    for a in arms:
        st = _make_eval_stage(a)
        stages[st.name] = st
    extra = ["arm/rm"] if "arm/rm" in r_stages else []
    targets = (["data", "base", "sft", "prompts", "prefs"] + extra + [f"arm/{a}" for a in arms if a != "sft"]
               + ["evalref"] + [f"eval/{a}" for a in arms + r_eval_only])
    return stages, targets


__all__ = ["arm_ids", "build_stages", "split_pairs"]
