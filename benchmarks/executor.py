"""Running a suite's stages concurrently: worker processes on this machine (``executor: local``) or Ray tasks on a
cluster (``executor: ray``).

The harness knows the DAG (each ``Stage``'s ``deps``); this module starts every stage whose inputs are finished, up
to ``workers`` at a time, each in a fresh process that loads its inputs from the cache and writes its own folder
through the same atomic, locked path as a serial run (``Harness.run_stage``). The main process only schedules, reads
finished stages' ``stage.json`` and prints one line per finished stage with a summary of where the run stands.

Threads. A stage's numbers depend on its intra-op thread count (the reductions of a matmul split differently;
sampling already differs between 1 and 2 threads), so that count is fixed per stage by the run's worker plan, not by
how many stages happen to be ready: the foundation chain (``data`` ... ``prefs``, nothing runs beside it) gets every
thread, every other stage ``stage_threads`` (threads // workers). A serial run (``workers: 1``) with the same
``stage_threads`` runs every stage at the same thread count and writes bit-identical artefacts
(``tests/test_executor.py``). The count is recorded in each stage's ``stage.json`` and in the run's ``stages.json``
(provenance, not part of the cache key: a cache filled at another thread count is reused as it is, and
``prefbench compare`` shows where two runs' artefacts first differ).

Why processes, not threads: the GIL, and memory. Each stage runs in a fresh process (a fork of a server process
that imported torch, transformers and the arms once, ``multiprocessing``'s forkserver, so a start costs
milliseconds, not the ~4 s import), and its models, optimiser and allocator arenas go back to the OS when it ends:
resident memory does not grow from arm to arm as it did in one long process.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks import progress, utils

FORKSERVER_PRELOAD = ["torch", "transformers", "datasets", "trl", "benchmarks.arms", "benchmarks.stages",
                      "benchmarks.harness"]


@dataclass(frozen=True)
class WorkerPlan:
    executor: str
    """'serial' (this process, one stage at a time), 'local' (worker processes) or 'ray'."""
    workers: int
    """Stages run at once."""
    threads: int
    """Intra-op threads of a foundation stage (the run's thread budget)."""
    stage_threads: int
    """Intra-op threads of every other stage."""
    reason: str

    def threads_for(self, name: str) -> int:
        return self.threads if is_wide(name) else self.stage_threads

    def line(self) -> str:
        if self.executor == "serial":
            return f"executor: serial, {self.stage_threads} thread(s) per stage ({self.reason})"
        return (f"executor: {self.executor}, {self.workers} workers x {self.stage_threads} thread(s) "
                f"(foundation stages {self.threads}) ({self.reason})")

    def record(self) -> dict[str, Any]:
        return {"executor": self.executor, "workers": self.workers, "threads": self.threads,
                "stage_threads": self.stage_threads, "reason": self.reason}


def is_wide(name: str) -> bool:
    """A foundation stage: the chain every other stage waits for, run with the whole thread budget."""
    from benchmarks.stages import FOUNDATION

    return name in FOUNDATION


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def available_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return 8.0


WORKER_GIB = 2.0
"""Resident memory one worker may need (a default-suite PPO arm peaks near 1.5 GiB): auto never plans more workers
than the available memory holds."""


def plan_workers(cfg, device: str, *, distributed: bool = False, parallel_ok: bool = True) -> WorkerPlan:
    """The run's executor, workers and per-stage threads from ``cfg.executor`` / ``cfg.workers`` /
    ``cfg.threads`` / ``cfg.stage_threads``.

    ``workers: auto``: one worker per core up to what memory holds (``WORKER_GIB`` each) and at most 8, one thread
    each. Measured on the default model (4 x 128 Llama) on a 2-core machine: a second thread buys a train step
    1.55x and a sampling forward nothing, while two 1-thread processes side by side give 1.2x the training throughput
    of one 2-thread process and ~2x the sampling throughput; so on small models more workers beat more threads.
    One worker on a GPU (one device), under ``accelerate launch`` (the ranks run every stage in step) and when the
    suite has a single CPU core. ``parallel_ok`` False (stages a worker could not rebuild from the config): serial."""
    n = cfg.threads or cores()
    if not parallel_ok:
        return WorkerPlan("serial", 1, n, cfg.stage_threads or n, "stages built in this process only")
    if cfg.executor == "ray":
        w = cfg.workers if isinstance(cfg.workers, int) else max(1, n)
        st = cfg.stage_threads or max(1, n // w)
        return WorkerPlan("ray", w, n, st, f"workers {cfg.workers}")
    if distributed:
        return WorkerPlan("serial", 1, n, n, "accelerate launch: every rank runs every stage in step")
    if cfg.workers == "auto":
        if not device.startswith("cpu"):
            w, why = 1, f"auto: one {device} device"
        else:
            w = max(1, min(n, int(available_gib() // WORKER_GIB), 8))
            why = f"auto: {n} core(s), {available_gib():.0f} GiB available"
    else:
        w, why = int(cfg.workers), "set in the suite"
    st = cfg.stage_threads or max(1, n // w)
    if w == 1:
        return WorkerPlan("serial", 1, n, st, why)
    return WorkerPlan("local", w, n, st, why)


# ------------------------------------------------------------------------------------------------ the worker side
def run_in_worker(cfg, name: str, threads: int, root: str) -> dict:
    """Run one stage in this (fresh) process; its inputs are finished stages in the cache. Returns what the main
    process needs to record it (``StageResult`` fields)."""
    import torch

    import benchmarks.arms  # noqa: F401 - registers the arm families
    from benchmarks import interrupts
    from benchmarks.arms import build_stages
    from benchmarks.arms.registry import REGISTRY
    from benchmarks.config import ConfigError
    from benchmarks.harness import Harness

    progress.set_enabled(False)  # one line per stage from the main process, no interleaved bars
    _log_to_file(Path(root) / cfg.runs_dir / cfg.name / "logs" / f"{name.replace('/', '__')}.log")
    interrupts.install()
    for m in cfg.plugins:  # plug-in families register on import, as in the main process
        importlib.import_module(m)
    missing = sorted(set(cfg.arms) - set(REGISTRY))
    if missing:
        raise ConfigError(f"config key 'arms.{missing[0]}': family {missing[0]!r} is registered in the main process "
                          "only, so a worker process cannot build its stages; list the module that registers it in "
                          "`plugins` (workers import those), or set workers: 1")
    stages, _ = build_stages(cfg)
    h = Harness(cfg, stages, root=Path(root), log=lambda *a, **k: None)
    torch.set_num_threads(threads)
    h.thread_plan = None  # this process runs exactly one stage at the given count
    try:
        r = h.run_stage(name)
    except BaseException:
        import traceback

        traceback.print_exc()  # into the stage's log; the exception itself goes back to the main process
        raise
    return {"name": r.name, "hash": r.hash, "path": str(r.path), "cached": r.cached, "wall_s": r.wall_s,
            "peak_rss_mb": r.peak_rss_mb, "summary": r.summary, "first_run": r.first_run, "digest": r.digest,
            "threads": threads, "pid": os.getpid()}


def _log_to_file(path: Path) -> None:
    """This worker's stdout and stderr (file descriptors 1 and 2: libraries' prints and C-level output too) go to
    ``path`` (the run folder's ``logs/<stage>.log``), so the main process's one line per stage stays readable."""
    import sys

    path.parent.mkdir(parents=True, exist_ok=True)
    f = open(path, "a", buffering=1)  # noqa: SIM115 - lives as long as this one-stage process
    sys.stdout.flush(), sys.stderr.flush()
    os.dup2(f.fileno(), 1)
    os.dup2(f.fileno(), 2)
    sys.stdout = sys.stderr = f


# ------------------------------------------------------------------------------------------------ backends
class LocalBackend:
    """Worker processes on this machine: a fresh process per stage, forked from a server that preloaded the
    libraries (``multiprocessing`` forkserver)."""

    def __init__(self, workers: int):
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(FORKSERVER_PRELOAD)
        self.pool = ProcessPoolExecutor(max_workers=workers, mp_context=ctx, max_tasks_per_child=1)

    def submit(self, cfg, name: str, threads: int, root: str):
        return self.pool.submit(run_in_worker, cfg, name, threads, root)

    def wait(self, handles: list, timeout: float = 1.0) -> list:
        from concurrent.futures import FIRST_COMPLETED, wait

        done, _ = wait(handles, timeout=timeout, return_when=FIRST_COMPLETED)
        return list(done)

    @staticmethod
    def result(handle) -> dict:
        return handle.result()

    def shutdown(self, cancel: bool = False, running=()) -> None:  # noqa: ARG002 - the pool knows its own tasks
        self.pool.shutdown(wait=True, cancel_futures=cancel)


class RayBackend:
    """Each stage a Ray task on ``ray.init(address=cfg.ray_address)`` (a local instance when None), asking for its
    threads as CPUs (capped at the largest node's, so a foundation stage still schedules on small nodes; it runs
    at its planned thread count either way) and a GPU where the run uses CUDA. A fresh worker process per stage
    (``max_calls=1``), as locally. The cache (``cache_dir``) must be on a path every node sees: each task reads its
    inputs from and commits its folder to it, under the same file lock as a local run."""

    def __init__(self, cfg, device: str):
        try:
            import ray
        except ImportError as e:
            from benchmarks.config import ConfigError

            raise ConfigError("config key 'executor': 'ray' needs Ray installed (pip install '.[ray]'), or set "
                              "executor: local") from e
        self.ray = ray
        if not ray.is_initialized():
            root = str(Path(__file__).resolve().parent.parent)  # importable on every node of a shared checkout
            env = {"env_vars": {"PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}}
            local = {} if cfg.ray_address else {"include_dashboard": False}
            ray.init(address=cfg.ray_address, runtime_env=env, log_to_driver=False, **local)
        self.max_cpus = max((n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")), default=1) or 1
        self.gpus = 1 if device.startswith("cuda") else 0
        self.task = ray.remote(max_retries=0, max_calls=1)(run_in_worker)

    def submit(self, cfg, name: str, threads: int, root: str):
        return self.task.options(num_cpus=min(threads, self.max_cpus), num_gpus=self.gpus).remote(cfg, name, threads, root)

    def wait(self, handles: list, timeout: float = 1.0) -> list:
        done, _ = self.ray.wait(handles, num_returns=1, timeout=timeout)
        return done

    def result(self, handle) -> dict:
        try:
            return self.ray.get(handle)
        except self.ray.exceptions.RayTaskError as e:  # the stage's own exception, not Ray's wrapper
            raise e.as_instanceof_cause() from None

    def shutdown(self, cancel: bool = False, running=()) -> None:
        for h in running if cancel else ():  # the cluster outlives the run; only this run's tasks are stopped
            self.ray.cancel(h)


# ------------------------------------------------------------------------------------------------ the scheduler
def run_concurrently(h, targets: list[str], plan: WorkerPlan, *, foundation_fails_run) -> None:
    """Run ``targets`` (and what they need) on ``plan``'s backend, recording into ``h.results`` / ``h.failed`` as
    ``Harness.run``'s serial loop does: a foundation stage's failure stops the run (raised after the running stages
    end), an arm's or an evaluation's is recorded and its dependents are skipped."""
    from benchmarks.harness import StageResult, _mmss

    stages = h.stages
    order: list[str] = []

    def visit(n: str) -> None:
        if n in order:
            return
        if n not in stages:
            raise KeyError(f"unknown stage '{n}'; stages: {list(stages)}")
        for d in stages[n].deps:
            visit(d)
        order.append(n)

    for t in targets:
        visit(t)
    backend = RayBackend(h.cfg, h.device) if plan.executor == "ray" else LocalBackend(plan.workers)
    running: dict[Any, str] = {}
    pending = [n for n in order if n not in h.results]
    total, t0, fatal = len(pending), utils.Timer(), None
    # on a terminal a summary bar (stages finished of the run's) under the one line per finished stage
    bar = progress.Bar(total, f"{h.cfg.name}: stages", unit="stage") if progress.is_terminal() else None
    log = progress.write if bar is not None and h.log is print else h.log

    def record(n: str, info: dict) -> None:
        res = StageResult(n, info["hash"], Path(info["path"]), info["cached"], info["wall_s"], info["peak_rss_mb"],
                          info["summary"], info["first_run"], info["digest"])
        h.results[n] = res
        h.stage_threads_used[n] = info["threads"]
        h.stage_pids[n] = info["pid"]
        finished = total - len(pending) - len(running)
        where = f"{finished}/{total}, running {len(running)}" if running else f"{finished}/{total}"
        log(f"{res.line()}  [{where}, elapsed {_mmss(t0.elapsed)}{_eta(h, pending, plan)}]")
        if bar is not None:
            bar.to(finished, running=len(running))

    try:
        while pending or running:
            started = True
            while started and fatal is None:
                started = False
                for n in list(pending):
                    deps = stages[n].deps
                    bad = [d for d in deps if d in h.failed]
                    if bad:
                        h.failed[n] = f"skipped: depends on failed stage {bad[0]} ({h.failed[bad[0]]})"
                        pending.remove(n)
                        started = True
                        continue
                    if not all(d in h.results for d in deps):
                        continue
                    if (h.stage_dir(n) / "stage.json").exists():  # cached: read it here (verifies its manifest)
                        pending.remove(n)
                        try:
                            h.run_stage(n)
                        except Exception as e:  # noqa: BLE001 - damaged and failed to rebuild here: as a stage failure
                            fatal = fatal or _failed(h, n, e, foundation_fails_run)
                        started = True
                        continue
                    wide = is_wide(n)
                    if running and (wide or any(is_wide(r) for r in running.values())):
                        continue  # a foundation stage runs alone with every thread
                    if len(running) >= plan.workers:
                        break
                    running[backend.submit(h.cfg, n, plan.threads_for(n), str(h.root))] = n
                    pending.remove(n)
                    started = True
            if not running:
                if pending and fatal is None:
                    raise RuntimeError(f"scheduler stuck: {pending[:3]} wait for stages that never finish")
                if fatal is not None:
                    break
                continue
            for handle in backend.wait(list(running)):
                n = running.pop(handle)
                try:
                    record(n, backend.result(handle))
                except (KeyboardInterrupt, SystemExit) as e:
                    raise e
                except BaseException as e:  # noqa: BLE001 - the stage's failure, recorded (or fatal for the foundation)
                    from benchmarks import interrupts

                    if isinstance(e, interrupts.Interrupted):
                        raise
                    fatal = fatal or _failed(h, n, e, foundation_fails_run)
            if fatal is not None and not running:
                break
    except BaseException:
        backend.shutdown(cancel=True, running=list(running))
        raise
    finally:
        if bar is not None:
            bar.close()
    backend.shutdown()
    if fatal is not None:
        raise fatal


def _failed(h, n: str, e: BaseException, foundation_fails_run) -> BaseException | None:
    """Record a stage's failure; returns the exception when it stops the run (a foundation stage)."""
    from benchmarks.errors import DiskFullError

    if n not in h.failed:
        h.failed[n] = f"{type(e).__name__}: {e}"
    if foundation_fails_run(n) or isinstance(e, DiskFullError):
        return e
    where = h.root / h.cfg.runs_dir / h.cfg.name / "logs" / f"{n.replace('/', '__')}.log"
    log = f"; its log: {where}" if where.exists() else ""
    h.log(f"[{n}] FAILED: {type(e).__name__}: {e} (the suite goes on{log})")
    return None


def _eta(h, pending: list[str], plan: WorkerPlan) -> str:
    """Serial time of the stages left at this run's measured speed, shared by the workers."""
    left = h.eta_s(pending) if pending else None
    return "" if left is None else f", about {left / 60 / plan.workers:.1f} min left"
