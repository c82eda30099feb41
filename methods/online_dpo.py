"""Online DPO: our DPO loss (``methods.dpo.losses.preference_loss``) on fresh pairs sampled every iteration and
labelled by the reward model (Guo et al. 2024, "Direct Language Model Alignment from Online AI Feedback"; TRL's
``OnlineDPOTrainer``), with a *sampling policy* that is refreshed from the trained policy every ``sync_interval``
iterations: its config, the pair rule and its step of the on-policy engine (``methods.onpolicy``, where the iteration
is described: rollout, scoring, no-grad forwards, minibatch updates, NaN guard, checkpoints, data parallelism).

The step (``OnlineDPOStep``), iteration ``t``:
  rollout   ``prompts_per_iteration`` prompts, ``k`` completions each from the *sampling policy*, per-row seeds
            ``derive_seed(seed, t, p, j)`` (``p``: the prompt's slot, ``j``: the sample)
  forwards  the engine's pi_ref and trained-policy log-probs at temperature 1 (the loss's; the KL monitor's), plus the
            sampling policy's when it differs from both; summed (and mean, for IPO) over the completion tokens
  pairs     per prompt the best and the worst of its k completions by reward (:func:`best_worst_pairs`); prompts
            whose k rewards all tie are skipped. ``labels='best_worst'`` (default, TRL's rule): the better one is
            chosen. ``labels='bradley_terry'``: the order is drawn, the better one chosen with probability
            sigmoid((r_best - r_worst) / bt_temperature) (the RM's own preference probability at temperature 1)
  loss      ``epochs`` passes over shuffled minibatches of ``minibatch_size`` pairs (the last one may be smaller);
            chosen and rejected in one forward; ``preference_loss`` (the pure function the offline DPO trainer
            calls), mean over the minibatch's pairs; AdamW (the DPO trainer's optimiser, no weight decay); the
            learning rate optionally annealed linearly over the iterations (``anneal_lr``, as PPO)
  sync      ``sync_interval = s``: after the update of iteration t with ``t % s == 0`` the sampling policy's
            weights become the trained policy's, so iterations ``t+1 .. t+s`` sample from the policy after t.
            ``s = 1``: fully online (the sampler is the policy of the previous iteration); ``s = None``: the sampler
            is pi_ref forever (offline-like, but on fresh RM-labelled pairs of pi_ref's samples)
Under data parallelism a minibatch's pairs are split over the ranks (unevenly when need be), each weighing its pairs.

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
Resumable: the checkpoint holds the sampler's weights and the iteration they are from besides the engine's state.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from methods import onpolicy as op
from methods.dpo import losses as dpo_losses
from methods.sampling import derive_seed

PAIR_LABELS = ("best_worst", "bradley_terry")


@dataclass
class OnlineDPOConfig(op.OnPolicyConfig):
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
    minibatch_size: int = 8
    """Pairs per optimiser step (2x as many sequences per forward); the last minibatch of an iteration may be
    smaller (the number of pairs varies: ties are skipped)."""
    epochs: int = 1
    """Passes over each iteration's pairs."""
    reward_norm: bool = False
    """Logging only: ``objective/scores`` normalised with the first rollouts' mean / std, as PPO's reward_norm, so
    that the curves share PPO's scale. Pairs depend only on the order of the raw scores."""
    anneal_lr: bool = False
    """lr * (1 - (t - 1) / iterations) at iteration t (PPO's anneal_lr); False = constant."""
    adam_eps: float = field(default=1e-8, kw_only=True)
    """AdamW's epsilon (the offline DPO trainer's default)."""

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

        ls_ok = op.is_num(self.label_smoothing) and 0 <= self.label_smoothing < 0.5
        checks = [
            (op.is_pos(self.beta), "beta", "must be > 0 (DPO's KL strength)"),
            (self.loss_type in dpo_losses.LOSS_TYPES, "loss_type", f"must be one of {dpo_losses.LOSS_TYPES}"),
            (ls_ok and (self.label_smoothing == 0 or self.loss_type in ("sigmoid", "robust")), "label_smoothing",
             "must be in [0, 0.5), and 0 unless loss_type is sigmoid (cDPO) or robust (rDPO)"),
            (op.is_pos_int(self.k) and self.k >= 2, "k", "must be an integer >= 2 (a pair needs two samples)"),
            (self.sync_interval is None or op.is_pos_int(self.sync_interval), "sync_interval",
             "must be an integer >= 1 or None (never: sample from pi_ref)"),
            (self.labels in PAIR_LABELS, "labels", f"must be one of {PAIR_LABELS}"),
            (op.is_pos(self.bt_temperature), "bt_temperature", "must be > 0"),
            (op.is_pos_int(self.prompts_per_iteration), "prompts_per_iteration", "must be an integer >= 1"),
            (op.is_pos_int(self.minibatch_size), "minibatch_size", "must be an integer >= 1 (pairs per optimiser step)"),
            (op.is_pos_int(self.epochs), "epochs", "must be an integer >= 1"),
            (isinstance(self.reward_norm, bool), "reward_norm", "must be true or false"),
            (isinstance(self.anneal_lr, bool), "anneal_lr", "must be true or false"),
        ]
        op.raise_invalid(op.field_errors(self, checks + op.loop_checks(self)), "online DPO config")


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


