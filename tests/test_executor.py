"""The parallel executor (benchmarks/executor.py): its worker plan, and a parallel run writing bit-identical
artefacts to a serial run at the same per-stage thread counts, with flat memory across arms."""

import json
import subprocess
import sys
from types import SimpleNamespace

import pandas as pd
import pytest

from benchmarks import executor
from benchmarks.config import ConfigError, load_suite
from benchmarks.tasks import corpus
from tests.test_pipeline import ROOT, TINY


def _cfg(**kw):
    base = {"executor": "local", "workers": "auto", "threads": 0, "stage_threads": 0, "ray_address": None}
    return SimpleNamespace(**(base | kw))


def test_plan_auto_takes_one_worker_per_core_with_one_thread(monkeypatch):
    monkeypatch.setattr(executor, "cores", lambda: 2)
    monkeypatch.setattr(executor, "available_gib", lambda: 20.0)
    p = executor.plan_workers(_cfg(), "cpu")
    assert (p.executor, p.workers, p.threads, p.stage_threads) == ("local", 2, 2, 1)
    assert p.threads_for("base") == 2 and p.threads_for("prefs") == 2  # the foundation runs alone, every thread
    assert p.threads_for("arm/dpo-sigmoid-b0.1-s0") == 1 and p.threads_for("eval/sft") == 1
    monkeypatch.setattr(executor, "cores", lambda: 16)
    assert executor.plan_workers(_cfg(), "cpu").workers == 8  # at most 8
    monkeypatch.setattr(executor, "available_gib", lambda: 5.0)
    p = executor.plan_workers(_cfg(), "cpu")
    assert (p.workers, p.stage_threads) == (2, 8)  # what memory holds (2 GiB a worker), threads shared out
    assert executor.plan_workers(_cfg(), "cuda").executor == "serial"  # one device
    assert executor.plan_workers(_cfg(), "cpu", distributed=True).executor == "serial"  # ranks run in step


def test_plan_explicit_fields():
    p = executor.plan_workers(_cfg(workers=1, threads=2, stage_threads=1), "cpu")
    assert (p.executor, p.threads, p.stage_threads) == ("serial", 2, 1)
    assert p.threads_for("base") == 2 and p.threads_for("arm/x") == 1
    p = executor.plan_workers(_cfg(workers=3, threads=6), "cpu")
    assert (p.executor, p.workers, p.stage_threads) == ("local", 3, 2)


def test_config_fields_are_validated():
    assert load_suite("smoke", ["workers=auto"]).workers == "auto"
    assert load_suite("smoke", ["workers=3"]).workers == 3
    with pytest.raises(ConfigError, match="config key 'workers'"):
        load_suite("smoke", ["workers=0"])
    with pytest.raises(ConfigError, match="config key 'workers'"):
        load_suite("smoke", ["workers=many"])
    with pytest.raises(ConfigError, match="config key 'executor'"):
        load_suite("smoke", ["executor=slurm"])


def _run(tmp_path, name, *extra):
    args = [sys.executable, "-m", "benchmarks", "run", "--suite", "smoke",
            "--set", f"cache_dir={tmp_path}/{name}/cache", "--set", f"runs_dir={tmp_path}/{name}/runs"]
    for o in [*TINY, "rlhf.ppo_gt=false", "dpo.trl_peer=false", "rlhf.preferred_ft=false", *extra]:  # CI time
        args += ["--set", o]
    r = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=900,
                       env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    run = tmp_path / name / "runs" / "smoke"
    return r, json.loads((run / "stages.json").read_text()), pd.read_csv(run / "summary.csv")


TIMING = ("train_s", "tokens_per_s", "eval_generation_s", "train_peak_rss_mb")


def _same_tables(a: pd.DataFrame, b: pd.DataFrame) -> None:
    """Every column that is not a time or a memory figure, exactly."""
    cols = [c for c in a.columns if not (c.startswith("time/") or c.endswith(TIMING))]
    assert len(cols) > 20 and {"gold", "kl", "win_vs_sft", "length"} <= set(cols)
    pd.testing.assert_frame_equal(a[cols], b[cols])


@pytest.fixture(scope="module")
def parallel_run(tmp_path_factory):
    if not corpus.FORTUNES_DIR.is_dir():
        pytest.skip("Debian package fortunes not installed")
    return _run(tmp_path_factory.mktemp("executor"), "par", "workers=2", "threads=2")


@pytest.mark.slow
def test_parallel_run_equals_serial_run_bit_for_bit(tmp_path, parallel_run):
    par_out, par, par_sum = parallel_run
    ser_out, ser, ser_sum = _run(tmp_path, "ser", "workers=1", "threads=2", "stage_threads=1")
    assert par["executor"]["executor"] == "local" and par["executor"]["workers"] == 2
    assert ser["executor"]["executor"] == "serial"
    # every stage ran at the same thread count in both runs: the foundation at 2, the rest at 1
    for n, r in par["stages"].items():
        assert r["threads"] == ser["stages"][n]["threads"] == (2 if executor.is_wide(n) else 1), n
    # ... and wrote the same bytes (artefact checksums: models, samples, tables; not logs or timings)
    assert {n: r["digest"] for n, r in par["stages"].items()} == {n: r["digest"] for n, r in ser["stages"].items()}
    # the tables agree in every column that is not a time or a memory figure
    _same_tables(par_sum, ser_sum)
    # stages ran side by side in separate processes (arms, evaluations), one line per finished stage
    assert "executor: local, 2 workers x 1 thread(s)" in par_out.stdout
    assert par_out.stdout.count("] done in") == len([r for r in par["stages"].values() if not r["cached"]])
    assert "\r" not in par_out.stdout  # no bars from the workers
    # a fresh process per stage, so no arm inherits an earlier arm's memory (a serial run's process grows)
    pids = [r["pid"] for n, r in par["stages"].items() if not r["cached"]]
    assert None not in pids and len(set(pids)) == len(pids) and all(r["pid"] is None for r in ser["stages"].values())


@pytest.mark.slow
def test_ray_executor_on_a_local_two_node_cluster_equals_the_local_executor(tmp_path, parallel_run):
    pytest.importorskip("ray", reason="the optional Ray extra (pip install '.[ray]'; CI installs it)")
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)  # two nodes of one CPU: stages spread over both
    try:
        out, idx, summary = _run(tmp_path, "ray", "executor=ray", f"ray_address={cluster.address}", "workers=2",
                                 "threads=2")
    finally:
        cluster.shutdown()
    _, par, par_sum = parallel_run
    assert idx["executor"]["executor"] == "ray" and "executor: ray, 2 workers" in out.stdout
    assert {n: r["digest"] for n, r in idx["stages"].items()} == {n: r["digest"] for n, r in par["stages"].items()}
    assert {n: r["threads"] for n, r in idx["stages"].items()} == {n: r["threads"] for n, r in par["stages"].items()}
    _same_tables(summary, par_sum)
