"""What every arm family shares: the held-out split of the pairs, the evaluation stage of an arm and the
reference's "chosen" responses for win rate vs chosen."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from benchmarks import progress, utils
from benchmarks.arms.registry import fmt
from benchmarks.harness import Harness, Stage
from benchmarks.stages import load_model, load_pairs, load_prompts


def split_pairs(rows: list[dict], heldout_fraction: float) -> tuple[list[dict], list[dict]]:
    """Hold out whole prompts (stable hash of the prompt id), so no held-out prompt is seen in training."""
    train, held = [], []
    for r in rows:
        (held if utils.text_hash("heldout/" + r["prompt_id"]) % 10_000 < heldout_fraction * 10_000 else train).append(r)
    return train, held


def heldout_fraction(c) -> float:
    """Share of prompts whose pairs every arm holds out (one split for DPO, the RM and Preferred-FT)."""
    return c.dpo.heldout_pairs_fraction if c.dpo is not None else 0.1


def train_and_heldout_pairs(h: Harness) -> tuple[list[dict], list[dict]]:
    return split_pairs([dict(r) for r in load_pairs(h)], heldout_fraction(h.cfg))


def eval_stage(arm: str) -> Stage:
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
        from benchmarks.tasks.registry import task_gold

        total = len(prompts) * e.samples_per_prompt * len(e.temperatures)
        with progress.bar(total, f"eval/{arm}", unit="sample") as b:
            rows, timing = generate_eval_samples(model, ref, tok, prompts, temperatures=e.temperatures, n=e.samples_per_prompt,
                                                 max_new_tokens=e.max_new_tokens, seed=e.seed,
                                                 gold_fn=lambda texts, prompts: task_gold(h.cfg.task, texts, prompts),
                                                 autocast=h.autocast(), on_batch=lambda rows, toks: b.add(rows))
        df = pd.DataFrame(rows)
        df.insert(0, "arm", arm)
        df.to_parquet(out / "samples.parquet", index=False)
        by_t = {}
        for temp, g in df.groupby("temperature"):
            by_t[fmt(temp)] = {"gold_mean": float(g.gold.mean()), "gold_sd": float(g.gold.std(ddof=0)),
                               "seq_kl_mean": float(g.seq_kl.mean()), "length_mean": float(g.length.mean())}
        return {"arm": arm, "samples": len(df), "by_temperature": by_t, **timing}

    key = lambda c: {"eval": asdict(c.eval), "target": c.task.target, "gold": c.task.gold, "dtype": c.dtype}  # noqa: E731
    deps = (src, "sft", "prompts") if src != "sft" else ("sft", "prompts")
    return Stage(f"eval/{arm}", deps, key, run)


def _evalref(h: Harness, out: Path) -> dict:
    """The 'chosen' response of every eval prompt, for win rate vs chosen: the task's own (``Task.evalref``), else the
    best of K reference samples by gold reward (the preferred response of a held-out pair)."""
    import pandas as pd

    from benchmarks.stages import sample_texts
    from benchmarks.tasks.registry import task_gold, task_of

    own = task_of(h.cfg).evalref(h, out)  # a task with its own reference responses (dialogue: the dataset's chosen)
    if own is not None:
        return own
    k = h.cfg.prefs.samples_per_prompt
    model, tok = load_model(h.path("sft"), h.device)
    prompts = load_prompts(h, "eval")
    texts, _ = sample_texts(h, model, tok, prompts, n=k, temperature=h.cfg.prefs.temperature,
                            max_new_tokens=h.cfg.eval.max_new_tokens, seed=h.cfg.seed + 99)
    rows = []
    for p, comps in zip(prompts, texts, strict=True):
        g = task_gold(h.cfg.task, comps, [p["prompt"]] * k)
        best = max(range(k), key=lambda i: g[i])
        rows.append({"prompt_id": p["prompt_id"], "chosen": comps[best], "chosen_gold": g[best]})
    df = pd.DataFrame(rows)
    df.to_parquet(out / "chosen.parquet", index=False)
    return {"prompts": len(df), "chosen_gold_mean": float(df.chosen_gold.mean())}


def evalref_stage() -> Stage:
    return Stage("evalref", ("sft", "prompts"), lambda c: {
        "k": c.prefs.samples_per_prompt, "T": c.prefs.temperature, "max_new_tokens": c.eval.max_new_tokens,
        "target": c.task.target, "gold": c.task.gold, "seed": c.seed, "dtype": c.dtype}, _evalref)


# ------------------------------------------------------------------------------------------------ compute
def compute_record(*, forward=(), trained=(), generated=(), shared: dict[str, float] | None = None) -> dict:
    """Compute accounting of one arm (or shared stage) from (model parameters N, tokens) pairs, the usual estimate
    (Kaplan et al. 2020): 2 N FLOPs per token through a model without gradient (``forward``: reference, value and
    reward forwards; ``generated``: sampling, prompt prefill included, KV-cached), 6 N per trained token (forward +
    backward). Token columns count token-passes summed over models. ``shared``: FLOPs of the stages this arm needs
    and shares with others (the reward model, pi_ref's log-probs), each counted in full, so that ``compute/flops``
    is the cost of producing this arm alone from pi_ref."""
    f = sum(2 * n * t for n, t in forward)
    tr = sum(6 * n * t for n, t in trained)
    g = sum(2 * n * t for n, t in generated)
    sh = float(sum((shared or {}).values()))
    return {"compute/tokens_forward": int(sum(t for _, t in forward)), "compute/tokens_trained": int(sum(t for _, t in trained)),
            "compute/tokens_generated": int(sum(t for _, t in generated)), "compute/flops_own": float(f + tr + g),
            "compute/flops_shared": sh, "compute/flops": float(f + tr + g + sh),
            **{f"compute/shared/{k}": float(v) for k, v in (shared or {}).items()}}


def stage_flops(h: Harness, name: str) -> float:
    """Own FLOPs of a finished shared stage (0 when it recorded none)."""
    return float(h.results[name].summary.get("compute/flops_own", 0.0)) if name in h.results else 0.0


# ------------------------------------------------------------------------------------ the on-policy arms' set-up
def gold_monitor(h: Harness, tok, rows: list[dict]):
    """``gold_fn(prompt_ids, completion_ids) -> list[float]``: the task's gold reward of decoded completions, for
    logging only (``objective/gold``), never trained on. The dialogue task's judge scores (prompt, response): the
    prompt text is looked up by its ids (decoded when unknown)."""
    from benchmarks.tasks.registry import task_gold

    prompt_text = {tuple(p["prompt_ids"]): p["prompt"] for p in rows}

    def gold_fn(prompt_ids, completion_ids):
        texts = tok.batch_decode(completion_ids, skip_special_tokens=True)
        prompts = [prompt_text.get(tuple(x)) or tok.decode(x, skip_special_tokens=True) for x in prompt_ids]
        return task_gold(h.cfg.task, texts, prompts)

    return gold_fn


def on_policy_setup(h: Harness, seed: int):
    """What RLOO / GRPO / online DPO start from: the SFT policy (with the suite's LoRA adapters, as PPO's and DPO's)
    and a frozen copy as pi_ref, the reward model stage's RM, its ``reward_fn``, the train prompts and the gold monitor.
    Returns (policy, ref, tok, rm, reward_fn, rows, gold_fn)."""
    from benchmarks.arms.reward_model import RM_STAGE
    from methods import lora
    from methods.rlhf.reward_model import load_reward_model, make_reward_fn

    utils.seed_everything(seed)
    policy, tok = load_model(h.path("sft"), h.device)
    ref, _ = load_model(h.path("sft"), h.device)
    rm = load_reward_model(h.path(RM_STAGE) / "rm").to(h.device).eval()
    rows = load_prompts(h, "train")
    reward_fn = make_reward_fn(rm, pad_id=tok.pad_token_id, autocast=h.autocast())
    policy = lora.add_adapters(policy, h.cfg.lora, seed=seed)
    return policy, ref, tok, rm, reward_fn, rows, gold_monitor(h, tok, rows)


def train_resumable(h: Harness, arm: str, trainer, iterations: int, on_log) -> list[dict]:
    """``trainer.train`` for an iterative arm: resume from its checkpoint and say so; on SIGINT/SIGTERM finish the
    iteration, write the checkpoint and exit (130/143) saying how to resume (``benchmarks/interrupts.py``)."""
    from benchmarks import interrupts

    ckpt = h.checkpoint_path(f"arm/{arm}")
    if ckpt.exists() and trainer.load_checkpoint(ckpt):  # (train() loads it too; this is to say so)
        h.log(f"[arm/{arm}] resuming from iteration {trainer.iteration} of {iterations} ({ckpt})")
    with interrupts.graceful():
        hist = trainer.train(on_log=on_log, checkpoint_path=ckpt, checkpoint_every=h.cfg.checkpoint_every_iterations,
                             stop=interrupts.requested)
        if interrupts.requested():  # (also after the last iteration: the re-run then resumes at the end, instantly)
            interrupts.stop_with_checkpoint(trainer, ckpt, f"arm/{arm}", trainer.iteration, iterations, "iteration")
    return hist


def run_on_policy_arm(h: Harness, arm: str, trainer, policy, tok, out: Path, *, bar_keys: tuple[str, ...] = (),
                      stop_on: tuple[type[BaseException], ...] = ()) -> tuple[list[dict], object, dict]:
    """What every on-policy arm (PPO, RLOO/GRPO, online DPO: ``methods.onpolicy`` trainers) does around its trainer:
    train it resumably with a progress bar (KL, score, gold, ``bar_keys``), stop cleanly on ``stop_on`` (status
    "stopped: ..."), save the merged policy, the tokenizer, the training curve and the config. Returns (history,
    the merged policy, the summary fields every on-policy arm reports: status, timings, counters, the RM's quality)."""
    from benchmarks.arms.reward_model import RM_STAGE
    from methods import lora

    t = utils.Timer()
    status = "ok"
    try:
        with progress.bar(trainer.cfg.iterations, f"arm/{arm}", unit="it") as b:
            def on_log(rec):
                b.to(rec["iteration"], kl=rec["objective/kl"], score=rec["objective/scores"], gold=rec.get("objective/gold"),
                     **{k: rec[k] for k in bar_keys}, **{"tok/s": rec["tokens/sequence"] / max(rec["time/iteration"], 1e-9)})

            hist = train_resumable(h, arm, trainer, trainer.cfg.iterations, on_log)
    except stop_on as e:
        hist, status = trainer.history, f"stopped: {e}"
    train_s = t.elapsed
    policy = lora.merged(policy)
    policy.save_pretrained(out / "model")
    tok.save_pretrained(out / "model")
    utils.write_jsonl(out / "train_curve.jsonl", hist)
    utils.atomic_write_json(out / "train_config.json", asdict(trainer.cfg))
    phases = ("time/generation", "time/reward", "time/ref_value_forward", "time/update")
    rm_sum = h.results[RM_STAGE].summary
    last = hist[-1] if hist else {}
    summary = {"status": status, "iterations": len(hist), "time/train_s": train_s,
               **{k + "_s": sum(r.get(k, 0.0) for r in hist) for k in phases},
               "tokens_seen": last.get("tokens_seen"), "episodes_seen": last.get("episodes_seen"),
               "tokens_per_s": (last.get("tokens_seen") or 0) / max(train_s, 1e-9),
               "rm_accuracy": rm_sum["rm_accuracy"], "rm_gold_pearson": rm_sum["rm_gold_pearson"]}
    return hist, policy, summary


def token_sums(hist: list[dict], kinds: tuple[str, ...] = ("prompt", "generated", "sequence", "update")) -> dict[str, int]:
    """``tokens/<kind>`` summed over a training curve (the compute accounting's token counts)."""
    return {k: sum(r.get(f"tokens/{k}", 0) for r in hist) for k in kinds}
