"""Stage runner with a content-addressed cache.

Every stage's output lives in ``<cache_dir>/<stage>/<hash>/`` where the hash covers the stage's resolved
config subset, its code version and the hashes of the stages it reads, so changing a field invalidates that
stage and everything downstream of it, nothing else. A stage is written into a temp folder and renamed in
one step when complete (``utils.atomic_dir``): a killed run never leaves a half artefact, and a re-run skips
finished stages.

Several processes (``accelerate launch ... -m benchmarks.cli run``; detected from ``WORLD_SIZE`` > 1, then
``h.accelerator`` is an ``accelerate.Accelerator`` and ``h.dist`` its ``methods.distributed.Dist``): every rank
runs every stage, in the same order, so the trainers of the arms can shard their batches and meet in their
collectives; stages that do not shard (data, sft, prefs, eval, ...) compute the same deterministic thing on
every rank. The scheme, per stage:
  1. rank 0 takes the stage's file lock (against other, independent runs), decides "cached or not" and
     broadcasts the decision, so all ranks take the same branch;
  2. if not cached, rank 0 runs the stage into its atomic temp folder and commits it; every other rank runs it
     into a private scratch folder (``.<hash>.scratch-rank<r>-*``) that is deleted afterwards, i.e. only rank
     0 ever writes a stage's artefacts;
  3. a failure on any rank is all-reduced, so every rank raises (the suite's arm bookkeeping stays in step);
  4. a barrier, after which every rank reads the committed folder (downstream stages load rank 0's artefacts,
     so ranks cannot drift apart through nondeterministic kernels).
Run-level files (resolved config, stages.json, summary tables) are written by rank 0 only, and only rank 0
logs. A failure raised on one rank *inside* a trainer's collectives cannot be reconciled and ends the launch
(the other ranks wait in the collective until the process group's timeout).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from benchmarks import progress, utils
from benchmarks.config import SuiteConfig, to_dict, to_yaml
from benchmarks.errors import DiskFullError
from methods.distributed import Dist


@dataclass
class Stage:
    name: str
    deps: tuple[str, ...]
    key: Callable[[SuiteConfig], dict]
    """The config subset this stage's output depends on (besides its deps' hashes)."""
    run: Callable[[Harness, Path], dict]
    """Writes the stage's artefacts into the folder; returns a JSON-able summary."""
    version: int = 1
    """Bump when the stage's code changes what it writes."""
    optional: bool = False
    """A stage only some arms need (e.g. pi_ref's log-probs for the DPO arms): like an arm, its failure is recorded
    and the suite goes on without the stages that need it. ``arm/*`` and ``eval/*`` stages always are."""


class StageNotFinished(RuntimeError):
    """A stage was asked for without running it (``prefbench results``) and has not finished."""


@dataclass
class StageResult:
    name: str
    hash: str
    path: Path
    cached: bool
    wall_s: float
    peak_rss_mb: float | None
    summary: dict
    first_run: dict | None = None
    """For a cached stage: wall time and peak memory measured when it really ran (from its stage.json)."""
    digest: str | None = None
    """Checksum of what the stage produced (its files' SHA-256, logs and metadata left out): equal digests mean
    bit-identical artefacts, so two runs' stage indexes show where they first diverge (``prefbench compare``)."""

    def line(self) -> str:
        if self.cached:
            return f"[{self.name:>8}] cached ({self.hash}) in {self.wall_s:.2f}s  -> {self.path}"
        mem = f"  peak RSS {self.peak_rss_mb:,.0f} MiB" if self.peak_rss_mb else ""
        return f"[{self.name:>8}] done in {self.wall_s:,.1f}s{mem}  -> {self.path}"


