"""One self-contained HTML report of a suite run: ``build_report(run_dir)`` -> ``run_dir/report.html``.

Figures are embedded as base64 PNG ``data:`` URIs, the CSS is inline and there is no script, web font or
other external request, so the file can be mailed, archived or opened offline. All text goes through
jinja2's autoescape.

    python -m benchmarks.report --run results/runs/<suite>
"""

from __future__ import annotations

import argparse
import base64
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from benchmarks import utils
from benchmarks.arms import registry
from benchmarks.report import figures as F

TEMPLATES = Path(__file__).parent / "templates"

SECTIONS = [  # (anchor, heading): the template renders these headings, the test checks them
    ("verdict", "Verdict"),
    ("claims", "Paper claims"),
    ("provenance", "Provenance"),
    ("headline", "Headline results"),
    ("frontier", "Reward\u2013KL frontier"),
    ("temperature", "Win rate vs temperature"),
    ("curves", "Training curves"),
    ("ppo", "PPO run"),
    ("perf", "Time and memory per phase"),
    ("cost", "Compute cost"),
    ("diagnostics", "Diagnostics"),
    ("failed", "Failed arms"),
    ("samples", "Sample browser"),
    ("method", "How the numbers are computed"),
]

NOTE = """\
How the numbers are computed (every method, same definitions)
-------------------------------------------------------------
gold reward   the task's oracle score of a completion, mean over held-out prompts.
win vs X      share of held-out prompts where the arm's sample beats X's sample on gold reward;
              ties count 1/2. X = the SFT reference (its own sample for the same prompt and
              temperature) or the dataset's chosen response. SFT vs itself is 0.5 by definition.
KL            sequence-level KL(pi || pi_ref) estimated on pi's own samples:
                KL = mean over prompts of  sum_t [ log pi(y_t | x, y_<t) - log pi_ref(y_t | x, y_<t) ]
              (the DPO paper's measure; single-sample estimates can be negative).
CI            bootstrap 95 % interval over prompts (percentile method); over several seeds the
              per-config table uses a seeds x prompts bootstrap.
distinct-n    unique word n-grams / all word n-grams over an arm's completions at one temperature.
noise floor   a row is marked ~ when |gold - gold_SFT| <= {gold} or |win vs SFT - 0.5| <= {win},
              the spread of the reference against itself under a fresh sampling seed.
time, memory  wall seconds of each training phase from the arm's own timers; peak memory is the
              process peak RSS while the arm's stage ran (not measured when a stage was reused
              from the cache; then the value recorded when it first ran is shown, if kept).
"""


# --------------------------------------------------------------------------------------------- formatting
def _isnum(x: Any) -> bool:
    try:
        return x is not None and not (isinstance(x, float) and math.isnan(x)) and not math.isnan(float(x))
    except (TypeError, ValueError):
        return False


def fmt(x: Any, spec: str = ".3f", dash: str = "\u2013") -> str:
    return format(float(x), spec) if _isnum(x) else dash


def fmt_ci(row: dict, key: str, spec: str = ".3f") -> str:
    v, lo, hi = row.get(key), row.get(f"{key}_low"), row.get(f"{key}_high")
    if not _isnum(v):
        return "\u2013"
    if _isnum(lo) and _isnum(hi):
        return f"{float(v):{spec}} [{float(lo):{spec}}, {float(hi):{spec}}]"
    return f"{float(v):{spec}}"


def _records(df: pd.DataFrame) -> list[dict]:
    return df.replace({np.nan: None}).to_dict("records")


def _natural(s: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(s))]


