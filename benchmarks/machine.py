"""What kind of machine a run ran on: CPU model and flags, torch's CPU capability, and a sub-second speed probe.

Floating-point results differ between kinds of machine (different matmul kernels), so a number measured on one
kind is not bit-reproducible on another: the regression gate compares a run with the baseline of its own kind
(``benchmarks/regression.py``) and records the kind in every run's provenance.

Kinds: ``cpu-avx512-bf16`` (AVX-512 with native bf16), otherwise ``cpu-<torch CPU capability>`` (``cpu-avx2``,
``cpu-avx512``, ...), ``cuda-<device name>`` on a GPU.
"""

from __future__ import annotations

import contextlib
import platform
import re
import time
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch

FLAGS_OF_INTEREST = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "fma")


@cache
def cpu_info() -> dict:
    """CPU model name and the flags that decide which kernels run (Linux: /proc/cpuinfo; elsewhere: platform)."""
    model, flags = platform.processor() or platform.machine(), set()
    p = Path("/proc/cpuinfo")
    if p.exists():
        text = p.read_text(errors="replace")
        m = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
        model = m.group(1).strip() if m else model
        m = re.search(r"^flags\s*:\s*(.+)$", text, re.M)
        flags = set(m.group(1).split()) if m else set()
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except (AttributeError, RuntimeError):
        capability = None
    return {"cpu_model": model, "cpu_flags": sorted(f for f in FLAGS_OF_INTEREST if f in flags),
            "torch_cpu_capability": capability, "arch": platform.machine()}


def kind_of(info: dict, device: str = "cpu") -> str:
    """The machine kind a baseline is keyed by (see the module docstring)."""
    if device.startswith("cuda"):
        name = info.get("cuda_device") or "gpu"
        return "cuda-" + re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    if "avx512_bf16" in info.get("cpu_flags", []):
        return "cpu-avx512-bf16"
    cap = info.get("torch_cpu_capability") or info.get("arch") or "unknown"
    return "cpu-" + re.sub(r"[^a-z0-9]+", "-", str(cap).lower()).strip("-")


def matmul_gflops(dtype: torch.dtype = torch.float32, n: int = 256, budget_s: float = 0.15, *,
                  autocast: torch.dtype | None = None) -> float:
    """Square matmul throughput on this process's threads, timed for about ``budget_s`` (a speed probe, not a
    benchmark: it tells the kinds apart, e.g. ~65 vs ~210 GFLOP/s fp32 on the two 2-core CPU kinds).
    ``autocast``: time fp32 operands under CPU autocast to that dtype (what a training step under ``dtype: bfloat16``
    runs: the cast of the operands included)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    ctx = torch.autocast("cpu", dtype=autocast) if autocast is not None else contextlib.nullcontext()
    with ctx:
        torch.mm(a, b)  # warm-up
        reps, t0 = 0, time.perf_counter()
        while True:
            torch.mm(a, b)
            reps += 1
            dt = time.perf_counter() - t0
            if dt >= budget_s or reps >= 10_000:
                break
    return 2 * n**3 * reps / dt / 1e9


# --------------------------------------------------------------------------------------------- dtype: auto
DTYPES = ("auto", "float32", "bfloat16", "float16")
BF16_MIN_SPEEDUP = 1.2
"""``dtype: auto`` on a CPU picks bfloat16 only when bf16 autocast matmul is at least this many times faster than
fp32 (CPU flags alone do not say: without native bf16 kernels a bf16 matmul is ~30x slower than fp32)."""


@cache
def dtype_probe(n: int = 256, budget_s: float = 0.06, trials: int = 3) -> dict:
    """bf16 autocast matmul vs fp32 matmul throughput (GFLOP/s) at a size like the models' layers, best of
    ``trials`` interleaved short timings each (the best is the least disturbed by other work on the machine);
    well under a second. On one thread: the ratio of the two kernels is what decides, and several threads on a
    busy machine stall at each matmul's barrier (measured here: fp32 75 GFLOP/s on 1 thread, 2 on 2 threads
    beside another 2-thread job), which would hide fp32's advantage. Cached per process: every harness of a
    process sees the same numbers."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        f32, b16 = [], []
        for _ in range(trials):
            f32.append(matmul_gflops(torch.float32, n=n, budget_s=budget_s))
            b16.append(matmul_gflops(torch.float32, n=n, budget_s=budget_s, autocast=torch.bfloat16))
    finally:
        torch.set_num_threads(threads)
    return {"float32": round(max(f32), 1), "bfloat16": round(max(b16), 1), "n": n, "threads": 1}