class Harness:
    def __init__(self, cfg: SuiteConfig, stages: dict[str, Stage], *, root: Path | None = None, log=print,
                 run_missing: bool = True, rebuildable: bool = False):
        self.cfg = cfg
        self.run_missing = run_missing
        """False: only read finished stages (``prefbench results``); a stage that has not run is an error."""
        self.rebuildable = rebuildable
        """The stages are ``benchmarks.arms.build_stages(cfg)``'s, so a worker process can rebuild them from the config
        (what the parallel executor needs; stages made in this process only, e.g. by a test, run serially)."""
        self.stages = stages
        self.root = Path(root) if root else Path.cwd()
        self.cache_dir = self.root / cfg.cache_dir
        self.accelerator = launched_accelerator()
        """``accelerate.Accelerator`` of a multi-process launch, else None (the single-process path)."""
        self.dist = Dist.from_accelerator(self.accelerator)
        self.log = log if self.dist.is_main else (lambda *a, **k: None)
        self.device = utils.resolve_device(cfg.device)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)  # before the dtype probe: it measures with the run's threads
        from benchmarks.executor import plan_workers

        self.plan = plan_workers(cfg, self.device, distributed=self.dist.distributed, parallel_ok=rebuildable)
        """Executor, workers and per-stage threads (``benchmarks.executor``)."""
        self.dtype_choice = self._resolve_dtype()
        """The run's autocast dtype (``cfg.dtype`` holds ``dtype_choice.resolved`` from here on)."""
        quiet_libraries()
        self.results: dict[str, StageResult] = {}
        self.failed: dict[str, str] = {}
        self._damaged_manifests: dict[str, dict] = {}  # stages found damaged and moved aside in this process
        self._hashes: dict[str, str] = {}
        self.thread_plan = self.plan
        """Per-stage thread counts of the stages this process runs (None: run at the current count, a worker)."""
        self.stage_threads_used: dict[str, int] = {}
        self.stage_pids: dict[str, int] = {}
        """The worker process that ran each stage (parallel executor; absent for stages run in this process)."""

    def _resolve_dtype(self):
        """Resolve ``cfg.dtype`` (``auto`` -> float32/bfloat16, ``benchmarks.machine.resolve_dtype``) once, and write
        the resolved dtype into ``cfg.dtype``: every stage key, ``resolved_config.yaml`` and ``stages.json`` see the
        dtype the run really uses, so ``auto`` resolved to float32 hashes exactly as an explicit ``float32``. Under a
        multi-process launch rank 0 decides and every rank takes its decision (the ranks' keys must agree)."""
        from benchmarks.machine import resolve_dtype

        cfg = self.cfg
        prev = getattr(cfg, "_dtype_choice", None)  # this config object was resolved by an earlier harness
        if prev is not None and prev.resolved == cfg.dtype and prev.device == self.device:
            choice = prev
        else:
            b, v = cfg.base, cfg.tokenizer
            shape = {"n_layers": b.n_layers, "hidden_size": b.hidden_size, "n_heads": b.n_heads,
                     "intermediate_size": b.intermediate_size, "vocab_size": v.vocab_size,
                     "max_position_embeddings": b.max_position_embeddings} if b.model == "tiny" else None
            choice = resolve_dtype(cfg.dtype, self.device, model_shape=shape,
                                   threads=self.plan.stage_threads) if self.dist.is_main else None
            choice = self.dist.broadcast_object(choice)
            if choice.requested == "auto":
                self.log(choice.line())
        cfg.dtype = choice.resolved
        cfg._dtype_choice = choice  # not a dataclass field: to_dict / to_yaml / equality ignore it
        _DTYPE_CHOICES[(self.device, choice.resolved)] = choice
        return choice

    # -------------------------------------------------------------------------------- keys and paths
    def stage_key(self, name: str) -> dict:
        if self.cfg.dtype == "auto":  # a key with 'auto' in it would name no real dtype (and differ from float32's)
            raise RuntimeError("cfg.dtype is 'auto' after the harness resolved it; resolve it with a new Harness")
        st = self.stages[name]
        return {"stage": name, "version": st.version, "config": st.key(self.cfg),
                "inputs": {d: self.stage_hash(d) for d in st.deps}}

    def stage_hash(self, name: str) -> str:
        if name not in self._hashes:
            self._hashes[name] = utils.stable_hash(self.stage_key(name))
        return self._hashes[name]

    def stage_dir(self, name: str) -> Path:
        return self.cache_dir / name / self.stage_hash(name)

    def path(self, name: str) -> Path:
        """Folder of a finished upstream stage (runs it if needed)."""
        return self.run_stage(name).path

    def checkpoint_path(self, name: str) -> Path:
        """Where a training stage keeps its resumable checkpoint (outside the stage's temp folder, so a killed
        run finds it again); removed once the stage has finished."""
        return self.cache_dir / "ckpt" / f"{name.replace('/', '__')}-{self.stage_hash(name)}.pt"

    def autocast(self):
        return utils.autocast_ctx(self.device, self.cfg.dtype)

    # -------------------------------------------------------------------------------- running
    def run_stage(self, name: str) -> StageResult:
        if name in self.results:
            return self.results[name]
        if name not in self.stages:
            raise KeyError(f"unknown stage '{name}'; stages: {list(self.stages)}")
        st = self.stages[name]
        for d in st.deps:
            if d in self.failed:
                self.failed[name] = f"skipped: depends on failed stage {d} ({self.failed[d]})"
                raise RuntimeError(self.failed[name])
            self.run_stage(d)
        final = self.stage_dir(name)
        t = utils.Timer()
        meta_path = final / "stage.json"
        if self.dist.distributed:
            res = self._run_distributed(name, st, final, meta_path, t)
        else:
            with utils.file_lock(final.parent / f".{final.name}.lock"):  # a concurrent run waits, then reuses
                res = self._run_locked(name, st, final, meta_path, t)
        self.results[name] = res
        self.log(res.line())
        return res

    def _damaged(self, name: str, final: Path, meta_path: Path) -> dict | None:
        """A finished stage whose files do not match the manifest in its stage.json (sizes always, SHA-256 of small
        files): moved aside (never deleted) so that it runs again. Returns the damaged stage's manifest."""
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError) as e:
            problems, meta = [f"stage.json unreadable: {e}"], {}
        else:
            problems = utils.verify_manifest(final, meta["manifest"]) if "manifest" in meta else []
        if not problems:
            return None
        dest = utils.move_aside(final, "damaged")
        self._damaged_manifests[name] = meta.get("manifest") or {}
        self.log(f"[{name}] cached stage DAMAGED ({'; '.join(problems[:3])}{' ...' if len(problems) > 3 else ''}): "
                 f"moved to {dest}, running it again")
        return meta.get("manifest") or {}

    def _supersede_downstream(self, name: str) -> None:
        """A rebuilt stage whose content differs from what its downstream stages were built from: move their cached
        folders aside so they run again (the keys are config hashes, so they would otherwise be reused)."""
        for n in self.stages:
            todo, seen = list(self.stages[n].deps), set()
            while todo:
                d = todo.pop()
                if d in seen:
                    continue
                seen.add(d)
                todo.extend(self.stages[d].deps if d in self.stages else [])
            if name in seen and n not in self.results and (self.stage_dir(n) / "stage.json").exists():
                dest = utils.move_aside(self.stage_dir(n), "superseded")
                self.log(f"[{n}] built from the damaged copy of {name}: moved to {dest}, it runs again")

    def _run_locked(self, name: str, st: Stage, final: Path, meta_path: Path, t) -> StageResult:
        if meta_path.exists():
            self._damaged(name, final, meta_path)
        damaged = self._damaged_manifests.get(name)
        if meta_path.exists():
            meta = json.loads(meta_path.read_text())
            res = StageResult(name, self.stage_hash(name), final, True, t.elapsed, None, meta["summary"],
                              {k: meta.get(k) for k in ("wall_s", "peak_rss_mb", "cuda_peak_mb", "finished_at")},
                              digest=artefact_digest(meta.get("manifest")))
        elif not self.run_missing:
            raise StageNotFinished(f"stage {name} has not finished (no {meta_path}); `prefbench run` runs it")
        else:
            self._clean_stale_tmp(final)
            utils.reset_peak_rss()
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            utils.seed_everything(self.cfg.seed)
            threads = self.thread_plan.threads_for(name) if self.thread_plan else torch.get_num_threads()
            with utils.atomic_dir(final) as tmp, _disk_full_names(name, final, tmp), utils.num_threads(threads):
                summary = st.run(self, tmp)
                wall = t.elapsed
                peak = utils.peak_rss_mb()
                # the manifest (sizes, SHA-256) goes into stage.json, the completion marker written last
                meta = {"stage": name, "key": self.stage_key(name), "summary": summary, "wall_s": wall,
                        "peak_rss_mb": peak, "cuda_peak_mb": utils.cuda_peak_mb(), "device": self.device,
                        "dtype": self.cfg.dtype, "threads": threads, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
                        "manifest": utils.manifest(tmp)}
                utils.atomic_write_json(tmp / "stage.json", meta)
            if damaged is not None and _artefacts(damaged) != _artefacts(meta["manifest"]):
                self._supersede_downstream(name)
            res = StageResult(name, self.stage_hash(name), final, False, wall, peak, summary,
                              digest=artefact_digest(meta["manifest"]))
            self.stage_threads_used[name] = threads
            self.checkpoint_path(name).unlink(missing_ok=True)
        return res

    def _run_distributed(self, name: str, st: Stage, final: Path, meta_path: Path, t) -> StageResult:
        """Every rank runs the stage, rank 0 commits it (the scheme of the module docstring)."""
        dist, lock = self.dist, None
        if dist.is_main:
            lock = utils.file_lock(final.parent / f".{final.name}.lock")
            lock.__enter__()
        err: BaseException | None = None
        res = None
        try:
            cached = dist.broadcast_object((meta_path.exists() and self._damaged(name, final, meta_path) is None)
                                           if dist.is_main else None)
            if cached:
                pass
            elif dist.is_main:
                res = self._run_locked(name, st, final, meta_path, t)
            else:
                scratch_glob = f".{final.name}.scratch-rank{dist.rank}-*"
                if final.parent.exists():  # scratch folders of a killed run of this rank
                    for p in final.parent.glob(scratch_glob):
                        shutil.rmtree(p, ignore_errors=True)
                final.parent.mkdir(parents=True, exist_ok=True)
                scratch = Path(tempfile.mkdtemp(prefix=scratch_glob[:-1], dir=final.parent))
                try:
                    utils.seed_everything(self.cfg.seed)
                    st.run(self, scratch)
                finally:
                    shutil.rmtree(scratch, ignore_errors=True)
        except Exception as e:  # noqa: BLE001 - re-raised below on every rank
            err = e
        finally:
            if lock is not None:
                lock.__exit__(None, None, None)
        if dist.any(err is not None):
            if err is not None:
                raise err
            raise RuntimeError(f"stage {name} failed on another process (see rank 0's log)")
        dist.barrier()  # rank 0's folder is committed: everyone reads it
        if res is None:
            meta = json.loads(meta_path.read_text())
            res = StageResult(name, self.stage_hash(name), final, bool(cached), t.elapsed, None, meta["summary"])
        return res

    def _stops_run(self, name: str) -> bool:
        """A foundation stage: its failure stops the suite (an arm's, an evaluation's or an optional stage's is
        recorded and the suite goes on without what needs it)."""
        return not (name.startswith(("arm/", "eval/")) or self.stages[name].optional)

    @staticmethod
    def _clean_stale_tmp(final: Path) -> None:
        """Temp folders of a killed run (we hold the stage's lock, so none of them is live)."""
        import shutil

        if final.parent.exists():
            for p in final.parent.glob(f".{final.name}.tmp-*"):
                shutil.rmtree(p, ignore_errors=True)

    def _eta(self, remaining: list[str]) -> str:
        """'about M min left' from the measured wall time of the stages already run here, by kind of stage."""
        left = self.eta_s(remaining)
        if left is None:
            return "time left unknown until a stage has run"
        return f"about {left / 60:.1f} min left (measured speed of this run's stages)"

    def eta_s(self, remaining: list[str]) -> float | None:
        """Seconds the ``remaining`` stages take one after another at the speed measured so far (None: nothing ran)."""
        ran = [(n, r.wall_s) for n, r in self.results.items() if not r.cached]
        if not ran:
            return None
        mean = sum(w for _, w in ran) / len(ran)
        by_kind: dict[str, list[float]] = {}
        for n, w in ran:
            by_kind.setdefault(_kind(n), []).append(w)
        return sum(sum(by_kind[_kind(n)]) / len(by_kind[_kind(n)]) if _kind(n) in by_kind else mean
                   for n in remaining if n not in self.results)

    def run(self, targets: list[str], run_dir: Path | None = None) -> dict[str, StageResult]:
        run_dir = run_dir or (self.root / self.cfg.runs_dir / self.cfg.name)
        self.run_id = f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"
        if self.dist.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            set_aside_previous_run(run_dir)
            c = self.dtype_choice
            head = f"# {c.line()}\n" if c.requested != c.resolved else ""  # the request; `dtype` below is what ran
            utils.atomic_write_text(run_dir / "resolved_config.yaml", head + to_yaml(self.cfg))
        t = utils.Timer()
        if self.plan.executor != "serial" and self.run_missing:  # `prefbench results` only reads: here
            from benchmarks.executor import run_concurrently

            self.log(self.plan.line())
            run_concurrently(self, targets, self.plan, foundation_fails_run=self._stops_run)
            targets = []  # every stage is done (or recorded as failed)
        show_eta = self.dist.is_main and progress.is_terminal()  # piped: one line per stage, nothing more
        for k, name in enumerate(targets, 1):
            if show_eta and k > 1:
                self.log(f"  stage {k} of {len(targets)}, elapsed {_mmss(t.elapsed)}, {self._eta(targets[k - 1:])}")
            if self._stops_run(name):
                self.run_stage(name)  # the shared foundation: a failure here stops the suite
                continue
            try:  # an arm that fails is recorded and the suite goes on with the others
                self.run_stage(name)
            except (KeyboardInterrupt, SystemExit, DiskFullError):
                raise  # a full disk fails every later stage too: stop with the one paragraph that says so
            except Exception as e:  # noqa: BLE001 - recorded, reported in the summary
                if name not in self.failed:
                    self.failed[name] = f"{type(e).__name__}: {e}"
                self.log(f"[{name}] FAILED: {type(e).__name__}: {e} (the suite goes on)")
        index = {n: {"hash": r.hash, "digest": r.digest, "path": str(r.path), "cached": r.cached, "wall_s": r.wall_s,
                     "threads": self.stage_threads_used.get(n), "pid": self.stage_pids.get(n),
                     "peak_rss_mb": r.peak_rss_mb, "first_run": r.first_run, "summary": r.summary}
                 for n, r in self.results.items()}
        if not self.dist.is_main:
            return self.results
        utils.atomic_write_json(run_dir / "stages.json", {"suite": self.cfg.name, "run_id": self.run_id,
                                                           "config": to_dict(self.cfg),
                                                           "provenance": provenance(self.device, self.cfg.dtype,
                                                                                    self.dtype_choice),
                                                           "executor": self.plan.record(),
                                                           "wall_s": t.elapsed, "stages": index,
                                                           "failed": self.failed})
        return self.results


