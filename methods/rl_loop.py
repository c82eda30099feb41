"""The outer iteration loop of the on-policy engine (``methods.onpolicy``: PPO, RLOO/GRPO, online DPO), and its
small pieces.

``IterativeTrainer.train`` runs ``_iteration(it)`` to ``cfg.iterations`` with one protocol for every method:
resume from a checkpoint, snapshot the weights before each iteration and restore them when it produces a
non-finite value (``FloatingPointError``), write the checkpoint every ``checkpoint_every`` iterations and after
the last one, stop early when ``stop()`` says so. The engine supplies ``_iteration``, ``_snapshot``, ``_restore``,
``_label`` (its name in messages) and ``_restored`` (what a restore brings back), plus ``state_dict`` /
``load_state_dict`` for ``CheckpointMixin``.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from methods.checkpointing import CheckpointMixin


class Timers:
    """Wall time per phase of one iteration (``with timers("generation"): ...``), CUDA-synchronised."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.t = device, {}

    @contextlib.contextmanager
    def __call__(self, key: str):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.t[key] = self.t.get(key, 0.0) + time.perf_counter() - t0


def cpu_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A CPU copy of ``module``'s state_dict (the last good weights)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


def all_finite(module: torch.nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in module.parameters())


def prompts_digest(prompts) -> str:
    """SHA-256 of the prompt list: a checkpoint resumes only on the prompts it was written for."""
    return hashlib.sha256(repr(prompts).encode()).hexdigest()


def permuted_slots(perms: dict[int, np.ndarray], n_prompts: int, it: int, per_iteration: int,
                   epoch_seed: Callable[[int], int]) -> tuple[list[int], dict[int, np.ndarray]]:
    """Prompt indices of iteration ``it`` (1-based): epochs of seeded permutations (``epoch_seed(e)``) read in
    order, ``per_iteration`` a time. Returns (indices, the permutation cache to keep: the current epoch's only)."""
    out = []
    for pos in range((it - 1) * per_iteration, it * per_iteration):
        e = pos // n_prompts
        if e not in perms:
            perms = {e: np.random.default_rng(epoch_seed(e)).permutation(n_prompts)}
        out.append(int(perms[e][pos % n_prompts]))
    return out, perms


class IterativeTrainer(CheckpointMixin):
    """The shared ``train`` loop (see the module docstring)."""

    _label = "trainer"
    _restored = "Policy restored to its state"

    def _stop_now(self, stop: Callable[[], bool]) -> bool:
        dist = getattr(self, "dist", None)
        return dist.any(stop()) if dist is not None else stop()  # under several processes: all ranks stop together

    def train(self, on_log: Callable[[dict], None] | None = None, stop: Callable[[], bool] | None = None,
              checkpoint_path: Path | None = None, checkpoint_every: int = 0) -> list[dict]:
        """Run to ``cfg.iterations``. With ``checkpoint_path``: resume from it if it exists, and write it every
        ``checkpoint_every`` iterations (0 = only at the end) and after the last iteration."""
        if checkpoint_every < 0:
            raise ValueError(f"checkpoint_every must be >= 0, got {checkpoint_every}")
        if checkpoint_path is not None:
            self.load_checkpoint(checkpoint_path)
        while self.iteration < self.cfg.iterations:
            it = self.iteration + 1
            self._snapshot(it)
            try:
                rec = self._iteration(it)
            except FloatingPointError as e:
                self._restore()
                raise FloatingPointError(f"{self._label} iteration {it}: {e}. {self._restored} before iteration {it} "
                                         f"(trainer.last_good_state)") from None
            self.iteration = it
            self.history.append(rec)
            if on_log:
                on_log(rec)
            if checkpoint_path is not None and (
                    it == self.cfg.iterations or (checkpoint_every and it % checkpoint_every == 0)):
                self.save_checkpoint(checkpoint_path)
            if stop is not None and self._stop_now(stop):
                break
        return self.history
