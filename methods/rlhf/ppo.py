"""The PPO loop of the RLHF arm, following "The N Implementation Details of RLHF with PPO" ([N-details]).

One iteration (= one rollout batch):
  1. rollouts   ``rollout_batch_size`` prompts -> one completion each from the *current* policy with the shared
                KV-cache sampler (``methods.sampling.sample``; per-row seeds from (seed, iteration, prompt, slot))
  2. reward     ``reward_fn(prompt_ids, completion_ids) -> [N]`` (the RM, or the gold reward for the explicitly
                named PPO-GT arm; this module never imports a gold reward), optional normalisation with the
                statistics of the first rollouts (= N-details' RM normalisation under pi_ref) or running ones,
                optional missing-EOS penalty ([TRL-ppov2] ``missing_eos_penalty``)
  3. forwards   one forward each of policy (old log-probs), reference (ref log-probs) and value model (values)
                over right-padded prompt+completion rows built by ``methods.data.collate``; log-probs through
                the shared core ``methods.logprobs.logps_at`` (``_token_logps``: ``token_logps`` without copying
                the logits) on logits / temperature ([N-details] "temperature scaling")
  4. advantages per-token reward = score at the last token - beta * KL_t (``ppo_core.compute_rewards``),
                optional reward whitening, GAE (gamma, lam), advantage whitening over the rollout batch
  5. update     ``ppo_epochs`` passes over shuffled minibatches: clipped policy loss + vf_coef * clipped value
                loss, grad clipping; optional early stop of the epochs when approx KL > kl_stop
  6. controller adaptive or fixed KL coefficient update; EMA reference update (Strong-PPO) if configured

Resumable: ``train(checkpoint_path=..., checkpoint_every=n)`` writes an atomic checkpoint (policy, value
parameters, optimiser, KL coefficient, reward-normalisation statistics, prompt order position, counters, EMA
reference, history, RNG states) every n iterations; started again after a kill, the run continues from it and
ends with the numbers of an uninterrupted run (rollout seeds depend only on (seed, iteration, prompt, slot)).

Data parallel under ``accelerate launch`` (pass ``accelerator=Accelerator()``, DDP-style: every rank holds the
whole policy, reference and value model): each rank samples, scores and forwards its contiguous shard of the
iteration's rollout batch (same prompts and per-row seeds as one process, so the same samples); the per-token
tensors and scores are then gathered, so reward normalisation, KL, GAE, whitening, explained variance and the
KL controller are computed on the whole batch exactly as in one process; every PPO minibatch is split over
the ranks, each rank's loss is its tokens' share of the minibatch's token mean and the gradients are summed
over ranks (= the single-process minibatch gradient); logged update statistics are token-weighted sums over
ranks. ``reward_fn`` must be deterministic per row (it is called on a shard). FSDP / DeepSpeed configs are
refused for PPO (the sampler and the no-grad forwards need whole parameters on each rank).

Completions handed to ``reward_fn`` and trained on are the generated token ids *including* the EOS token when
the sample ended with one (the sequence DPO and the RM see: text + EOS); decode with
``skip_special_tokens=True`` for text rewards. Dropout is left off throughout (models in eval mode, gradients
still flow), so the first minibatch of every iteration has ratio exactly 1 ([N-details] "disable dropout").

Sources:
  [N-details]  Huang et al. 2023, HF blog + vwxyzjn/lm-human-preference-details ``summarize/ppo.py``
  [TRL-ppov2]  huggingface/trl ``PPOv2Trainer`` / ``PPOTrainer`` (<= 0.x; deleted in TRL 1.16)
  [TRL-ppo]    huggingface/trl legacy ``PPOTrainer.step`` (adaptive KL update with the batch's mean KL)
  [Ziegler19]  Ziegler et al. 2019, arXiv:1909.08593 (per-token KL reward, adaptive KL controller)
  [Xu24]       Xu et al. 2024, "Is DPO Superior to PPO for LLM Alignment?", arXiv:2404.10719 (EMA reference)
"""

from __future__ import annotations

import contextlib
import copy
import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch

from methods.checkpointing import check_same_config, rng_state, set_rng_state
from methods.data import collate
from methods.distributed import Dist
from methods.logprobs import IGNORE_INDEX, logps_at
from methods.rl_loop import IterativeTrainer, Timers, all_finite, cpu_state, permuted_slots, prompts_digest
from methods.rlhf import ppo_core
from methods.rlhf.ppo_core import (
    AdaptiveKLController,
    FixedKLController,
    check_finite,
    compute_gae,
    compute_rewards,
    entropy_from_logits,
    explained_variance,
    masked_mean,
    masked_whiten,
    policy_loss,
    value_loss,
)
from methods.sampling import derive_seed, sample

VALUE_MODES = ("separate", "shared")
NORM_STATS = ("first", "running", "given")


class KLBlowupError(RuntimeError):
    """The rollout KL exceeded ``PPOConfig.kl_blowup``: the run is aborted (history is kept on the trainer)."""