@contextlib.contextmanager
def _disk_full_names(name: str, final: Path, tmp: Path):
    """Turn ENOSPC inside a stage into one paragraph: which stage, which folder, how much it had written (the temp
    folder is then removed by ``atomic_dir``: no partial stage is left, earlier stages are untouched)."""
    import errno

    try:
        yield
    except OSError as e:
        if e.errno != errno.ENOSPC or isinstance(e, DiskFullError):
            raise
        written = sum(f.stat().st_size for f in tmp.rglob("*") if f.is_file()) if tmp.exists() else 0
        free = shutil.disk_usage(final.parent).free if final.parent.exists() else 0
        raise DiskFullError(errno.ENOSPC, (
            f"no space left on the device while writing stage {name} into {final.parent} (it had written "
            f"{written / 2**20:,.1f} MiB and needed more; {free / 2**20:,.1f} MiB free now). Its partial folder was "
            f"removed and every finished stage is intact: free space (or set cache_dir to a larger disk) and run the "
            f"same command to continue")) from e


def _artefacts(manifest: dict[str, dict]) -> dict[str, str]:
    """A stage's content for comparing two builds: its files' hashes, logs and metadata (json, jsonl: timings) left out."""
    return {k: v["sha256"] for k, v in manifest.items() if not k.endswith((".json", ".jsonl"))}