# ------------------------------------------------------------------------------------------------ the step
class OnlineDPOStep(op.OnPolicyStep):
    """Online DPO's part of the engine's iteration (module docstring)."""

    label = "online DPO"
    rows_field = "rollout batch (prompts_per_iteration * k)"
    scores_on_cpu = True
    sum_stats = ("loss",)
    list_stats = ("rc", "rr", "pc", "pr")
    finite_checks = (("dpo_loss", "loss"),)

    def __init__(self, cfg: OnlineDPOConfig) -> None:
        super().__init__(cfg)
        self.pairs_seen = 0
        self.sampler_iteration = 0
        """The iteration whose trained weights the sampler holds (0: the initial policy = pi_ref)."""

    def loop_config(self) -> op.LoopConfig:
        c = self.cfg
        return op.LoopConfig.of(c, prompts_per_iteration=c.prompts_per_iteration, k=c.k, logp_temperature=1.0,
                             epochs=c.epochs, minibatch_size=c.minibatch_size, anneal_lr=c.anneal_lr,
                             reward_norm="first" if c.reward_norm else None)

    def bind(self, engine: op.OnPolicyEngine) -> None:
        super().bind(engine)
        if self.cfg.sync_interval is None:
            self.sampler = engine.ref_model
        else:
            self.sampler = copy.deepcopy(engine.policy).eval()
            self.sampler.requires_grad_(False)

    def optimizer(self, policy_params, extra_params):
        return torch.optim.AdamW(policy_params, lr=self.cfg.lr, eps=self.cfg.adam_eps, weight_decay=0.0)

    def sync_sampler(self) -> None:
        """Copy the trained policy's weights into the sampling policy (no-op for sync_interval None)."""
        if self.sampler is not self.engine.ref_model:
            self.sampler.load_state_dict(self.engine.policy.state_dict())

    # ----------------------------------------------------------------------------------------- rollout
    def begin(self, it: int) -> None:
        s = self.cfg.sync_interval
        self.sampler_is_policy = s is not None and self.sampler_iteration == it - 1  # synced after the last step
        self.lag = it - 1 - self.sampler_iteration if s is not None else None

    def sampling_model(self):
        return self.sampler

    def slot_seed(self, epoch: int) -> int:
        return derive_seed(self.cfg.seed, 0, epoch, 0, 1)

    def row_seeds(self, it: int, slots: list[int]) -> list[int]:
        """Rows ``p * k + j``: ``derive_seed(seed, it, p, j)``."""
        k = self.cfg.k
        return [derive_seed(self.cfg.seed, it, r // k, r % k) for r in range(self.cfg.rollout_batch_size)]

    def epoch_seed(self, it: int, epoch: int) -> int:
        return derive_seed(self.cfg.seed, 0, it, epoch, 2) % (2**63 - 1)

    def _label_uniforms(self, it: int) -> torch.Tensor:
        """One uniform per prompt slot for Bradley-Terry labels: the stream ``derive_seed(seed, it, p, k)`` (j = k is
        never a sample's)."""
        k = self.cfg.k
        return torch.stack([torch.rand((), dtype=torch.float64, generator=torch.Generator().manual_seed(
            derive_seed(self.cfg.seed, it, p, k) % (2**63 - 1))) for p in range(self.cfg.prompts_per_iteration)])

    def rollout_extras(self, ids, attn, labels, policy_fwd):
        if self.cfg.sync_interval is None or self.sampler_is_policy:
            return {}  # the sampler is pi_ref or holds the policy's weights: their log-probs are already there
        return {"sampler_logprobs": self.engine.forward(self.sampler, ids, attn, labels).logps}

    # ----------------------------------------------------------------------------------------- pairs
    def experience(self, ro) -> op.Experience:
        cfg, it = self.cfg, ro.it
        P, k, B = cfg.prompts_per_iteration, cfg.k, cfg.rollout_batch_size
        raw = ro.raw
        uni = self._label_uniforms(it) if cfg.labels == "bradley_terry" else None
        pidx, cj, rj = best_worst_pairs(raw.view(P, k), labels=cfg.labels, uniforms=uni, bt_temperature=cfg.bt_temperature)
        chosen_rows, rejected_rows = pidx * k + cj, pidx * k + rj
        ref_sum, pol_sum = ro.ref_logprobs.sum(-1), ro.logprobs.sum(-1)  # [B] sequence log-probs
        ref_mean = ref_sum / ro.mask.sum(-1).clamp_min(1.0)
        if cfg.sync_interval is None:
            smp_sum = ref_sum
        elif self.sampler_is_policy:
            smp_sum = pol_sum
        else:
            smp_sum = ro.extra["sampler_logprobs"].sum(-1)
        kl_seq = (pol_sum - ref_sum).double()  # [B] k1 sequence KL terms of the trained policy
        w = torch.softmax((pol_sum - smp_sum).double(), 0)  # self-normalised importance weights (all 1/B on-policy)
        n_seq = int(ro.attn.sum())
        ref_lp = ref_mean if cfg.average else ref_sum
        inspect = {"prompts": ro.prompts, "prompt_indices": ro.slots, "seeds": ro.seeds, "samples": ro.samples,
                   "completions": ro.completions, "raw_scores": raw, "chosen_rows": chosen_rows,
                   "rejected_rows": rejected_rows, "ref_logps": ref_lp.detach().cpu(),
                   "policy_logps": pol_sum.detach().cpu(), "sampler_is_policy": self.sampler_is_policy}
        data = {"chosen": chosen_rows, "rejected": rejected_rows, "ref_lp": ref_lp,
                "kl": float((w * kl_seq).sum()), "ess": float(1.0 / (w**2).sum()) / B,
                "kl_sampler": float((smp_sum - ref_sum).double().mean()),
                "fwd_tokens": n_seq * (2 + ("sampler_logprobs" in ro.extra))}
        return op.Experience(n=int(pidx.numel()), data=data, inspect=inspect)

    def rows(self, exp, idx):
        return torch.cat([exp.data["chosen"][idx], exp.data["rejected"][idx]]).to(self.engine.device)

    def units(self, exp, idx, rows):
        return torch.tensor(float(len(idx)), device=self.engine.device)  # a mean over pairs

    def minibatch(self, exp, mb) -> op.MinibatchLoss:
        cfg, ref_lp = self.cfg, exp.data["ref_lp"]
        f = self.engine.forward(self.engine.policy, mb.ids, mb.attn, mb.labels)
        total = f.logps.sum(-1)
        lp = total / f.mask.sum(-1).clamp_min(1.0) if cfg.average else total
        n, rows = len(mb.idx), mb.rows
        losses, rc, rr = dpo_losses.preference_loss(
            lp[:n], lp[n:], ref_lp[rows[:n]], ref_lp[rows[n:]], beta=cfg.beta, loss_type=cfg.loss_type,
            label_smoothing=cfg.label_smoothing)
        lists = {"rc": rc.float().cpu().tolist(), "rr": rr.float().cpu().tolist(),
                 "pc": total[:n].detach().float().cpu().tolist(), "pr": total[n:].detach().float().cpu().tolist()}
        return op.MinibatchLoss(losses.mean(), sums={"loss": losses.detach().sum()}, lists=lists)

    # ----------------------------------------------------------------------------------------- end
    def end_iteration(self, ro, exp, upd) -> None:
        s = self.cfg.sync_interval
        self.synced = s is not None and ro.it % s == 0  # after the step of every iteration t with t % s == 0
        if self.synced:
            self.sync_sampler()
            self.sampler_iteration = ro.it
        self.pairs_seen += exp.n

    def record(self, ro, exp, upd) -> dict:
        cfg, d = self.cfg, exp.data
        P, k = cfg.prompts_per_iteration, cfg.k
        rc, rr = np.asarray(upd.lists["rc"]), np.asarray(upd.lists["rr"])
        loss_n = len(upd.lists["rc"])
        gap = ro.raw.view(P, k).max(1).values - ro.raw.view(P, k).min(1).values
        return {
            "examples_seen": self.pairs_seen,
            "pairs": exp.n,
            "objective/kl": d["kl"],
            "objective/kl_ess": d["ess"],
            "objective/kl_sampler": d["kl_sampler"],
            "objective/sampler_lag": self.lag,
            "objective/score_gap": float(gap.mean()),
            "objective/tied_prompts": (P - exp.n) / P,
            "objective/kl_coef": cfg.beta,
            "loss": sum(upd.sums["loss"]) / loss_n if loss_n else None,
            "rewards/chosen": float(rc.mean()) if rc.size else None,
            "rewards/rejected": float(rr.mean()) if rr.size else None,
            "rewards/margins": float((rc - rr).mean()) if rc.size else None,
            "rewards/accuracies": float((rc > rr).mean()) if rc.size else None,
            "logps/chosen": op.mean_or_none(upd.lists["pc"]),
            "logps/rejected": op.mean_or_none(upd.lists["pr"]),
            "sampler/synced": self.synced,
            # no-grad forward tokens summed over models (pi_ref, trained policy, sampler when it differs; the
            # reward's are the caller's: tokens/sequence)
            "tokens/forward": d["fwd_tokens"],
        }

    # ----------------------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict:
        sampler = None if self.sampler is self.engine.ref_model else self.sampler.state_dict()
        return {"sampler": sampler, "pairs_seen": self.pairs_seen, "sampler_iteration": self.sampler_iteration}

    def load_state_dict(self, d: dict) -> None:
        if d["sampler"] is not None:
            self.sampler.load_state_dict(d["sampler"])
        self.pairs_seen, self.sampler_iteration = int(d["pairs_seen"]), int(d["sampler_iteration"])


class OnlineDPOTrainer(op.OnPolicyEngine):
    """Online DPO for a causal-LM policy against a reward callable: the on-policy engine with ``OnlineDPOStep``.

    ``policy`` is trained in place (pass a copy of pi_ref, adapters added); ``ref_model`` is only read. The sampling
    policy (``self.sampler``) is a deep copy of ``policy`` made here (or ``ref_model`` itself for sync_interval None).
    The rest as ``methods.onpolicy.OnPolicyEngine``. A checkpoint of the earlier trainer (with a learning-rate
    scheduler's state) resumes: the engine sets the annealed learning rate itself."""

    def __init__(self, policy, ref_model, reward_fn: Callable, tokenizer, prompts: Sequence[Sequence[int]],
                 cfg: OnlineDPOConfig, device: str | torch.device, autocast=None, monitor: Callable | None = None,
                 accelerator=None):
        super().__init__(OnlineDPOStep(cfg), policy, ref_model, reward_fn, tokenizer, prompts, device,
                         autocast=autocast, accelerator=accelerator, monitor=monitor)

    @property
    def sampler(self):
        return self.step.sampler

    @property
    def sampler_iteration(self) -> int:
        return self.step.sampler_iteration

    @property
    def pairs_seen(self) -> int:
        return self.step.pairs_seen

    @property
    def last_batch(self) -> dict | None:
        """The last iteration's prompts, seeds, samples, scores, pairs and log-probs."""
        return self.last_rollout

    def sync_sampler(self) -> None:
        self.step.sync_sampler()