@dataclass
class PPOConfig:
    init_kl_coef: float
    """beta of the per-token KL penalty (initial value when adaptive). Required: no default."""
    target_kl: float | None = None
    """Adaptive KL controller target (sequence KL, nats) [Ziegler19]; None = fixed beta."""
    kl_horizon: float = 10000.0
    """Adaptive controller horizon in episodes [Ziegler19]."""
    kl_coef_min: float | None = None
    """Adaptive controller: lower bound on beta (None = 0). See ``ppo_core.AdaptiveKLController``."""
    kl_coef_max: float | None = None
    """Adaptive controller: upper bound on beta (None = unbounded)."""
    kl_hold_while_rising: bool = False
    """Adaptive controller: take no *decrease* of beta while the KL is below target but still climbing (above the
    EMA of its earlier measurements), so beta cannot collapse before the KL arrives and then overshoot."""
    kl_estimator: str = "k1"
    """Per-token KL estimator in the reward: k1 (log-ratio, the N-details reward) | k2 | k3."""
    rollout_batch_size: int = 64
    """Prompts (= episodes) per iteration."""
    minibatch_size: int = 16
    """Episodes per optimiser step; must divide rollout_batch_size."""
    ppo_epochs: int = 4
    """Passes over each rollout batch ([N-details] noptepochs = 4)."""
    lr: float = 1e-5
    """Adam learning rate of the policy (and of the value model unless vf_lr)."""
    vf_lr: float | None = None
    """Learning rate of the value parameters; None = lr."""
    vf_coef: float = 0.1
    """Weight of the value loss in the joint loss ([N-details] vf_coef = 0.1)."""
    clip_range: float = 0.2
    clip_range_value: float = 0.2
    gamma: float = 1.0
    lam: float = 0.95
    whiten_advantages: bool = True
    """Normalise advantages over the rollout batch ([N-details]; Xu et al. 2024: important)."""
    whiten_rewards: bool = False
    """Rescale the per-token rewards by their std (mean kept) before GAE ([N-details] whiten_rewards)."""
    reward_norm: bool = False
    """Normalise reward_fn scores to mean 0 / std 1 (stats: reward_norm_stats)."""
    reward_norm_stats: str = "first"
    """first: stats of the first rollouts (from pi_ref) | running: all seen | given: the ``reward_scale=(mean, std)``
    passed to the trainer (N-details: the RM's gain and bias fitted on many pi_ref samples before training)."""
    max_new_tokens: int = 24
    temperature: float = 1.0
    """Sampling temperature of rollouts; log-probs are of logits / temperature ([N-details]). Must be > 0."""
    missing_eos_penalty: float | None = None
    """Subtracted from the score of completions that did not end with EOS ([TRL-ppov2]); None = off."""
    iterations: int = 100
    grad_clip: float = 1.0
    kl_stop: float | None = None
    """Stop an iteration's remaining PPO epochs once a minibatch's approx KL exceeds this; None = off."""
    kl_blowup: float | None = None
    """Abort the run (KLBlowupError) if the rollout's mean sequence KL exceeds this; None = off."""
    ema_ref_decay: float | None = None
    """Strong-PPO EMA reference [Xu24]: ref <- d * ref + (1 - d) * policy after every iteration (on a private
    copy of the reference); None = fixed reference."""
    value_model: str = "separate"
    """separate: a value model with ``token_values`` (e.g. a copy of the RM, N-details) | shared: a zero-init
    linear value head on the policy's last hidden state."""
    adam_eps: float = 1e-5
    """Adam epsilon ([N-details] eps = 1e-5)."""
    anneal_lr: bool = False
    """Linearly anneal the learning rates to 0 over the iterations ([N-details])."""
    generation_batch_size: int = 256
    """Rows per sampler batch (the samples do not depend on it)."""
    forward_batch_size: int = 0
    """Rows per no-grad rollout forward; 0 = the whole rollout batch in one forward."""
    seed: int = 0

    def validate(self) -> None:
        errors: list[str] = []
        try:
            ppo_core.validate_ppo_hparams(clip_range=self.clip_range, clip_range_value=self.clip_range_value,
                                          gamma=self.gamma, lam=self.lam, target_kl=self.target_kl,
                                          batch_size=self.rollout_batch_size, minibatch_size=self.minibatch_size)
        except ValueError as e:
            # ppo_core names the rollout batch "batch_size"; name our field
            msg = re.sub(r"(?<![a-z_])batch_size", "rollout_batch_size", str(e))
            errors += [m.strip() for m in msg.split("\n  - ")[1:]]

        def pos(x) -> bool:
            return x is not None and not isinstance(x, bool) and float(x) > 0 and math.isfinite(float(x))

        def pos_int(x) -> bool:
            return isinstance(x, int) and not isinstance(x, bool) and x >= 1

        checks = [
            (isinstance(self.init_kl_coef, int | float) and float(self.init_kl_coef) >= 0
             and math.isfinite(float(self.init_kl_coef)), "init_kl_coef", "must be >= 0 (0 = no KL penalty)"),
            (pos(self.kl_horizon), "kl_horizon", "must be > 0 (e.g. 10000 episodes)"),
            (self.kl_estimator in ppo_core.KL_KINDS, "kl_estimator", f"must be one of {ppo_core.KL_KINDS}"),
            (pos_int(self.ppo_epochs), "ppo_epochs", "must be an integer >= 1"),
            (pos(self.lr), "lr", "must be > 0"),
            (self.vf_lr is None or pos(self.vf_lr), "vf_lr", "must be > 0 or null (= lr)"),
            (self.vf_coef is not None and float(self.vf_coef) >= 0, "vf_coef", "must be >= 0"),
            (self.reward_norm_stats in NORM_STATS, "reward_norm_stats", f"must be one of {NORM_STATS}"),
            (self.kl_coef_min is None or (pos(self.kl_coef_min) and self.kl_coef_min <= self.init_kl_coef),
             "kl_coef_min", "must be > 0 and <= init_kl_coef, or null (0)"),
            (self.kl_coef_max is None or (pos(self.kl_coef_max) and self.kl_coef_max >= self.init_kl_coef),
             "kl_coef_max", "must be >= init_kl_coef, or null (unbounded)"),
            (isinstance(self.kl_hold_while_rising, bool), "kl_hold_while_rising", "must be true or false"),
            (pos_int(self.max_new_tokens), "max_new_tokens", "must be an integer >= 1"),
            (pos(self.temperature), "temperature", "must be > 0 (PPO needs a stochastic policy)"),
            (self.missing_eos_penalty is None or math.isfinite(float(self.missing_eos_penalty)),
             "missing_eos_penalty", "must be a finite number or null"),
            (pos_int(self.iterations), "iterations", "must be an integer >= 1"),
            (pos(self.grad_clip), "grad_clip", "must be > 0"),
            (self.kl_stop is None or pos(self.kl_stop), "kl_stop", "must be > 0 or null (off)"),
            (self.kl_blowup is None or pos(self.kl_blowup), "kl_blowup", "must be > 0 or null (off)"),
            (self.ema_ref_decay is None or 0.0 <= float(self.ema_ref_decay) < 1.0, "ema_ref_decay",
             "must be in [0, 1) or null (fixed reference)"),
            (self.value_model in VALUE_MODES, "value_model", f"must be one of {VALUE_MODES}"),
            (pos(self.adam_eps), "adam_eps", "must be > 0"),
            (pos_int(self.generation_batch_size), "generation_batch_size", "must be an integer >= 1"),
            (isinstance(self.forward_batch_size, int) and self.forward_batch_size >= 0, "forward_batch_size",
             "must be an integer >= 0 (0 = whole rollout batch)"),
        ]
        errors += [f"{key} {msg}, got {getattr(self, key)!r}" for ok, key, msg in checks if not ok]
        if errors:
            raise ValueError("invalid PPO config (ppo.*):\n  - " + "\n  - ".join(errors))


