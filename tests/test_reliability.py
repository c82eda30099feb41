"""Same seed, same numbers; concurrent runs share the cache without corrupting it."""

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from benchmarks.tasks import corpus

sys.path.insert(0, str(Path(__file__).parent))
from test_pipeline import TINY  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TIMING = {"train_s", "eval_generation_s", "train_peak_rss_mb", "train_tokens_per_s", "time/reference_s", "time/train_s",
          "time/generation_s", "time/reward_s", "time/ref_value_forward_s", "time/update_s"}
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not corpus.FORTUNES_DIR.is_dir(), reason="Debian package fortunes not installed")]


def _cmd(cache, runs, *extra):
    args = [sys.executable, "-m", "benchmarks", "run", "--suite", "smoke", "--set", f"cache_dir={cache}",
            "--set", f"runs_dir={runs}"]
    for o in TINY + list(extra):
        args += ["--set", o]
    return args


ENV = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}


def _run(cache, runs, *extra):
    r = subprocess.run(_cmd(cache, runs, *extra), cwd=ROOT, capture_output=True, text=True, timeout=600, env=ENV)
    assert r.returncode == 0, r.stderr[-3000:]
    return pd.read_csv(Path(runs) / "smoke" / "summary.csv")


def test_same_seed_same_numbers_and_new_seed_new_samples(tmp_path):
    a = _run(tmp_path / "a", tmp_path / "ra")
    b = _run(tmp_path / "b", tmp_path / "rb")
    metrics = [c for c in a.columns if c not in TIMING]
    pd.testing.assert_frame_equal(a[metrics], b[metrics], check_exact=True)  # bit-for-bit on CPU fp32
    sa = pd.read_parquet(tmp_path / "ra" / "smoke" / "samples.parquet")
    c = _run(tmp_path / "c", tmp_path / "rc", "seed=1")
    sc = pd.read_parquet(tmp_path / "rc" / "smoke" / "samples.parquet")
    assert (sa.completion.values != sc.completion.values).mean() > 0.5 or not a[metrics].equals(c[metrics])


