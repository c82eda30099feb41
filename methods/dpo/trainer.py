"""Our DPO trainer: a small loop around the pure losses of ``methods.dpo.losses``.

* starts from pi_ref; reference log-probs are computed once (no_grad) and cached on disk, keyed by
  (reference model, pairs, truncation), so sweeps over beta / seeds / loss types reuse them;
* chosen and rejected go through one forward (padded concatenation, or the packed prompt-sharing layout);
* gradient accumulation is exactly a big batch (per-micro-batch losses summed / pairs per step);
* warm-up + schedule (transformers' schedulers), RMSprop (the paper) or AdamW, grad clipping, bf16/fp16
  autocast where the device supports it;
* data parallel under ``accelerate launch`` (pass ``accelerator=Accelerator()``; DDP, FSDP or DeepSpeed through
  accelerate configs): every step's global batch (the same ``example_order``) is split into equal contiguous
  shards, one per rank, each rank's loss is its shard's sum / shard size, and the gradient average over ranks
  is then the single-process gradient of the full batch; logged metrics are gathered over ranks, so the logs
  equal a single-process run's (up to float summation order). Only the main process writes checkpoints;
* resumable: ``train(checkpoint_path=..., checkpoint_every=n)`` writes an atomic checkpoint (model, optimiser,
  scheduler, step = data position, counters, history, RNG states) every n steps and, started again after a
  kill, continues from it on exactly the batches an uninterrupted run would have used.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from methods.checkpointing import CheckpointMixin, check_same_config, rng_state, set_rng_state
from methods.data import tokenize_pairs  # noqa: F401 - re-exported: the DPO arm's tokenisation
from methods.distributed import Dist
from methods.dpo.batching import PairExample, batch_to, make_batch, pair_logps
from methods.dpo.losses import preference_loss, simpo_loss, uses_average_logps, validate_dpo_hparams


@dataclass
class DPOConfig:
    beta: float
    """KL-penalty strength (the paper: 0.1 for sentiment). Required: no default."""
    loss_type: str = "sigmoid"
    """sigmoid (DPO) | ipo | hinge (SLiC) | robust (rDPO) | simpo (reference-free)."""
    label_smoothing: float = 0.0
    """cDPO / rDPO label-noise epsilon in [0, 0.5)."""
    simpo_gamma: float = 0.5
    """SimPO target margin (only for loss_type simpo)."""
    lr: float = 1e-4
    optimizer: str = "adamw"
    """adamw | rmsprop (the DPO paper's choice)."""
    weight_decay: float = 0.0
    batch_size: int = 32
    """Pairs per optimiser step (= micro_batch_size x gradient accumulation)."""
    micro_batch_size: int = 0
    """Pairs per forward; 0 = batch_size (no accumulation)."""
    epochs: float = 1.0
    max_steps: int = 0
    """If > 0, overrides epochs."""
    warmup_steps: int = 0
    scheduler: str = "constant_with_warmup"
    """Any transformers scheduler name: constant_with_warmup (the paper), linear, cosine, ..."""
    grad_clip: float = 1.0
    max_length: int = 512
    truncation_mode: str = "keep_start"
    layout: str = "packed"
    """packed (padding-free, prompt computed once) | padded (TRL's layout)."""
    pack_len: int = 1024
    shuffle: bool = True
    """False = sequential batches (for parity with TRL's sequential sampler)."""
    seed: int = 0
    log_every: int = 1

    def validate(self) -> None:
        if self.loss_type == "simpo":
            if not (self.beta > 0 and math.isfinite(self.beta)):
                raise ValueError(f"dpo.beta must be > 0, got {self.beta}")
            if self.simpo_gamma < 0:
                raise ValueError(f"dpo.simpo_gamma must be >= 0, got {self.simpo_gamma}")
        else:
            try:
                validate_dpo_hparams(beta=self.beta, loss_type=self.loss_type, label_smoothing=self.label_smoothing)
            except ValueError as e:
                raise ValueError(f"dpo: {e}") from None
        checks = [
            (self.lr > 0 and math.isfinite(self.lr), "lr", "must be > 0"),
            (self.optimizer in ("adamw", "rmsprop"), "optimizer", "must be 'adamw' or 'rmsprop'"),
            (self.batch_size >= 1, "batch_size", "must be >= 1"),
            (self.micro_batch_size >= 0, "micro_batch_size", "must be >= 0 (0 = batch_size)"),
            (self.micro_batch_size == 0 or self.batch_size % self.micro_batch_size == 0, "micro_batch_size",
             f"must divide batch_size ({self.batch_size})"),
            (self.epochs > 0 or self.max_steps > 0, "epochs", "give epochs > 0 or max_steps > 0"),
            (self.max_steps >= 0, "max_steps", "must be >= 0"),
            (self.warmup_steps >= 0, "warmup_steps", "must be >= 0"),
            (self.grad_clip > 0, "grad_clip", "must be > 0"),
            (self.max_length >= 2, "max_length", "must be >= 2"),
            (self.truncation_mode in ("keep_start", "keep_end"), "truncation_mode", "must be keep_start or keep_end"),
            (self.layout in ("packed", "padded"), "layout", "must be 'packed' or 'padded'"),
            (self.pack_len >= self.max_length * 2, "pack_len", f"must be >= 2 x max_length ({2 * self.max_length})"),
        ]
        for ok, key, msg in checks:
            if not ok:
                raise ValueError(f"dpo.{key} {msg}, got {getattr(self, key)!r}")

    @property
    def micro(self) -> int:
        return self.micro_batch_size or self.batch_size

    @property
    def average(self) -> bool:
        return uses_average_logps(self.loss_type)


# ------------------------------------------------------------------------------------------------ data
@torch.no_grad()
def compute_reference_logps(ref_model, examples: list[PairExample], *, pad_id: int, batch_size: int = 64,
                            autocast=None, layout: str = "packed", pack_len: int | None = None) -> dict[str, torch.Tensor]:
    """Reference log-probs (sum and mean) of every pair, computed once: {'chosen', 'rejected', *_mean} [N].

    ``pack_len``: row length of the packed layout; None = the trainer's default (``DPOConfig.pack_len``, or the
    longest pair if longer): rows of at most that many tokens, not one row per batch (attention is quadratic in
    the row length: a 64-pair row took ~1.8x a padded forward of the same pairs). The log-probs do not depend on
    it beyond float rounding."""
    ref_model.eval()
    device = next(ref_model.parameters()).device
    ctx = autocast if autocast is not None else contextlib.nullcontext()
    if pack_len is None:
        pack_len = max([DPOConfig.pack_len, *(e.n_tokens_packed for e in examples)])
    parts: list[tuple[torch.Tensor, ...]] = []
    for i in range(0, len(examples), batch_size):
        b = batch_to(make_batch(examples[i : i + batch_size], pad_id, layout, pack_len), device)
        with ctx:
            parts.append(tuple(t.float().cpu() for t in pair_logps(ref_model, b)))
    cs, rs, cm, rm = (torch.cat([p[k] for p in parts]) for k in range(4))
    return {"chosen": cs, "rejected": rs, "chosen_mean": cm, "rejected_mean": rm}


# ------------------------------------------------------------------------------------------------ trainer
def total_steps_for(n_examples: int, cfg: DPOConfig) -> int:
    return cfg.max_steps or max(1, int(round(cfg.epochs * max(1, n_examples // cfg.batch_size))))


def example_order(n: int, cfg: DPOConfig, total_steps: int) -> list[int]:
    """The sequence of example indices the trainer consumes: a fresh seeded shuffle every epoch, the last
    incomplete batch of an epoch dropped. Peers are fed this same order so every arm sees identical batches."""
    order, epoch = [], 0
    need = total_steps * cfg.batch_size
    while len(order) < need:
        idx = list(range(n))
        if cfg.shuffle:
            random.Random(cfg.seed * 1000 + epoch).shuffle(idx)
        order += idx[: len(idx) - len(idx) % cfg.batch_size] or idx
        epoch += 1
    return order[:need]


def _optimizer(model, cfg: DPOConfig):
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def dpo_step_loss(model, batch, ref: dict[str, torch.Tensor], idx: torch.Tensor, cfg: DPOConfig):
    """Per-pair losses and metrics for one micro-batch (policy forward + pure loss)."""
    pc, pr, pcm, prm = pair_logps(model, batch)
    avg = cfg.average
    pol_c, pol_r = (pcm, prm) if avg else (pc, pr)
    if cfg.loss_type == "simpo":
        losses, rc, rr = simpo_loss(pcm, prm, beta=cfg.beta, gamma=cfg.simpo_gamma)
    else:
        key_c, key_r = ("chosen_mean", "rejected_mean") if avg else ("chosen", "rejected")
        ref_c, ref_r = ref[key_c][idx].to(pc.device), ref[key_r][idx].to(pc.device)
        losses, rc, rr = preference_loss(pol_c, pol_r, ref_c, ref_r, beta=cfg.beta, loss_type=cfg.loss_type,
                                         label_smoothing=cfg.label_smoothing)
    return losses, rc, rr, pc.detach(), pr.detach()


class DPOTrainer(CheckpointMixin):
    def __init__(self, model, examples: list[PairExample], ref_logps: dict[str, torch.Tensor] | None, cfg: DPOConfig,
                 *, pad_id: int, autocast=None, accelerator=None):
        cfg.validate()
        if cfg.loss_type != "simpo" and ref_logps is None:
            raise ValueError("reference log-probs are required for every loss but simpo")
        if ref_logps is not None and len(ref_logps["chosen"]) != len(examples):
            raise ValueError(f"{len(ref_logps['chosen'])} reference log-probs for {len(examples)} pairs")
        self.model, self.examples, self.ref, self.cfg = model, examples, ref_logps, cfg
        self.pad_id = pad_id
        self.autocast = autocast if autocast is not None else contextlib.nullcontext()
        self.accelerator = accelerator
        self.dist = Dist.from_accelerator(accelerator)
        self.dist.shard(cfg.batch_size, "dpo.batch_size")  # refuse uneven shards before any work
        self.total_steps = total_steps_for(len(examples), cfg)
        from transformers import get_scheduler

        self.opt = _optimizer(model, cfg)
        self.sched = get_scheduler(cfg.scheduler, self.opt, num_warmup_steps=cfg.warmup_steps,
                                   num_training_steps=self.total_steps)
        if accelerator is not None:
            # the scheduler is stepped by us, once per optimiser step: accelerate's AcceleratedScheduler would
            # step it num_processes times per step (it assumes the per-process batch is the global batch)
            self.model, self.opt = accelerator.prepare(self.model, self.opt)
        self.device = accelerator.device if accelerator is not None else next(model.parameters()).device
        self.history: list[dict] = []
        self.step = 0
        """Optimiser steps done = the data position (batch ``step`` of ``example_order`` is next)."""
        self.counters = {"examples_seen": 0, "tokens_seen": 0, "wall_s": 0.0}
        """Running totals after ``step`` steps (checkpointed, so the logs of a resumed run continue them)."""

    def _order(self) -> list[int]:
        return example_order(len(self.examples), self.cfg, self.total_steps)

    def _unwrapped(self):
        return self.accelerator.unwrap_model(self.model) if self.accelerator is not None else self.model

    # -------------------------------------------------------------------------------------------- checkpoints
    def model_state_dict(self) -> dict:
        """The full (unsharded, unwrapped) weights; a collective under FSDP/ZeRO-3: call it on every rank."""
        if self.accelerator is not None and self.dist.distributed:
            return self.accelerator.get_state_dict(self.model)
        return self._unwrapped().state_dict()

    def state_dict(self) -> dict:
        """Everything a resumed run needs to end with the same numbers as an uninterrupted one."""
        return {"model": self.model_state_dict(), "optimizer": self.opt.state_dict(),
                "scheduler": self.sched.state_dict(), "step": self.step, "history": list(self.history),
                "counters": dict(self.counters), "rng": rng_state(), "config": config_dict(self.cfg),
                "n_examples": len(self.examples), "total_steps": self.total_steps}

    def load_state_dict(self, d: dict) -> None:
        check_same_config(d["config"], config_dict(self.cfg), "DPO", ignore=("log_every",))
        if d["n_examples"] != len(self.examples) or d["total_steps"] != self.total_steps:
            raise ValueError(f"DPO checkpoint is for {d['n_examples']} pairs / {d['total_steps']} steps, this trainer "
                             f"has {len(self.examples)} / {self.total_steps}: the data differ")
        self._unwrapped().load_state_dict(d["model"])
        self.opt.load_state_dict(d["optimizer"])
        self.sched.load_state_dict(d["scheduler"])
        self.step = int(d["step"])
        self.history = list(d["history"])
        self.counters = dict(d["counters"])
        set_rng_state(d["rng"])

    # -------------------------------------------------------------------------------------------- loop
    def train(self, on_log: Callable[[dict], None] | None = None, stop: Callable[[], bool] | None = None,
              checkpoint_path: Path | None = None, checkpoint_every: int = 0) -> list[dict]:
        """Train to ``total_steps``. With ``checkpoint_path``: resume from it if it exists, and write it every
        ``checkpoint_every`` optimiser steps (0 = only at the end) and after the last step."""
        if checkpoint_every < 0:
            raise ValueError(f"checkpoint_every must be >= 0, got {checkpoint_every}")
        if checkpoint_path is not None:
            self.load_checkpoint(checkpoint_path)
        cfg, model, dist = self.cfg, self.model, self.dist
        model.train()
        order = self._order()
        seen, tokens = int(self.counters["examples_seen"]), int(self.counters["tokens_seen"])
        t0 = time.perf_counter() - float(self.counters["wall_s"])  # wall_s of a resumed run: summed over runs
        while self.step < self.total_steps:
            step_idx = order[self.step * cfg.batch_size : (self.step + 1) * cfg.batch_size]
            local_idx = step_idx[dist.shard(len(step_idx))]  # this rank's contiguous shard (all of it: 1 process)
            self.opt.zero_grad(set_to_none=True)
            agg = {"loss": 0.0, "rc": [], "rr": [], "pc": [], "pr": []}
            step_tokens = 0
            for m0 in range(0, len(local_idx), cfg.micro):
                idx = torch.tensor(local_idx[m0 : m0 + cfg.micro])
                exs = [self.examples[i] for i in idx.tolist()]
                batch = batch_to(make_batch(exs, self.pad_id, cfg.layout, cfg.pack_len), self.device)
                last_micro = m0 + cfg.micro >= len(local_idx)
                sync = (self.accelerator.no_sync(model) if dist.distributed and not last_micro
                        else contextlib.nullcontext())  # DDP: one gradient all-reduce per optimiser step
                with sync:
                    with self.autocast:
                        losses, rc, rr, pc, pr = dpo_step_loss(model, batch, self.ref, idx, cfg)
                    # accumulation == one big batch; under DDP the average over ranks of the shards' means is
                    # the full batch's mean (equal shards)
                    loss = losses.sum() / len(local_idx)
                    if not torch.isfinite(loss):
                        raise FloatingPointError(f"non-finite DPO loss at step {self.step + 1}; lower dpo.lr or check the pairs")
                    (self.accelerator.backward(loss) if self.accelerator else loss.backward())
                agg["loss"] += loss.item()
                for k, v in (("rc", rc), ("rr", rr), ("pc", pc), ("pr", pr)):
                    agg[k].append(v.float().cpu())
                step_tokens += sum(e.n_tokens_packed for e in exs)
            if self.accelerator is not None:
                gnorm = self.accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                gnorm = math.nan if gnorm is None else gnorm  # DeepSpeed clips inside its engine
            else:
                gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            self.opt.step()
            self.sched.step()
            self.step += 1
            seen += len(step_idx)
            if dist.distributed:  # global metrics: shards gathered in rank order = the single-process batch
                red = dist.all_reduce_sum(torch.tensor([agg["loss"], float(step_tokens)], dtype=torch.float64,
                                                       device=self.device)).cpu()
                agg["loss"], step_tokens = float(red[0]) / dist.world_size, int(red[1])
                for k in ("rc", "rr", "pc", "pr"):
                    agg[k] = [dist.gather_rows(torch.cat(agg[k]).to(self.device)).cpu()]
            tokens += step_tokens
            if self.step % cfg.log_every == 0 or self.step == self.total_steps:
                rc, rr = torch.cat(agg["rc"]), torch.cat(agg["rr"])
                el = time.perf_counter() - t0
                rec = {"step": self.step, "loss": agg["loss"], "rewards/chosen": rc.mean().item(),
                       "rewards/rejected": rr.mean().item(), "rewards/margins": (rc - rr).mean().item(),
                       "rewards/accuracies": (rc > rr).float().mean().item(),
                       "logps/chosen": torch.cat(agg["pc"]).mean().item(),
                       "logps/rejected": torch.cat(agg["pr"]).mean().item(), "grad_norm": float(gnorm),
                       "lr": self.sched.get_last_lr()[0], "examples_seen": seen, "tokens_seen": tokens,
                       "tokens_per_s": tokens / max(el, 1e-9), "wall_s": el}
                self.history.append(rec)
                if on_log:
                    on_log(rec)
            self.counters = {"examples_seen": seen, "tokens_seen": tokens, "wall_s": time.perf_counter() - t0}
            if checkpoint_path is not None and (
                    self.step == self.total_steps or (checkpoint_every and self.step % checkpoint_every == 0)):
                self.save_checkpoint(checkpoint_path)
            if stop is not None and dist.any(stop()):
                break
        model.eval()
        return self.history

    @torch.no_grad()
    def evaluate(self, examples: list[PairExample], ref_logps: dict[str, torch.Tensor] | None, batch_size: int = 64) -> dict:
        """Held-out preference accuracy and margins of the implicit reward."""
        self.model.eval()
        rcs, rrs, losses = [], [], []
        for i in range(0, len(examples), batch_size):
            idx = torch.arange(i, min(i + batch_size, len(examples)))
            b = batch_to(make_batch(examples[i : i + batch_size], self.pad_id, self.cfg.layout, self.cfg.pack_len), self.device)
            with self.autocast:
                lo, rc, rr, _, _ = dpo_step_loss(self.model, b, ref_logps, idx, self.cfg)
            rcs.append(rc.float().cpu()), rrs.append(rr.float().cpu()), losses.append(lo.float().cpu())
        rc, rr = torch.cat(rcs), torch.cat(rrs)
        return {"eval/loss": torch.cat(losses).mean().item(), "eval/rewards/accuracies": ((rc > rr).float() + 0.5 * (rc == rr).float()).mean().item(),  # ties = 1/2
                "eval/rewards/margins": (rc - rr).mean().item()}


def config_dict(cfg: DPOConfig) -> dict:
    return asdict(cfg)
