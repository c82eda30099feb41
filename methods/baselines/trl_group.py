"""The peer arms: TRL 1.16's ``GRPOTrainer`` and ``RLOOTrainer`` on the same prompts, reward model and budget as ours.

Only the mapping of our ``GroupRLConfig`` onto TRL's lives here; TRL samples, scores, computes advantages and
trains. Every TRL 1.16 flag that changes the objective (the loss, the advantages, the rewards or the distribution
the samples come from) is set explicitly from our config, never left to TRL's default (``objective_flags``, listed
in ``OBJECTIVE_FLAGS``); every other flag TRL's own config classes declare is named in ``LEFT_AT_DEFAULT`` with the
reason it cannot matter (tests/test_trl_parity.py fails when TRL adds one). Where ours and TRL's defaults differ:

  GRPO  ``loss_type="bnpo"`` (a token mean over the minibatch, ours; TRL's default ``"dapo"`` divides by the
        generation batch's tokens / ``steps_per_generation``), ``use_bias_correction_kl = (kl_grad == "k3_ratio")``,
        ``beta`` > 0 (TRL's default 0 keeps no reference), ``epsilon_high`` = ``epsilon`` = our clip, dropout off,
        ``k`` completions per prompt, ``scale_rewards="none"`` for our ``scale_rewards=False`` (Dr. GRPO).
  RLOO  ``epsilon = inf`` when ours is unclipped (``clip_eps=None``): TRL always clips the sequence ratio (default
        0.2), and with several minibatches per rollout the later ones are off-policy, so a finite clip would fire.
  both  ``prompts_per_iteration * k`` completions per generation round, ``minibatch_size`` per optimiser step
        (``gradient_accumulation_steps=1``), ``num_iterations = epochs``, ``max_completion_length``, temperature, no
        top-k / top-p / min-p / repetition penalty, no vLLM (TRL samples with ``model.generate``), no MoE auxiliary
        loss, one reward function of weight 1; lr constant (ours does not anneal), Adam's epsilon, no weight decay,
        gradient clipping, fp32 or bf16 as the suite says.

The reward function scores exactly TRL's sampled token ids with our RM (a dataset column carries each prompt's ids),
normalised as ``GroupRLTrainer._normalise`` does when ``reward_norm`` is on: with a given ``(mean, std)`` (the RM's
gain and bias on pi_ref's samples, stage ``arm/rm-scale``) or else with the first generation round's statistics.

What still differs, by construction of TRL 1.16: it samples with ``model.generate`` (ours: the shared KV-cache
sampler; the same distribution, other random streams), conditions the policy on its own tokenisation of the prompt
text (``retokenised_prompts`` counts the prompts where that differs from the ids the RM scores), and with
``num_iterations > 1`` reuses one split of each generation batch into minibatches (ours reshuffles every epoch).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from methods.rlhf.group_trainer import GroupRLConfig

TRL_ADV_EPS = 1e-4
"""TRL 1.16 GRPO's std epsilon, hard-coded in ``_generate_and_score_completions``: ours must equal it."""

_SHARED_OBJECTIVE = (
    "beta", "num_generations", "per_device_train_batch_size", "gradient_accumulation_steps", "steps_per_generation",
    "num_iterations", "epsilon", "epsilon_high", "reward_weights", "mask_truncated_completions", "sync_ref_model",
    "disable_dropout", "router_aux_loss_coef", "max_completion_length", "temperature", "top_p", "top_k", "min_p",
    "repetition_penalty", "generation_kwargs", "use_vllm", "use_transformers_continuous_batching",
)
OBJECTIVE_FLAGS: dict[str, tuple[str, ...]] = {
    "grpo": _SHARED_OBJECTIVE + (
        "loss_type", "use_bias_correction_kl", "scale_rewards", "multi_objective_aggregation",
        "importance_sampling_level", "delta", "top_entropy_quantile", "entropy_coef", "use_adaptive_entropy",
        "off_policy_mask_threshold", "vllm_importance_sampling_correction", "cast_lm_head_to_fp32",
    ),
    "rloo": _SHARED_OBJECTIVE + ("normalize_advantages", "reward_clip_range"),
}
"""The TRL config fields ``trl_config`` always sets from our config (``objective_flags``), per algorithm."""


