"""The on-policy engine: ONE iteration loop for every on-policy method (PPO, RLOO, GRPO, online DPO), so that the
arms differ only in their math, never in their machinery. The split follows OpenRLHF's ``experience_maker`` (rollout,
scoring and the no-grad forwards, the same for every algorithm) / ``advantage_estimator`` (what turns a scored rollout
into training signal: GAE with a critic, leave-one-out, group normalisation, ...).

One iteration ``t`` (1-based), ``OnPolicyEngine._iteration``:
  1. rollout    ``prompts_per_iteration`` prompt slots (epochs of seeded permutations of the prompts read in order,
                ``rl_loop.permuted_slots``), ``k`` completions each (rows ``p * k + j``; PPO: ``k = 1``) from the step's
                sampling model (the policy; online DPO: its lagged sampler) with the shared KV-cache sampler
                (``methods.sampling.sample``) and per-row seeds (``step.row_seeds``: a completion depends only on
                (model, prompt, seed), never on the batch); EOS appended where the sample ended with it (the sequence
                the reward model and DPO see: text + EOS)
  2. score      ``reward_fn(prompt_ids, completion_ids) -> [N]`` (deterministic per row: under data parallelism it
                is called on a rank's shard); normalised (:class:`RewardNorm`: off, the first rollouts' statistics
                (from pi_ref), running statistics, or a given ``reward_scale=(mean, std)``: the RM's gain and bias
                under pi_ref); the optional missing-EOS penalty; ``monitor`` (e.g. the gold reward) only logged as
                ``objective/gold``, never trained on
  3. forwards   one no-grad forward each of the policy (old log-probs) and the reference (reference log-probs) over
                right-padded rows (``methods.data.collate``), in chunks of ``forward_batch_size``, through the shared
                log-prob core (``methods.logprobs.token_logps_nocopy`` on logits / the step's temperature), plus the
                step's extra per-token tensors (``step.rollout_extras``: PPO's values, online DPO's sampler log-probs)
  4. step       ``step.experience(rollout)``: the method's math turns the scored rollout into training examples
                (PPO: per-token KL reward + GAE with the critic; RLOO: leave-one-out; GRPO: group-normalised
                advantages; online DPO: best-vs-worst pairs)
  5. update     ``epochs`` passes over seeded shuffles of the examples in minibatches of ``minibatch_size``: the
                step's loss on a minibatch (``step.minibatch``), backward, gradient-norm clipping, the optimiser
                step; every loss, statistic and gradient norm is checked for NaN/inf; the step may stop the epochs
                early (PPO's ``kl_stop``); the learning rate optionally annealed linearly over the iterations
  6. end        ``step.end_iteration`` (PPO's KL controller and EMA reference, online DPO's sampler sync), counters
                (episodes = completions, tokens), the log record: the engine's common keys + the step's

The engine also owns what every method needs the same way: validation (prompts, tokenizer, models), the NaN guard
(weights snapshotted before each iteration and restored on a non-finite value: ``FloatingPointError`` names the
quantity, phase and iteration), checkpoints (``state_dict``: engine state + step state; ``rl_loop.IterativeTrainer``
resumes, writes every ``checkpoint_every`` iterations and stops), timers, and data parallelism.

Data parallel under ``accelerate launch`` (``accelerator=Accelerator()``, DDP-style: every rank holds the whole
policy, reference and critic): each rank samples, scores and forwards its contiguous shard of the iteration's rows
(same prompts and seeds as one process, so the same samples); the rows, scores and per-token tensors are gathered,
so the step's math runs on the whole rollout on every rank exactly as in one process; every minibatch is split over
the ranks (``Dist.split``, uneven allowed), each rank's loss weighs its share of the minibatch's loss units (tokens
for token means, sequences, pairs: ``step.units``) and the gradients are summed over ranks (= the single-process
minibatch gradient); logged minibatch statistics are unit-weighted over ranks. FSDP / DeepSpeed are refused (the
sampler and the no-grad forwards need whole parameters on each rank).

A new on-policy method = one :class:`OnPolicyStep` subclass (its config, math and log keys) + one arm module.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from methods.checkpointing import check_same_config, rng_state, set_rng_state
from methods.data import collate
from methods.distributed import Dist
from methods.logprobs import IGNORE_INDEX, token_logps_nocopy
from methods.rl_loop import IterativeTrainer, Timers, all_finite, cpu_state, permuted_slots, prompts_digest
from methods.rlhf.ppo_core import check_finite
from methods.sampling import derive_seed, sample

NORM_MODES = (None, "first", "running", "given")


# ------------------------------------------------------------------------------------------------ config
@dataclass(kw_only=True)
class OnPolicyConfig:
    """The fields every on-policy method's config shares; the engine reads them (``LoopConfig.of``)."""

    iterations: int = 100
    """Iterations (= rollout batches)."""
    lr: float = 1e-5
    """Learning rate of the policy (PPO: and of its critic unless ``vf_lr``)."""
    max_new_tokens: int = 24
    temperature: float = 1.0
    """Sampling temperature (> 0). PPO's and RLOO/GRPO's log-probs are of logits / temperature ([N-details]); online
    DPO's loss and KL monitor use the model's log-probs at temperature 1."""
    grad_clip: float = 1.0
    """Gradient-norm clipping of every optimiser step."""
    adam_eps: float = 1e-5
    """Adam epsilon ([N-details] eps = 1e-5)."""
    generation_batch_size: int = 256
    """Rows per sampler batch (the samples do not depend on it)."""
    forward_batch_size: int = 0
    """Rows per no-grad rollout forward; 0 = the whole rollout batch in one forward."""
    seed: int = 0


