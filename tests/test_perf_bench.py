"""The DPO-vs-TRL performance benchmark runs end to end (``--quick``) and writes well-formed numbers.

Never asserts on speed: timings on a shared CI machine mean nothing. It checks the JSON's keys, that times
are positive and finite, and that TRL and our trainer (both layouts) did the same work: same losses and
first-step log-probs from the same weights and batches.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

REQUIRED = [
    "trl_s_per_step", "trl_precompute_s_per_step", "ours_s_per_step", "ours_padded_s_per_step", "floor_s_per_step",
    "trl_peak_rss_mb", "ours_peak_rss_mb", "tokens_per_step", "packed_tokens_per_step", "speedup_vs_trl",
    "speedup_vs_trl_precompute", "ours_vs_floor", "trl_tokens_per_s", "ours_tokens_per_s", "floor_tokens_per_s",
    "variants", "config", "provenance",
]
PARITY = ("trl", "trl_precompute", "ours", "ours_padded")


@pytest.fixture(scope="module")
def quick_result(tmp_path_factory):
    out = tmp_path_factory.mktemp("perf") / "dpo_vs_trl.json"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    p = subprocess.run([sys.executable, "-m", "benchmarks.perf.dpo_vs_trl", "--quick", "--out", str(out)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "speedup vs TRL" in p.stdout  # the table was printed
    return json.loads(out.read_text())


@pytest.mark.slow
def test_quick_run_writes_required_keys(quick_result):
    res = quick_result
    missing = [k for k in REQUIRED if k not in res]
    assert not missing, missing
    for k in ("torch", "trl", "transformers", "threads", "cpu_model"):
        assert res["provenance"][k], k
    assert res["config"]["quick"] and res["config"]["repeats"] == 2


@pytest.mark.slow
def test_quick_run_numbers_are_positive_and_finite(quick_result):
    res = quick_result
    for k in REQUIRED[:15]:
        v = res[k]
        assert isinstance(v, (int, float)) and math.isfinite(v) and v > 0, (k, v)
    assert res["packed_tokens_per_step"] < res["tokens_per_step"]  # the prompt is computed once
    for name, var in res["variants"].items():
        s = var["s_per_step"]
        assert 0 < s["min"] <= s["median"] <= s["max"] < math.inf, name
        assert len(s["values"]) == 2, name
    for name, runs in res["runs"].items():
        for r in runs:
            steps = r["step_s"]
            assert len(steps) == res["config"]["steps"] + res["config"]["warmup_steps"], name
            assert all(math.isfinite(t) and t > 0 for t in steps), name


@pytest.mark.slow
def test_trl_and_ours_compute_the_same_losses(quick_result):
    runs = quick_result["runs"]
    ref = runs["trl"][0]
    for name in PARITY:
        for r in runs[name]:
            assert r["first_loss"] == pytest.approx(ref["first_loss"], abs=1e-4), name
            # step 1 sees the same weights and batch: the log-probs are the real check (the loss is log 2 there)
            assert r["first_logps_chosen"] == pytest.approx(ref["first_logps_chosen"], rel=1e-5, abs=1e-3), name
            assert r["first_logps_rejected"] == pytest.approx(ref["first_logps_rejected"], rel=1e-5, abs=1e-3), name
            # --quick trains with lr 1e-3, so the later losses move and must still agree
            assert r["losses"] == pytest.approx(ref["losses"], abs=1e-4), name
    assert runs["floor"][0]["first_logps_chosen"] == pytest.approx(ref["first_logps_chosen"], rel=1e-5, abs=1e-3)