def _why(reason: str, *names: str) -> dict[str, str]:
    return dict.fromkeys(names, reason)


LEFT_AT_DEFAULT: dict[str, str] = {
    **_why("inert: use_vllm=False", "vllm_mode", "vllm_model_impl", "vllm_enable_sleep_mode",
           "vllm_structured_outputs_regex", "vllm_server_base_url", "vllm_server_host", "vllm_server_port",
           "vllm_server_timeout", "vllm_group_port", "vllm_gpu_memory_utilization", "vllm_max_model_length",
           "vllm_tensor_parallel_size", "vllm_importance_sampling_mode", "vllm_importance_sampling_clip_max",
           "vllm_importance_sampling_clip_min", "vllm_importance_sampling_cap"),
    **_why("inert: read only by loss_type 'sapo' / 'vespo' (ours: 'bnpo')", "sapo_temperature_neg",
           "sapo_temperature_pos", "vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg", "vespo_lambda_neg"),
    **_why("inert: use_adaptive_entropy=False and entropy_coef=0", "entropy_coef_min", "entropy_coef_max",
           "entropy_coef_delta", "entropy_target"),
    **_why("inert: sync_ref_model=False", "ref_model_mixup_alpha", "ref_model_sync_steps"),
    **_why("inert: no tools, no chat template (plain-text prompts), no evaluation", "max_tool_calling_iterations",
           "chat_template_kwargs", "num_generations_eval"),
    **_why("derived from steps_per_generation (the two are mutually exclusive)", "generation_batch_size"),
    **_why("loading, sharding, padding, caching: no effect on the numbers", "model_init_kwargs", "trust_remote_code",
           "ds3_gather_for_generation", "pad_to_multiple_of", "cache_implementation",
           "transformers_continuous_batching_config", "use_transformers_paged"),
    **_why("logging only", "log_completions", "log_multimodal", "num_completions_to_print", "log_unique_prompts",
           "log_completions_hub_repo"),
    **_why("set explicitly (data order, not the objective): prompts reshuffled each epoch, as ours", "shuffle_dataset"),
}
"""Every other field TRL's ``GRPOConfig`` / ``RLOOConfig`` declare (beyond ``TrainingArguments``) with the reason
``OBJECTIVE_FLAGS`` leaves it out."""


def _rollout_split(cfg: GroupRLConfig) -> int:
    rollout = cfg.prompts_per_iteration * cfg.k
    if rollout % cfg.minibatch_size:
        raise ValueError(f"minibatch_size ({cfg.minibatch_size}) must divide prompts_per_iteration * k ({rollout})")
    return rollout // cfg.minibatch_size


