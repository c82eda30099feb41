"""Online DPO: our DPO loss (``methods.dpo.losses.preference_loss``) on fresh pairs sampled every iteration and
labelled by the reward model (Guo et al. 2024, "Direct Language Model Alignment from Online AI Feedback"; TRL's
``OnlineDPOTrainer``), with a *sampling policy* that is refreshed from the trained policy every ``sync_interval``
iterations.

One iteration ``t`` (1-based):
  1. rollouts   ``prompts_per_iteration`` prompts (epochs of seeded permutations, as the PPO / GroupRL trainers),
                ``k`` completions each from the sampling policy with the shared KV-cache sampler
                (``methods.sampling.sample``), per-row seeds ``derive_seed(seed, t, p, j)`` (``p``: the prompt's slot
                in the iteration, ``j``: the sample); completions end with EOS when the sample did
  2. reward     ``reward_fn(prompt_ids, completion_ids) -> [B]`` (the reward model; ``monitor``, e.g. the gold reward,
                is logged as ``objective/gold`` and never trained on)
  3. pairs      per prompt the best and the worst of its k completions by reward (:func:`best_worst_pairs`); prompts
                whose k rewards all tie are skipped. ``labels='best_worst'`` (default, TRL's rule): the better one is
                chosen. ``labels='bradley_terry'``: the order is drawn, the better one chosen with probability
                sigmoid((r_best - r_worst) / bt_temperature) (the RM's own preference probability at temperature 1)
  4. forwards   one no-grad forward of pi_ref over all rows through the shared log-prob path
                (``methods.logprobs.token_logps`` on right-padded rows of ``methods.data.collate``): its summed (and
                mean, for IPO) log-probs are the reference terms of the loss; one of the trained policy (for the KL
                monitor); one of the sampling policy when it differs from both
  5. update     ``epochs`` passes over shuffled minibatches of ``minibatch_size`` pairs; chosen and rejected in one
                forward; ``preference_loss`` (the pure function the offline DPO trainer calls), mean over the
                minibatch's pairs; grad-norm clipping, AdamW (the DPO trainer's optimiser, no weight decay); the
                learning rate optionally annealed linearly over the iterations (``anneal_lr``, as PPO)
  6. sync       ``sync_interval = s``: after the update of iteration t with ``t % s == 0`` the sampling policy's
                weights become the trained policy's, so iterations ``t+1 .. t+s`` sample from the policy after t.
                ``s = 1``: fully online (the sampler is the policy of the previous iteration); ``s = None``: the sampler
                is pi_ref forever (offline-like, but on fresh RM-labelled pairs of pi_ref's samples)

The sampling policy is a separate copy of the policy (``trainer.sampler``), or ``ref_model`` itself when ``s`` is None.

Logged KL. ``objective/kl`` is the sequence KL(pi_theta || pi_ref) of the *trained* policy as it stands before the
iteration's update, estimated on the iteration's samples: sum_t (log pi_theta - log pi_ref) per completion, averaged
with self-normalised importance weights pi_theta(y) / pi_sample(y). Whenever the sampler holds the trained weights
(every iteration for s = 1, iterations 1, s+1, 2s+1, ... otherwise) the weights are all 1 and this is the plain
Monte-Carlo estimate PPO and RLOO/GRPO log; for s = None it is importance-weighted from pi_ref's samples (a biased
but consistent estimate; ``objective/kl_ess``, the effective sample size over B, says how far to trust it).
``objective/kl_sampler`` is the sampling policy's own Monte-Carlo KL (0 for s = None). Weights use log-probs at
temperature 1: exact for the default ``temperature = 1``. The arm's reported KL is the evaluation stage's.

What it targets (``tests/test_bandit_optimum.py``): with Bradley-Terry labels the population loss on any full-support
pair distribution is minimised at pi* = pi_ref exp(r / beta) / Z, so online DPO with ``labels='bradley_terry'``
targets pi* for every s. With deterministic best-vs-worst labels every observed pair is an infinitely confident
preference: the loss has no finite minimiser and the policy keeps moving towards argmax r (beta sets the speed, not
the end point), as Azar et al. 2023 (Sec. 4.2) show for offline DPO with deterministic preferences.

Budget: ``episodes = completions``; ``prompts_per_iteration * k`` per iteration, PPO's ``rollout_batch_size``.

NaN guard as PPO / GroupRL: a non-finite score, log-prob, loss or gradient norm raises ``FloatingPointError`` naming
the quantity, phase and iteration, after the policy is restored to its state before that iteration
(``trainer.last_good_state``). Resumable: ``train(checkpoint_path=..., checkpoint_every=n)`` writes the trained
policy, the sampler's weights, optimiser, scheduler, RNG states and counters; every seed depends only on (seed,
iteration, slot, row), so a resumed run ends with the numbers of an uninterrupted one. Single process only.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch

from methods.checkpointing import check_same_config, rng_state, set_rng_state
from methods.data import collate
from methods.dpo import losses as dpo_losses
from methods.logprobs import token_logps
from methods.rl_loop import IterativeTrainer, Timers, all_finite, cpu_state, permuted_slots, prompts_digest
from methods.rlhf.ppo_core import check_finite
from methods.sampling import derive_seed, sample

PAIR_LABELS = ("best_worst", "bradley_terry")


@dataclass
class OnlineDPOConfig:
    beta: float = 0.1
    """DPO's beta (the KL strength of the objective it targets)."""
    loss_type: str = "sigmoid"
    """One of ``methods.dpo.losses.LOSS_TYPES``: sigmoid (DPO) | ipo (on mean log-probs) | hinge | robust."""
    label_smoothing: float = 0.0
    """cDPO / rDPO label-noise epsilon in [0, 0.5) (sigmoid / robust only), as the offline DPO trainer."""
    k: int = 4
    """Completions sampled per prompt (>= 2); one pair per prompt: the best and the worst of them."""
    sync_interval: int | None = 1
    """s: copy the trained weights into the sampling policy after every iteration t with t % s == 0 (1 = fully
    online); None = never: the sampler is pi_ref forever."""
    labels: str = "best_worst"
    """best_worst: the higher-reward completion is chosen (TRL's rule) | bradley_terry: chosen with probability
    sigmoid((r_best - r_worst) / bt_temperature) (targets pi*, see the module docstring)."""
    bt_temperature: float = 1.0
    """Bradley-Terry temperature on the reward_fn's raw scores (1: the RM's own preference model)."""
    prompts_per_iteration: int = 16
    """Prompts per iteration; episodes per iteration = prompts_per_iteration * k (PPO's rollout_batch_size)."""
    iterations: int = 100
    lr: float = 1e-5
    minibatch_size: int = 8
    """Pairs per optimiser step (2x as many sequences per forward); the last minibatch of an iteration may be
    smaller (the number of pairs varies: ties are skipped)."""
    epochs: int = 1
    """Passes over each iteration's pairs."""
    max_new_tokens: int = 24
    temperature: float = 1.0
    """Sampling temperature (> 0). The loss and the KL monitor use the model's log-probs at temperature 1."""
    reward_norm: bool = False
    """Logging only: ``objective/scores`` normalised with the first rollouts' mean / std, as PPO's reward_norm, so
    that the curves share PPO's scale. Pairs depend only on the order of the raw scores."""
    anneal_lr: bool = False
    """lr * (1 - (t - 1) / iterations) at iteration t (PPO's anneal_lr); False = constant."""
    grad_clip: float = 1.0
    adam_eps: float = 1e-8
    """AdamW's epsilon (the offline DPO trainer's default)."""
    generation_batch_size: int = 256
    """Rows per sampler batch (the samples do not depend on it)."""
    forward_batch_size: int = 0
    """Rows per no-grad forward; 0 = the whole rollout batch in one forward."""
    seed: int = 0

    @property
    def rollout_batch_size(self) -> int:
        """Completions (= episodes) per iteration."""
        return self.prompts_per_iteration * self.k

    @property
    def average(self) -> bool:
        """Whether the loss takes length-averaged log-probs (IPO)."""
        return dpo_losses.uses_average_logps(self.loss_type)

    def validate(self) -> None:
        """Raise one ValueError listing every invalid field, each by name."""

        def num(x) -> bool:
            return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(float(x))

        def pos(x) -> bool:
            return num(x) and float(x) > 0

        def pos_int(x) -> bool:
            return isinstance(x, int) and not isinstance(x, bool) and x >= 1

        ls_ok = num(self.label_smoothing) and 0 <= self.label_smoothing < 0.5
        checks = [
            (pos(self.beta), "beta", "must be > 0 (DPO's KL strength)"),
            (self.loss_type in dpo_losses.LOSS_TYPES, "loss_type", f"must be one of {dpo_losses.LOSS_TYPES}"),
            (ls_ok and (self.label_smoothing == 0 or self.loss_type in ("sigmoid", "robust")), "label_smoothing",
             "must be in [0, 0.5), and 0 unless loss_type is sigmoid (cDPO) or robust (rDPO)"),
            (pos_int(self.k) and self.k >= 2, "k", "must be an integer >= 2 (a pair needs two samples)"),
            (self.sync_interval is None or pos_int(self.sync_interval), "sync_interval",
             "must be an integer >= 1 or None (never: sample from pi_ref)"),
            (self.labels in PAIR_LABELS, "labels", f"must be one of {PAIR_LABELS}"),
            (pos(self.bt_temperature), "bt_temperature", "must be > 0"),
            (pos_int(self.prompts_per_iteration), "prompts_per_iteration", "must be an integer >= 1"),
            (pos_int(self.iterations), "iterations", "must be an integer >= 1"),
            (pos(self.lr), "lr", "must be > 0"),
            (pos_int(self.minibatch_size), "minibatch_size", "must be an integer >= 1 (pairs per optimiser step)"),
            (pos_int(self.epochs), "epochs", "must be an integer >= 1"),
            (pos_int(self.max_new_tokens), "max_new_tokens", "must be an integer >= 1"),
            (pos(self.temperature), "temperature", "must be > 0 (k samples of a prompt must differ)"),
            (isinstance(self.reward_norm, bool), "reward_norm", "must be true or false"),
            (isinstance(self.anneal_lr, bool), "anneal_lr", "must be true or false"),
            (pos(self.grad_clip), "grad_clip", "must be > 0"),
            (pos(self.adam_eps), "adam_eps", "must be > 0"),
            (pos_int(self.generation_batch_size), "generation_batch_size", "must be an integer >= 1"),
            (isinstance(self.forward_batch_size, int) and not isinstance(self.forward_batch_size, bool)
             and self.forward_batch_size >= 0, "forward_batch_size", "must be an integer >= 0 (0 = whole rollout batch)"),
            (isinstance(self.seed, int) and not isinstance(self.seed, bool) and self.seed >= 0, "seed",
             "must be an integer >= 0"),
        ]
        errors = [f"{key} {msg}, got {getattr(self, key)!r}" for ok, key, msg in checks if not ok]
        if errors:
            raise ValueError("invalid online DPO config:\n  - " + "\n  - ".join(errors))


