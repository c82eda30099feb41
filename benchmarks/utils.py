"""Small shared utilities: atomic writes, stable hashing, seeding, device/dtype selection, memory."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import resource
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np


# ------------------------------------------------------------------------------------------ headline temperature
def headline_temperature(temperatures) -> float:
    """The temperature of every headline number (tables, gate, comparisons, report): 1.0 if evaluated, else the
    highest evaluated (the one place this choice is made)."""
    temps = sorted(float(t) for t in temperatures if t == t)  # NaN-free
    if not temps:
        return float("nan")
    return 1.0 if any(abs(t - 1.0) < 1e-9 for t in temps) else temps[-1]


# ------------------------------------------------------------------------------------------ atomic writes
def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temp file in the same folder + ``os.replace``: readers see the old
    file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600: keep the permissions a plain open() would give
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def write_jsonl(path: str | Path, rows: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, default=_json_default) + "\n" for r in rows))


def read_jsonl(path: str | Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


@contextlib.contextmanager
def atomic_dir(final: str | Path):
    """Yield a temp folder beside ``final``; on success it is renamed to ``final`` in one step, on failure
    it is removed. A killed process leaves only a ``.tmp-*`` folder that the next run ignores and cleans."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
        try:
            os.replace(tmp, final)
        except OSError:
            if not final.exists():
                raise
            shutil.rmtree(tmp)  # another process finished the same stage first: keep theirs (same key = same content)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def file_lock(path: str | Path):
    """An exclusive advisory lock (fcntl.flock) held for the block; released by the OS if the process dies."""
    import fcntl

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


# ------------------------------------------------------------------------------------------ hashing
def stable_hash(obj: Any, n: int = 12) -> str:
    """Hash of a JSON-serialisable object, independent of dict order."""
    blob = json.dumps(obj, sort_keys=True, default=_json_default, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:n]


def text_hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


# ------------------------------------------------------------------------------------------ seeding/device
def seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextlib.contextmanager
def num_threads(n: int):
    """torch's intra-op threads set to ``n`` for the block (restored after)."""
    import torch

    before = torch.get_num_threads()
    if n and n != before:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def resolve_device(name: str = "auto") -> str:
    import torch

    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but torch.cuda.is_available() is False; set device: auto or cpu")
    return name


def autocast_ctx(device: str, dtype: str):
    """bf16/fp16 autocast where the device supports it; fp32 is a no-op context. ``dtype`` is a resolved dtype
    (the harness resolves 'auto' when it starts: ``benchmarks.machine.resolve_dtype``)."""
    import torch

    if dtype == "auto":
        raise RuntimeError("dtype 'auto' must be resolved first (benchmarks.machine.resolve_dtype; Harness does it)")
    if dtype == "float32":
        return contextlib.nullcontext()
    dt = {"bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    if device == "cpu" and dt == torch.float16:
        raise RuntimeError("dtype float16 is not supported on CPU; use bfloat16 or float32")
    return torch.autocast(device_type=device if device != "mps" else "cpu", dtype=dt)


# ------------------------------------------------------------------------------------------ memory / timing
def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) of this process; False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB (since the last reset where supported)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cuda_peak_mb() -> float | None:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return None


class Timer:
    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.t0


# ------------------------------------------------------------------------------------------ verified cache
MANIFEST_HASH_LIMIT = 1 << 20
"""Files up to this size are re-hashed every time a cached stage is loaded; larger ones have their size checked
(their SHA-256 on ``prefbench verify``)."""


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def manifest(folder: str | Path, skip: tuple[str, ...] = ("stage.json",)) -> dict[str, dict]:
    """{relative path: {"size", "sha256"}} of every file under ``folder`` (the stage's completion marker left out)."""
    folder = Path(folder)
    return {str(f.relative_to(folder)): {"size": f.stat().st_size, "sha256": sha256_file(f)}
            for f in sorted(folder.rglob("*")) if f.is_file() and f.name not in skip}


def verify_manifest(folder: str | Path, recorded: dict[str, dict], *, full: bool = False) -> list[str]:
    """What is wrong with ``folder`` against its manifest: missing files and size mismatches always, content
    (SHA-256) of files up to MANIFEST_HASH_LIMIT, or of every file with ``full``. Empty list: intact."""
    folder = Path(folder)
    problems = []
    for rel, rec in recorded.items():
        f = folder / rel
        if not f.is_file():
            problems.append(f"{rel}: missing")
        elif f.stat().st_size != rec["size"]:
            problems.append(f"{rel}: {f.stat().st_size} bytes, expected {rec['size']}")
        elif (full or rec["size"] <= MANIFEST_HASH_LIMIT) and sha256_file(f) != rec["sha256"]:
            problems.append(f"{rel}: content differs from its SHA-256")
    return problems


def move_aside(folder: str | Path, why: str) -> Path:
    """Rename a damaged folder to ``.<name>.<why>-<time>`` beside it (kept for inspection, never deleted)."""
    folder = Path(folder)
    dest = folder.with_name(f".{folder.name}.{why}-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}")
    os.replace(folder, dest)
    return dest
