"""Stage runner with a content-addressed cache.

Every stage's output lives in ``<cache_dir>/<stage>/<hash>/`` where the hash covers the stage's resolved
config subset, its code version and the hashes of the stages it reads, so changing a field invalidates that
stage and everything downstream of it, nothing else. A stage is written into a temp folder and renamed in
one step when complete (``utils.atomic_dir``): a killed run never leaves a half artefact, and a re-run skips
finished stages.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from benchmarks import utils
from benchmarks.config import SuiteConfig, to_dict, to_yaml


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


@dataclass
class StageResult:
    name: str
    hash: str
    path: Path
    cached: bool
    wall_s: float
    peak_rss_mb: float | None
    summary: dict

    def line(self) -> str:
        if self.cached:
            return f"[{self.name:>8}] cached ({self.hash}) in {self.wall_s:.2f}s  -> {self.path}"
        mem = f"  peak RSS {self.peak_rss_mb:,.0f} MiB" if self.peak_rss_mb else ""
        return f"[{self.name:>8}] done in {self.wall_s:,.1f}s{mem}  -> {self.path}"


class Harness:
    def __init__(self, cfg: SuiteConfig, stages: dict[str, Stage], *, root: Path | None = None, log=print):
        self.cfg = cfg
        self.stages = stages
        self.root = Path(root) if root else Path.cwd()
        self.cache_dir = self.root / cfg.cache_dir
        self.log = log
        self.device = utils.resolve_device(cfg.device)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        quiet_libraries()
        self.results: dict[str, StageResult] = {}
        self.failed: dict[str, str] = {}
        self._hashes: dict[str, str] = {}

    # -------------------------------------------------------------------------------- keys and paths
    def stage_key(self, name: str) -> dict:
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
                self.failed[name] = f"skipped: depends on failed stage {d}"
                raise RuntimeError(self.failed[name])
            self.run_stage(d)
        final = self.stage_dir(name)
        t = utils.Timer()
        meta_path = final / "stage.json"
        with utils.file_lock(final.parent / f".{final.name}.lock"):  # a concurrent run waits, then reuses
            res = self._run_locked(name, st, final, meta_path, t)
        self.results[name] = res
        self.log(res.line())
        return res

    def _run_locked(self, name: str, st: Stage, final: Path, meta_path: Path, t) -> StageResult:
        if meta_path.exists():
            meta = json.loads(meta_path.read_text())
            res = StageResult(name, self.stage_hash(name), final, True, t.elapsed, None, meta["summary"])
        else:
            self._clean_stale_tmp(final)
            utils.reset_peak_rss()
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            utils.seed_everything(self.cfg.seed)
            with utils.atomic_dir(final) as tmp:
                summary = st.run(self, tmp)
                wall = t.elapsed
                peak = utils.peak_rss_mb()
                meta = {"stage": name, "key": self.stage_key(name), "summary": summary, "wall_s": wall,
                        "peak_rss_mb": peak, "cuda_peak_mb": utils.cuda_peak_mb(), "device": self.device,
                        "dtype": self.cfg.dtype, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
                utils.atomic_write_json(tmp / "stage.json", meta)
            res = StageResult(name, self.stage_hash(name), final, False, wall, peak, summary)
            self.checkpoint_path(name).unlink(missing_ok=True)
        return res

    @staticmethod
    def _clean_stale_tmp(final: Path) -> None:
        """Temp folders of a killed run (we hold the stage's lock, so none of them is live)."""
        import shutil

        if final.parent.exists():
            for p in final.parent.glob(f".{final.name}.tmp-*"):
                shutil.rmtree(p, ignore_errors=True)

    def run(self, targets: list[str], run_dir: Path | None = None) -> dict[str, StageResult]:
        run_dir = run_dir or (self.root / self.cfg.runs_dir / self.cfg.name)
        run_dir.mkdir(parents=True, exist_ok=True)
        utils.atomic_write_text(run_dir / "resolved_config.yaml", to_yaml(self.cfg))
        t = utils.Timer()
        for name in targets:
            if not name.startswith(("arm/", "eval/")):
                self.run_stage(name)  # the shared foundation: a failure here stops the suite
                continue
            try:  # an arm that fails is recorded and the suite goes on with the others
                self.run_stage(name)
            except (KeyboardInterrupt, SystemExit):
                raise
            except Exception as e:  # noqa: BLE001 - recorded, reported in the summary
                if name not in self.failed:
                    self.failed[name] = f"{type(e).__name__}: {e}"
                self.log(f"[{name}] FAILED: {type(e).__name__}: {e} (the suite goes on)")
        index = {n: {"hash": r.hash, "path": str(r.path), "cached": r.cached, "wall_s": r.wall_s,
                     "peak_rss_mb": r.peak_rss_mb, "summary": r.summary} for n, r in self.results.items()}
        utils.atomic_write_json(run_dir / "stages.json", {"suite": self.cfg.name, "config": to_dict(self.cfg),
                                                           "provenance": provenance(self.device, self.cfg.dtype),
                                                           "wall_s": t.elapsed, "stages": index,
                                                           "failed": self.failed})
        return self.results


def quiet_libraries() -> None:
    """Our stages print one line each; silence the libraries' own per-file progress bars."""
    import datasets
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    datasets.disable_progress_bars()


def provenance(device: str, dtype: str) -> dict[str, Any]:
    import platform
    import subprocess

    import transformers
    import trl

    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        sha = None
    return {"git_sha": sha, "python": sys.version.split()[0], "torch": torch.__version__,
            "transformers": transformers.__version__, "trl": trl.__version__, "platform": platform.platform(),
            "device": device, "dtype": dtype, "threads": torch.get_num_threads()}