# ------------------------------------------------------------------------------------------------ pairs
def best_worst_pairs(rewards: torch.Tensor, *, labels: str = "best_worst", uniforms: torch.Tensor | None = None,
                     bt_temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One preference pair per prompt from its k rewards ``[P, k]``: the best and the worst completion (the first
    one on equal rewards); prompts whose k rewards all tie give no pair.

    ``labels='best_worst'``: the best is chosen. ``'bradley_terry'``: the best is chosen when ``uniforms[p] <
    sigmoid((r_best - r_worst) / bt_temperature)``, else the worst (``uniforms``: ``[P]`` draws in [0, 1)).
    Returns ``(prompt index, chosen column, rejected column)``, each ``[n_pairs]`` (long), prompts in order."""
    if rewards.dim() != 2 or rewards.shape[1] < 2:
        raise ValueError(f"rewards must be [P, k] with k >= 2, got {tuple(rewards.shape)}")
    if labels not in PAIR_LABELS:
        raise ValueError(f"labels must be one of {PAIR_LABELS}, got {labels!r}")
    hi, lo = rewards.argmax(1), rewards.argmin(1)  # first occurrence on ties
    r_hi = rewards.gather(1, hi[:, None]).squeeze(1)
    r_lo = rewards.gather(1, lo[:, None]).squeeze(1)
    keep = r_hi > r_lo
    if labels == "bradley_terry":
        if uniforms is None or uniforms.shape != (rewards.shape[0],):
            raise ValueError(f"bradley_terry labels need one uniform per prompt ([{rewards.shape[0]}])")
        p_best = torch.sigmoid((r_hi - r_lo).double() / bt_temperature)
        flip = uniforms.to(p_best) >= p_best
        hi, lo = torch.where(flip, lo, hi), torch.where(flip, hi, lo)
    idx = keep.nonzero().flatten()
    return idx, hi[idx], lo[idx]


# ------------------------------------------------------------------------------------------------ trainer
def _mean(xs: list[float]) -> float | None:
    return float(np.mean(xs)) if xs else None


class OnlineDPOTrainer(IterativeTrainer):
    """Online DPO for a causal-LM policy against a reward callable.

    ``policy`` is trained in place (pass a copy of pi_ref, adapters added); ``ref_model`` is only read. The sampling
    policy (``self.sampler``) is a deep copy of ``policy`` made here (or ``ref_model`` itself for sync_interval None).
    ``prompts``: token-id lists (with BOS if the tokenizer adds it). ``monitor(prompt_ids, completion_ids) -> [B]``
    (optional, e.g. the gold reward) is logged as ``objective/gold`` and never trained on. ``autocast``: a reusable
    context manager wrapped around every forward and the sampler."""

    def __init__(self, policy, ref_model, reward_fn: Callable, tokenizer, prompts: Sequence[Sequence[int]],
                 cfg: OnlineDPOConfig, device: str | torch.device, autocast=None, monitor: Callable | None = None):
        cfg.validate()
        if policy is ref_model:
            raise ValueError("policy and ref_model are the same object: pass a trainable copy of pi_ref as policy")
        if not callable(reward_fn):
            raise TypeError("reward_fn must be callable: reward_fn(prompt_ids, completion_ids) -> Tensor[N]")
        if len(prompts) == 0:
            raise ValueError("no prompts: online DPO needs at least one prompt")
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
        if cfg.sync_interval is None:
            self.sampler = self.ref_model
        else:
            self.sampler = copy.deepcopy(self.policy).eval()
            self.sampler.requires_grad_(False)
        self.reward_fn, self.monitor = reward_fn, monitor
        self.eos_id, self.pad_id = tokenizer.eos_token_id, tokenizer.pad_token_id
        self.prompts = [list(map(int, p)) for p in prompts]
        self._autocast_arg = autocast
        self.autocast = autocast if autocast is not None else contextlib.nullcontext()
        self._params = [p for p in self.policy.parameters() if p.requires_grad]
        if not self._params:
            raise ValueError("the policy has no trainable parameters")
        self.opt = torch.optim.AdamW(self._params, lr=cfg.lr, eps=cfg.adam_eps, weight_decay=0.0)
        iters = cfg.iterations
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda e: max(0.0, 1.0 - e / iters) if cfg.anneal_lr else 1.0)  # stepped once per iteration
        self._norm: tuple[float, float] | None = None
        self._perms: dict[int, np.ndarray] = {}
        self.history: list[dict] = []
        self.iteration = 0
        self.episodes_seen = 0
        self.tokens_seen = 0
        self.pairs_seen = 0
        self.sampler_iteration = 0
        """The iteration whose trained weights the sampler holds (0: the initial policy = pi_ref)."""
        self.last_good_state: dict[str, torch.Tensor] | None = None
        """CPU copy of the policy's state_dict before the current/last iteration (restored on non-finite)."""
        self.last_batch: dict | None = None

    # ----------------------------------------------------------------------------------------- pieces
    def _prompt_slots(self, it: int) -> list[int]:
        """Prompt indices of iteration ``it`` (1-based): epochs of seeded permutations read in order (as PPO)."""
        out, self._perms = permuted_slots(self._perms, len(self.prompts), it, self.cfg.prompts_per_iteration,
                                          lambda e: derive_seed(self.cfg.seed, 0, e, 0, 1))
        return out

    def row_seeds(self, it: int) -> list[int]:
        """Sampling seeds of iteration ``it``, rows ``p * k + j``: ``derive_seed(seed, it, p, j)``."""
        k = self.cfg.k
        return [derive_seed(self.cfg.seed, it, r // k, r % k) for r in range(self.cfg.rollout_batch_size)]

    def _label_uniforms(self, it: int) -> torch.Tensor:
        """One uniform per prompt slot for Bradley-Terry labels: the stream ``derive_seed(seed, it, p, k)`` (j = k is
        never a sample's)."""
        k = self.cfg.k
        return torch.stack([torch.rand((), dtype=torch.float64, generator=torch.Generator().manual_seed(
            derive_seed(self.cfg.seed, it, p, k) % (2**63 - 1))) for p in range(self.cfg.prompts_per_iteration)])

    def _seq_logps(self, model, ids, attn, labels) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (summed [B], mean [B] log-probs of the labels, per-token log-probs [B, T-1]) via ``token_logps``."""
        with self.autocast:
            logits = model(input_ids=ids, attention_mask=attn, use_cache=False).logits  # [B, T, V]
        lp, mask = token_logps(logits, labels)
        total = lp.sum(-1)
        return total, total / mask.sum(-1).clamp_min(1.0), lp

    @torch.no_grad()
    def _forward_all(self, model, ids, attn, labels) -> tuple[torch.Tensor, torch.Tensor]:
        """No-grad (summed, mean) log-probs of every row, in chunks of ``forward_batch_size``."""
        B = ids.shape[0]
        fb = self.cfg.forward_batch_size or B
        sums, means = [], []
        for c0 in range(0, B, fb):
            sl = slice(c0, c0 + fb)
            s, m, _ = self._seq_logps(model, ids[sl], attn[sl], labels[sl])
            sums.append(s), means.append(m)
        return torch.cat(sums), torch.cat(means)

    def _normalise(self, raw: torch.Tensor) -> tuple[torch.Tensor, float, float]:
        if not self.cfg.reward_norm:
            return raw, 0.0, 1.0
        if self._norm is None:  # statistics of the first rollouts (pi_ref's samples)
            x = raw.double()
            std = float(x.std()) if x.numel() > 1 else 1.0
            self._norm = (float(x.mean()), std if std > 1e-6 else 1.0)
        mean, std = self._norm
        return (raw - mean) / std, mean, std

    def _snapshot(self, it: int) -> None:
        if not all_finite(self.policy):
            self._restore()
            raise FloatingPointError(f"online DPO iteration {it}: non-finite parameters after iteration {it - 1}; "
                                     "restored the state before it (trainer.last_good_state)")
        self.last_good_state = cpu_state(self.policy)

    def _restore(self) -> None:
        if self.last_good_state is not None:
            self.policy.load_state_dict(self.last_good_state)

    def sync_sampler(self) -> None:
        """Copy the trained policy's weights into the sampling policy (no-op for sync_interval None)."""
        if self.sampler is not self.ref_model:
            self.sampler.load_state_dict(self.policy.state_dict())

    # ----------------------------------------------------------------------------------------- checkpoints
    def _prompts_digest(self) -> str:
        return prompts_digest(self.prompts)

    def state_dict(self) -> dict:
        sampler = None if self.sampler is self.ref_model else self.sampler.state_dict()
        return {"policy": self.policy.state_dict(), "sampler": sampler, "optimizer": self.opt.state_dict(),
                "scheduler": self.sched.state_dict(), "norm": self._norm,
                "perms": {int(e): torch.from_numpy(np.asarray(pm)) for e, pm in self._perms.items()},
                "iteration": self.iteration, "episodes_seen": self.episodes_seen, "tokens_seen": self.tokens_seen,
                "pairs_seen": self.pairs_seen, "sampler_iteration": self.sampler_iteration,
                "history": list(self.history), "rng": rng_state(), "config": asdict(self.cfg),
                "prompts_sha256": self._prompts_digest()}

    def load_state_dict(self, d: dict) -> None:
        check_same_config(d["config"], asdict(self.cfg), "online DPO")
        if d["prompts_sha256"] != self._prompts_digest():
            raise ValueError("online DPO checkpoint was written for other prompts: resuming it would not reproduce the run")
        self.policy.load_state_dict(d["policy"])
        if d["sampler"] is not None:
            self.sampler.load_state_dict(d["sampler"])
        self.opt.load_state_dict(d["optimizer"])
        self.sched.load_state_dict(d["scheduler"])
        self._norm = None if d["norm"] is None else (float(d["norm"][0]), float(d["norm"][1]))
        self._perms = {int(e): pm.numpy() for e, pm in d["perms"].items()}
        self.iteration, self.episodes_seen, self.tokens_seen = int(d["iteration"]), int(d["episodes_seen"]), int(d["tokens_seen"])
        self.pairs_seen, self.sampler_iteration = int(d["pairs_seen"]), int(d["sampler_iteration"])
        self.history = list(d["history"])
        set_rng_state(d["rng"])

    # ----------------------------------------------------------------------------------------- loop
    _label = "online DPO"  # in the shared loop's messages

    def _iteration(self, it: int) -> dict:
        cfg, dev = self.cfg, self.device
        timers = Timers(dev)
        t_iter = time.perf_counter()
        P, k, B, M = cfg.prompts_per_iteration, cfg.k, cfg.rollout_batch_size, cfg.minibatch_size
        s = cfg.sync_interval
        sampler_is_policy = s is not None and self.sampler_iteration == it - 1  # synced after the last step
        lag = it - 1 - self.sampler_iteration if s is not None else None

        # 1. k completions per prompt from the sampling policy (rows p * k + j), per-row seeds
        slots = self._prompt_slots(it)
        prompts = [self.prompts[i] for i in slots for _ in range(k)]
        seeds = self.row_seeds(it)
        with timers("time/generation"):
            smp = sample(self.sampler, prompts, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                         seeds=seeds, eos_token_id=self.eos_id, pad_token_id=self.pad_id,
                         batch_size=cfg.generation_batch_size, autocast=self._autocast_arg)
        self.sampler.eval()
        comps = [c + [self.eos_id] if e else list(c) for c, e in zip(smp.completions, smp.ended, strict=True)]

        # 2. scores (and the monitor, logged only)
        with timers("time/reward"):
            raw = torch.as_tensor(self.reward_fn(prompts, comps), dtype=torch.float32).detach().flatten().cpu()
            if raw.numel() != B:
                raise ValueError(f"reward_fn returned {raw.numel()} scores for {B} completions")
            check_finite("scores", raw, phase="reward", step=it)
            scores, norm_mean, norm_std = self._normalise(raw)
        gold = None
        if self.monitor is not None:
            g = [float(x) for x in self.monitor(prompts, comps)]
            gold = sum(g) / max(1, len(g))

        # 3. pairs: best vs worst of each prompt's k (ties skipped)
        uni = self._label_uniforms(it) if cfg.labels == "bradley_terry" else None
        pidx, cj, rj = best_worst_pairs(raw.view(P, k), labels=cfg.labels, uniforms=uni, bt_temperature=cfg.bt_temperature)
        chosen_rows, rejected_rows = pidx * k + cj, pidx * k + rj
        n_pairs = int(pidx.numel())

        # 4. pi_ref, trained policy (KL monitor) and, when it differs from both, sampler log-probs over every row
        batch = {key: v.to(dev) for key, v in collate(prompts, comps, self.pad_id).items()}
        ids, attn, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        n_seq = int(attn.sum())
        fwd_tokens = 0
        with timers("time/ref_value_forward"):
            ref_sum, ref_mean = self._forward_all(self.ref_model, ids, attn, labels)
            pol_sum, _ = self._forward_all(self.policy, ids, attn, labels)
            fwd_tokens += 2 * n_seq
            if s is None:
                smp_sum = ref_sum
            elif sampler_is_policy:
                smp_sum = pol_sum
            else:
                smp_sum, _ = self._forward_all(self.sampler, ids, attn, labels)
                fwd_tokens += n_seq
        for name, t in (("ref_logprobs", ref_sum), ("logprobs", pol_sum), ("sampler_logprobs", smp_sum)):
            check_finite(name, t, phase="rollout_forward", step=it)
        kl_seq = (pol_sum - ref_sum).double()  # [B] k1 sequence KL terms of the trained policy
        w = torch.softmax((pol_sum - smp_sum).double(), 0)  # self-normalised importance weights (all 1/B on-policy)
        kl_policy = float((w * kl_seq).sum())
        ess = float(1.0 / (w**2).sum()) / B
        kl_sampler = float((smp_sum - ref_sum).double().mean())
        ref_lp = ref_mean if cfg.average else ref_sum
        self.last_batch = {"prompts": prompts, "prompt_indices": slots, "seeds": seeds, "samples": smp.completions,
                           "completions": comps, "raw_scores": raw, "chosen_rows": chosen_rows,
                           "rejected_rows": rejected_rows, "ref_logps": ref_lp.detach().cpu(),
                           "policy_logps": pol_sum.detach().cpu(), "sampler_is_policy": sampler_is_policy}

        # 5. epochs over shuffled minibatches of pairs: chosen and rejected in one forward, our DPO loss
        stats: dict[str, list[float]] = {key: [] for key in ("rc", "rr", "pc", "pr", "grad_norm")}
        loss_sum, loss_n, update_tokens = 0.0, 0, 0
        with timers("time/update"):
            for epoch in range(cfg.epochs):
                if n_pairs == 0:
                    break
                gen = torch.Generator().manual_seed(derive_seed(cfg.seed, 0, it, epoch, 2) % (2**63 - 1))
                perm = torch.randperm(n_pairs, generator=gen)
                for m0 in range(0, n_pairs, M):
                    mb = perm[m0 : m0 + M]
                    rows = torch.cat([chosen_rows[mb], rejected_rows[mb]]).to(dev)
                    T = int(attn[rows].sum(1).max())  # trim the minibatch's trailing padding
                    total, mean, _ = self._seq_logps(self.policy, ids[rows, :T], attn[rows, :T], labels[rows, :T])
                    lp = mean if cfg.average else total
                    n = len(mb)
                    pc, pr = lp[:n], lp[n:]
                    losses, rc, rr = dpo_losses.preference_loss(
                        pc, pr, ref_lp[rows[:n]], ref_lp[rows[n:]], beta=cfg.beta, loss_type=cfg.loss_type,
                        label_smoothing=cfg.label_smoothing)
                    loss = losses.mean()
                    check_finite("dpo_loss", loss.detach(), phase="update", step=it)
                    self.opt.zero_grad(set_to_none=True)
                    loss.backward()
                    gnorm = torch.nn.utils.clip_grad_norm_(self._params, cfg.grad_clip)
                    check_finite("grad_norm", gnorm, phase="update", step=it)
                    self.opt.step()
                    update_tokens += int(attn[rows].sum())  # policy forward + backward tokens
                    loss_sum += float(losses.detach().sum())
                    loss_n += n
                    stats["rc"] += rc.float().cpu().tolist()
                    stats["rr"] += rr.float().cpu().tolist()
                    stats["pc"] += total[:n].detach().float().cpu().tolist()
                    stats["pr"] += total[n:].detach().float().cpu().tolist()
                    stats["grad_norm"].append(float(gnorm))
        lr_used = self.opt.param_groups[0]["lr"]
        self.sched.step()

        # 6. sync the sampling policy after the step of every iteration t with t % s == 0
        synced = s is not None and it % s == 0
        if synced:
            self.sync_sampler()
            self.sampler_iteration = it

        n_tok = int(sum(len(c) for c in comps))
        self.episodes_seen += B
        self.tokens_seen += n_tok
        self.pairs_seen += n_pairs
        rc, rr = np.asarray(stats["rc"]), np.asarray(stats["rr"])
        gap = (raw.view(P, k).max(1).values - raw.view(P, k).min(1).values)
        t = timers.t
        rec = {
            "iteration": it,
            "episodes_seen": self.episodes_seen,
            "examples_seen": self.pairs_seen,
            "tokens_seen": self.tokens_seen,
            "pairs": n_pairs,
            "objective/kl": kl_policy,
            "objective/kl_ess": ess,
            "objective/kl_sampler": kl_sampler,
            "objective/sampler_lag": lag,
            "objective/scores": float(scores.mean()),
            "objective/raw_scores": float(raw.mean()),
            "objective/score_gap": float(gap.mean()),
            "objective/tied_prompts": (P - n_pairs) / P,
            "objective/kl_coef": cfg.beta,
            "objective/eos_frac": float(np.mean(smp.ended)),
            "objective/completion_len": n_tok / B,
            "objective/reward_norm_mean": norm_mean,
            "objective/reward_norm_std": norm_std,
            **({"objective/gold": gold} if gold is not None else {}),
            "loss": loss_sum / loss_n if loss_n else None,
            "rewards/chosen": float(rc.mean()) if rc.size else None,
            "rewards/rejected": float(rr.mean()) if rr.size else None,
            "rewards/margins": float((rc - rr).mean()) if rc.size else None,
            "rewards/accuracies": float((rc > rr).mean()) if rc.size else None,
            "logps/chosen": _mean(stats["pc"]),
            "logps/rejected": _mean(stats["pr"]),
            "grad_norm": _mean(stats["grad_norm"]),
            "lr": lr_used,
            "policy/updates": len(stats["grad_norm"]),
            "sampler/synced": synced,
            # compute accounting (whole rollout batch): prompt + generated tokens of sampling, tokens of the no-grad
            # forwards summed over models (pi_ref, trained policy, sampler when it differs; the reward's are the
            # caller's: tokens/sequence), policy forward + backward tokens of the DPO steps
            "tokens/prompt": sum(len(p) for p in prompts),
            "tokens/generated": n_tok,
            "tokens/sequence": n_seq,
            "tokens/forward": fwd_tokens,
            "tokens/update": update_tokens,
            "time/generation": t.get("time/generation", 0.0),
            "time/reward": t.get("time/reward", 0.0),
            "time/ref_value_forward": t.get("time/ref_value_forward", 0.0),
            "time/update": t.get("time/update", 0.0),
            "time/iteration": time.perf_counter() - t_iter,
        }
        return rec