# --------------------------------------------------------------------------------------------- context
def headline_rows(run: F.RunData, temperature: float) -> list[dict]:
    arms = run.arms
    if arms.empty:
        return []
    df = arms[np.isclose(arms.temperature.astype(float), temperature)]
    perf = F.phase_table(run.stages).set_index("arm") if run.stages else pd.DataFrame()
    rows = []
    for r in _records(df):
        method = r.get("method") or ""
        peak = r.get("train_peak_rss_mb")
        if not _isnum(peak) and r["arm"] in perf.index:
            peak = perf.loc[r["arm"], "peak_rss_mb"]
        ref = F.is_reference(method)
        within = not ref and not bool(r.get("outside_noise"))
        rm = ""
        if registry.method(method).kind == "oracle":
            rm = "not used (gold reward)"
        elif _isnum(r.get("rm_accuracy")) or _isnum(r.get("rm_gold_pearson")):
            rm = f"acc {fmt(r.get('rm_accuracy'), '.2f')} / r {fmt(r.get('rm_gold_pearson'), '.2f')}"
        rows.append({
            "arm": r["arm"], "method": method, "method_label": F.method_label(method, r.get("loss_type")),
            "config": F.config_label(r), "color": F.method_color(method), "seed": fmt(r.get("seed"), ".0f"),
            "gold": fmt_ci(r, "gold"), "win_sft": fmt_ci(r, "win_vs_sft"), "win_chosen": fmt_ci(r, "win_vs_chosen"),
            "kl": fmt_ci(r, "kl", ".2f"), "length": fmt(r.get("length"), ".1f"), "distinct2": fmt(r.get("distinct_2")),
            "train_s": fmt(r.get("train_s"), ".1f") if not ref else "\u2013",
            "tokens_per_s": fmt(r.get("train_tokens_per_s"), ",.0f"), "peak_mb": fmt(peak, ",.0f"),
            "rm": rm, "within_noise": within,
        })
    return rows


def cost_rows(run: F.RunData, temperature: float) -> list[dict]:
    """The cost table: tokens and estimated FLOPs of every arm (own, and with the shared stages it needs)."""
    if run.arms.empty or "flops" not in run.arms:
        return []
    sci = lambda x: f"{float(x):.2e}" if _isnum(x) else "\u2013"  # noqa: E731
    return [{"arm": r["arm"], "color": F.method_color(r.get("method") or ""), "params": fmt(r.get("params"), ",.0f"),
             "fwd": sci(r.get("tokens_forward")), "trained": sci(r.get("tokens_trained")),
             "generated": sci(r.get("tokens_generated")), "flops_own": sci(r.get("flops_own")), "flops": sci(r.get("flops")),
             "train_s": fmt(r.get("train_s"), ".1f"), "gold": fmt(r.get("gold"))}
            for r in _records(F.cost_table(run.arms, temperature))]


def by_config_rows(run: F.RunData) -> list[dict]:
    bc = run.by_config
    if bc is None or bc.empty or "n_seeds" not in bc or not (pd.to_numeric(bc.n_seeds, errors="coerce") > 1).any():
        return []
    out = []
    for r in _records(bc):
        out.append({"config": F.config_label(r), "color": F.method_color(r.get("method") or ""),
                    "temperature": fmt(r.get("temperature"), "g"), "n_seeds": fmt(r.get("n_seeds"), ".0f"),
                    "gold": fmt_ci(r, "gold"),
                    **{k: (f"{fmt(r.get(k))} \u00b1 {fmt(r.get(k + '_seed_sd'))}" if _isnum(r.get(k + "_seed_sd"))
                           else fmt(r.get(k))) for k in ("win_vs_sft", "win_vs_chosen", "kl", "length", "distinct_2")}})
    return out


def sample_browser(run: F.RunData, temperature: float, n_prompts: int = 8, max_chars: int = 400) -> list[dict]:
    s = run.samples
    if s is None or s.empty or "temperature" not in s:
        return []
    s = s[np.isclose(s.temperature.astype(float), temperature)]
    if "sample_index" in s:
        s = s[s.sample_index == s.sample_index.min()]
    ids = sorted(pd.unique(s.prompt_id), key=_natural)
    if not ids:
        return []
    pick = [ids[i] for i in sorted(set(np.linspace(0, len(ids) - 1, min(n_prompts, len(ids))).round().astype(int)))]
    order = {a: (F.method_rank(m), a) for a, m in run.methods.items()}
    out = []
    for pid in pick:
        g = s[s.prompt_id == pid]
        rows = []
        for r in sorted(_records(g), key=lambda r: order.get(r["arm"], (99, r["arm"]))):
            text = str(r.get("completion") or "")
            rows.append({"arm": r["arm"], "color": F.method_color(run.methods.get(r["arm"], "")),
                         "gold": fmt(r.get("gold")), "completion": text if len(text) <= max_chars else text[:max_chars] + "\u2026",
                         "kl": fmt(r.get("seq_kl"), ".2f")})
        out.append({"prompt_id": pid, "prompt": str(g.prompt.iloc[0]) if "prompt" in g else "", "rows": rows})
    return out


