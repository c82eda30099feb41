"""The regression gate: passes on the baseline itself, fails when an arm is degraded or the perf ratio slips."""

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.evaluators.diagnostics import (
    chosen_logp_falling,
    diversity_collapse,
    length_drift,
    negative_kl,
    proxy_gold_gap,
    run_diagnostics,
)
from benchmarks.regression import compact, compare

ROOT = Path(__file__).resolve().parents[1]


def _summary():
    def arm(name, method, gold, win, kl, half=0.02):
        return {"arm": name, "method": method, "temperature": 1.0, "gold": gold, "gold_low": gold - half,
                "gold_high": gold + half, "win_vs_sft": win, "win_vs_sft_low": win - half, "win_vs_sft_high": win + half,
                "kl": kl}
    return {"suite": "smoke", "arms": [arm("sft", "sft", 0.02, 0.5, 0.0), arm("dpo-sigmoid-b0.1-s0", "dpo", 0.08, 0.55, 4.3),
                                       arm("ppo-kl0.05-s0", "ppo", 0.22, 0.69, 8.6)]}


def test_gate_passes_on_its_own_baseline_and_fails_on_degraded_arm():
    s = _summary()
    base = compact(s, {"ours_s_per_step": 0.12, "trl_s_per_step": 0.25})
    rows, ok = compare(s, base, {"ours_s_per_step": 0.12, "trl_s_per_step": 0.25})
    assert ok and all(r["status"] == "ok" for r in rows)
    # "learning rate zero": the DPO arm stays at the reference (gold back to SFT's, KL 0)
    bad = copy.deepcopy(s)
    bad["arms"][1].update(gold=0.0, win_vs_sft=0.5, kl=0.0)
    rows, ok = compare(bad, base)
    assert not ok
    # gold fell by 0.06 (> its band), KL fell below half the baseline; win 0.55 -> 0.50 is inside the win band
    assert {(r["arm"], r["metric"]) for r in rows if r["status"] != "ok"} == {
        ("dpo-sigmoid-b0.1-s0", "gold"), ("dpo-sigmoid-b0.1-s0", "kl")}
    # small moves inside the noise band pass; an improvement passes
    ok_move = copy.deepcopy(s)
    ok_move["arms"][1].update(gold=0.08 - 0.05, kl=5.0)
    ok_move["arms"][2].update(gold=0.40)
    assert compare(ok_move, base)[1]


def test_gate_checks_the_perf_ratio_and_missing_arms():
    s = _summary()
    base = compact(s, {"ours_s_per_step": 0.10, "trl_s_per_step": 0.20})
    assert not compare(s, base, {"ours_s_per_step": 0.20, "trl_s_per_step": 0.20})[1]  # ours got 2x slower vs TRL
    assert compare(s, base, {"ours_s_per_step": 0.11, "trl_s_per_step": 0.20})[1]
    missing = copy.deepcopy(s)
    missing["arms"] = missing["arms"][:2]
    rows, ok = compare(missing, base)
    assert not ok and any(r["status"] == "MISSING" for r in rows)


def test_check_command_exit_codes(tmp_path):
    s = _summary()
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "summary.json").write_text(json.dumps(s))
    (tmp_path / "base.json").write_text(json.dumps(compact(s)))
    cmd = [sys.executable, "-m", "benchmarks", "check", "--run", str(tmp_path / "run"), "--baseline",
           str(tmp_path / "base.json"), "--perf", str(tmp_path / "none.json")]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0 and "PASSED" in r.stdout
    s["arms"][2]["gold"] = 0.0
    (tmp_path / "run" / "summary.json").write_text(json.dumps(s))
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 1 and "REGRESSION" in r.stdout and "ppo-kl0.05-s0" in r.stdout


def test_committed_baseline_is_readable():
    base = ROOT / "results" / "baseline" / "smoke.json"
    if not base.exists():
        pytest.skip("no committed baseline yet")
    b = json.loads(base.read_text())
    assert "sft" in b["arms"] and all("gold" in v for v in b["arms"].values())


def test_diagnostics_on_hand_made_curves():
    falling = [{"logps/chosen": -50 - i, "rewards/margins": 0.1 * i} for i in range(20)]
    assert "likelihood displacement" in chosen_logp_falling(falling)
    assert chosen_logp_falling([{"logps/chosen": -50 + i, "rewards/margins": 0.1 * i} for i in range(20)]) is None
    assert "over-optimisation" in proxy_gold_gap([{"objective/scores": 0.1 * i, "objective/gold": 0.3 - 0.01 * i} for i in range(20)])
    assert proxy_gold_gap([{"objective/scores": 0.1 * i, "objective/gold": 0.01 * i} for i in range(20)]) is None
    assert length_drift(20.0, 14.0) and length_drift(14.5, 14.0) is None
    assert negative_kl(-0.2, 0.6) and negative_kl(0.3, 0.4) is None
    assert diversity_collapse(0.6, 0.98) and diversity_collapse(0.97, 0.98) is None
    arms = [{"arm": "sft", "kl": 0.0, "length": 14.0, "distinct_2": 0.98},
            {"arm": "x", "kl": -0.1, "length": 20.0, "distinct_2": 0.5, "negative_kl_share": 0.7}]
    flags = {d["flag"] for d in run_diagnostics(arms, {"x": falling})}
    assert flags == {"negative_kl", "length_drift", "diversity_collapse", "chosen_logp_falling"}


@pytest.mark.slow
def test_gate_fails_end_to_end_when_dpo_learning_rate_is_zero(tmp_path):
    """The smoke suite with DPO's learning rate forced to ~0: the DPO arms stay at pi_ref and the gate, run
    against the committed baseline, exits 1 naming them; the untouched arms stay inside their bands."""
    base = ROOT / "results" / "baseline" / "smoke.json"
    if not base.exists():
        pytest.skip("no committed baseline")
    env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    run = subprocess.run([sys.executable, "-m", "benchmarks", "run", "--suite", "smoke", "--set", "dpo.lr=1e-12",
                          "--set", f"cache_dir={tmp_path}/cache", "--set", f"runs_dir={tmp_path}/runs"],
                         cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    r = subprocess.run([sys.executable, "-m", "benchmarks", "check", "--run", str(tmp_path / "runs" / "smoke"),
                        "--baseline", str(base), "--perf", str(tmp_path / "none.json")],
                       cwd=ROOT, capture_output=True, text=True, env=env)
    assert r.returncode == 1, r.stdout
    bad = {tuple(line.split()[:2]) for line in r.stdout.splitlines() if line.endswith("REGRESSION")}
    # smoke's DPO gain over pi_ref (0.056) is inside the gold band (0.06), so the gate catches the frozen
    # policy through its KL (4.3 -> ~0, band [1.67, 9.66]); only the degraded arms (ours and the TRL peer) fail
    assert ("dpo-sigmoid-b0.1-s0", "kl") in bad and ("trl-sigmoid-b0.1-s0", "kl") in bad
    assert all(arm.startswith(("dpo-", "trl-")) for arm, _ in bad)
