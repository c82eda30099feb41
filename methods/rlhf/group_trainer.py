"""One training loop for the group-sampled policy-gradient methods RLOO and GRPO (``methods.rlhf.group``).

One iteration:
  1. rollouts   ``prompts_per_iteration`` prompts, ``k`` completions each, from the *current* policy with the shared
                KV-cache sampler (``methods.sampling.sample``; per-row seeds ``derive_seed(seed, 2, iteration, prompt,
                row)``), so ``prompts_per_iteration * k`` episodes per iteration; completions end with EOS when the
                sample did (the sequence the reward model and DPO see)
  2. reward     ``reward_fn(prompt_ids, completion_ids) -> [B]`` (optionally normalised with the first rollouts'
                statistics, as ``PPOConfig.reward_norm_stats="first"``); ``monitor`` (e.g. the gold reward) is only
                logged, never trained on
  3. forwards   one no-grad forward each of the policy (old log-probs) and the reference over right-padded rows built
                by ``methods.data.collate``, log-probs through ``methods.logprobs.token_logps`` (PPO's path, on logits /
                temperature); no value model
  4. advantages RLOO: reward - beta * sum_t (log pi - log pi_ref) (k1, as PPO's KL reward), leave-one-out baseline.
                GRPO: scores normalised within each prompt's group (mean, std + 1e-4); its KL is in the loss
  5. update     ``epochs`` passes over shuffled minibatches of ``minibatch_size`` completions: ``rloo_loss``
                (REINFORCE, or clipped when ``clip_eps`` is set) / ``grpo_loss`` (clipped ratio + beta * k3, token
                mean), grad-norm clipping, Adam

Budget: ``episodes = completions``; with ``prompts_per_iteration * k == PPOConfig.rollout_batch_size`` and the same
``iterations``, an RLOO/GRPO arm samples exactly as many completions as the PPO arm.

NaN guard as PPO's: every non-finite score, log-prob, advantage, loss or gradient norm raises ``FloatingPointError``
naming the quantity, phase and iteration, after the policy is restored to its state before that iteration
(``trainer.last_good_state``). Resumable as PPO: ``train(checkpoint_path=..., checkpoint_every=n)``; rollout seeds
depend only on (seed, iteration, prompt, row), so a resumed run ends with the numbers of an uninterrupted one.
Single process only (under ``accelerate launch`` every rank computes the same whole run).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch

from methods.checkpointing import check_same_config, rng_state, set_rng_state
from methods.data import collate
from methods.logprobs import token_logps
from methods.rl_loop import IterativeTrainer, Timers, all_finite, cpu_state, permuted_slots, prompts_digest
from methods.rlhf.group import (
    KL_GRADS,
    grpo_advantages,
    grpo_loss,
    kl_penalised_rewards,
    rloo_advantages,
    rloo_loss,
)
from methods.rlhf.ppo_core import check_finite
from methods.sampling import derive_seed, sample

ALGORITHMS = ("rloo", "grpo")
GRPO_DEFAULT_CLIP = 0.2
"""TRL 1.16 GRPOConfig.epsilon."""


@dataclass
class GroupRLConfig:
    algorithm: str
    """'rloo' (leave-one-out baseline, KL in the reward) | 'grpo' (group-normalised advantages, k3 KL in the loss)."""
    beta: float = 0.05
    """KL coefficient: RLOO's k1 penalty in the reward (>= 0), GRPO's k3 term in the loss (> 0: the arm must be
    KL-regularised to sit on the KL frontier)."""
    k: int = 4
    """Completions sampled per prompt (the group); >= 2."""
    prompts_per_iteration: int = 16
    """Prompts per iteration; episodes per iteration = prompts_per_iteration * k (PPO's rollout_batch_size)."""
    minibatch_size: int = 16
    """Completions per optimiser step; must divide prompts_per_iteration * k."""
    epochs: int = 1
    """Passes over each rollout batch. RLOO needs clip_eps for > 1 (repeated unclipped importance weights)."""
    clip_eps: float | None = None
    """Ratio clipping: GRPO per token (None = 0.2, TRL's epsilon); RLOO per sequence (None = unclipped REINFORCE)."""
    lr: float = 1e-5
    iterations: int = 100
    max_new_tokens: int = 24
    temperature: float = 1.0
    """Sampling temperature; log-probs are of logits / temperature (as PPO). Must be > 0."""
    scale_rewards: bool = True
    """GRPO: divide by the group's std (TRL's scale_rewards='group'); False = mean baseline only (Dr. GRPO)."""
    adv_eps: float = 1e-4
    """GRPO: the std's epsilon (TRL: 1e-4)."""
    kl_grad: str = "k3_ratio"
    """GRPO: the KL term's gradient (``methods.rlhf.group.KL_GRADS``). ``k3_ratio`` (default; TRL 1.16's
    ``use_bias_correction_kl=True``): the unbiased gradient of the reverse KL(pi || pi_ref), the KL the frontier
    measures and PPO / RLOO penalise; ``k3``: DeepSeekMath's term, whose gradient is that of KL(pi_ref || pi)."""
    reward_norm: bool = False
    """Normalise reward_fn scores to mean 0 / std 1 with the first rollouts' statistics (from pi_ref), as PPO's
    reward_norm with reward_norm_stats='first' (matters for RLOO, whose beta weighs the KL against the score)."""
    grad_clip: float = 1.0
    adam_eps: float = 1e-5
    generation_batch_size: int = 256
    """Rows per sampler batch (the samples do not depend on it)."""
    forward_batch_size: int = 0
    """Rows per no-grad rollout forward; 0 = the whole rollout batch in one forward."""
    seed: int = 0

    @property
    def rollout_batch_size(self) -> int:
        """Completions (= episodes) per iteration."""
        return self.prompts_per_iteration * self.k

    @property
    def effective_clip(self) -> float | None:
        return self.clip_eps if self.clip_eps is not None or self.algorithm == "rloo" else GRPO_DEFAULT_CLIP

    def validate(self) -> None:
        """Raise one ValueError listing every invalid field, each by name."""

        def num(x) -> bool:
            return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(float(x))

        def pos(x) -> bool:
            return num(x) and float(x) > 0

        def pos_int(x) -> bool:
            return isinstance(x, int) and not isinstance(x, bool) and x >= 1

        grpo = self.algorithm == "grpo"
        checks = [
            (self.algorithm in ALGORITHMS, "algorithm", f"must be one of {ALGORITHMS}"),
            (num(self.beta) and (self.beta > 0 if grpo else self.beta >= 0), "beta",
             "must be > 0 for GRPO (its KL term keeps the arm on the KL frontier)" if grpo else "must be >= 0"),
            (pos_int(self.k) and self.k >= 2, "k", "must be an integer >= 2 (a group needs another sample as baseline)"),
            (pos_int(self.prompts_per_iteration), "prompts_per_iteration", "must be an integer >= 1"),
            (pos_int(self.minibatch_size), "minibatch_size", "must be an integer >= 1"),
            (pos_int(self.epochs), "epochs", "must be an integer >= 1"),
            (self.clip_eps is None or (num(self.clip_eps) and 0 < self.clip_eps < 1), "clip_eps",
             "must be in (0, 1) or null (GRPO: 0.2; RLOO: unclipped)"),
            (pos(self.lr), "lr", "must be > 0"),
            (pos_int(self.iterations), "iterations", "must be an integer >= 1"),
            (pos_int(self.max_new_tokens), "max_new_tokens", "must be an integer >= 1"),
            (pos(self.temperature), "temperature", "must be > 0 (a policy gradient needs a stochastic policy)"),
            (isinstance(self.scale_rewards, bool), "scale_rewards", "must be true or false"),
            (num(self.adv_eps) and self.adv_eps >= 0, "adv_eps", "must be >= 0"),
            (self.kl_grad in KL_GRADS, "kl_grad", f"must be one of {KL_GRADS}"),
            (isinstance(self.reward_norm, bool), "reward_norm", "must be true or false"),
            (pos(self.grad_clip), "grad_clip", "must be > 0"),
            (pos(self.adam_eps), "adam_eps", "must be > 0"),
            (pos_int(self.generation_batch_size), "generation_batch_size", "must be an integer >= 1"),
            (isinstance(self.forward_batch_size, int) and self.forward_batch_size >= 0, "forward_batch_size",
             "must be an integer >= 0 (0 = whole rollout batch)"),
            (isinstance(self.seed, int) and self.seed >= 0, "seed", "must be an integer >= 0"),
        ]
        errors = [f"{key} {msg}, got {getattr(self, key)!r}" for ok, key, msg in checks if not ok]
        if not errors:
            n = self.rollout_batch_size
            if self.minibatch_size > n or n % self.minibatch_size:
                errors.append(f"minibatch_size must divide prompts_per_iteration * k = {n}, got {self.minibatch_size}")
            if self.algorithm == "rloo" and self.epochs > 1 and self.clip_eps is None:
                errors.append(f"epochs > 1 needs clip_eps for RLOO (unclipped REINFORCE is on-policy), got epochs="
                              f"{self.epochs} with clip_eps=None")
        if errors:
            raise ValueError(f"invalid {self.algorithm} config:\n  - " + "\n  - ".join(errors))


class GroupRLTrainer(IterativeTrainer):
    """RLOO / GRPO for a causal-LM policy against a reward callable (no value model).

    ``policy`` is trained in place (pass a copy of pi_ref); ``ref_model`` is only read. ``prompts``: token-id lists
    (with BOS if the tokenizer adds it). ``monitor(prompt_ids, completion_ids) -> [B]`` (optional, e.g. the gold
    reward) is logged as ``objective/gold`` and never used for training. ``autocast``: a reusable context manager
    wrapped around every forward and the sampler.
    """

    def __init__(self, policy, ref_model, reward_fn: Callable, tokenizer, prompts: Sequence[Sequence[int]],
                 cfg: GroupRLConfig, device: str | torch.device, autocast=None, monitor: Callable | None = None,
                 reward_scale: tuple[float, float] | None = None):
        cfg.validate()
        if reward_scale is not None and not (cfg.reward_norm and math.isfinite(reward_scale[0]) and reward_scale[1] > 0):
            raise ValueError(f"reward_scale={reward_scale!r} needs reward_norm and a finite (mean, std > 0)")
        if policy is ref_model:
            raise ValueError("policy and ref_model are the same object: pass a trainable copy of pi_ref as policy")
        if not callable(reward_fn):
            raise TypeError("reward_fn must be callable: reward_fn(prompt_ids, completion_ids) -> Tensor[N]")
        if len(prompts) == 0:
            raise ValueError(f"no prompts: {cfg.algorithm} needs at least one prompt")
        bad = [i for i, p in enumerate(prompts) if len(p) == 0]
        if bad:
            raise ValueError(f"empty prompts at indices {bad[:5]}: every prompt needs at least one token (e.g. BOS)")
        if tokenizer.eos_token_id is None or tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer needs eos_token_id and pad_token_id")
        if tokenizer.pad_token_id == tokenizer.eos_token_id:
            raise ValueError("pad_token_id == eos_token_id: give the tokenizer a distinct pad token")
        self.cfg = cfg
        self.device = torch.device(device)
        self.policy = policy.to(self.device).eval()  # dropout off throughout (gradients still flow)
        self.ref_model = ref_model.to(self.device).eval()
        self.reward_fn, self.monitor = reward_fn, monitor
        self.eos_id, self.pad_id = tokenizer.eos_token_id, tokenizer.pad_token_id
        self.prompts = [list(map(int, p)) for p in prompts]
        self._autocast_arg = autocast
        self.autocast = autocast if autocast is not None else contextlib.nullcontext()
        self._params = [p for p in self.policy.parameters() if p.requires_grad]
        if not self._params:
            raise ValueError("the policy has no trainable parameters")
        self.opt = torch.optim.Adam(self._params, lr=cfg.lr, eps=cfg.adam_eps)
        self._norm: tuple[float, float] | None = None if reward_scale is None else (float(reward_scale[0]),
                                                                                      float(reward_scale[1]))
        """(mean, std) of the reward normalisation: ``reward_scale`` (the RM's gain and bias under pi_ref), else the
        first rollouts' statistics."""
        self._perms: dict[int, np.ndarray] = {}
        self.history: list[dict] = []
        self.iteration = 0
        self.episodes_seen = 0
        self.tokens_seen = 0
        self.last_good_state: dict[str, torch.Tensor] | None = None
        """CPU copy of the policy's state_dict before the current/last iteration (restored on non-finite)."""
        self.last_rollout: dict | None = None

    # ----------------------------------------------------------------------------------------- pieces
    def _prompt_slots(self, it: int) -> list[int]:
        """Prompt indices of iteration ``it`` (1-based): epochs of seeded permutations read in order (as PPO)."""
        out, self._perms = permuted_slots(self._perms, len(self.prompts), it, self.cfg.prompts_per_iteration,
                                          lambda e: derive_seed(self.cfg.seed, 1, e))
        return out

    def _logps(self, model, ids: torch.Tensor, attn: torch.Tensor, labels: torch.Tensor):
        """-> (log-probs of the labels [B, T-1], mask [B, T-1]) through PPO's path (``token_logps``)."""
        with self.autocast:
            logits = model(input_ids=ids, attention_mask=attn, use_cache=False).logits  # [B, T, V]
        if self.cfg.temperature != 1.0:
            logits = logits.float() / self.cfg.temperature  # as PPO: logits /= temperature
        return token_logps(logits, labels)

    def _normalise(self, raw: torch.Tensor) -> tuple[torch.Tensor, float, float]:
        if not self.cfg.reward_norm:
            return raw, 0.0, 1.0
        if self._norm is None:  # statistics of the first rollouts (the policy is still pi_ref)
            x = raw.double()
            std = float(x.std()) if x.numel() > 1 else 1.0
            self._norm = (float(x.mean()), std if std > 1e-6 else 1.0)
        mean, std = self._norm
        return (raw - mean) / std, mean, std

    def _snapshot(self, it: int) -> None:
        if not all_finite(self.policy):
            self._restore()
            raise FloatingPointError(f"{self.cfg.algorithm} iteration {it}: non-finite parameters after iteration "
                                     f"{it - 1}; restored the state before it (trainer.last_good_state)")
        self.last_good_state = cpu_state(self.policy)

    def _restore(self) -> None:
        if self.last_good_state is not None:
            self.policy.load_state_dict(self.last_good_state)

    # ----------------------------------------------------------------------------------------- checkpoints
    def _prompts_digest(self) -> str:
        return prompts_digest(self.prompts)

    def state_dict(self) -> dict:
        return {"policy": self.policy.state_dict(), "optimizer": self.opt.state_dict(), "norm": self._norm,
                "perms": {int(e): torch.from_numpy(np.asarray(pm)) for e, pm in self._perms.items()},
                "iteration": self.iteration, "episodes_seen": self.episodes_seen, "tokens_seen": self.tokens_seen,
                "history": list(self.history), "rng": rng_state(), "config": asdict(self.cfg),
                "prompts_sha256": self._prompts_digest()}

    def load_state_dict(self, d: dict) -> None:
        check_same_config(d["config"], asdict(self.cfg), self.cfg.algorithm.upper())
        if d["prompts_sha256"] != self._prompts_digest():
            raise ValueError(f"{self.cfg.algorithm} checkpoint was written for other prompts: resuming it would not "
                             "reproduce the run")
        self.policy.load_state_dict(d["policy"])
        self.opt.load_state_dict(d["optimizer"])
        self._norm = None if d["norm"] is None else (float(d["norm"][0]), float(d["norm"][1]))
        self._perms = {int(e): pm.numpy() for e, pm in d["perms"].items()}
        self.iteration, self.episodes_seen, self.tokens_seen = int(d["iteration"]), int(d["episodes_seen"]), int(d["tokens_seen"])
        self.history = list(d["history"])
        set_rng_state(d["rng"])

    # ----------------------------------------------------------------------------------------- loop
    @property
    def _label(self) -> str:  # in the shared loop's messages
        return self.cfg.algorithm

    def _iteration(self, it: int) -> dict:
        cfg, dev = self.cfg, self.device
        timers = Timers(dev)
        t_iter = time.perf_counter()
        P, k, B, M = cfg.prompts_per_iteration, cfg.k, cfg.rollout_batch_size, cfg.minibatch_size

        # 1. k rollouts per prompt from the current policy (rows p * k + j), per-row seeds
        slots = self._prompt_slots(it)
        prompts = [self.prompts[i] for i in slots for _ in range(k)]
        seeds = [derive_seed(cfg.seed, 2, it, slots[r // k], r) for r in range(B)]
        with timers("time/generation"):
            s = sample(self.policy, prompts, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                       seeds=seeds, eos_token_id=self.eos_id, pad_token_id=self.pad_id,
                       batch_size=cfg.generation_batch_size, autocast=self._autocast_arg)
        self.policy.eval()
        comps = [c + [self.eos_id] if e else list(c) for c, e in zip(s.completions, s.ended, strict=True)]

        # 2. scores (and the monitor, logged only)
        with timers("time/reward"):
            raw = torch.as_tensor(self.reward_fn(prompts, comps), dtype=torch.float32).detach().flatten().to(dev)
            if raw.numel() != B:
                raise ValueError(f"reward_fn returned {raw.numel()} scores for {B} completions")
            check_finite("scores", raw, phase="reward", step=it)
            scores, norm_mean, norm_std = self._normalise(raw)
        gold = None
        if self.monitor is not None:
            g = [float(x) for x in self.monitor(prompts, comps)]
            gold = sum(g) / max(1, len(g))

        # 3. old policy and reference log-probs, one no-grad forward each per chunk
        batch = {key: v.to(dev) for key, v in collate(prompts, comps, self.pad_id).items()}
        ids, attn, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        fb = cfg.forward_batch_size or B
        with timers("time/ref_value_forward"), torch.no_grad():
            lps, refs, masks = [], [], []
            for c0 in range(0, B, fb):
                sl = slice(c0, c0 + fb)
                lp, mask = self._logps(self.policy, ids[sl], attn[sl], labels[sl])
                rlp, _ = self._logps(self.ref_model, ids[sl], attn[sl], labels[sl])
                lps.append(lp), refs.append(rlp), masks.append(mask)
            old_lp, ref_lp, mask = (torch.cat(x) for x in (lps, refs, masks))  # [B, T-1]
        for name, t in (("logprobs", old_lp), ("ref_logprobs", ref_lp)):
            check_finite(name, t, phase="rollout_forward", step=it)
        m = mask.bool()
        zero = torch.zeros((), device=dev, dtype=old_lp.dtype)
        kl_seq = torch.where(m, old_lp - ref_lp, zero).sum(1)  # [B] k1 sequence KL (the paper's measure, as PPO)

        # 4. advantages
        if cfg.algorithm == "rloo":
            rewards, _ = kl_penalised_rewards(scores, old_lp, ref_lp, mask, cfg.beta)
            advantages = rloo_advantages(rewards.view(P, k)).flatten()
        else:
            advantages = grpo_advantages(scores.view(P, k), eps=cfg.adv_eps, scale=cfg.scale_rewards).flatten()
        check_finite("advantages", advantages, phase="advantages", step=it)
        zero_std = float((scores.view(P, k).std(1) == 0).float().mean())
        self.last_rollout = {"input_ids": ids, "attention_mask": attn, "labels": labels, "mask": mask,
                             "logprobs": old_lp, "ref_logprobs": ref_lp, "scores": scores, "raw_scores": raw,
                             "advantages": advantages, "prompt_indices": slots, "completions": comps}

        # 5. epochs over shuffled minibatches
        stats: dict[str, list[float]] = {key: [] for key in ("loss", "pg_loss", "kl_loss", "clipfrac", "ratio", "grad_norm")}
        update_tokens = 0
        clip = cfg.effective_clip
        with timers("time/update"):
            for epoch in range(cfg.epochs):
                perm = torch.randperm(B, generator=torch.Generator().manual_seed(derive_seed(cfg.seed, 3, it, epoch))).to(dev)
                for m0 in range(0, B, M):
                    mb = perm[m0 : m0 + M]
                    T = int(attn[mb].sum(1).max())  # trim the minibatch's trailing padding
                    lp, _ = self._logps(self.policy, ids[mb, :T], attn[mb, :T], labels[mb, :T])
                    mm = mask[mb, : T - 1]
                    if cfg.algorithm == "rloo":
                        loss, st = rloo_loss(lp, old_lp[mb, : T - 1], advantages[mb], mm, clip_eps=clip)
                        pg, kl_loss = loss.detach(), 0.0
                    else:
                        loss, st = grpo_loss(lp, old_lp[mb, : T - 1], ref_lp[mb, : T - 1], advantages[mb], mm,
                                             clip_eps=clip, beta=cfg.beta, kl_grad=cfg.kl_grad)
                        pg, kl_loss = st["pg_loss"], st["kl"]
                    check_finite("policy_loss", loss.detach(), phase="update", step=it)
                    self.opt.zero_grad(set_to_none=True)
                    loss.backward()
                    gnorm = torch.nn.utils.clip_grad_norm_(self._params, cfg.grad_clip)
                    check_finite("grad_norm", gnorm, phase="update", step=it)
                    self.opt.step()
                    update_tokens += int(attn[mb].sum())  # policy forward + backward tokens
                    for key, val in (("loss", loss), ("pg_loss", pg), ("kl_loss", kl_loss), ("clipfrac", st["clipfrac"]),
                                     ("ratio", st["ratio_mean"]), ("grad_norm", gnorm)):
                        stats[key].append(float(val.detach()) if torch.is_tensor(val) else float(val))

        n_tok = int(mask.sum())
        self.episodes_seen += B
        self.tokens_seen += n_tok
        mean_kl = float(kl_seq.mean())
        t = timers.t
        rec = {
            "iteration": it,
            "episodes_seen": self.episodes_seen,
            "tokens_seen": self.tokens_seen,
            "objective/kl": mean_kl,
            "objective/scores": float(scores.mean()),
            "objective/raw_scores": float(raw.mean()),
            "objective/rlhf_reward": float(scores.mean()) - cfg.beta * mean_kl,
            "objective/kl_coef": cfg.beta,
            "objective/eos_frac": float(np.mean(s.ended)),
            "objective/completion_len": n_tok / B,
            "objective/reward_norm_mean": norm_mean,
            "objective/reward_norm_std": norm_std,
            "objective/zero_std_groups": zero_std,
            **({"objective/gold": gold} if gold is not None else {}),
            # compute accounting (whole rollout batch): prompt + generated tokens of sampling, the tokens of each
            # no-grad forward over the rollouts (old policy, reference; the reward's are the caller's), update tokens
            "tokens/prompt": sum(len(p) for p in prompts),
            "tokens/generated": sum(len(c) for c in comps),
            "tokens/sequence": int(attn.sum()),
            "tokens/update": update_tokens,
            "policy/loss": float(np.mean(stats["loss"])),
            "policy/pg_loss": float(np.mean(stats["pg_loss"])),
            "policy/kl_loss": float(np.mean(stats["kl_loss"])),
            "policy/clipfrac": float(np.mean(stats["clipfrac"])),
            "policy/ratio": float(np.mean(stats["ratio"])),
            "policy/updates": len(stats["loss"]),
            "policy/advantage_abs": float(advantages.abs().mean()),
            "grad_norm": float(np.mean(stats["grad_norm"])),
            "lr": self.opt.param_groups[0]["lr"],
            "time/generation": t.get("time/generation", 0.0),
            "time/reward": t.get("time/reward", 0.0),
            "time/ref_value_forward": t.get("time/ref_value_forward", 0.0),
            "time/update": t.get("time/update", 0.0),
            "time/iteration": time.perf_counter() - t_iter,
        }
        return rec