# ------------------------------------------------------------------------------------------------ config checks
def is_num(x) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(float(x))


def is_pos(x) -> bool:
    return is_num(x) and float(x) > 0


def is_pos_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 1


def is_count(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def loop_checks(cfg) -> list[tuple[bool, str, str]]:
    """(ok, field, message) of the fields every on-policy config shares, read by the engine; a config's
    ``validate`` adds its own and reports them all with :func:`raise_invalid`."""
    return [
        (is_pos(cfg.lr), "lr", "must be > 0"),
        (is_pos_int(cfg.iterations), "iterations", "must be an integer >= 1"),
        (is_pos_int(cfg.max_new_tokens), "max_new_tokens", "must be an integer >= 1"),
        (is_pos(cfg.temperature), "temperature", "must be > 0 (on-policy training needs a stochastic policy)"),
        (is_pos(cfg.grad_clip), "grad_clip", "must be > 0"),
        (is_pos(cfg.adam_eps), "adam_eps", "must be > 0"),
        (is_pos_int(cfg.generation_batch_size), "generation_batch_size", "must be an integer >= 1"),
        (is_count(cfg.forward_batch_size), "forward_batch_size", "must be an integer >= 0 (0 = whole rollout batch)"),
        (is_count(cfg.seed), "seed", "must be an integer >= 0"),
    ]


def field_errors(cfg, checks: list[tuple[bool, str, str]]) -> list[str]:
    return [f"{key} {msg}, got {getattr(cfg, key)!r}" for ok, key, msg in checks if not ok]


def raise_invalid(errors: list[str], what: str) -> None:
    """One ValueError listing every invalid field, each line starting with the field's name."""
    if errors:
        raise ValueError(f"invalid {what}:\n  - " + "\n  - ".join(errors))


# ------------------------------------------------------------------------------------------------ pieces
@dataclass(frozen=True)
class LoopConfig:
    """What the engine reads of a method's config (``step.loop_config()`` builds it)."""

    iterations: int
    prompts_per_iteration: int
    k: int
    """Completions per prompt slot (rows ``p * k + j``); PPO: 1."""
    max_new_tokens: int
    temperature: float
    """Sampling temperature."""
    logp_temperature: float
    """Log-probs are of logits / this (PPO, RLOO/GRPO: the sampling temperature; online DPO: 1)."""
    epochs: int
    minibatch_size: int
    """Examples per optimiser step (completions; online DPO: pairs)."""
    grad_clip: float
    anneal_lr: bool
    """lr_t = (1 - (t - 1) / iterations) * lr, set before iteration t ([N-details])."""
    reward_norm: str | None
    """One of ``NORM_MODES``."""
    generation_batch_size: int
    forward_batch_size: int
    missing_eos_penalty: float | None = None

    @property
    def rows(self) -> int:
        """Completions (= episodes) per iteration."""
        return self.prompts_per_iteration * self.k

    @classmethod
    def of(cls, cfg: OnPolicyConfig, **method) -> LoopConfig:
        """The loop of a method's config: its ``OnPolicyConfig`` fields, plus ``method`` (prompts_per_iteration, k,
        epochs, minibatch_size, anneal_lr, reward_norm, logp_temperature, missing_eos_penalty)."""
        shared = ("iterations", "max_new_tokens", "temperature", "grad_clip", "generation_batch_size",
                  "forward_batch_size")
        return cls(**{k: getattr(cfg, k) for k in shared}, **method)


class RunningStats:
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


class RewardNorm:
    """Score normalisation ``(raw - mean) / std`` (std <= 1e-6: shift only). ``mode``: None (off) | ``first`` (the
    first rollouts' statistics, frozen: the policy is still pi_ref) | ``running`` (all scores seen) | ``given``
    (``scale = (mean, std)``, e.g. the RM's gain and bias fitted on many pi_ref samples).

    ``first_stats`` says how the first rollouts' statistics are computed: ``"running"`` (PPO: the running
    accumulator after one update) or ``"batch"`` (RLOO/GRPO/online DPO: torch's mean and Bessel std in one pass).
    They are the same statistics and agree to ~1 ulp; both are kept so that every method's numbers (and the TRL
    peers' reproduction of them) stay bit for bit what they were. The checkpoint layout follows it too."""

    def __init__(self, mode: str | None, scale: tuple[float, float] | None = None, *, first_stats: str = "batch"):
        if mode not in NORM_MODES or first_stats not in ("batch", "running"):
            raise ValueError(f"reward normalisation mode {mode!r} / first_stats {first_stats!r}")
        self.mode, self.first_stats = mode, first_stats
        self.running = RunningStats()
        self.frozen: tuple[float, float] | None = None if scale is None else (float(scale[0]), float(scale[1]))

    def __call__(self, raw: torch.Tensor) -> tuple[torch.Tensor, float, float]:
        """-> (normalised scores, mean, std used)."""
        if self.mode is None:
            return raw, 0.0, 1.0
        if self.mode == "running":
            self.running.update(raw)
            mean, std = self.running.mean, self.running.std
        else:
            if self.frozen is None:  # first: statistics of the first rollouts
                if self.first_stats == "running":
                    self.running.update(raw)
                    self.frozen = (self.running.mean, self.running.std)
                else:
                    x = raw.double()
                    self.frozen = (float(x.mean()), float(x.std()) if x.numel() > 1 else 1.0)
            mean, std = self.frozen
        std = std if std > 1e-6 else 1.0  # constant scores: shift only
        return (raw - mean) / std, mean, std

    def state_dict(self) -> dict:
        if self.first_stats == "running":
            r = self.running
            return {"norm": {"n": r.n, "mean": r.mean, "m2": r.m2}, "norm_frozen": self.frozen}
        return {"norm": self.frozen}

    def load_state_dict(self, d: dict) -> None:
        if self.first_stats == "running":
            r = self.running
            r.n, r.mean, r.m2 = int(d["norm"]["n"]), float(d["norm"]["mean"]), float(d["norm"]["m2"])
            nf = d["norm_frozen"]
        else:
            nf = d["norm"]
        self.frozen = None if nf is None else (float(nf[0]), float(nf[1]))


@dataclass
class Forward:
    """One forward through the shared log-prob path."""

    logits: torch.Tensor
    """[B, T, V], divided by the log-prob temperature when it is not 1."""
    logps: torch.Tensor
    """[B, T-1] log-probs of the labels, 0 where masked."""
    mask: torch.Tensor
    """[B, T-1] float, 1 on completion tokens."""
    hidden: torch.Tensor | None
    """[B, T, H] last hidden state (when asked for)."""


@dataclass
class Rollout:
    """A scored rollout: the whole iteration's rows on every rank (gathered under data parallelism)."""

    it: int
    slots: list[int]
    """Prompt index of each slot."""
    prompts: list[list[int]]
    """One per row (slot p repeated k times)."""
    seeds: list[int]
    completions: list[list[int]]
    """Generated ids, EOS appended where the sample ended with it (what the reward and the loss see)."""
    ended: list[bool]
    raw: torch.Tensor
    """[N] reward_fn scores."""
    scores: torch.Tensor
    """[N] normalised (and EOS-penalised) scores."""
    norm_mean: float
    norm_std: float
    gold: float | None
    """Mean of the monitor's values (None without a monitor)."""
    ids: torch.Tensor
    attn: torch.Tensor
    labels: torch.Tensor
    mask: torch.Tensor
    """[N, T-1] float."""
    logprobs: torch.Tensor
    """[N, T-1] policy log-probs at rollout time (old log-probs)."""
    ref_logprobs: torch.Tensor
    extra: dict[str, torch.Tensor]
    """The step's per-token tensors (``rollout_extras``)."""
    kl_seq: torch.Tensor
    """[N] k1 sequence KL of the rollout policy, sum_t (log pi - log pi_ref): the paper's measure."""

    @property
    def n_tok(self) -> int:
        return int(self.mask.sum())

    @property
    def samples(self) -> list[list[int]]:
        """The sampler's completions (EOS excluded)."""
        return [c[:-1] if e else list(c) for c, e in zip(self.completions, self.ended, strict=True)]


@dataclass
class Experience:
    """The step's training examples of one iteration: ``n`` examples (completions or pairs), ``data`` (its tensors)
    and ``inspect`` (kept as ``trainer.last_rollout``)."""

    n: int
    data: dict
    inspect: dict


@dataclass
class Minibatch:
    """This rank's part of a minibatch: example indices, their rows and the trimmed row tensors."""

    idx: torch.Tensor
    rows: torch.Tensor
    ids: torch.Tensor
    attn: torch.Tensor
    labels: torch.Tensor


@dataclass
class MinibatchLoss:
    """What ``step.minibatch`` returns: the loss (a mean over this rank's loss units) and statistics: ``means``
    (minibatch means: unit-weighted over ranks), ``sums`` (summed over ranks), ``lists`` (per-example values,
    gathered in rank order = the single-process order)."""

    loss: torch.Tensor
    means: dict[str, torch.Tensor | float] = field(default_factory=dict)
    sums: dict[str, torch.Tensor | float] = field(default_factory=dict)
    lists: dict[str, list[float]] = field(default_factory=dict)


@dataclass
class UpdateStats:
    """Per optimiser step: ``means[k]`` / ``sums[k]`` (one float per step), ``lists[k]`` (all examples),
    ``grad_norm``; ``updates`` (optimiser steps), ``early`` (the step stopped the epochs), ``tokens`` (forward +
    backward tokens)."""

    means: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    sums: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    lists: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    grad_norm: list[float] = field(default_factory=list)
    updates: int = 0
    early: bool = False
    tokens: int = 0

    def mean(self, key: str) -> float:
        return float(np.mean(self.means[key]))


def mean_or_none(xs: list[float]) -> float | None:
    return float(np.mean(xs)) if xs else None


def _float(v) -> float:
    return float(v.detach()) if torch.is_tensor(v) else float(v)


# ------------------------------------------------------------------------------------------------ the step
class OnPolicyStep:
    """A method's part of the iteration (its config, math, state and log keys). The engine calls, per iteration:
    ``begin(it)``, ``sampling_model()``, ``row_seeds(it, slots)``, ``rollout_extras`` per forward chunk,
    ``experience(rollout)``, then per minibatch ``rows`` / ``units`` / ``minibatch`` / ``stop_epochs``, then
    ``end_iteration`` and ``record``. Defaults: sample from the policy; seeds of the PPO / RLOO / GRPO streams."""

    label = "on-policy"
    """The method's name in messages."""
    rows_field = "rollout batch"
    """The config field of the rollout rows (in the data-parallel divisibility message)."""
    restored = "Policy restored to its state"
    first_stats = "batch"
    """``RewardNorm.first_stats``."""
    scores_on_cpu = False
    """Keep the scores on the CPU (online DPO's pairing and logging ran there)."""
    wants_hidden = False
    """The policy forwards (rollout and update) return the last hidden state (PPO's shared value head)."""
    mean_stats: tuple[str, ...] = ()
    sum_stats: tuple[str, ...] = ()
    list_stats: tuple[str, ...] = ()
    finite_checks: tuple[tuple[str, str], ...] = ()
    """(quantity named in the error, statistic) checked for NaN/inf on every minibatch, before the backward."""

    engine: OnPolicyEngine

    def __init__(self, cfg) -> None:
        self.cfg = cfg

    # configuration
    def loop_config(self) -> LoopConfig:
        raise NotImplementedError

    def config_dict(self) -> dict:
        return asdict(self.cfg)

    def reward_scale_error(self, reward_scale) -> str:
        return f"reward_scale={reward_scale!r} needs reward normalisation on"

    # construction
    def check_models(self, policy, ref_model) -> None:
        """Method-specific checks of the models before anything moves (raise ValueError)."""

    def bind(self, engine: OnPolicyEngine) -> None:
        """Build the method's state (engine.policy / ref_model / device / dist are set)."""
        self.engine = engine

    def extra_params(self) -> list[torch.nn.Parameter]:
        """Trainable parameters beside the policy's (a critic), clipped and stepped with them."""
        return []

    def extra_modules(self) -> dict[str, torch.nn.Module]:
        """Modules snapshotted and restored with the policy by the NaN guard."""
        return {}

    def optimizer(self, policy_params: list, extra_params: list) -> torch.optim.Optimizer:
        raise NotImplementedError

    # rollout
    def begin(self, it: int) -> None:
        pass

    def sampling_model(self) -> torch.nn.Module:
        return self.engine.policy

    def slot_seed(self, epoch: int) -> int:
        """Seed of the prompt permutation of prompt epoch ``epoch``."""
        return derive_seed(self.cfg.seed, 1, epoch)

    def row_seeds(self, it: int, slots: list[int]) -> list[int]:
        """Sampling seed of every row ``r = p * k + j``: ``derive_seed(seed, 2, it, prompt index, r)``."""
        k = self.engine.loop.k
        return [derive_seed(self.cfg.seed, 2, it, slots[r // k], r) for r in range(len(slots) * k)]

    def epoch_seed(self, it: int, epoch: int) -> int:
        """Seed of the minibatch shuffle of update epoch ``epoch``."""
        return derive_seed(self.cfg.seed, 3, it, epoch)

    def rollout_extras(self, ids, attn, labels, policy_fwd: Forward) -> dict[str, torch.Tensor]:
        """Extra no-grad per-token tensors [b, T-1] of a forward chunk (0 where masked)."""
        return {}

    # the method's math
    def experience(self, ro: Rollout) -> Experience:
        raise NotImplementedError

    def rows(self, exp: Experience, idx: torch.Tensor) -> torch.Tensor:
        """Rollout rows of examples ``idx`` (on the device)."""
        return idx.to(self.engine.device)

    def units(self, exp: Experience, idx: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """The loss's units among examples ``idx`` (its mean is over them): sequences by default."""
        return torch.tensor(float(len(rows)), device=self.engine.device)

    def minibatch(self, exp: Experience, mb: Minibatch) -> MinibatchLoss:
        raise NotImplementedError

    def stop_epochs(self, upd: UpdateStats) -> bool:
        return False

    def end_iteration(self, ro: Rollout, exp: Experience, upd: UpdateStats) -> None:
        pass

    def record(self, ro: Rollout, exp: Experience, upd: UpdateStats) -> dict:
        raise NotImplementedError

    # checkpoints
    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, d: dict) -> None:
        pass


# ------------------------------------------------------------------------------------------------ the engine
class OnPolicyEngine(IterativeTrainer):
    """The on-policy loop (module docstring) around a method's ``step``.

    ``policy`` is trained in place (pass a copy of pi_ref, adapters added); ``ref_model`` is only read (a step may
    replace it by a private copy it moves, PPO's EMA reference). ``prompts``: token-id lists (with BOS if the
    tokenizer adds it). ``monitor(prompt_ids, completion_ids) -> [N]`` (optional, e.g. the gold reward) is logged as
    ``objective/gold``. ``autocast``: a reusable context manager wrapped around every forward and the sampler.
    ``accelerator``: an ``accelerate.Accelerator`` of a multi-process launch (data parallel); None or a one-process
    accelerator = one process. ``reward_scale``: the (mean, std) of ``reward_norm='given'``."""

    def __init__(self, step: OnPolicyStep, policy, ref_model, reward_fn: Callable, tokenizer,
                 prompts: Sequence[Sequence[int]], device: str | torch.device, *, autocast=None, accelerator=None,
                 monitor: Callable | None = None, reward_scale: tuple[float, float] | None = None):
        step.cfg.validate()
        self.step, self.cfg = step, step.cfg
        self.loop = L = step.loop_config()
        label = step.label
        if (L.reward_norm == "given") != (reward_scale is not None):
            raise ValueError(step.reward_scale_error(reward_scale))
        if reward_scale is not None and not (math.isfinite(reward_scale[0]) and reward_scale[1] > 0):
            raise ValueError(f"reward_scale must be (finite mean, std > 0), got {reward_scale!r}")
        self.accelerator = accelerator
        self.dist = Dist.from_accelerator(accelerator)
        if self.dist.distributed:
            kind = str(getattr(accelerator, "distributed_type", ""))
            if "FSDP" in kind or "DEEPSPEED" in kind:
                raise NotImplementedError(
                    f"{label} under {kind}: parameter sharding is not supported (rollout sampling and the no-grad "
                    "forwards need whole parameters on every rank); launch it with a DDP config "
                    "(benchmarks/configs/accelerate/ddp.yaml)")
            self.dist.shard(L.rows, step.rows_field)
            device = accelerator.device
        if policy is ref_model:
            raise ValueError("policy and ref_model are the same object: pass a trainable copy of pi_ref as policy")
        if not callable(reward_fn):
            raise TypeError("reward_fn must be callable: reward_fn(prompt_ids, completion_ids) -> Tensor[N]")
        if monitor is not None and not callable(monitor):
            raise TypeError("monitor must be callable: monitor(prompt_ids, completion_ids) -> list[float]")
        if len(prompts) == 0:
            raise ValueError(f"no prompts: {label} needs at least one prompt")
        bad = [i for i, p in enumerate(prompts) if len(p) == 0]
        if bad:
            raise ValueError(f"empty prompts at indices {bad[:5]}: every prompt needs at least one token (e.g. BOS)")
        step.check_models(policy, ref_model)
        if tokenizer.eos_token_id is None or tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer needs eos_token_id and pad_token_id")
        if tokenizer.pad_token_id == tokenizer.eos_token_id:
            # [N+-details] EOS as padding masks the EOS out of training: the policy then never learns to stop
            raise ValueError("pad_token_id == eos_token_id: give the tokenizer a distinct pad token")
        self.device = torch.device(device)
        self.policy = policy.to(self.device).eval()  # dropout off throughout (gradients still flow)
        self.ref_model = ref_model.to(self.device).eval()
        self.reward_fn, self.monitor, self.tokenizer = reward_fn, monitor, tokenizer
        self.eos_id, self.pad_id = tokenizer.eos_token_id, tokenizer.pad_token_id
        self.prompts = [list(map(int, p)) for p in prompts]
        self._autocast_arg = autocast
        self.autocast = autocast if autocast is not None else contextlib.nullcontext()
        self._policy_params = [p for p in self.policy.parameters() if p.requires_grad]
        if not self._policy_params:
            raise ValueError("the policy has no trainable parameters")
        self.dist.broadcast_params(self._policy_params)  # replicas start equal (as DDP)
        step.bind(self)
        extra = step.extra_params()
        self.dist.broadcast_params(extra)
        self.params = self._policy_params + extra
        self.opt = step.optimizer(self._policy_params, extra)
        self._base_lrs = [g["lr"] for g in self.opt.param_groups]
        self.norm = RewardNorm(L.reward_norm, reward_scale, first_stats=step.first_stats)
        self._perms: dict[int, np.ndarray] = {}
        self.history: list[dict] = []
        self.iteration = 0
        self.episodes_seen = 0
        self.tokens_seen = 0
        self.last_good_state: dict[str, torch.Tensor] | None = None
        """CPU copy of the policy's state_dict before the current/last iteration (restored on non-finite)."""
        self.last_good_extra: dict[str, dict[str, torch.Tensor]] = {}
        """The same of the step's extra modules (PPO's critic)."""
        self.last_rollout: dict | None = None
        """The step's tensors of the last rollout (``Experience.inspect``), for inspection."""

    # ----------------------------------------------------------------------------------------- pieces
    @property
    def _label(self) -> str:  # in the shared loop's messages
        return self.step.label

    @property
    def _restored(self) -> str:
        return self.step.restored

    def _prompt_slots(self, it: int) -> list[int]:
        """Prompt indices of iteration ``it`` (1-based): epochs of seeded permutations, read in order."""
        out, self._perms = permuted_slots(self._perms, len(self.prompts), it, self.loop.prompts_per_iteration,
                                          self.step.slot_seed)
        return out

    def _normalise(self, raw: torch.Tensor) -> tuple[torch.Tensor, float, float]:
        return self.norm(raw)

    def forward(self, model, ids: torch.Tensor, attn: torch.Tensor, labels: torch.Tensor, *,
                hidden: bool = False) -> Forward:
        """``model`` on right-padded rows -> log-probs of the labels through the shared path (logits / the step's
        log-prob temperature, [N-details] "temperature scaling")."""
        with self.autocast:
            out = model(input_ids=ids, attention_mask=attn, use_cache=False, output_hidden_states=hidden)
        logits = out.logits  # [B, T, V]
        temp = self.loop.logp_temperature
        if temp != 1.0:
            logits = logits.float() / temp
        lp, mask = token_logps_nocopy(logits, labels)
        return Forward(logits, lp, mask, out.hidden_states[-1] if hidden else None)

    def _snapshot(self, it: int) -> None:
        extra = self.step.extra_modules()
        if not all_finite(self.policy) or not all(all_finite(m) for m in extra.values()):
            self._restore()
            raise FloatingPointError(
                f"{self.step.label} iteration {it}: non-finite parameters after the update of iteration {it - 1} "
                f"(phase update); restored the state before iteration {it - 1} (trainer.last_good_state)")
        self.last_good_state = cpu_state(self.policy)
        self.last_good_extra = {k: cpu_state(m) for k, m in extra.items()}

    def _restore(self) -> None:
        if self.last_good_state is not None:
            self.policy.load_state_dict(self.last_good_state)
            for k, m in self.step.extra_modules().items():
                m.load_state_dict(self.last_good_extra[k])

    # ----------------------------------------------------------------------------------------- checkpoints
    def _prompts_digest(self) -> str:
        return prompts_digest(self.prompts)

    def state_dict(self) -> dict:
        """Everything that affects later iterations (not ``last_good_state`` / ``last_rollout``)."""
        return {"policy": self.policy.state_dict(), **self.step.state_dict(), "optimizer": self.opt.state_dict(),
                **self.norm.state_dict(),
                "perms": {int(e): torch.from_numpy(np.asarray(pm)) for e, pm in self._perms.items()},
                "iteration": self.iteration, "episodes_seen": self.episodes_seen, "tokens_seen": self.tokens_seen,
                "history": list(self.history), "rng": rng_state(), "config": self.step.config_dict(),
                "prompts_sha256": self._prompts_digest()}

    def load_state_dict(self, d: dict) -> None:
        label = self.step.label
        check_same_config(d["config"], self.step.config_dict(), label)
        if d["prompts_sha256"] != self._prompts_digest():
            raise ValueError(f"{label} checkpoint was written for other prompts: resuming it would not reproduce the run")
        self.policy.load_state_dict(d["policy"])
        self.step.load_state_dict(d)
        self.opt.load_state_dict(d["optimizer"])
        self.norm.load_state_dict(d)
        self._perms = {int(e): pm.numpy() for e, pm in d["perms"].items()}
        self.iteration, self.episodes_seen, self.tokens_seen = int(d["iteration"]), int(d["episodes_seen"]), int(d["tokens_seen"])
        self.history = list(d["history"])
        set_rng_state(d["rng"])

    # ----------------------------------------------------------------------------------------- the iteration
    def _iteration(self, it: int) -> dict:
        L, step = self.loop, self.step
        timers = Timers(self.device)
        t_iter = time.perf_counter()
        if L.anneal_lr:  # [N-details] lrnow = (1 - (update - 1) / num_updates) * lr
            frac = 1.0 - (it - 1) / L.iterations
            for g, base in zip(self.opt.param_groups, self._base_lrs, strict=True):
                g["lr"] = frac * base
        step.begin(it)
        ro = self._rollout(it, timers)
        exp = step.experience(ro)
        self.last_rollout = exp.inspect
        upd = self._update(it, ro, exp, timers)
        lr = self.opt.param_groups[0]["lr"]
        step.end_iteration(ro, exp, upd)
        n_tok, B = ro.n_tok, L.rows
        self.episodes_seen += B
        self.tokens_seen += n_tok
        rec = {
            "iteration": it,
            "episodes_seen": self.episodes_seen,
            "tokens_seen": self.tokens_seen,
            "objective/scores": float(ro.scores.mean()),
            "objective/raw_scores": float(ro.raw.mean()),
            "objective/eos_frac": float(np.mean(ro.ended)),
            "objective/completion_len": n_tok / B,
            "objective/reward_norm_mean": ro.norm_mean,
            "objective/reward_norm_std": ro.norm_std,
            **({"objective/gold": ro.gold} if ro.gold is not None else {}),
            # compute accounting (whole rollout batch): prompt + generated tokens of sampling, the tokens of one
            # no-grad forward over the rollouts (each model's), the update's forward + backward tokens
            "tokens/prompt": sum(len(p) for p in ro.prompts),
            "tokens/generated": sum(len(c) for c in ro.completions),
            "tokens/sequence": int(ro.attn.sum()),
            "tokens/update": upd.tokens,
            "policy/updates": upd.updates,
            "grad_norm": mean_or_none(upd.grad_norm),
            "lr": lr,
        }
        rec.update(step.record(ro, exp, upd))
        t = timers.t
        for key in ("time/generation", "time/reward", "time/ref_value_forward", "time/update"):
            rec[key] = t.get(key, 0.0)
        rec["time/iteration"] = time.perf_counter() - t_iter
        return rec

    def _rollout(self, it: int, timers: Timers) -> Rollout:
        """Steps 1-3: sample, score, forward; this rank's shard of the rows, then the whole rollout gathered."""
        L, step, dist, dev = self.loop, self.step, self.dist, self.device
        slots = self._prompt_slots(it)
        prompts = [self.prompts[i] for i in slots for _ in range(L.k)]
        seeds = step.row_seeds(it, slots)
        sh = dist.shard(L.rows)  # all rows with one process
        l_prompts = prompts[sh]
        model = step.sampling_model()
        with timers("time/generation"):
            s = sample(model, l_prompts, max_new_tokens=L.max_new_tokens, temperature=L.temperature,
                       seeds=seeds[sh], eos_token_id=self.eos_id, pad_token_id=self.pad_id,
                       batch_size=L.generation_batch_size, autocast=self._autocast_arg)
        model.eval()
        l_comps = [c + [self.eos_id] if e else list(c) for c, e in zip(s.completions, s.ended, strict=True)]
        ended = dist.gather_objects(list(s.ended))  # global order
        comps = dist.gather_objects(l_comps)

        with timers("time/reward"):
            raw = self.reward_fn(l_prompts, l_comps)
            raw = torch.as_tensor(raw, dtype=torch.float32).detach().flatten().to(dev)
            if raw.numel() != len(l_prompts):
                raise ValueError(f"reward_fn returned {raw.numel()} scores for {len(l_prompts)} completions")
            raw = dist.gather_rows(raw)
            if step.scores_on_cpu:
                raw = raw.cpu()
            check_finite("scores", raw, phase="reward", step=it)
            scores, norm_mean, norm_std = self.norm(raw)
            if L.missing_eos_penalty is not None:
                # [TRL-ppov2] scores[~contain_eos_token] -= self.args.missing_eos_penalty
                scores = torch.where(torch.tensor(ended, device=raw.device), scores, scores - L.missing_eos_penalty)
        gold = None
        if self.monitor is not None:
            g = dist.gather_objects([float(x) for x in self.monitor(l_prompts, l_comps)])
            gold = sum(g) / max(1, len(g))

        batch = {key: v.to(dev) for key, v in collate(l_prompts, l_comps, self.pad_id).items()}
        ids, attn, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        n_local = len(l_prompts)
        fb = L.forward_batch_size or n_local
        parts: dict[str, list[torch.Tensor]] = defaultdict(list)
        with timers("time/ref_value_forward"), torch.no_grad():
            for c0 in range(0, n_local, fb):
                sl = slice(c0, c0 + fb)
                pf = self.forward(self.policy, ids[sl], attn[sl], labels[sl], hidden=step.wants_hidden)
                rf = self.forward(self.ref_model, ids[sl], attn[sl], labels[sl])
                parts["logprobs"].append(pf.logps)
                parts["ref_logprobs"].append(rf.logps)
                parts["mask"].append(pf.mask)
                for key, v in step.rollout_extras(ids[sl], attn[sl], labels[sl], pf).items():
                    parts[key].append(v)
                del pf, rf
            tok = {key: torch.cat(v) for key, v in parts.items()}  # [N, T-1]
        if dist.distributed:  # the whole rollout on every rank, padded as one collate would pad it
            ids, attn = dist.gather_rows(ids, self.pad_id), dist.gather_rows(attn, 0)
            labels = dist.gather_rows(labels, IGNORE_INDEX)
            tok = {key: dist.gather_rows(v, 0) for key, v in tok.items()}
        mask, lp, ref_lp = tok.pop("mask"), tok.pop("logprobs"), tok.pop("ref_logprobs")
        for name, t in (("logprobs", lp), ("ref_logprobs", ref_lp), *tok.items()):
            check_finite(name, t, phase="rollout_forward", step=it)
        zero = torch.zeros((), device=lp.device, dtype=lp.dtype)
        kl_seq = torch.where(mask.bool(), lp - ref_lp, zero).sum(1)  # [N] k1 sequence KL
        return Rollout(it=it, slots=slots, prompts=prompts, seeds=seeds, completions=comps, ended=ended, raw=raw,
                       scores=scores, norm_mean=norm_mean, norm_std=norm_std, gold=gold, ids=ids, attn=attn,
                       labels=labels, mask=mask, logprobs=lp, ref_logprobs=ref_lp, extra=tok, kl_seq=kl_seq)

    def _update(self, it: int, ro: Rollout, exp: Experience, timers: Timers) -> UpdateStats:
        """Step 5: epochs x seeded shuffles x minibatches of the step's loss; each minibatch split over the ranks."""
        L, step, dist = self.loop, self.step, self.dist
        upd = UpdateStats()
        with timers("time/update"):
            for epoch in range(L.epochs):
                if exp.n == 0:
                    break
                perm = torch.randperm(exp.n, generator=torch.Generator().manual_seed(step.epoch_seed(it, epoch)))
                for m0 in range(0, exp.n, L.minibatch_size):
                    idx_all = perm[m0 : m0 + L.minibatch_size]
                    idx = idx_all[dist.split(len(idx_all))]  # this rank's examples (all of them: 1 process)
                    rows_all = step.rows(exp, idx_all)
                    out, rows = None, rows_all
                    if len(idx):
                        rows = step.rows(exp, idx) if dist.distributed else rows_all
                        T = int(ro.attn[rows].sum(1).max())  # trim the minibatch's trailing padding
                        mb = Minibatch(idx, rows, ro.ids[rows, :T], ro.attn[rows, :T], ro.labels[rows, :T])
                        out = step.minibatch(exp, mb)
                    loss, means, sums, lists = self._reduce(exp, out, idx, rows, idx_all, rows_all)
                    for name, key in step.finite_checks:
                        check_finite(name, means[key] if key in means else sums[key], phase="update", step=it)
                    self.opt.zero_grad(set_to_none=True)
                    if loss is not None:
                        loss.backward()
                    dist.all_reduce_grads(self.params, average=False)
                    gnorm = torch.nn.utils.clip_grad_norm_(self.params, L.grad_clip)
                    check_finite("grad_norm", gnorm, phase="update", step=it)
                    self.opt.step()
                    upd.updates += 1
                    upd.tokens += int(ro.attn[rows_all].sum())  # policy (and critic) forward + backward tokens
                    for key, v in means.items():
                        upd.means[key].append(_float(v))
                    for key, v in sums.items():
                        upd.sums[key].append(_float(v))
                    for key, v in lists.items():
                        upd.lists[key] += v
                    upd.grad_norm.append(_float(gnorm))
                    if step.stop_epochs(upd):
                        upd.early = True
                        break
                if upd.early:
                    break
        return upd

    def _reduce(self, exp, out: MinibatchLoss | None, idx, rows, idx_all, rows_all):
        """The minibatch's loss and statistics over the ranks: this rank's loss weighs its share of the minibatch's
        loss units, so that the gradients summed over ranks are the single-process minibatch gradient."""
        step, dist = self.step, self.dist
        if not dist.distributed:
            return out.loss, out.means, out.sums, out.lists
        dd = dict(dtype=torch.float64, device=self.device)

        def stacked(vals: dict, keys: tuple[str, ...]) -> torch.Tensor:
            return torch.stack([torch.as_tensor(vals[k]).detach().to(**dd).reshape(()) for k in keys]) if keys \
                else torch.zeros(0, **dd)

        loss = None
        if out is not None:
            w = step.units(exp, idx, rows) / step.units(exp, idx_all, rows_all)
            loss = out.loss * w
            means, sums = stacked(out.means, step.mean_stats) * w.double(), stacked(out.sums, step.sum_stats)
            lists = {k: list(out.lists[k]) for k in step.list_stats}
        else:  # no example of this minibatch on this rank: it still joins every collective
            means, sums = torch.zeros(len(step.mean_stats), **dd), torch.zeros(len(step.sum_stats), **dd)
            lists = {k: [] for k in step.list_stats}
        means = dict(zip(step.mean_stats, dist.all_reduce_sum(means).cpu(), strict=True))
        sums = dict(zip(step.sum_stats, dist.all_reduce_sum(sums).cpu(), strict=True))
        parts = dist.gather_objects([lists])
        lists = {k: [x for p in parts for x in p[k]] for k in step.list_stats}
        return loss, means, sums, lists