def step_probe(shape: dict, *, batch: int = 32, seq_len: int = 40, trials: int = 3, threads: int = 1) -> dict:
    """Seconds per forward + backward of a suite's own tiny model (``shape``: n_layers, hidden_size, n_heads,
    intermediate_size, vocab_size, max_position_embeddings; random weights) on a [batch, seq_len] batch, in fp32 and
    under bf16 autocast, best of ``trials`` interleaved steps each after one warm-up, at ``threads`` (the stages'
    count). What decides ``dtype: auto`` for a tiny model: on the bf16 CPU kind a 256-wide matmul runs 3x faster in
    bf16 while the default model's whole train step gains only 1.1x (its matmuls are small, the rest is fp32)."""
    from benchmarks.perf.phases import IdTokenizer
    from benchmarks.tasks.models import build_tiny_llama

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(0)
        model = build_tiny_llama(IdTokenizer(shape["vocab_size"]), n_layers=shape["n_layers"],
                                 hidden_size=shape["hidden_size"], n_heads=shape["n_heads"],
                                 intermediate_size=shape["intermediate_size"],
                                 max_position_embeddings=max(seq_len, shape["max_position_embeddings"]), seed=0)
        ids = torch.randint(4, shape["vocab_size"], (batch, seq_len), generator=g)

        def step(dtype) -> float:
            ctx = torch.autocast("cpu", dtype=dtype) if dtype is not None else contextlib.nullcontext()
            t0 = time.perf_counter()
            with ctx:
                loss = model(input_ids=ids).logits.float().logsumexp(-1).mean()
            loss.backward()
            model.zero_grad(set_to_none=True)
            return time.perf_counter() - t0

        step(None), step(torch.bfloat16)  # warm-up
        f32, b16 = [], []
        for _ in range(trials):
            f32.append(step(None))
            b16.append(step(torch.bfloat16))
    finally:
        torch.set_num_threads(before)
    return {"float32_s": round(min(f32), 4), "bfloat16_s": round(min(b16), 4), "batch": [batch, seq_len],
            "threads": threads}


@dataclass(frozen=True)
class DtypeChoice:
    """The dtype a run uses: what the suite asked for, what it resolved to, why, and the probe behind it."""

    requested: str
    resolved: str
    device: str
    reason: str
    probe: dict | None = None
    """``dtype_probe()``'s numbers (CPU ``auto`` only)."""

    def line(self) -> str:
        return f"dtype {self.requested} -> {self.resolved}: {self.reason}"

    def record(self) -> dict:
        """The provenance fields of the choice."""
        return {"dtype_requested": self.requested, "dtype_resolved": self.resolved, "dtype_reason": self.reason,
                "dtype_probe_gflops": self.probe}