def config_dict(cfg: PPOConfig) -> dict:
    return asdict(cfg)


# --------------------------------------------------------------------------------------------- helpers
_seed = derive_seed


def _token_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``methods.logprobs.token_logps`` (same core, ``logps_at``; bitwise the same log-probs and gradients) without
    copying the shifted [B, T-1, V] slice of the logits: every row of the contiguous [B*T, V] logits is scored (the
    last position, which predicts nothing, against token 0) and the last column dropped after. Returns
    (logps [B, T-1] zero where masked, mask [B, T-1] float)."""
    if logits.shape[:2] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} disagree on [B, T]")
    B, T, V = logits.shape
    tgt = labels[:, 1:]  # position t predicts token t + 1
    mask = tgt != IGNORE_INDEX
    safe = torch.cat([torch.where(mask, tgt, torch.zeros_like(tgt)), tgt.new_zeros(B, 1)], dim=1)  # [B, T]
    logps = logps_at(logits.reshape(B * T, V), safe.reshape(-1)).view(B, T)[:, :-1]
    return logps * mask, mask.to(logps.dtype)


class _RunningStats:
    """Running mean/variance (Chan et al. parallel update) of the scalar scores."""

    def __init__(self) -> None:
        self.n, self.mean, self.m2 = 0, 0.0, 0.0

    def update(self, x: torch.Tensor) -> None:
        x = x.double()
        nb, mb = x.numel(), float(x.mean())
        m2b = float(((x - mb) ** 2).sum())
        n = self.n + nb
        d = mb - self.mean
        self.mean += d * nb / n
        self.m2 += m2b + d * d * self.n * nb / n
        self.n = n

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / (self.n - 1)) if self.n > 1 else 1.0


# --------------------------------------------------------------------------------------------- trainer
class PPOTrainer(IterativeTrainer):
    """PPO for a causal-LM policy against a reward callable.

    ``policy`` is trained in place (pass a copy of pi_ref); ``ref_model`` is only read (with ``ema_ref_decay``
    the trainer moves a private copy, ``trainer.ref_model``); ``value_model`` is a module with
    ``token_values(input_ids, attention_mask) -> [B, T]`` for ``value_model="separate"`` (e.g.
    ``reward_model.value_model_from_reward_model(rm)``) and must be None for ``"shared"``.
    ``prompts``: token-id lists (with BOS if the tokenizer adds it). ``autocast``: a reusable context manager
    (e.g. ``torch.autocast(...)``) wrapped around every forward and the sampler. ``accelerator``: an
    ``accelerate.Accelerator`` of a multi-process launch (data parallel, see the module docstring); None or a
    one-process accelerator = the single-process loop.
    """

    def __init__(self, policy, ref_model, reward_fn: Callable, value_model, tokenizer,
                 prompts: Sequence[Sequence[int]], cfg: PPOConfig, device: str | torch.device, autocast=None,
                 accelerator=None, reward_scale: tuple[float, float] | None = None):
        cfg.validate()
        if (cfg.reward_norm and cfg.reward_norm_stats == "given") != (reward_scale is not None):
            raise ValueError("ppo.reward_norm_stats='given' (with reward_norm) needs reward_scale=(mean, std), and "
                             "reward_scale is only read then")
        if reward_scale is not None and not (math.isfinite(reward_scale[0]) and reward_scale[1] > 0):
            raise ValueError(f"reward_scale must be (finite mean, std > 0), got {reward_scale!r}")
        self.accelerator = accelerator
        self.dist = Dist.from_accelerator(accelerator)
        if self.dist.distributed:
            kind = str(getattr(accelerator, "distributed_type", ""))
            if "FSDP" in kind or "DEEPSPEED" in kind:
                raise NotImplementedError(
                    f"PPO under {kind}: parameter sharding is not supported (rollout sampling and the no-grad "
                    "forwards need whole parameters on every rank); launch PPO with a DDP config "
                    "(benchmarks/configs/accelerate/ddp.yaml)")
            self.dist.shard(cfg.rollout_batch_size, "ppo.rollout_batch_size")
            self.dist.shard(cfg.minibatch_size, "ppo.minibatch_size")
            device = accelerator.device
        if policy is ref_model:
            raise ValueError("policy and ref_model are the same object: pass a trainable copy of pi_ref as policy")
        if not callable(reward_fn):
            raise TypeError("reward_fn must be callable: reward_fn(prompt_ids, completion_ids) -> Tensor[N]")
        if len(prompts) == 0:
            raise ValueError("no prompts: PPO needs at least one prompt")
        bad = [i for i, p in enumerate(prompts) if len(p) == 0]
        if bad:
            raise ValueError(f"empty prompts at indices {bad[:5]}: every prompt needs at least one token (e.g. BOS)")
        if cfg.value_model == "separate":
            if value_model is None or not hasattr(value_model, "token_values"):
                raise ValueError("ppo.value_model='separate' needs a value model with token_values(); pass "
                                 "value_model_from_reward_model(rm) (N-details) or use value_model='shared'")
            if value_model is policy or value_model is ref_model:
                raise ValueError("value_model must be its own module, not the policy or the reference")
        elif value_model is not None:
            raise ValueError("ppo.value_model='shared' puts a value head on the policy: pass value_model=None")
        if tokenizer.eos_token_id is None or tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer needs eos_token_id and pad_token_id")
        if tokenizer.pad_token_id == tokenizer.eos_token_id:
            # [N+-details] EOS as padding masks the EOS out of training: the policy then never learns to stop
            raise ValueError("pad_token_id == eos_token_id: give the tokenizer a distinct pad token")
        self.cfg = cfg
        self.device = torch.device(device)
        self.policy = policy.to(self.device)
        self.reward_fn = reward_fn
        self.tokenizer = tokenizer
        self.eos_id, self.pad_id = tokenizer.eos_token_id, tokenizer.pad_token_id
        self.prompts = [list(map(int, p)) for p in prompts]
        self._autocast_arg = autocast
        self.autocast = autocast if autocast is not None else contextlib.nullcontext()
        ref_model = ref_model.to(self.device)
        if cfg.ema_ref_decay is not None:
            ref_model = copy.deepcopy(ref_model)  # the EMA moves the reference: never the caller's pi_ref
            p_shapes = [(n, p.shape) for n, p in policy.named_parameters()]
            r_shapes = [(n, p.shape) for n, p in ref_model.named_parameters()]
            if p_shapes != r_shapes:
                raise ValueError("ppo.ema_ref_decay needs ref_model and policy of the same architecture")
        self.ref_model = ref_model.eval()
        self.value_model = value_model.to(self.device).eval() if value_model is not None else None
        self.value_head: torch.nn.Linear | None = None
        if cfg.value_model == "shared":
            hidden = policy.config.hidden_size
            self.value_head = torch.nn.Linear(hidden, 1).to(self.device)
            with torch.no_grad():  # zero init: V = 0 at the start
                self.value_head.weight.zero_()
                self.value_head.bias.zero_()
        self.policy.eval()  # dropout off throughout (gradients still flow)
        self._policy_params = [p for p in self.policy.parameters() if p.requires_grad]
        self._value_params = [p for p in self._value_module().parameters() if p.requires_grad]
        self.dist.broadcast_params(self._policy_params + self._value_params)  # replicas start equal (as DDP)
        self.opt = torch.optim.Adam(
            [{"params": self._policy_params, "lr": cfg.lr},
             {"params": self._value_params, "lr": cfg.vf_lr if cfg.vf_lr is not None else cfg.lr}],
            eps=cfg.adam_eps,
        )
        self._base_lrs = [g["lr"] for g in self.opt.param_groups]
        if cfg.target_kl is None:
            self.kl_ctl = FixedKLController(cfg.init_kl_coef)
        else:
            self.kl_ctl = AdaptiveKLController(cfg.init_kl_coef, cfg.target_kl, cfg.kl_horizon,
                                               coef_min=cfg.kl_coef_min, coef_max=cfg.kl_coef_max,
                                               hold_while_rising=cfg.kl_hold_while_rising)
        self._norm = _RunningStats()
        self._norm_frozen: tuple[float, float] | None = (
            None if reward_scale is None else (float(reward_scale[0]), float(reward_scale[1])))
        self.history: list[dict] = []
        self.iteration = 0
        self.episodes_seen = 0
        self.tokens_seen = 0
        self.last_good_state: dict[str, torch.Tensor] | None = None
        """CPU copy of the policy's state_dict before the current/last iteration (restored on non-finite)."""
        self.last_good_value_state: dict[str, torch.Tensor] | None = None
        self.last_rollout: dict | None = None
        """Tensors of the last rollout batch (ids, masks, log-probs, values, rewards, advantages), for inspection."""
        self._perms: dict[int, np.ndarray] = {}

    # ----------------------------------------------------------------------------------------- pieces
    def _value_module(self) -> torch.nn.Module:
        return self.value_head if self.value_head is not None else self.value_model

    def _prompt_slots(self, it: int) -> list[int]:
        """Prompt indices of iteration ``it`` (1-based): epochs of seeded permutations, read in order."""
        out, self._perms = permuted_slots(self._perms, len(self.prompts), it, self.cfg.rollout_batch_size,
                                          lambda e: _seed(self.cfg.seed, 1, e))
        return out

    def _forward(self, ids: torch.Tensor, attn: torch.Tensor, labels: torch.Tensor, *, want_entropy: bool):
        """Policy forward -> (logps [B, T-1], mask [B, T-1], values [B, T-1] or None, entropy or None)."""
        shared = self.value_head is not None
        with self.autocast:
            out = self.policy(input_ids=ids, attention_mask=attn, use_cache=False, output_hidden_states=shared)
        logits = out.logits  # [B, T, V]
        if self.cfg.temperature != 1.0:
            logits = logits.float() / self.cfg.temperature  # [N-details] logits /= temperature
        lp, mask = _token_logps(logits, labels)  # the shared log-prob path, [B, T-1]
        values = None
        if shared:
            h = out.hidden_states[-1][:, :-1]  # [B, T-1, H]: state before each predicted token
            values = self.value_head(h.float()).squeeze(-1)
        ent = None
        if want_entropy:
            with torch.no_grad():
                # the mean over scored positions, computed at those positions only (not prompt / padding)
                ent = entropy_from_logits(logits[:, :-1].detach()[mask.bool()]).mean()
        return lp, mask, values, ent

    def _values(self, ids: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        with self.autocast:
            v = self.value_model.token_values(ids, attn)  # [B, T]
        return v[:, :-1].float()  # [N-details] full_value[:, context_length - 1 : -1]

    def _normalise(self, raw: torch.Tensor) -> tuple[torch.Tensor, float, float]:
        cfg = self.cfg
        if not cfg.reward_norm:
            return raw, 0.0, 1.0
        if cfg.reward_norm_stats in ("first", "given"):  # given: frozen at construction
            if self._norm_frozen is None:
                self._norm.update(raw)
                self._norm_frozen = (self._norm.mean, self._norm.std)
            mean, std = self._norm_frozen
        else:
            self._norm.update(raw)
            mean, std = self._norm.mean, self._norm.std
        std = std if std > 1e-6 else 1.0  # constant scores: shift only
        return (raw - mean) / std, mean, std

    def _snapshot(self, it: int) -> None:
        if not all_finite(self.policy) or not all_finite(self._value_module()):
            self._restore()
            raise FloatingPointError(
                f"PPO iteration {it}: non-finite parameters after the update of iteration {it - 1} (phase update); "
                f"restored the state before iteration {it - 1} (trainer.last_good_state)")
        self.last_good_state = cpu_state(self.policy)
        self.last_good_value_state = cpu_state(self._value_module())

    def _restore(self) -> None:
        if self.last_good_state is not None:
            self.policy.load_state_dict(self.last_good_state)
            self._value_module().load_state_dict(self.last_good_value_state)

    # ----------------------------------------------------------------------------------------- checkpoints
    def _prompts_digest(self) -> str:
        return prompts_digest(self.prompts)

    def state_dict(self) -> dict:
        """Everything that affects later iterations (not ``last_good_state`` / ``last_rollout``)."""
        return {
            "policy": self.policy.state_dict(),
            "value": self._value_module().state_dict(),
            "ref_model": self.ref_model.state_dict() if self.cfg.ema_ref_decay is not None else None,
            "optimizer": self.opt.state_dict(),
            "kl_coef": float(self.kl_ctl.value),
            "kl_ctl": self.kl_ctl.state_dict(),
            "norm": {"n": self._norm.n, "mean": self._norm.mean, "m2": self._norm.m2},
            "norm_frozen": self._norm_frozen,
            "perms": {int(e): torch.from_numpy(np.asarray(pm)) for e, pm in self._perms.items()},
            "iteration": self.iteration,
            "episodes_seen": self.episodes_seen,
            "tokens_seen": self.tokens_seen,
            "history": list(self.history),
            "rng": rng_state(),
            "config": config_dict(self.cfg),
            "prompts_sha256": self._prompts_digest(),
        }

    def load_state_dict(self, d: dict) -> None:
        check_same_config(d["config"], config_dict(self.cfg), "PPO")
        if d["prompts_sha256"] != self._prompts_digest():
            raise ValueError("PPO checkpoint was written for other prompts: resuming it would not reproduce the run")
        self.policy.load_state_dict(d["policy"])
        self._value_module().load_state_dict(d["value"])
        if d["ref_model"] is not None:
            self.ref_model.load_state_dict(d["ref_model"])
        self.opt.load_state_dict(d["optimizer"])
        self.kl_ctl.load_state_dict(d.get("kl_ctl") or {"value": d["kl_coef"]})
        self._norm.n, self._norm.mean, self._norm.m2 = int(d["norm"]["n"]), float(d["norm"]["mean"]), float(d["norm"]["m2"])
        nf = d["norm_frozen"]
        self._norm_frozen = None if nf is None else (float(nf[0]), float(nf[1]))
        self._perms = {int(e): pm.numpy() for e, pm in d["perms"].items()}
        self.iteration = int(d["iteration"])
        self.episodes_seen = int(d["episodes_seen"])
        self.tokens_seen = int(d["tokens_seen"])
        self.history = list(d["history"])
        set_rng_state(d["rng"])

    # ----------------------------------------------------------------------------------------- loop
    _label = "PPO"  # in the shared loop's messages
    _restored = "Policy and value model restored to their state"

    def _iteration(self, it: int) -> dict:
        cfg, dev, dist = self.cfg, self.device, self.dist
        timers = Timers(dev)
        t_iter = time.perf_counter()
        R, M = cfg.rollout_batch_size, cfg.minibatch_size
        if cfg.anneal_lr:  # [N-details] lrnow = (1 - (update - 1) / num_updates) * lr
            frac = 1.0 - (it - 1) / cfg.iterations
            for g, base in zip(self.opt.param_groups, self._base_lrs, strict=True):
                g["lr"] = frac * base

        # 1. rollouts from the current policy (shared sampler, per-row seeds); this rank's shard of them
        slots = self._prompt_slots(it)
        prompts = [self.prompts[i] for i in slots]
        seeds = [_seed(cfg.seed, 2, it, i, j) for j, i in enumerate(slots)]
        sh = dist.shard(R)  # all R rows with one process
        l_prompts = prompts[sh]
        with timers("time/generation"):
            s = sample(self.policy, l_prompts, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                       seeds=seeds[sh], eos_token_id=self.eos_id, pad_token_id=self.pad_id,
                       batch_size=cfg.generation_batch_size, autocast=self._autocast_arg)
        self.policy.eval()
        l_comps = [c + [self.eos_id] if e else list(c) for c, e in zip(s.completions, s.ended, strict=True)]
        s_ended = dist.gather_objects(list(s.ended))  # [R] in global order
        comps = dist.gather_objects(l_comps)
        ended = torch.tensor(s_ended, device=dev)

        # 2. scores
        with timers("time/reward"):
            raw = self.reward_fn(l_prompts, l_comps)
            raw = torch.as_tensor(raw, dtype=torch.float32).detach().flatten().to(dev)  # [R / world_size]
            if raw.numel() != len(l_prompts):
                raise ValueError(f"reward_fn returned {raw.numel()} scores for {len(l_prompts)} completions")
            raw = dist.gather_rows(raw)  # [R]
            check_finite("scores", raw, phase="reward", step=it)
            scores, norm_mean, norm_std = self._normalise(raw)
            if cfg.missing_eos_penalty is not None:
                # [TRL-ppov2] scores[~contain_eos_token] -= self.args.missing_eos_penalty
                scores = torch.where(ended, scores, scores - cfg.missing_eos_penalty)

        # 3. old log-probs, reference log-probs, values: one no-grad forward each per chunk
        batch = {k: v.to(dev) for k, v in collate(l_prompts, l_comps, self.pad_id).items()}
        ids, attn, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        n_local = len(l_prompts)
        fb = cfg.forward_batch_size or n_local
        with timers("time/ref_value_forward"), torch.no_grad():
            lps, refs, vals, masks = [], [], [], []
            for c0 in range(0, n_local, fb):
                sl = slice(c0, c0 + fb)
                lp, mask, v, _ = self._forward(ids[sl], attn[sl], labels[sl], want_entropy=False)
                with self.autocast:
                    ref_logits = self.ref_model(input_ids=ids[sl], attention_mask=attn[sl], use_cache=False).logits
                if cfg.temperature != 1.0:
                    ref_logits = ref_logits.float() / cfg.temperature
                rlp, _ = _token_logps(ref_logits, labels[sl])
                if v is None:
                    v = self._values(ids[sl], attn[sl])
                lps.append(lp), refs.append(rlp), vals.append(v), masks.append(mask)
            old_lp, ref_lp, values, mask = (torch.cat(x) for x in (lps, refs, vals, masks))  # [R, T-1]
            zero = torch.zeros((), device=dev)
            values = torch.where(mask.bool(), values, zero)
        if dist.distributed:  # the whole rollout batch on every rank, padded as one collate would pad it
            ids, attn = dist.gather_rows(ids, self.pad_id), dist.gather_rows(attn, 0)
            labels = dist.gather_rows(labels, IGNORE_INDEX)
            old_lp, ref_lp, values, mask = (dist.gather_rows(x, 0) for x in (old_lp, ref_lp, values, mask))
        for name, t in (("logprobs", old_lp), ("ref_logprobs", ref_lp), ("values", values)):
            check_finite(name, t, phase="rollout_forward", step=it)

        # 4. per-token rewards, GAE, whitening
        kl_coef = float(self.kl_ctl.value)
        rewards, kl_pen = compute_rewards(scores, old_lp, ref_lp, mask, kl_coef=kl_coef, kl_kind=cfg.kl_estimator)
        kl_seq = torch.where(mask.bool(), old_lp - ref_lp, zero).sum(1)  # [R] k1 sequence KL (the paper's measure)
        mean_kl = float(kl_seq.mean())
        if cfg.kl_blowup is not None and mean_kl > cfg.kl_blowup:
            raise KLBlowupError(f"PPO iteration {it}: rollout KL {mean_kl:.3f} > ppo.kl_blowup={cfg.kl_blowup}; "
                                f"run aborted (lower ppo.lr or raise ppo.init_kl_coef); history up to iteration {it - 1} "
                                "is in trainer.history")
        if cfg.whiten_rewards:
            rewards = masked_whiten(rewards, mask, shift_mean=False)  # [N-details] whiten(rewards, shift_mean=False)
        check_finite("rewards", rewards, phase="advantages", step=it)
        advantages, returns = compute_gae(rewards, values, mask, gamma=cfg.gamma, lam=cfg.lam)
        ev = explained_variance(values, returns, mask)
        if cfg.whiten_advantages:
            advantages = masked_whiten(advantages, mask)  # [N-details] advantages = whiten(advantages)
        check_finite("advantages", advantages, phase="advantages", step=it)
        check_finite("returns", returns, phase="advantages", step=it)
        self.last_rollout = {"input_ids": ids, "attention_mask": attn, "labels": labels, "mask": mask,
                             "logprobs": old_lp, "ref_logprobs": ref_lp, "values": values, "scores": scores,
                             "raw_scores": raw, "rewards": rewards, "advantages": advantages, "returns": returns,
                             "prompt_indices": slots, "completions": comps, "ended": s.ended}

        # 5. PPO epochs over shuffled minibatches
        stats: dict[str, list[float]] = {k: [] for k in ("approxkl", "clipfrac", "entropy", "pg_loss", "vf_loss",
                                                          "vf_clipfrac", "loss", "grad_norm", "ratio")}
        first_approxkl = math.nan
        early, n_updates, update_tokens = False, 0, 0
        params = self._policy_params + self._value_params
        with timers("time/update"):
            for epoch in range(cfg.ppo_epochs):
                g = torch.Generator().manual_seed(_seed(cfg.seed, 3, it, epoch))
                perm = torch.randperm(R, generator=g).to(dev)
                for m0 in range(0, R, M):
                    mb_all = perm[m0 : m0 + M]
                    mb = mb_all[dist.shard(M)]  # this rank's rows of the minibatch (all of them: 1 process)
                    T = int(attn[mb].sum(1).max())  # trim the batch's trailing padding
                    mids, mattn, mlab = ids[mb, :T], attn[mb, :T], labels[mb, :T]
                    lp, _, v, ent = self._forward(mids, mattn, mlab, want_entropy=True)
                    if v is None:
                        v = self._values(mids, mattn)
                    mm = mask[mb, : T - 1]
                    pg, pst = policy_loss(lp, old_lp[mb, : T - 1], advantages[mb, : T - 1], mm,
                                          clip_range=cfg.clip_range)
                    vf, vst = value_loss(v, values[mb, : T - 1], returns[mb, : T - 1], mm,
                                         clip_range_value=cfg.clip_range_value)
                    loss = pg + cfg.vf_coef * vf  # [N-details] loss = pg_loss + vf_coef * vf_loss
                    mstats = {"approxkl": pst["approxkl"], "clipfrac": pst["clipfrac"], "entropy": ent,
                              "pg_loss": pg, "vf_loss": vf, "vf_clipfrac": vst["clipfrac"], "loss": loss,
                              "ratio": pst["ratio_mean"]}
                    if dist.distributed:
                        # token means over the whole minibatch: this rank's tokens weigh n_local / n_minibatch;
                        # the weighted losses' gradients, summed over ranks, are the minibatch mean's gradient
                        w = mm.sum() / mask[mb_all].sum()
                        loss = loss * w
                        red = dist.all_reduce_sum(torch.stack([x.detach().double() for x in mstats.values()]) * w.double())
                        mstats = dict(zip(mstats, red.cpu(), strict=True))
                    check_finite("policy_loss", mstats["pg_loss"], phase="update", step=it)
                    check_finite("value_loss", mstats["vf_loss"], phase="update", step=it)
                    self.opt.zero_grad(set_to_none=True)
                    loss.backward()
                    dist.all_reduce_grads(params, average=False)
                    gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                    check_finite("grad_norm", gnorm, phase="update", step=it)
                    self.opt.step()
                    n_updates += 1
                    update_tokens += int(attn[mb_all].sum())  # policy (and value) forward + backward tokens
                    akl = float(mstats["approxkl"])
                    if n_updates == 1:
                        first_approxkl = akl  # 0 up to float noise: policy unchanged since the rollout
                    for k, val in (("approxkl", akl), ("clipfrac", mstats["clipfrac"]), ("entropy", mstats["entropy"]),
                                   ("pg_loss", mstats["pg_loss"]), ("vf_loss", mstats["vf_loss"]),
                                   ("vf_clipfrac", mstats["vf_clipfrac"]), ("loss", mstats["loss"]),
                                   ("grad_norm", gnorm), ("ratio", mstats["ratio"])):
                        stats[k].append(float(val.detach()) if torch.is_tensor(val) else float(val))
                    if cfg.kl_stop is not None and akl > cfg.kl_stop:
                        early = True
                        break
                if early:
                    break

        # 6. KL controller ([TRL-ppo] kl_ctl.update(mean_kl, batch_size)) and EMA reference
        self.kl_ctl.update(mean_kl, R)
        kl_held = bool(self.kl_ctl.held)
        if cfg.ema_ref_decay is not None:
            with torch.no_grad():  # [Xu24] ref <- decay * ref + (1 - decay) * policy
                for pr, pp in zip(self.ref_model.parameters(), self.policy.parameters(), strict=True):
                    pr.lerp_(pp.detach().to(pr.dtype), 1.0 - cfg.ema_ref_decay)

        n_tok = int(mask.sum())
        self.episodes_seen += R
        self.tokens_seen += n_tok
        non_score = float((-kl_coef * kl_pen).sum(1).mean())  # [TRL-ppov2] mean sequence non-score reward
        t = timers.t
        rec = {
            "iteration": it,
            "episodes_seen": self.episodes_seen,
            "tokens_seen": self.tokens_seen,
            "objective/kl": mean_kl,
            "objective/kl_penalty": float(kl_pen.sum(1).mean()),
            "objective/scores": float(scores.mean()),
            "objective/raw_scores": float(raw.mean()),
            "objective/non_score_reward": non_score,
            "objective/rlhf_reward": float(scores.mean()) + non_score,  # [TRL-ppov2] rlhf_reward
            "objective/kl_coef": kl_coef,
            "objective/kl_coef_next": float(self.kl_ctl.value),
            "objective/kl_coef_held": kl_held,
            "objective/eos_frac": float(ended.float().mean()),
            "objective/completion_len": n_tok / R,
            # compute accounting (whole rollout batch): prompt + generated tokens of sampling, the tokens of each
            # no-grad forward over the rollouts (old policy, reference, value, reward), the update's fwd+bwd tokens
            "tokens/prompt": sum(len(p) for p in prompts),
            "tokens/generated": sum(len(c) for c in comps),
            "tokens/sequence": int(attn.sum()),
            "tokens/update": update_tokens,
            "objective/reward_norm_mean": norm_mean,
            "objective/reward_norm_std": norm_std,
            "policy/approxkl": float(np.mean(stats["approxkl"])),
            "policy/approxkl_first_minibatch": first_approxkl,
            "policy/clipfrac": float(np.mean(stats["clipfrac"])),
            "policy/entropy": float(np.mean(stats["entropy"])),
            "policy/loss": float(np.mean(stats["pg_loss"])),
            "policy/ratio": float(np.mean(stats["ratio"])),
            "policy/updates": n_updates,
            "policy/early_stopped": early,
            "val/loss": float(np.mean(stats["vf_loss"])),
            "val/explained_variance": ev,
            "val/clipfrac": float(np.mean(stats["vf_clipfrac"])),
            "val/mean": float(masked_mean(values, mask)),
            "loss/total": float(np.mean(stats["loss"])),
            "grad_norm": float(np.mean(stats["grad_norm"])),
            "lr": self.opt.param_groups[0]["lr"],
            "time/generation": t.get("time/generation", 0.0),
            "time/reward": t.get("time/reward", 0.0),
            "time/ref_value_forward": t.get("time/ref_value_forward", 0.0),
            "time/update": t.get("time/update", 0.0),
            "time/iteration": time.perf_counter() - t_iter,
        }
        return rec