def _data_uri(png: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(png.read_bytes()).decode("ascii")


def rl_health_rows(h) -> dict | None:
    """The on-policy health table: per arm, the trust-region and controller statistics with their N+ ranges."""
    if not isinstance(h, dict) or not h.get("arms"):
        return None
    R = h.get("ranges") or {}

    def f(x, spec):
        return fmt(x, spec) if _isnum(x) else "\u2013"

    rows = [{"arm": r["arm"], "clipfrac": f(r.get("clipfrac"), ".3f"), "approxkl": f(r.get("approxkl"), ".4f"),
             "ev": f(r.get("explained_variance"), ".2f"),
             "beta": f"{f(r.get('beta_0'), '.3g')} \u2192 {f(r.get('beta_final'), '.3g')} (min {f(r.get('beta_min'), '.3g')})",
             "kl": f(r.get("kl_final"), ".2f") + (f" / {r['target_kl']:g}" if _isnum(r.get("target_kl")) else ""),
             "length": f"{f(r.get('length_first'), '.1f')} \u2192 {f(r.get('length_final'), '.1f')}",
             "flags": ", ".join(r.get("flags") or []) or "ok"} for r in h["arms"]]
    ranges = (f"median clipfrac \u2264 {R.get('clipfrac')}, median approx KL \u2264 {R.get('approxkl')}, explained "
              f"variance > {R.get('explained_variance')} after the first iterations, final KL within "
              f"\u00b1{R.get('target_kl_rel', 0):.0%} of its target, completion length within \u00b1{R.get('length_rel', 0):.0%} "
              f"of the first iteration's, \u03b2 within \u00d7{R.get('beta_ratio')} of \u03b2\u2080")
    return {"rows": rows, "ranges": ranges}


def _failed(failed: Any) -> list[dict]:
    if not failed:
        return []
    if isinstance(failed, dict):
        return [{"arm": str(k), "reason": str(v)} for k, v in failed.items()]
    return [{"arm": str(f.get("arm", f)) if isinstance(f, dict) else str(f),
             "reason": str(f.get("reason", "")) if isinstance(f, dict) else ""} for f in failed]


def verdict_context(v: dict | None) -> dict | None:
    """The verdict record of summary.json as table rows (None for runs made before verdicts existed)."""
    if not v:
        return None
    comps = []
    for c in v.get("comparisons", []):
        for axis, name in (("kl", "KL"), ("flops", "log10 FLOPs")):
            r = c.get(axis) or {}
            rng = (lambda lo, hi: f"{lo:.1f}\u2013{hi:.1f}") if axis == "kl" else (lambda lo, hi: f"{10 ** lo:.1e}\u2013{10 ** hi:.1e}")
            alone = [f"{c['a_label']} {rng(*x)}" for x in r.get("only_a", [])] + [f"{c['b_label']} {rng(*x)}" for x in r.get("only_b", [])]
            comps.append({"pair": f"{c['a_label']} vs {c['b_label']}", "axis": name,
                          "range": rng(*r["overlap"]) if r.get("overlap") else "no overlap",
                          "gap": f"{r['gap']:+.3f} [{r['low']:+.3f}, {r['high']:+.3f}]" if r.get("gap") is not None else "\u2013",
                          "p": fmt(r.get("p_a_better"), ".2f"), "alone": "; ".join(alone) or "\u2013",
                          "front": ", ".join(r.get("a_front", []) + r.get("b_front", [])) or r.get("reason", "")})
    fams = []
    for f in (v.get("families") or {}).values():
        fams.append({"label": f["label"], "configs": f["configs"], "axes": ", ".join(f["axes"]) or "one setting",
                     "rows": [{"config": r["config"], "seeds": r["seeds"],
                               "gold": fmt(r["gold"]) + (f" \u00b1 {r['gold_sd']:.3f}" if r.get("gold_sd") is not None else ""),
                               "kl": fmt(r["kl"], ".2f") + (f" \u00b1 {r['kl_sd']:.2f}" if r.get("kl_sd") is not None else ""),
                               "length": fmt(r.get("length"), ".1f")} for r in f["rows"]]})
    landing = [{"arm": a["arm"], "target": fmt(a["target_kl"], "g"), "kl": fmt(a["kl"], ".2f"), "error": f"{a['error']:+.0%}",
                "landed": a["landed"]} for k in (v.get("kl_landing") or {}).values() for a in k["arms"]]
    return {"text": v.get("text", ""), "comparisons": comps, "families": fams, "landing": landing,
            "tolerance": next((f"{k['tolerance']:.0%}" for k in (v.get("kl_landing") or {}).values()), "25%")}


def build_context(run: F.RunData, fig_paths: dict, fig_errors: dict) -> dict:
    summary = run.summary
    t = F.headline_temperature(run.arms)
    prov = dict(summary.get("provenance") or run.stages.get("provenance") or {})
    seeds = summary.get("seeds") or ((run.config or {}).get("seeds"))
    noise = summary.get("noise_floor") or {}
    figs = {}
    for name in F.FIGURE_CAPTIONS:
        if name in fig_paths and fig_paths[name].get("png"):
            figs[name] = {"src": _data_uri(fig_paths[name]["png"]), "caption": F.FIGURE_CAPTIONS[name],
                          "pdf": f"figures/{name}.pdf"}
        else:
            figs[name] = {"error": fig_errors.get(name, "not drawn")}
    diagnostics = summary.get("diagnostics")
    return {
        "suite": summary.get("suite") or run.stages.get("suite") or run.run_dir.name,
        "provenance": [(k, str(v)) for k, v in sorted(prov.items())],
        "seeds": ", ".join(str(s) for s in seeds) if isinstance(seeds, list | tuple) else (str(seeds) if seeds else "\u2013"),
        "wall_s": fmt(run.stages.get("wall_s"), ",.1f"),
        "config_text": run.config_text,
        "sections": SECTIONS,
        "titles": dict(SECTIONS),
        "temperature": f"{t:g}" if _isnum(t) else "\u2013",
        "temperatures": ", ".join(f"{x:g}" for x in sorted(pd.unique(run.arms.temperature.dropna()))) if not run.arms.empty else "",
        "headline": headline_rows(run, t),
        "verdict": verdict_context(summary.get("verdict")),
        "claims": [{"id": c["id"], "claim": c["claim"], "source": c["source"], "status": c["status"],
                    "stat": (fmt(c.get("statistic"), "+.3f") + (f" [{c['low']:+.3f}, {c['high']:+.3f}]" if _isnum(c.get("low")) and _isnum(c.get("high")) else ""))
                    if _isnum(c.get("statistic")) else "\u2013",
                    "sentence": c["sentence"], "arms": ", ".join(c.get("arms") or []) or "\u2013"}
                   for c in summary.get("claims") or []],
        "by_config": by_config_rows(run),
        "cost": cost_rows(run, t),
        "figs": figs,
        "ppo_arm": F.pick_ppo_arm(run),
        "missing_curves": run.missing_curves,
        "diagnostics": [{"arm": str(d.get("arm", "")), "flag": str(d.get("flag", "")), "reason": str(d.get("reason", ""))}
                        for d in diagnostics] if isinstance(diagnostics, list) else None,
        "rl_health": rl_health_rows(summary.get("rl_health")),
        "failed": _failed(summary.get("failed_arms", run.stages.get("failed"))),
        "samples": sample_browser(run, t),
        "note": NOTE.format(gold=noise.get("gold", "?"), win=noise.get("win_vs_sft", "?")),
        "legend": [{"label": F.method_label(m), "color": F.method_color(m)} for m in F.method_order()
                   if m in set(run.methods.values())],
    }


def render(context: dict) -> str:
    import jinja2

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    return env.get_template("report.html.j2").render(**context)


def build_report(run_dir: str | Path, figures: bool = True) -> Path:
    """Draw the figures (``run_dir/figures/``) and write ``run_dir/report.html``; returns its path."""
    run_dir = Path(run_dir)
    run = F.load_run(run_dir)
    if figures:
        paths, errors = F.make_figures(run)
    else:
        paths = {n: {"png": run_dir / "figures" / f"{n}.png"} for n in F.FIGURE_CAPTIONS
                 if (run_dir / "figures" / f"{n}.png").exists()}
        errors = {n: "figures not drawn (figures=False)" for n in F.FIGURE_CAPTIONS if n not in paths}
    out = run_dir / "report.html"
    utils.atomic_write_text(out, render(build_context(run, paths, errors)))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.report",
                                 description="Build figures/ and report.html of a suite run folder.")
    ap.add_argument("--run", required=True, help="run folder, e.g. results/runs/smoke")
    ap.add_argument("--no-figures", action="store_true", help="reuse figures/*.png instead of redrawing them")
    args = ap.parse_args(argv)
    path = build_report(args.run, figures=not args.no_figures)
    print(path)
    return 0