def artefact_digest(manifest: dict[str, dict] | None) -> str | None:
    return utils.stable_hash(_artefacts(manifest)) if manifest else None


def compare_runs(a: dict, b: dict) -> tuple[str | None, list[tuple[str, str]]]:
    """Two runs' stage indexes (stages.json) stage by stage in A's order: (the first stage whose artefacts differ or
    None, [(stage, "same" | "differs" | "config differs" | "only in A" | "no checksum")])."""
    sa, sb = a.get("stages", {}), b.get("stages", {})
    rows, first = [], None
    for n, ra in sa.items():
        rb = sb.get(n)
        if rb is None:
            status = "only in A"
        elif not ra.get("digest") or not rb.get("digest"):
            status = "no checksum"
        elif ra["digest"] == rb["digest"]:
            status = "same"
        else:
            status = "differs" if ra.get("hash") == rb.get("hash") else "config differs"
        if status in ("differs", "config differs") and first is None:
            first = n
        rows.append((n, status))
    return first, rows


RUN_TABLES = ("summary.json", "summary.csv", "by_config.csv", "samples.parquet", "stages.json", "report.html", "logs",
              "figures", "curves")


def set_aside_previous_run(run_dir: Path) -> None:
    """A run's tables belong to that run: an earlier run's tables, report and figures move to ``run_dir/previous/``
    (replacing what an even earlier run left there) before a new run writes anything, so a run that fails half way
    never leaves the previous run's numbers looking like its own."""
    old = [run_dir / n for n in RUN_TABLES if (run_dir / n).exists()]
    if not old:
        return
    prev = run_dir / "previous"
    if prev.exists():
        shutil.rmtree(prev)
    prev.mkdir()
    for f in old:
        os.replace(f, prev / f.name)


