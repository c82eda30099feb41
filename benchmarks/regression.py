"""Metric-level regression gate: compare a suite's summary with the committed baseline.

Quality bands (per arm, at the suite's main temperature) are set from seed noise, not from taste:
  gold and win rate vs SFT: a regression is a DROP larger than the band; the band is
      max(floor, 3 x the baseline's own bootstrap half-width / 2), floor = 2 x the reference-vs-itself noise (0.06)
      — so an arm fails only when it is clearly worse than the committed run, not when sampling noise moves it;
  KL: outside [baseline / 2 - 0.5, 2 x baseline + 1] (a policy that stops moving or blows up).
Performance: only ratios measured in one run (ours / TRL seconds per step from the DPO speed benchmark),
never absolute seconds; a regression is a ratio more than 25 % above the baseline's.

``make baseline`` refreshes ``results/baseline/`` deliberately; ``make check`` runs the smoke suite and this gate.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

GOLD_FLOOR = 0.06
WIN_FLOOR = 0.06
PERF_SLACK = 1.25


def _main_rows(summary: dict) -> dict[str, dict]:
    temps = sorted({a["temperature"] for a in summary["arms"]})
    t = 1.0 if 1.0 in temps else temps[-1]
    return {a["arm"]: a for a in summary["arms"] if a["temperature"] == t}


def compact(summary: dict, perf: dict | None = None) -> dict:
    """The baseline as committed: the few numbers the gate reads, per arm."""
    keep = ("gold", "gold_low", "gold_high", "win_vs_sft", "win_vs_sft_low", "win_vs_sft_high", "kl", "method")
    out = {"suite": summary["suite"], "provenance": summary.get("provenance", {}),
           "arms": {k: {m: v.get(m) for m in keep} for k, v in _main_rows(summary).items()}}
    if perf and perf.get("ours_s_per_step") and perf.get("trl_s_per_step"):
        out["perf"] = {"ours_over_trl_step_time": perf["ours_s_per_step"] / perf["trl_s_per_step"],
                       "source": "benchmarks.perf.dpo_vs_trl"}
    return out


def compare(current: dict, baseline: dict, perf: dict | None = None) -> tuple[list[dict], bool]:
    """Rows of (arm, metric, baseline, current, band, status) and whether everything passed."""
    rows = []
    cur = _main_rows(current)
    for arm, b in baseline["arms"].items():
        c = cur.get(arm)
        if c is None:
            rows.append({"arm": arm, "metric": "-", "baseline": None, "current": None, "band": "present", "status": "MISSING"})
            continue
        for metric, floor in (("gold", GOLD_FLOOR), ("win_vs_sft", WIN_FLOOR)):
            if arm == "sft" and metric == "win_vs_sft":
                continue
            half = (b[f"{metric}_high"] - b[f"{metric}_low"]) / 2 if b.get(f"{metric}_high") is not None else 0.0
            band = max(floor, 1.5 * half)
            ok = c[metric] >= b[metric] - band
            rows.append({"arm": arm, "metric": metric, "baseline": b[metric], "current": c[metric],
                         "band": f">= {b[metric] - band:.3f}", "status": "ok" if ok else "REGRESSION"})
        if arm != "sft" and b.get("kl") is not None and not (b.get("method") == "best_of_n"):
            lo, hi = b["kl"] / 2 - 0.5, 2 * b["kl"] + 1.0
            ok = lo <= c["kl"] <= hi
            rows.append({"arm": arm, "metric": "kl", "baseline": b["kl"], "current": c["kl"], "band": f"[{lo:.2f}, {hi:.2f}]",
                         "status": "ok" if ok else "REGRESSION"})
    if "perf" in baseline and perf and perf.get("ours_s_per_step") and perf.get("trl_s_per_step"):
        r_b = baseline["perf"]["ours_over_trl_step_time"]
        r_c = perf["ours_s_per_step"] / perf["trl_s_per_step"]
        rows.append({"arm": "perf", "metric": "ours/TRL s per step", "baseline": r_b, "current": r_c,
                     "band": f"<= {r_b * PERF_SLACK:.3f}", "status": "ok" if r_c <= r_b * PERF_SLACK else "REGRESSION"})
    passed = all(r["status"] == "ok" for r in rows)
    return rows, passed


def format_table(rows: list[dict]) -> str:
    def f(x):
        return "-" if x is None else (f"{x:.3f}" if isinstance(x, float) and math.isfinite(x) else str(x))

    lines = [f"{'arm':<26} {'metric':<20} {'baseline':>9} {'current':>9} {'band':>16}  status"]
    for r in rows:
        lines.append(f"{r['arm']:<26} {r['metric']:<20} {f(r['baseline']):>9} {f(r['current']):>9} {r['band']:>16}  {r['status']}")
    return "\n".join(lines)


def load(path: Path) -> dict:
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run the suite first (make bench SUITE=smoke) or make baseline")
    return json.loads(path.read_text())