def objective_flags(cfg: GroupRLConfig) -> dict[str, Any]:
    """TRL 1.16's objective flags (``OBJECTIVE_FLAGS[cfg.algorithm]``) for our config, each mapped from ours."""
    if cfg.algorithm not in OBJECTIVE_FLAGS:
        raise ValueError(f"no TRL peer for algorithm {cfg.algorithm!r}")
    shared = dict(
        beta=float(cfg.beta),  # GRPO: k3 in the loss; RLOO: k1 summed per sequence in the reward (as ours)
        num_generations=cfg.k,  # the group
        per_device_train_batch_size=cfg.minibatch_size,  # completions per optimiser step (bnpo's token mean)
        gradient_accumulation_steps=1,  # one minibatch per optimiser step, as ours (no loss rescaling)
        steps_per_generation=_rollout_split(cfg),  # generation batch = prompts_per_iteration * k = our rollout
        num_iterations=cfg.epochs,  # passes over each generation batch
        reward_weights=[1.0],  # one reward function (our RM), unweighted (TRL's None = ones)
        mask_truncated_completions=False,  # truncated completions stay in the loss, as ours
        sync_ref_model=False,  # pi_ref fixed (no TR-DPO style reference refresh)
        disable_dropout=True,  # ours trains in eval mode (TRL's default keeps dropout)
        router_aux_loss_coef=0.0,  # no MoE load-balancing loss (TRL's None = the model config's coefficient)
        max_completion_length=cfg.max_new_tokens,
        temperature=float(cfg.temperature),  # sampling and the log-probs (logits / T), as ours
        top_p=1.0, top_k=0, min_p=None, repetition_penalty=1.0, generation_kwargs=None,  # plain sampling at T
        use_vllm=False,  # TRL samples with model.generate from the policy being trained
        use_transformers_continuous_batching=False,  # model.generate, not the continuous-batching engine
    )
    if cfg.algorithm == "grpo":
        if cfg.adv_eps != TRL_ADV_EPS:
            raise ValueError(f"adv_eps={cfg.adv_eps} has no TRL 1.16 counterpart: its GRPO divides by std + {TRL_ADV_EPS}")
        clip = float(cfg.effective_clip)
        return shared | dict(
            loss_type="bnpo",  # token mean over the minibatch = ours (TRL's default 'dapo' normalises otherwise)
            use_bias_correction_kl=cfg.kl_grad == "k3_ratio",  # k3 * ratio (reverse-KL gradient) or plain k3
            scale_rewards="group" if cfg.scale_rewards else "none",  # std-scaled groups, or Dr. GRPO's mean baseline
            multi_objective_aggregation="sum_then_normalize",  # one reward, group-normalised (not GDPO)
            importance_sampling_level="token",  # per-token ratio, as ours (not GSPO's sequence ratio)
            epsilon=clip, epsilon_high=clip,  # symmetric clip [1 - eps, 1 + eps] (no DAPO clip-higher)
            delta=None,  # no two-sided (INTELLECT-2) upper bound on the unclipped ratio
            top_entropy_quantile=1.0,  # every token in the loss (no high-entropy token selection)
            entropy_coef=0.0, use_adaptive_entropy=False,  # no entropy bonus
            off_policy_mask_threshold=None,  # no off-policy sequence masking (DeepSeek-V3.2 OPSM)
            vllm_importance_sampling_correction=False,  # no sampler/trainer IS weights (no vLLM)
            cast_lm_head_to_fp32=False,  # log-probs in the model's dtype, as ours
        )
    # RLOO: ours is unclipped REINFORCE unless clip_eps is set; TRL always clips (sequence ratio), so inf = unclipped
    clip = math.inf if cfg.clip_eps is None else float(cfg.clip_eps)
    return shared | dict(
        epsilon=clip, epsilon_high=clip,
        normalize_advantages=False,  # leave-one-out advantages as they are (no batch whitening)
        reward_clip_range=None,  # scores unclipped
    )


def trl_config(cfg: GroupRLConfig, *, output_dir: str, device: str, dtype: str = "float32", **overrides):
    """TRL's ``GRPOConfig`` / ``RLOOConfig`` for our config: ``objective_flags`` plus the optimiser, schedule and
    run plumbing (see the module docstring). ``overrides`` may not touch an objective flag."""
    from trl import GRPOConfig, RLOOConfig

    cfg.validate()
    flags = objective_flags(cfg)
    bad = sorted(set(overrides) & set(flags))
    if bad:
        raise ValueError(f"overrides {bad} would change the objective away from ours")
    kw = dict(
        output_dir=output_dir, learning_rate=cfg.lr, lr_scheduler_type="constant", warmup_steps=0,
        adam_epsilon=cfg.adam_eps, adam_beta1=0.9, adam_beta2=0.999, weight_decay=0.0, optim="adamw_torch",  # = Adam
        max_grad_norm=cfg.grad_clip, max_steps=cfg.iterations * flags["steps_per_generation"] * cfg.epochs,
        seed=cfg.seed, data_seed=cfg.seed, bf16=dtype == "bfloat16", fp16=dtype == "float16", use_cpu=device == "cpu",
        gradient_checkpointing=False, logging_steps=1, report_to="none", save_strategy="no", dataloader_num_workers=0,
        remove_unused_columns=False, shuffle_dataset=True, disable_tqdm=True,
    )
    kw.update(flags)
    kw.update(overrides)
    return (GRPOConfig if cfg.algorithm == "grpo" else RLOOConfig)(**kw)