def root_cause(failed: dict[str, str], stages: dict, targets: list[str]) -> str:
    """One paragraph for a run that failed: the failures that are not knock-on skips, grouped by their error, and
    the stages every failing stage reads (where one damaged input usually sits)."""
    own = {n: e for n, e in failed.items() if not e.startswith("skipped: depends on failed stage")}
    by_err: dict[str, list[str]] = {}
    for n, e in own.items():
        by_err.setdefault(e, []).append(n)
    lines = []
    for e, names in sorted(by_err.items(), key=lambda kv: -len(kv[1])):
        names.sort(key=lambda n: targets.index(n) if n in targets else len(targets))
        lines.append(f"{len(names)} stage(s) failed with {e!r} ({', '.join(names[:4])}{', ...' if len(names) > 4 else ''})")

    def closure(n: str) -> set[str]:
        out, todo = set(), list(stages[n].deps) if n in stages else []
        while todo:
            d = todo.pop()
            if d not in out:
                out.add(d)
                todo.extend(stages[d].deps if d in stages else [])
        return out

    common = set.intersection(*(closure(n) for n in own)) if own else set()
    deepest = [d for d in common if not any(d in closure(o) for o in common if o != d)]
    hint = (f"; every failing stage reads {', '.join(sorted(deepest))}: if that stage's cached files are damaged, "
            f"delete its folder (prefbench stages --suite <suite> shows where) and run again") if deepest else ""
    skipped = len(failed) - len(own)
    return "; ".join(lines) + (f"; {skipped} more skipped because a stage they need failed" if skipped else "") + hint + "."


