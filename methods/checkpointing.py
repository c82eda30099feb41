"""Resumable training state shared by the trainers (DPO, PPO): RNG states, atomic checkpoint files, and a
guard against resuming a checkpoint written under another configuration."""

from __future__ import annotations

import contextlib
import os
import random
from pathlib import Path

import numpy as np
import torch


def rng_state() -> dict:
    """torch (CPU and CUDA), python ``random`` and numpy global RNG states, as tensors/builtins only (so a
    checkpoint loads with ``torch.load(weights_only=True)``)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    st = {"torch": torch.get_rng_state(), "python": random.getstate(),
          "numpy": (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached))}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    """Restore what ``rng_state`` returned."""
    torch.set_rng_state(st["torch"])
    random.setstate(st["python"])
    name, keys, pos, has_gauss, cached = st["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in st and torch.cuda.is_available() and len(st["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(st["cuda"])


def atomic_torch_save(obj, path: Path) -> None:
    """``torch.save`` to a temporary file in ``path``'s folder, fsync, then ``os.replace``: a kill or an error
    at any point leaves either the previous file or the new one, never a partial one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}-{random.Random().getrandbits(32):08x}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable (POSIX; not possible everywhere)
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def check_same_config(saved: dict, current: dict, what: str, ignore: tuple[str, ...] = ()) -> None:
    """Refuse to resume a checkpoint written under another configuration (keys in ``ignore`` may differ)."""
    diff = sorted(k for k in saved.keys() | current.keys() if k not in ignore and saved.get(k) != current.get(k))
    if diff:
        raise ValueError(f"{what} checkpoint was written with a different configuration ({', '.join(diff)}: "
                         f"{[saved.get(k) for k in diff]} vs now {[current.get(k) for k in diff]}); resuming it "
                         "would not reproduce the run: delete it or restore the configuration")




class CheckpointMixin:
    """``save_checkpoint``/``load_checkpoint`` for a trainer that defines ``state_dict``/``load_state_dict``
    (and optionally ``dist``, a ``methods.distributed.Dist``, or ``accelerator``: only the main process writes).

    Under several processes every rank builds ``state_dict()`` (gathering sharded weights is a collective), the
    main one writes, and all wait at a barrier, so a checkpoint read right after is complete on every rank.
    Every rank resumes from the main rank's file (replicas are equal; RNG streams are the main rank's)."""

    def save_checkpoint(self, path: Path) -> None:
        """Write ``state_dict()`` atomically to ``path``."""
        dist = getattr(self, "dist", None)
        if dist is not None and dist.distributed:
            state = self.state_dict()
            if dist.is_main:
                atomic_torch_save(state, Path(path))
            dist.barrier()
            return
        acc = getattr(self, "accelerator", None)
        if acc is None or acc.is_main_process:
            atomic_torch_save(self.state_dict(), Path(path))

    def load_checkpoint(self, path: Path) -> bool:
        """Load a checkpoint written by ``save_checkpoint``; False (nothing changed) if there is none."""
        path = Path(path)
        if not path.exists():
            return False
        self.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return True