def normalised_reward(reward_fn: Callable, enabled: bool, scale: tuple[float, float] | None = None) -> Callable:
    """``reward_fn(prompt_ids, completion_ids) -> scores`` normalised exactly as ``GroupRLTrainer._normalise``
    (float32 ``(raw - mean) / std``) when ``enabled``: with ``scale = (mean, std)`` when given (ours: the
    ``arm/rm-scale`` stage), else with the first call's mean and std (the first rollouts, from pi_ref)."""
    import torch

    if scale is not None and not (enabled and math.isfinite(scale[0]) and math.isfinite(scale[1]) and scale[1] > 0):
        raise ValueError(f"scale={scale!r} needs enabled=True and a finite (mean, std > 0)")
    stats: list[tuple[float, float]] = [] if scale is None else [(float(scale[0]), float(scale[1]))]

    def f(prompt_ids, completion_ids):
        raw = torch.as_tensor(reward_fn(prompt_ids, completion_ids), dtype=torch.float32).detach().flatten().cpu()
        if not enabled:
            return raw
        if not stats:
            x = raw.double()
            sd = float(x.std()) if x.numel() > 1 else 1.0
            stats.append((float(x.mean()), sd if sd > 1e-6 else 1.0))
        m, sd = stats[0]
        return (raw - m) / sd

    return f


def retokenised_prompts(tokenizer, prompts: list[dict]) -> int:
    """How many rows' ``prompt`` text TRL re-tokenises (``tokenizer(text=...)``, as its ``_tokenize_prompts``) into
    other ids than the row's ``prompt_ids`` (which the reward model scores): 0 when the peer conditions the policy on
    exactly the prompts ours does."""
    ids = tokenizer(text=[p["prompt"] for p in prompts])["input_ids"]
    return sum(list(a) != list(p["prompt_ids"]) for a, p in zip(ids, prompts, strict=True))


def trl_reward_func(score: Callable, monitor: Callable | None = None, gold_log: list[float] | None = None) -> Callable:
    """TRL's reward function: ``score(prompt_ids, completion_ids)`` on the row's own prompt ids (a dataset column)
    and exactly TRL's sampled completion ids; ``monitor``'s batch mean is appended to ``gold_log`` (logged only)."""

    def reward_model(prompts, completions, completion_ids, prompt_ids, **_):
        ps, cs = [list(p) for p in prompt_ids], [list(c) for c in completion_ids]
        r = score(ps, cs)
        if monitor is not None and gold_log is not None:
            gold_log.append(float(sum(monitor(ps, cs))) / max(len(cs), 1))
        return [float(x) for x in r]

    return reward_model


def train_trl_group(policy, tokenizer, prompts: list[dict], reward_fn: Callable, cfg: GroupRLConfig, *, device: str,
                    output_dir: str, dtype: str = "float32", monitor: Callable | None = None,
                    on_log: Callable | None = None, reward_scale: tuple[float, float] | None = None) -> list[dict]:
    """Train ``policy`` with TRL's GRPO / RLOO trainer; ``prompts``: rows {"prompt", "prompt_ids"};
    ``reward_fn(prompt_ids, completion_ids) -> tensor``; ``monitor`` (gold) is logged, never trained on;
    ``reward_scale``: the fixed (mean, std) of the reward normalisation (``GroupRLTrainer(reward_scale=...)``).
    Returns TRL's per-step log records (plus "objective/gold" where a monitor is given)."""
    import datasets
    import torch
    from transformers import TrainerCallback

    gold_log: list[float] = []
    rm_reward = trl_reward_func(normalised_reward(reward_fn, cfg.reward_norm, reward_scale), monitor, gold_log)
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
