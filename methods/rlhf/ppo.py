"""PPO for the RLHF arm, following "The N Implementation Details of RLHF with PPO" ([N-details]): its config and
its step of the on-policy engine (``methods.onpolicy``, where the iteration itself is described: rollout, scoring,
no-grad forwards, minibatch updates, NaN guard, checkpoints, data parallelism).

PPO's step (``PPOStep``; rows = ``rollout_batch_size`` prompts, one completion each):
  forwards    the critic's values beside the engine's old / reference log-probs: a separate value model with
              ``token_values`` (e.g. a copy of the RM, [N-details]) or a zero-init linear head on the policy's last
              hidden state (``value_model="shared"``), ``values[t]`` = V(state before completion token t)
  advantages  per-token reward = score at the last token - beta * KL_t (``ppo_core.compute_rewards``, the k1 / k2 /
              k3 estimator [Ziegler19]), optional reward whitening, GAE (gamma, lam) [GAE], advantage whitening
              over the rollout batch [N-details]; the run is aborted (``KLBlowupError``) past ``kl_blowup``
  loss        clipped policy loss + vf_coef * clipped value loss [PPO] (token means), entropy and approx KL logged;
              the epochs stop early once a minibatch's approx KL exceeds ``kl_stop``
  end         adaptive or fixed KL coefficient update with the batch's mean KL ([TRL-ppo] ``kl_ctl.update``;
              bounds and the hold while the KL still climbs: ``ppo_core.AdaptiveKLController``); the EMA reference
              (Strong-PPO [Xu24]) moved towards the policy on a private copy of the reference

Resumable (checkpoint: policy, critic, optimiser, KL controller, reward-normalisation statistics, prompt order,
counters, EMA reference, history, RNG states). Data parallel as every engine method; under several processes
every PPO minibatch is split over the ranks with its token-weighted loss. Dropout is left off throughout, so the
first minibatch of every iteration has ratio exactly 1 ([N-details] "disable dropout").

Sources:
  [N-details]  Huang et al. 2023, HF blog + vwxyzjn/lm-human-preference-details ``summarize/ppo.py``
  [TRL-ppov2]  huggingface/trl ``PPOv2Trainer`` / ``PPOTrainer`` (<= 0.x; deleted in TRL 1.16)
  [TRL-ppo]    huggingface/trl legacy ``PPOTrainer.step`` (adaptive KL update with the batch's mean KL)
  [Ziegler19]  Ziegler et al. 2019, arXiv:1909.08593 (per-token KL reward, adaptive KL controller)
  [PPO]        Schulman et al. 2017, arXiv:1707.06347; [GAE] Schulman et al. 2016, arXiv:1506.02438
  [Xu24]       Xu et al. 2024, "Is DPO Superior to PPO for LLM Alignment?", arXiv:2404.10719 (EMA reference)
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch

from methods import onpolicy as op
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

VALUE_MODES = ("separate", "shared")
NORM_STATS = ("first", "running", "given")


class KLBlowupError(RuntimeError):
    """The rollout KL exceeded ``PPOConfig.kl_blowup``: the run is aborted (history is kept on the trainer)."""


@dataclass
class PPOConfig(op.OnPolicyConfig):
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
    missing_eos_penalty: float | None = None
    """Subtracted from the score of completions that did not end with EOS ([TRL-ppov2]); None = off."""
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
    anneal_lr: bool = False
    """Linearly anneal the learning rates to 0 over the iterations ([N-details])."""

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

        pos = op.is_pos
        checks = [
            (op.is_num(self.init_kl_coef) and float(self.init_kl_coef) >= 0, "init_kl_coef",
             "must be >= 0 (0 = no KL penalty)"),
            (pos(self.kl_horizon), "kl_horizon", "must be > 0 (e.g. 10000 episodes)"),
            (self.kl_estimator in ppo_core.KL_KINDS, "kl_estimator", f"must be one of {ppo_core.KL_KINDS}"),
            (op.is_pos_int(self.ppo_epochs), "ppo_epochs", "must be an integer >= 1"),
            (self.vf_lr is None or pos(self.vf_lr), "vf_lr", "must be > 0 or null (= lr)"),
            (self.vf_coef is not None and float(self.vf_coef) >= 0, "vf_coef", "must be >= 0"),
            (self.reward_norm_stats in NORM_STATS, "reward_norm_stats", f"must be one of {NORM_STATS}"),
            (self.kl_coef_min is None or (pos(self.kl_coef_min) and self.kl_coef_min <= self.init_kl_coef),
             "kl_coef_min", "must be > 0 and <= init_kl_coef, or null (0)"),
            (self.kl_coef_max is None or (pos(self.kl_coef_max) and self.kl_coef_max >= self.init_kl_coef),
             "kl_coef_max", "must be >= init_kl_coef, or null (unbounded)"),
            (isinstance(self.kl_hold_while_rising, bool), "kl_hold_while_rising", "must be true or false"),
            (self.missing_eos_penalty is None or math.isfinite(float(self.missing_eos_penalty)),
             "missing_eos_penalty", "must be a finite number or null"),
            (self.kl_stop is None or pos(self.kl_stop), "kl_stop", "must be > 0 or null (off)"),
            (self.kl_blowup is None or pos(self.kl_blowup), "kl_blowup", "must be > 0 or null (off)"),
            (self.ema_ref_decay is None or 0.0 <= float(self.ema_ref_decay) < 1.0, "ema_ref_decay",
             "must be in [0, 1) or null (fixed reference)"),
            (self.value_model in VALUE_MODES, "value_model", f"must be one of {VALUE_MODES}"),
            (isinstance(self.anneal_lr, bool), "anneal_lr", "must be true or false"),
        ]
        op.raise_invalid(errors + op.field_errors(self, checks + op.loop_checks(self)), "PPO config (ppo.*)")


def config_dict(cfg: PPOConfig) -> dict:
    return asdict(cfg)


# --------------------------------------------------------------------------------------------- the step
class PPOStep(op.OnPolicyStep):
    """PPO's part of the engine's iteration (module docstring)."""

    label = "PPO"
    rows_field = "ppo.rollout_batch_size"
    restored = "Policy and value model restored to their state"
    first_stats = "running"
    mean_stats = ("approxkl", "clipfrac", "entropy", "pg_loss", "vf_loss", "vf_clipfrac", "loss", "ratio")
    finite_checks = (("policy_loss", "pg_loss"), ("value_loss", "vf_loss"))

    def __init__(self, cfg: PPOConfig, value_model=None) -> None:
        super().__init__(cfg)
        self.value_model = value_model
        self.value_head: torch.nn.Linear | None = None
        self.wants_hidden = cfg.value_model == "shared"

    def loop_config(self) -> op.LoopConfig:
        c = self.cfg
        return op.LoopConfig.of(c, prompts_per_iteration=c.rollout_batch_size, k=1, logp_temperature=c.temperature,
                             epochs=c.ppo_epochs, minibatch_size=c.minibatch_size, anneal_lr=c.anneal_lr,
                             reward_norm=c.reward_norm_stats if c.reward_norm else None,
                             missing_eos_penalty=c.missing_eos_penalty)

    def config_dict(self) -> dict:
        return config_dict(self.cfg)

    def reward_scale_error(self, reward_scale) -> str:
        return ("ppo.reward_norm_stats='given' (with reward_norm) needs reward_scale=(mean, std), and reward_scale is "
                "only read then")

    def check_models(self, policy, ref_model) -> None:
        vm = self.value_model
        if self.cfg.value_model == "separate":
            if vm is None or not hasattr(vm, "token_values"):
                raise ValueError("ppo.value_model='separate' needs a value model with token_values(); pass "
                                 "value_model_from_reward_model(rm) (N-details) or use value_model='shared'")
            if vm is policy or vm is ref_model:
                raise ValueError("value_model must be its own module, not the policy or the reference")
        elif vm is not None:
            raise ValueError("ppo.value_model='shared' puts a value head on the policy: pass value_model=None")

    def bind(self, engine: op.OnPolicyEngine) -> None:
        super().bind(engine)
        cfg, dev = self.cfg, engine.device
        if cfg.ema_ref_decay is not None:
            ref = copy.deepcopy(engine.ref_model)  # the EMA moves the reference: never the caller's pi_ref
            p_shapes = [(n, p.shape) for n, p in engine.policy.named_parameters()]
            if p_shapes != [(n, p.shape) for n, p in ref.named_parameters()]:
                raise ValueError("ppo.ema_ref_decay needs ref_model and policy of the same architecture")
            engine.ref_model = ref.eval()
        if self.value_model is not None:
            self.value_model = self.value_model.to(dev).eval()
        if cfg.value_model == "shared":
            self.value_head = torch.nn.Linear(engine.policy.config.hidden_size, 1).to(dev)
            with torch.no_grad():  # zero init: V = 0 at the start
                self.value_head.weight.zero_()
                self.value_head.bias.zero_()
        if cfg.target_kl is None:
            self.kl_ctl = FixedKLController(cfg.init_kl_coef)
        else:
            self.kl_ctl = AdaptiveKLController(cfg.init_kl_coef, cfg.target_kl, cfg.kl_horizon,
                                               coef_min=cfg.kl_coef_min, coef_max=cfg.kl_coef_max,
                                               hold_while_rising=cfg.kl_hold_while_rising)

    def value_module(self) -> torch.nn.Module:
        return self.value_head if self.value_head is not None else self.value_model

    def extra_params(self) -> list:
        return [p for p in self.value_module().parameters() if p.requires_grad]

    def extra_modules(self) -> dict:
        return {"value": self.value_module()}

    def optimizer(self, policy_params, extra_params):
        cfg = self.cfg
        return torch.optim.Adam([{"params": policy_params, "lr": cfg.lr},
                                 {"params": extra_params, "lr": cfg.vf_lr if cfg.vf_lr is not None else cfg.lr}],
                                eps=cfg.adam_eps)

    # ----------------------------------------------------------------------------------------- critic
    def _values(self, fwd, ids, attn) -> torch.Tensor:
        """V(state before each predicted token) [B, T-1]."""
        if self.value_head is not None:
            h = fwd.hidden[:, :-1]  # [B, T-1, H]: state before each predicted token
            return self.value_head(h.float()).squeeze(-1)
        with self.engine.autocast:
            v = self.value_model.token_values(ids, attn)  # [B, T]
        return v[:, :-1].float()  # [N-details] full_value[:, context_length - 1 : -1]

    def rollout_extras(self, ids, attn, labels, policy_fwd):
        v = self._values(policy_fwd, ids, attn)
        return {"values": torch.where(policy_fwd.mask.bool(), v, torch.zeros((), device=v.device))}

    # ----------------------------------------------------------------------------------------- advantages
    def experience(self, ro) -> op.Experience:
        cfg, it = self.cfg, ro.it
        mask, old_lp, ref_lp, values, scores = ro.mask, ro.logprobs, ro.ref_logprobs, ro.extra["values"], ro.scores
        kl_coef = float(self.kl_ctl.value)
        rewards, kl_pen = compute_rewards(scores, old_lp, ref_lp, mask, kl_coef=kl_coef, kl_kind=cfg.kl_estimator)
        mean_kl = float(ro.kl_seq.mean())
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
        inspect = {"input_ids": ro.ids, "attention_mask": ro.attn, "labels": ro.labels, "mask": mask,
                   "logprobs": old_lp, "ref_logprobs": ref_lp, "values": values, "scores": scores,
                   "raw_scores": ro.raw, "rewards": rewards, "advantages": advantages, "returns": returns,
                   "prompt_indices": ro.slots, "completions": ro.completions, "ended": ro.ended}
        data = {"advantages": advantages, "returns": returns, "kl_coef": kl_coef, "kl_pen": kl_pen,
                "mean_kl": mean_kl, "ev": ev}
        return op.Experience(n=cfg.rollout_batch_size, data=data, inspect=inspect)

    def units(self, exp, idx, rows):
        return exp.inspect["mask"][rows].sum()  # token means: this rank's tokens of the minibatch

    def minibatch(self, exp, mb) -> op.MinibatchLoss:
        cfg, d, ro = self.cfg, exp.data, exp.inspect
        T = mb.ids.shape[1]
        f = self.engine.forward(self.engine.policy, mb.ids, mb.attn, mb.labels, hidden=self.wants_hidden)
        v = self._values(f, mb.ids, mb.attn)
        with torch.no_grad():
            # the mean over scored positions, computed at those positions only (not prompt / padding)
            ent = entropy_from_logits(f.logits[:, :-1].detach()[f.mask.bool()]).mean()
        r, mm = mb.rows, ro["mask"][mb.rows, : T - 1]
        pg, pst = policy_loss(f.logps, ro["logprobs"][r, : T - 1], d["advantages"][r, : T - 1], mm,
                              clip_range=cfg.clip_range)
        vf, vst = value_loss(v, ro["values"][r, : T - 1], d["returns"][r, : T - 1], mm,
                             clip_range_value=cfg.clip_range_value)
        loss = pg + cfg.vf_coef * vf  # [N-details] loss = pg_loss + vf_coef * vf_loss
        return op.MinibatchLoss(loss, {"approxkl": pst["approxkl"], "clipfrac": pst["clipfrac"], "entropy": ent,
                                    "pg_loss": pg, "vf_loss": vf, "vf_clipfrac": vst["clipfrac"], "loss": loss,
                                    "ratio": pst["ratio_mean"]})

    def stop_epochs(self, upd) -> bool:
        return self.cfg.kl_stop is not None and upd.means["approxkl"][-1] > self.cfg.kl_stop

    # ----------------------------------------------------------------------------------------- end
    def end_iteration(self, ro, exp, upd) -> None:
        cfg = self.cfg
        self.kl_ctl.update(exp.data["mean_kl"], cfg.rollout_batch_size)  # [TRL-ppo] kl_ctl.update(mean_kl, bs)
        if cfg.ema_ref_decay is not None:
            with torch.no_grad():  # [Xu24] ref <- decay * ref + (1 - decay) * policy
                for pr, pp in zip(self.engine.ref_model.parameters(), self.engine.policy.parameters(), strict=True):
                    pr.lerp_(pp.detach().to(pr.dtype), 1.0 - cfg.ema_ref_decay)

    def record(self, ro, exp, upd) -> dict:
        d, values = exp.data, ro.extra["values"]
        kl_coef, kl_pen = d["kl_coef"], d["kl_pen"]
        non_score = float((-kl_coef * kl_pen).sum(1).mean())  # [TRL-ppov2] mean sequence non-score reward
        return {
            "objective/kl": d["mean_kl"],
            "objective/kl_penalty": float(kl_pen.sum(1).mean()),
            "objective/non_score_reward": non_score,
            "objective/rlhf_reward": float(ro.scores.mean()) + non_score,  # [TRL-ppov2] rlhf_reward
            "objective/kl_coef": kl_coef,
            "objective/kl_coef_next": float(self.kl_ctl.value),
            "objective/kl_coef_held": bool(self.kl_ctl.held),
            "policy/approxkl": upd.mean("approxkl"),
            "policy/approxkl_first_minibatch": upd.means["approxkl"][0],  # 0 up to float noise: ratio 1
            "policy/clipfrac": upd.mean("clipfrac"),
            "policy/entropy": upd.mean("entropy"),
            "policy/loss": upd.mean("pg_loss"),
            "policy/ratio": upd.mean("ratio"),
            "policy/early_stopped": upd.early,
            "val/loss": upd.mean("vf_loss"),
            "val/explained_variance": d["ev"],
            "val/clipfrac": upd.mean("vf_clipfrac"),
            "val/mean": float(masked_mean(values, ro.mask)),
            "loss/total": upd.mean("loss"),
        }

    # ----------------------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict:
        e = self.engine
        return {"value": self.value_module().state_dict(),
                "ref_model": e.ref_model.state_dict() if self.cfg.ema_ref_decay is not None else None,
                "kl_coef": float(self.kl_ctl.value), "kl_ctl": self.kl_ctl.state_dict()}

    def load_state_dict(self, d: dict) -> None:
        self.value_module().load_state_dict(d["value"])
        if d["ref_model"] is not None:
            self.engine.ref_model.load_state_dict(d["ref_model"])
        self.kl_ctl.load_state_dict(d.get("kl_ctl") or {"value": d["kl_coef"]})


# --------------------------------------------------------------------------------------------- trainer
class PPOTrainer(op.OnPolicyEngine):
    """PPO for a causal-LM policy against a reward callable: the on-policy engine with ``PPOStep``.

    ``policy`` is trained in place (pass a copy of pi_ref); ``ref_model`` is only read (with ``ema_ref_decay``
    the trainer moves a private copy, ``trainer.ref_model``); ``value_model`` is a module with
    ``token_values(input_ids, attention_mask) -> [B, T]`` for ``value_model="separate"`` (e.g.
    ``reward_model.value_model_from_reward_model(rm)``) and must be None for ``"shared"``. ``reward_fn`` may be the
    RM or, for the explicitly named PPO-GT arm, the gold reward (this module never imports one). The rest as
    ``methods.onpolicy.OnPolicyEngine`` (``autocast``, ``accelerator``, ``monitor``, ``reward_scale``)."""

    def __init__(self, policy, ref_model, reward_fn: Callable, value_model, tokenizer,
                 prompts: Sequence[Sequence[int]], cfg: PPOConfig, device: str | torch.device, autocast=None,
                 accelerator=None, reward_scale: tuple[float, float] | None = None, monitor: Callable | None = None):
        super().__init__(PPOStep(cfg, value_model), policy, ref_model, reward_fn, tokenizer, prompts, device,
                         autocast=autocast, accelerator=accelerator, monitor=monitor, reward_scale=reward_scale)

    @property
    def kl_ctl(self):
        return self.step.kl_ctl

    @property
    def value_head(self) -> torch.nn.Linear | None:
        return self.step.value_head

    @property
    def value_model(self):
        return self.step.value_model