def _mmss(seconds: float) -> str:
    return f"{int(seconds // 60)}:{int(seconds % 60):02d}"


def _kind(name: str) -> str:
    """Stages expected to take alike: the kind (arm/eval/...) and the arm's method prefix (dpo, ppo, pft...)."""
    head, _, rest = name.partition("/")
    return f"{head}/{rest.split('-')[0]}" if rest else head


def launched_accelerator():
    """An ``accelerate.Accelerator`` when this process is one of several started by ``accelerate launch`` (or
    torchrun): ``WORLD_SIZE`` > 1. None otherwise: a plain run never imports accelerate here."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from accelerate import Accelerator

    # without CUDA the ranks form a gloo CPU group (accelerate would otherwise see no distributed setup)
    return Accelerator(cpu=not torch.cuda.is_available())


def quiet_libraries() -> None:
    """Our stages print one line each; silence the libraries' own per-file progress bars."""
    import datasets
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    datasets.disable_progress_bars()


_DTYPE_CHOICES: dict[tuple[str, str], Any] = {}
"""(device, resolved dtype) -> the last ``DtypeChoice`` a harness of this process made, for ``provenance()`` callers
that pass only the dtype string."""


def provenance(device: str, dtype: str, dtype_choice=None) -> dict[str, Any]:
    """Versions, machine and precision of a run. ``dtype``: the resolved dtype; ``dtype_choice``: the harness's
    ``DtypeChoice`` (requested dtype, reason, probe numbers), looked up from this process's harnesses if not given."""
    import platform
    import subprocess

    import transformers
    import trl

    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        sha = None
    from benchmarks.machine import machine_info

    machine = machine_info(device)
    choice = dtype_choice if dtype_choice is not None else _DTYPE_CHOICES.get((device, dtype))
    dtype_rec = choice.record() if choice is not None else {
        "dtype_requested": dtype, "dtype_resolved": dtype, "dtype_reason": "set in the suite", "dtype_probe_gflops": None}
    return {"git_sha": sha, "python": sys.version.split()[0], "torch": torch.__version__,
            "transformers": transformers.__version__, "trl": trl.__version__, "platform": platform.platform(),
            "device": device, "dtype": dtype, "threads": torch.get_num_threads(), "machine_kind": machine["kind"],
            "machine": machine, **dtype_rec}
