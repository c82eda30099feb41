"""What kind of machine a run ran on: CPU model and flags, torch's CPU capability, and a sub-second speed probe.

Floating-point results differ between kinds of machine (different matmul kernels), so a number measured on one
kind is not bit-reproducible on another: the regression gate compares a run with the baseline of its own kind
(``benchmarks/regression.py``) and records the kind in every run's provenance.

Kinds: ``cpu-avx512-bf16`` (AVX-512 with native bf16), otherwise ``cpu-<torch CPU capability>`` (``cpu-avx2``,
``cpu-avx512``, ...), ``cuda-<device name>`` on a GPU.
"""

from __future__ import annotations

import platform
import re
import time
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


def matmul_gflops(dtype: torch.dtype = torch.float32, n: int = 256, budget_s: float = 0.15) -> float:
    """Square matmul throughput on this process's threads, timed for about ``budget_s`` (a speed probe, not a
    benchmark: it tells the kinds apart, e.g. ~65 vs ~210 GFLOP/s fp32 on the two 2-core CPU kinds)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    torch.mm(a, b)  # warm-up
    reps, t0 = 0, time.perf_counter()
    while True:
        torch.mm(a, b)
        reps += 1
        dt = time.perf_counter() - t0
        if dt >= budget_s or reps >= 10_000:
            break
    return 2 * n**3 * reps / dt / 1e9


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
