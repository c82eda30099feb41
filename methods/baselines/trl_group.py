"""The peer arms: TRL 1.16's ``GRPOTrainer`` and ``RLOOTrainer`` on the same prompts, reward model and budget as ours.

Only the mapping of our ``GroupRLConfig`` onto TRL's lives here; TRL samples, scores, computes advantages and
trains. Set to match ours, not TRL's defaults: beta > 0 (TRL's GRPO default 0 keeps no reference), ``k``
completions per prompt, ``prompts_per_iteration * k`` completions per generation round, ``minibatch_size``
completions per optimiser step, one pass (``num_iterations = epochs``), the same lr (constant: ours does not
anneal), Adam's epsilon, gradient clipping, temperature and completion length, dropout off, fp32 or bf16 as the
suite says. The reward function scores exactly TRL's sampled token ids with our RM (a dataset column carries each
prompt's ids), normalised with the first generation round's statistics when ``reward_norm`` is on, as ours is.

What still differs, by construction of TRL 1.16: its GRPO samples with ``model.generate`` (ours: the shared
sampler; same distribution, other random streams), and RLOO's ratio is clipped at epsilon = 0.2 (ours unclipped;
with one pass the ratio is 1 and the clip never fires).
"""

from __future__ import annotations

import math
from collections.abc import Callable

from methods.rlhf.group_trainer import GroupRLConfig


def trl_config(cfg: GroupRLConfig, *, output_dir: str, device: str, dtype: str = "float32", **overrides):
    """TRL's ``GRPOConfig`` / ``RLOOConfig`` for our config (field by field, see the module docstring)."""
    from trl import GRPOConfig, RLOOConfig

    rollout = cfg.prompts_per_iteration * cfg.k
    if rollout % cfg.minibatch_size:
        raise ValueError(f"minibatch_size ({cfg.minibatch_size}) must divide prompts_per_iteration * k ({rollout})")
    steps_per_generation = rollout // cfg.minibatch_size
    kw = dict(
        output_dir=output_dir, beta=cfg.beta, num_generations=cfg.k, learning_rate=cfg.lr, lr_scheduler_type="constant",
        warmup_steps=0, adam_epsilon=cfg.adam_eps, max_grad_norm=cfg.grad_clip if cfg.grad_clip else 1e9,
        per_device_train_batch_size=cfg.minibatch_size, gradient_accumulation_steps=1,
        steps_per_generation=steps_per_generation, num_iterations=cfg.epochs,  # generation batch = rollout
        max_steps=cfg.iterations * steps_per_generation * cfg.epochs, max_completion_length=cfg.max_new_tokens,
        temperature=cfg.temperature, top_k=0, top_p=1.0, seed=cfg.seed, data_seed=cfg.seed,
        bf16=dtype == "bfloat16", fp16=dtype == "float16", use_cpu=device == "cpu", gradient_checkpointing=False,
        logging_steps=1, report_to="none", save_strategy="no", dataloader_num_workers=0, disable_dropout=True,
        remove_unused_columns=False, shuffle_dataset=True, disable_tqdm=True,
    )
    if cfg.algorithm == "grpo":
        kw.update(epsilon=cfg.clip_eps if cfg.clip_eps is not None else 0.2,
                  scale_rewards="group" if cfg.scale_rewards else "none")
        cls = GRPOConfig
    elif cfg.algorithm == "rloo":
        kw.update(epsilon=cfg.clip_eps if cfg.clip_eps is not None else 0.2, normalize_advantages=False)
        cls = RLOOConfig
    else:
        raise ValueError(f"no TRL peer for algorithm {cfg.algorithm!r}")
    kw.update(overrides)
    return cls(**kw)


def normalised_reward(reward_fn: Callable, enabled: bool) -> Callable:
    """``reward_fn(prompt_ids, completion_ids) -> tensor``, normalised with its first call's mean and std (ours:
    ``GroupRLTrainer._normalise``, statistics of the first rollouts) when ``enabled``."""
    stats: list[tuple[float, float]] = []

    def f(prompt_ids, completion_ids):
        raw = reward_fn(prompt_ids, completion_ids).double()
        if not enabled:
            return raw
        if not stats:
            sd = float(raw.std()) if raw.numel() > 1 else 1.0
            stats.append((float(raw.mean()), sd if sd > 1e-6 else 1.0))
        m, sd = stats[0]
        return (raw - m) / sd

    return f


def train_trl_group(policy, tokenizer, prompts: list[dict], reward_fn: Callable, cfg: GroupRLConfig, *, device: str,
                    output_dir: str, dtype: str = "float32", monitor: Callable | None = None,
                    on_log: Callable | None = None) -> list[dict]:
    """Train ``policy`` with TRL's GRPO / RLOO trainer; ``prompts``: rows {"prompt", "prompt_ids"};
    ``reward_fn(prompt_ids, completion_ids) -> tensor``; ``monitor`` (gold) is logged, never trained on.
    Returns TRL's per-step log records (plus "objective/gold" where a monitor is given)."""
    import datasets
    import torch
    from transformers import TrainerCallback

    score = normalised_reward(reward_fn, cfg.reward_norm)
    gold_log: list[float] = []

    def rm_reward(prompts, completions, completion_ids, prompt_ids, **_):
        r = score([list(p) for p in prompt_ids], [list(c) for c in completion_ids])
        if monitor is not None:
            gold_log.append(float(sum(monitor([list(p) for p in prompt_ids], [list(c) for c in completion_ids]))
                                  / max(len(completion_ids), 1)))
        return [float(x) for x in r]

    rm_reward.__name__ = "reward_model"
    ds = datasets.Dataset.from_list([{"prompt": p["prompt"], "prompt_ids": list(p["prompt_ids"])} for p in prompts])
    args = trl_config(cfg, output_dir=output_dir, device=device, dtype=dtype)
    history: list[dict] = []

    class _Log(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                rec = {"step": state.global_step, **{k: v for k, v in logs.items() if isinstance(v, (int, float))}}
                if gold_log:
                    rec["objective/gold"] = gold_log[-1]
                history.append(rec)
                if on_log:
                    on_log(rec)

    if cfg.algorithm == "grpo":
        from trl import GRPOTrainer as Trainer
    else:
        from trl import RLOOTrainer as Trainer
    tr = Trainer(model=policy, reward_funcs=rm_reward, args=args, train_dataset=ds, processing_class=tokenizer,
                 callbacks=[_Log()])
    tr.train()
    for r in history:
        for k, v in list(r.items()):
            if isinstance(v, float) and not math.isfinite(v):
                r[k] = None
    del tr
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return history