def resolve_dtype(requested: str, device: str, *, probe: dict | None = None,
                  cuda_bf16: bool | None = None, model_shape: dict | None = None, threads: int = 1,
                  step: dict | None = None) -> DtypeChoice:
    """The autocast dtype of a run on ``device`` ('cpu', 'cuda', 'mps'). An explicit float32/bfloat16/float16 is
    kept (float16 needs CUDA: a clear ConfigError elsewhere). 'auto': on CUDA bfloat16 where the device supports
    it (``cuda_bf16``, default ``torch.cuda.is_bf16_supported()``), else float32; on mps float32; on a CPU
    bfloat16 only if bf16 autocast matmul is measurably faster than fp32 (``probe``: {'float32': GFLOP/s,
    'bfloat16': GFLOP/s}, default ``dtype_probe()``, run only here), else float32. With ``model_shape`` (a tiny
    model's dimensions) a matmul probe that favours bf16 is confirmed on the suite's own train step
    (``step_probe`` at ``threads``; ``step``: its result, for tests): bf16 only if that step is >= 1.2x faster too."""
    from benchmarks.errors import ConfigError

    if requested not in DTYPES:
        raise ConfigError(f"config key 'dtype': must be one of {list(DTYPES)}, got {requested!r}")
    cuda = device.startswith("cuda")
    if requested == "float16" and not cuda:
        raise ConfigError(f"config key 'dtype': float16 autocast needs a CUDA device, this run is on {device}; "
                          "set dtype: auto (bfloat16 where it is faster, else float32), bfloat16 or float32")
    if requested != "auto":
        return DtypeChoice(requested, requested, device, "set in the suite")
    if cuda:
        if cuda_bf16 is None:
            cuda_bf16 = bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
        if cuda_bf16:
            return DtypeChoice(requested, "bfloat16", device, "the CUDA device supports bf16 (autocast, fp32 weights)")
        return DtypeChoice(requested, "float32", device, "the CUDA device has no bf16 support")
    if device != "cpu":
        return DtypeChoice(requested, "float32", device, f"prefbench runs {device} in fp32")
    probe = dict(probe) if probe is not None else dict(dtype_probe())
    f32, b16 = float(probe["float32"]), float(probe["bfloat16"])
    speedup = b16 / f32 if f32 > 0 else float("inf")
    probe["bf16_speedup"] = round(speedup, 2)
    nums = f"bf16 autocast matmul {b16:.1f} GFLOP/s vs fp32 {f32:.1f} on this CPU"
    if speedup >= BF16_MIN_SPEEDUP and model_shape is not None:
        st = dict(step) if step is not None else step_probe(model_shape, threads=threads)
        s_speed = st["float32_s"] / st["bfloat16_s"] if st["bfloat16_s"] > 0 else float("inf")
        probe["step"], probe["step_bf16_speedup"] = st, round(s_speed, 2)
        snums = (f"{nums} ({speedup:.1f}x); the suite's own train step [{st['batch'][0]} x {st['batch'][1]}] "
                 f"{st['bfloat16_s'] * 1e3:.0f} ms bf16 vs {st['float32_s'] * 1e3:.0f} ms fp32 at {st['threads']} thread(s)")
        if s_speed >= BF16_MIN_SPEEDUP:
            return DtypeChoice(requested, "bfloat16", device, f"{snums} ({s_speed:.2f}x faster)", probe)
        return DtypeChoice(requested, "float32", device, f"{snums} (only {s_speed:.2f}x, below the "
                           f"{BF16_MIN_SPEEDUP}x needed)", probe)
    if speedup >= BF16_MIN_SPEEDUP:
        return DtypeChoice(requested, "bfloat16", device, f"{nums} ({speedup:.1f}x faster)", probe)
    why = "bf16 not faster" if speedup <= 1.0 else f"bf16 only {speedup:.2f}x faster, below the {BF16_MIN_SPEEDUP}x needed"
    return DtypeChoice(requested, "float32", device, f"{nums} ({why})", probe)


@cache
def machine_info(device: str = "cpu") -> dict:
    """Provenance of the machine: CPU model/flags, torch capability, threads, speed probe and the kind."""
    info = dict(cpu_info())
    info["threads"] = torch.get_num_threads()
    if device.startswith("cuda") and torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name()
    else:
        info["probe_gflops"] = {"float32": round(matmul_gflops(torch.float32, n=512), 1),
                                "bfloat16": round(matmul_gflops(torch.bfloat16, n=128, budget_s=0.1), 1)}
    info["kind"] = kind_of(info, device)
    return info
