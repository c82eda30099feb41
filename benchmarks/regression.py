"""Metric-level regression gate: compare a suite's summary with the committed baseline of the same machine kind.

Why per kind: floating-point results differ between kinds of machine (``benchmarks/machine.py``: e.g. the 2-core
CPU with AVX-512 + native bf16 and the AVX2-only one), so pi_ref, the pairs and every trajectory differ; one run of
an arm on another kind is not one seed away, it is one *machine* away. ``make baseline`` writes
``results/baseline/<suite>/<kind>.json`` for the kind it runs on.

Bands (per arm configuration = arm id without its ``-s<seed>``, at the suite's main temperature), from the noise
that exists, with ``n_b`` baseline seeds and ``n_c`` current seeds:

    sigma^2 = (s_seed^2 + se_prompt^2) * (1/n_b + 1/n_c)  [+ m^2 when the baseline is of another kind]

``s_seed``: the spread of the baseline's seeds (the only estimate a broken run cannot widen); ``se_prompt``: the
baseline's bootstrap standard error over prompts (its 95 % CI / 3.92); ``m``: the machine term, the spread between
kinds that seeds and prompts do not explain, pooled over the configurations both kinds' baselines share, separately
for configurations with a measured seed spread and those with one seed (``machine_term``).
  gold and win rate vs SFT: a regression is a DROP below ``mean_b - max(floor, Z * sigma)`` (improvements pass);
  KL, on the scale log(1 + KL): outside ``mean_b +- max(floor, Z * sigma)`` (a policy that stops moving or blows up).
Z = 3: a regression is a move that seeds, prompts (and machines) cannot explain at ~3 sigma.
A baseline with one seed borrows ``s_seed`` from a baseline of another kind that has seeds (printed).
Performance: only ratios measured in one run (ours / TRL seconds per step from the DPO speed benchmark),
never absolute seconds; a regression is a ratio more than 25 % above the baseline's.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from benchmarks import utils
from benchmarks.arms import registry
from benchmarks.arms.registry import config_id

Z = 3.0
PERF_SLACK = 1.25
# one-sided metrics (a drop is a regression) and their floors; KL is two-sided on log(1 + KL)
FLOORS = {"gold": 0.03, "win_vs_sft": 0.03, "kl": 0.1}
METRICS = ("gold", "win_vs_sft", "kl")
# the machine term used against a kind for which no pair of kinds has been measured yet
DEFAULT_MACHINE = {"gold": 0.05, "win_vs_sft": 0.05, "kl": 0.2}
def _main_rows(summary: dict) -> dict[str, dict]:
    t = utils.headline_temperature({a["temperature"] for a in summary["arms"]})
    return {a["arm"]: a for a in summary["arms"] if a["temperature"] == t}


def _gated(cid: str, method: str | None, metric: str) -> bool:
    """Which metrics of a configuration the gate reads (from the arm registry): not the reference's win rate against
    itself nor its KL (fixed by definition), not an analytic KL (best-of-N's log N - (N-1)/N)."""
    info = registry.method(method or cid)
    if info.kind == "reference":
        return metric == "gold"
    return not (metric == "kl" and info.kl != "sampled")


def _value(row: dict, metric: str) -> float:
    v = row[metric]
    return math.log1p(max(v, 0.0)) if metric == "kl" else v


def _se(row: dict, metric: str) -> float:
    """Prompt-level standard error of one arm's metric from its bootstrap CI (on the gate's scale)."""
    lo, hi = row.get(f"{metric}_low"), row.get(f"{metric}_high")
    if lo is None or hi is None:
        return float("nan")
    if metric == "kl":
        return (math.log1p(max(hi, 0.0)) - math.log1p(max(lo, 0.0))) / 3.92
    return (hi - lo) / 3.92


def config_stats(arms: dict[str, dict]) -> dict[str, dict]:
    """Per configuration: method, seeds, and per metric the mean, seed sd and prompt se (gate scale)."""
    groups: dict[str, list[dict]] = {}
    for arm, row in sorted(arms.items()):
        groups.setdefault(config_id(arm), []).append(row)
    out = {}
    for cid, rows in groups.items():
        rec = {"method": rows[0].get("method"), "n": len(rows), "arms": [r.get("arm") for r in rows]}
        for m in METRICS:
            vals = [_value(r, m) for r in rows if r.get(m) is not None]
            if not vals:
                continue
            ses = [s for s in (_se(r, m) for r in rows) if math.isfinite(s)]
            rec[m] = {"mean": float(np.mean(vals)), "seed_sd": float(np.std(vals, ddof=1)) if len(vals) > 1 else None,
                      "prompt_se": float(np.sqrt(np.mean(np.square(ses)))) if ses else 0.0,
                      "values": [float(v) for v in vals]}
        out[cid] = rec
    return out


def compact(summary: dict, perf: dict | None = None) -> dict:
    """The baseline as committed: per arm (every seed) the few numbers the gate reads, plus the machine kind."""
    keep = ("arm", "method", "seed", "gold", "gold_low", "gold_high", "win_vs_sft", "win_vs_sft_low",
            "win_vs_sft_high", "kl", "kl_low", "kl_high")
    prov = summary.get("provenance", {})
    out = {"format": 2, "suite": summary["suite"], "kind": machine_kind_of(summary), "provenance": prov,
           "arms": {k: {m: v.get(m) for m in keep} for k, v in _main_rows(summary).items()}}
    out["seeds"] = sorted({v.get("seed") for v in out["arms"].values() if v.get("seed") is not None})
    if perf and perf.get("ours_s_per_step") and perf.get("trl_s_per_step"):
        out["perf"] = {"ours_over_trl_step_time": perf["ours_s_per_step"] / perf["trl_s_per_step"],
                       "source": "benchmarks.perf.dpo_vs_trl"}
    return out


def machine_kind_of(summary: dict) -> str | None:
    """The kind of machine a run (or baseline) was made on, from its provenance (None when not recorded)."""
    if summary.get("kind"):
        return summary["kind"]
    prov = summary.get("provenance") or {}
    return prov.get("machine_kind") or (prov.get("machine") or {}).get("kind")


# -------------------------------------------------------------------------------- baselines of several kinds
def load_baselines(path: Path, suite: str = "smoke") -> dict[str, dict]:
    """Every baseline of a suite by kind: ``path`` is a folder (``<path>/<suite>/<kind>.json`` or
    ``<path>/<kind>.json``) or one baseline file."""
    path = Path(path)
    if path.is_file():
        files = [path]
    else:
        folder = path / suite if (path / suite).is_dir() else path
        files = sorted(folder.glob("*.json"))
    out = {}
    for f in files:
        b = json.loads(f.read_text())
        if "arms" not in b:
            continue
        b["_path"] = str(f)
        out[machine_kind_of(b) or f.stem] = b
    if not out:
        raise FileNotFoundError(f"no baseline under {path}: run `make baseline` (then commit results/baseline/)")
    return out


def machine_term(a: dict, b: dict) -> dict[str, dict[str, float]]:
    """Spread between two kinds that seeds and prompts do not explain, per metric, in two classes of configuration:
    ``seeded`` (a seed spread is measured in at least one of the two baselines) and ``unseeded`` (one seed in both:
    a kind moves such an arm as a new seed would, and nothing measured says how far). Over the configurations both
    baselines share, per class: m^2 = max(0, mean(d^2 - expected)), d the difference of the two means and expected
    its seed + prompt variance. A class with no shared configuration takes the other's term."""
    sa, sb = config_stats(a["arms"]), config_stats(b["arms"])
    out: dict[str, dict[str, float]] = {"seeded": {}, "unseeded": {}}
    for m in METRICS:
        excess: dict[str, list[float]] = {"seeded": [], "unseeded": []}
        for cid in sorted(set(sa) & set(sb)):
            if not _gated(cid, sa[cid]["method"], m) or m not in sa[cid] or m not in sb[cid]:
                continue
            x, y = sa[cid][m], sb[cid][m]
            s = x["seed_sd"] if x["seed_sd"] is not None else y["seed_sd"]
            var = ((s or 0.0) ** 2 + max(x["prompt_se"], y["prompt_se"]) ** 2) * (1 / sa[cid]["n"] + 1 / sb[cid]["n"])
            excess["seeded" if s is not None else "unseeded"].append((x["mean"] - y["mean"]) ** 2 - var)
        for cls, e in excess.items():
            if e:
                out[cls][m] = float(math.sqrt(max(0.0, float(np.mean(e)))))
        for cls, other in (("seeded", "unseeded"), ("unseeded", "seeded")):
            out[cls].setdefault(m, out[other].get(m, DEFAULT_MACHINE[m]))
    return out


def choose(baselines: dict[str, dict], kind: str | None) -> tuple[dict, dict | None, str]:
    """The baseline to compare with, the machine term (None for the same kind) and a line saying which."""
    if kind in baselines:
        b = baselines[kind]
        return b, None, f"baseline {b['_path']}: same kind as this run ({kind}), {len(b.get('seeds') or [0])} seed(s)"
    # another kind: the one with most seeds; the machine term from every measured pair of kinds involving it
    other = max(baselines, key=lambda k: (len(baselines[k].get("seeds") or [0]), k))
    b = baselines[other]
    terms = [machine_term(b, baselines[k]) for k in baselines if k != other]
    if terms:
        m = {c: {x: max(t[c][x] for t in terms) for x in METRICS} for c in ("seeded", "unseeded")}
        why = "measured between " + " and ".join(sorted(baselines))
    else:
        m = {c: dict(DEFAULT_MACHINE) for c in ("seeded", "unseeded")}
        why = "a default: no two kinds measured yet"
    terms_txt = "; ".join(f"{c}: " + ", ".join(f"{x} {m[c][x]:.3f}" for x in METRICS) for c in m)
    msg = (f"baseline {b['_path']}: no baseline of this run's kind ({kind}); compared with kind {other} "
           f"({len(b.get('seeds') or [0])} seed(s)), bands widened by the machine term ({why}; KL on log(1+KL)): "
           f"{terms_txt}  [`make baseline` on this machine writes one for its kind]")
    return b, m, msg


def _borrowed_seed_sd(baselines: dict[str, dict] | None, base: dict) -> dict[str, dict]:
    """Seed sd per configuration and metric from the baselines (of any kind) that have seeds."""
    out: dict[str, dict] = {}
    for b in (baselines or {}).values():
        if b is base:
            continue
        for cid, rec in config_stats(b["arms"]).items():
            for m in METRICS:
                if m in rec and rec[m]["seed_sd"] is not None:
                    out.setdefault(cid, {})[m] = rec[m]["seed_sd"]
    return out


def compare(current: dict, baseline: dict, perf: dict | None = None, *, machine: dict | None = None,
            baselines: dict[str, dict] | None = None) -> tuple[list[dict], bool]:
    """Rows of (arm configuration, metric, baseline, current, band, status) and whether everything passed.
    ``machine``: the machine term by class (a baseline of another kind, see ``machine_term``); ``baselines``: all baselines, to borrow the seed
    spread when ``baseline`` has a single seed."""
    rows = []
    base, cur = config_stats(baseline["arms"]), config_stats(_main_rows(current))
    borrowed = _borrowed_seed_sd(baselines, baseline)
    for cid, b in base.items():
        c = cur.get(cid)
        if c is None:
            rows.append({"arm": cid, "metric": "-", "baseline": None, "current": None, "band": "present", "status": "MISSING"})
            continue
        for m in METRICS:
            if m not in b or m not in c or not _gated(cid, b["method"], m):
                continue
            s = b[m]["seed_sd"]
            if s is None:
                s = borrowed.get(cid, {}).get(m)
            mach = machine["seeded" if s is not None else "unseeded"][m] if machine else 0.0
            var = ((s or 0.0) ** 2 + b[m]["prompt_se"] ** 2) * (1 / b["n"] + 1 / c["n"]) + mach**2
            band = max(FLOORS[m], Z * math.sqrt(var))
            mb, mc = b[m]["mean"], c[m]["mean"]
            if m == "kl":
                lo, hi = math.expm1(mb - band), math.expm1(mb + band)
                ok = mb - band <= mc <= mb + band
                rows.append({"arm": cid, "metric": m, "baseline": math.expm1(mb), "current": math.expm1(mc),
                             "band": f"[{lo:.2f}, {hi:.2f}]", "status": "ok" if ok else "REGRESSION",
                             "seeds": f"{c['n']}/{b['n']}"})
            else:
                ok = mc >= mb - band
                rows.append({"arm": cid, "metric": m, "baseline": mb, "current": mc, "band": f">= {mb - band:.3f}",
                             "status": "ok" if ok else "REGRESSION", "seeds": f"{c['n']}/{b['n']}"})
    if "perf" in baseline and perf and perf.get("ours_s_per_step") and perf.get("trl_s_per_step"):
        r_b = baseline["perf"]["ours_over_trl_step_time"]
        r_c = perf["ours_s_per_step"] / perf["trl_s_per_step"]
        rows.append({"arm": "perf", "metric": "ours/TRL s per step", "baseline": r_b, "current": r_c,
                     "band": f"<= {r_b * PERF_SLACK:.3f}", "status": "ok" if r_c <= r_b * PERF_SLACK else "REGRESSION"})
    passed = all(r["status"] == "ok" for r in rows)
    return rows, passed


def check(current: dict, baselines: dict[str, dict], perf: dict | None = None,
          kind: str | None = None) -> tuple[list[dict], bool, str]:
    """The gate as ``make check`` runs it: pick the baseline of the run's kind (else another kind with the machine
    term), compare. Returns the rows, pass/fail and the line saying which baseline was used."""
    kind = kind or machine_kind_of(current)
    base, machine, msg = choose(baselines, kind)
    rows, ok = compare(current, base, perf, machine=machine, baselines=baselines)
    return rows, ok, msg


def required_claims(current: dict, required: list[str]) -> tuple[bool, list[str]]:
    """Each required paper claim (``benchmarks/evaluators/claims.py``) must hold in the run; an unknown id is an
    error naming the known ones. Returns pass/fail and one line per claim."""
    have = {c["id"]: c for c in current.get("claims") or []}
    unknown = [c for c in required if c not in have]
    if unknown:
        from benchmarks.errors import ConfigError

        raise ConfigError(f"--require-claims: unknown claim(s) {unknown}; this run checked {sorted(have)}")
    lines = [f"claim {c:<34} {have[c]['status']:<12} {have[c]['sentence']}" for c in required]
    return all(have[c]["status"] == "holds" for c in required), lines


def format_table(rows: list[dict]) -> str:
    def f(x):
        return "-" if x is None else (f"{x:.3f}" if isinstance(x, float) and math.isfinite(x) else str(x))

    lines = [f"{'arm':<24} {'metric':<20} {'n c/b':>5} {'baseline':>9} {'current':>9} {'band':>16}  status"]
    for r in rows:
        lines.append(f"{r['arm']:<24} {r['metric']:<20} {r.get('seeds', ''):>5} {f(r['baseline']):>9} "
                     f"{f(r['current']):>9} {r['band']:>16}  {r['status']}")
    return "\n".join(lines)


def load(path: Path) -> dict:
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run the suite first (make bench SUITE=smoke) or make baseline")
    return json.loads(path.read_text())