def test_two_runs_at_once_do_not_corrupt_each_other(tmp_path):
    procs = [subprocess.Popen(_cmd(tmp_path / "cache", tmp_path / f"runs{i}"), cwd=ROOT, env=ENV,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=900) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    s0 = json.loads((tmp_path / "runs0" / "smoke" / "summary.json").read_text())
    s1 = json.loads((tmp_path / "runs1" / "smoke" / "summary.json").read_text())
    assert [a["gold"] for a in s0["arms"]] == [a["gold"] for a in s1["arms"]]
    cache = tmp_path / "cache"
    for stage_dir in [p for p in cache.rglob("*") if p.is_dir() and (p / "stage.json").exists()]:
        json.loads((stage_dir / "stage.json").read_text())  # every finished stage is complete and readable
    assert not list(cache.rglob(".*.tmp-*"))  # no half-written stage left behind
    # each stage was computed once: the second run waited on the lock and reused it
    n_done = sum(o[0].count("done in") for o in outs)
    n_cached = sum(o[0].count("cached (") for o in outs)
    assert n_cached >= n_done - 2


CKPT_EVERY = ("checkpoint_every_steps=1", "checkpoint_every_iterations=1")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The summary of an uninterrupted run (checkpointing every step changes no number)."""
    root = tmp_path_factory.mktemp("uninterrupted")
    return _run(root / "cache", root / "runs", *CKPT_EVERY)


def test_killed_run_resumes_to_the_same_summary(tmp_path, uninterrupted):
    """SIGKILL the suite at several points (after pairs exist, mid-DPO / mid-PPO training with a checkpoint on
    disk, after the reference's evaluation), re-run the same command: same summary as an uninterrupted run."""
    import time

    ref = uninterrupted
    cache, runs = tmp_path / "k", tmp_path / "rk"
    extra = CKPT_EVERY
    killed_at = []
    for pattern in ("prefs/*/stage.json", "ckpt/arm__dpo*.pt", "ckpt/arm__ppo*.pt", "eval/sft/*/stage.json"):
        p = subprocess.Popen(_cmd(cache, runs, *extra), cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
        t0 = time.time()
        while p.poll() is None and not list(cache.glob(pattern)) and time.time() - t0 < 300:
            time.sleep(0.02)
        if p.poll() is None:
            p.kill()  # SIGKILL: no cleanup handlers run
            killed_at.append(pattern)
        p.wait()
    assert len(killed_at) >= 2, killed_at  # the run really was interrupted
    final = _run(cache, runs, *extra)
    metrics = [c for c in ref.columns if c not in TIMING]
    pd.testing.assert_frame_equal(final[metrics], ref[metrics], check_exact=True)
    assert not list((cache / "ckpt").glob("*.pt"))  # finished stages removed their checkpoints


def test_a_failed_run_never_shows_the_previous_runs_tables(tmp_path):
    """A damaged cached SFT stage makes every evaluation fail: the run exits non-zero with one paragraph naming the
    shared input, writes no tables, and the previous run's tables move to previous/ (never read as this run's)."""
    from benchmarks.results import StaleTablesError, check_same_run

    cache, runs = tmp_path / "c", tmp_path / "r"
    _run(cache, runs)
    run_dir = runs / "smoke"
    first_id = json.loads((run_dir / "summary.json").read_text())["run_id"]
    assert first_id == json.loads((run_dir / "stages.json").read_text())["run_id"]
    first = pd.read_csv(run_dir / "summary.csv")
    (weights,) = list((cache / "sft").glob("*/model/model.safetensors"))
    good = weights.read_bytes()
    import shutil

    # 1. a half-copied weights file in a finished stage: the manifest catches it, the stage is rebuilt (bit-identical,
    # so nothing downstream re-runs) and the run ends with the same summary
    weights.write_bytes(good[: len(good) // 2])
    shutil.rmtree(cache / "eval")
    r = subprocess.run(_cmd(cache, runs), cwd=ROOT, capture_output=True, text=True, timeout=600, env=ENV)
    assert r.returncode == 0 and "[sft] cached stage DAMAGED (model/model.safetensors:" in r.stdout, r.stdout[-2000:]
    metrics = [c for c in first.columns if c not in TIMING]
    pd.testing.assert_frame_equal(pd.read_csv(run_dir / "summary.csv")[metrics], first[metrics], check_exact=True)
    first_id = json.loads((run_dir / "summary.json").read_text())["run_id"]
    # 2. the same damage in a stage written before manifests existed: loading fails in every evaluation
    weights.write_bytes(good[: len(good) // 2])
    meta_path = weights.parents[1] / "stage.json"
    meta = json.loads(meta_path.read_text())
    del meta["manifest"]
    meta_path.write_text(json.dumps(meta))
    shutil.rmtree(cache / "eval")  # the evaluations must run again and load the damaged weights
    r = subprocess.run(_cmd(cache, runs), cwd=ROOT, capture_output=True, text=True, timeout=600, env=ENV)
    assert r.returncode == 1, (r.stdout[-2000:], r.stderr[-2000:])
    assert "run FAILED: the reference's evaluation (eval/sft) failed" in r.stderr
    assert r.stderr.count("run FAILED") == 1 and "every failing stage reads" in r.stderr and "sft" in r.stderr
    assert "prefbench: done" not in r.stdout
    assert not (run_dir / "summary.csv").exists() and not (run_dir / "summary.json").exists()
    assert json.loads((run_dir / "previous" / "summary.json").read_text())["run_id"] == first_id
    # a summary from another run beside this run's stage index is refused by the report and the gate
    (run_dir / "summary.json").write_text((run_dir / "previous" / "summary.json").read_text())
    with pytest.raises(StaleTablesError, match="not this run's"):
        check_same_run(run_dir)
    r = subprocess.run([sys.executable, "-m", "benchmarks", "check", "--run", str(run_dir)], cwd=ROOT,
                       capture_output=True, text=True, timeout=120, env=ENV)
    assert r.returncode != 0 and "not this run's" in r.stderr


def test_sigterm_and_sigint_at_four_points_resume_to_the_same_summary(tmp_path, uninterrupted):
    """SIGTERM / SIGINT during base pretraining, a DPO arm and a PPO arm (once the loop has written a checkpoint):
    the loop finishes its step, writes its checkpoint and the run exits 143 / 130 with the resume line. SIGINT during
    an evaluation (no trainer: the stage is cheap and deterministic) exits 130 at once and leaves no stage behind.
    The re-run says which stages it resumes and ends with the uninterrupted summary, bit for bit."""
    import signal
    import time

    cache, runs = tmp_path / "k", tmp_path / "rk"
    extra, ref = CKPT_EVERY, uninterrupted
    points = [("base", "ckpt/base-*.pt", signal.SIGTERM), ("dpo", "ckpt/arm__dpo-sigmoid*.pt", signal.SIGTERM),
              ("ppo", "ckpt/arm__ppo-kl*.pt", signal.SIGINT), ("eval", "eval/dpo-sigmoid*/.*.tmp-*", signal.SIGINT)]
    stopped, logs = [], ""
    for what, pattern, sig in points:
        p = subprocess.Popen(_cmd(cache, runs, *extra), cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
        t0 = time.time()
        while p.poll() is None and not list(cache.glob(pattern)) and time.time() - t0 < 300:
            time.sleep(0.005)  # the stage is running
        p.send_signal(sig)
        out, err = p.communicate(timeout=300)
        logs += out + err
        if p.returncode == 0:  # the stage finished between the poll and the signal: nothing to resume there
            continue
        stopped.append(what)
        assert p.returncode == 128 + sig, (what, out[-1500:], err[-1500:])
        assert f"interrupted by {signal.Signals(sig).name}" in err and "run the same command to resume" in err
        if what != "eval":
            assert "checkpoint is written" in err and list(cache.glob(pattern)), (what, err[-1500:])
    assert {"base", "dpo", "ppo"} <= set(stopped), stopped
    r = subprocess.run(_cmd(cache, runs, *extra), cwd=ROOT, capture_output=True, text=True, timeout=600, env=ENV)
    assert r.returncode == 0, r.stderr[-2000:]
    logs += r.stdout + r.stderr
    # each run resumed what the one before stopped, and said so
    assert "[base] resuming from step" in logs and "resuming from iteration" in logs
    assert any("[arm/dpo-sigmoid-b0.1-s0] resuming from step" in x for x in logs.splitlines())
    final = pd.read_csv(runs / "smoke" / "summary.csv")
    metrics = [c for c in ref.columns if c not in TIMING]
    pd.testing.assert_frame_equal(final[metrics], ref[metrics], check_exact=True)
    assert not list((cache / "ckpt").glob("*.pt")) and not list(cache.glob("*/*/.*.tmp-*"))
