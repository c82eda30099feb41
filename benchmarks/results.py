"""Suite-level tidy tables: the only input of the report and of the regression gate.

Written into the run folder ``results/runs/<suite>/``:
  samples.parquet   every evaluation sample of every arm (one row per arm x temperature x prompt x index)
  summary.csv       one row per arm x temperature: gold, win rates, KL, diversity, length (+ CIs), train cost
  by_config.csv     the same aggregated over seeds (mean, and a seeds x prompts bootstrap CI)
  summary.json      both tables + provenance + which arms failed or are missing
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from benchmarks import utils
from benchmarks.arms.registry import config_id, describe, method
from benchmarks.evaluators.metrics import arm_metrics
from benchmarks.evaluators.stats import seeds_prompts_ci
from benchmarks.evaluators.verdict import build_verdict, verdict_text

# the noise floor: the reference compared with itself under a new evaluation sampling seed
NOISE = {"gold": 0.03, "win_vs_sft": 0.03}


# typed hyper-parameter columns: DPO's beta, best-of-N's N (bon_n; `n` counts samples), PPO's (initial) KL coefficient and target KL
HPARAMS = ("beta", "bon_n", "kl_coef", "target_kl")


def _arm_meta(name: str, summary: dict | None) -> dict:
    if name == "sft":
        return {"method": "sft", "config": "sft", "loss_type": "", **{k: np.nan for k in HPARAMS}, "seed": 0, "train_s": 0.0,
                "flops": 0.0}
    s = summary or {}
    return {"method": s.get("method", name.split("-")[0]), "config": config_id(name), "loss_type": s.get("loss_type", ""),
            **{k: s.get(k, np.nan) for k in HPARAMS}, "seed": s.get("seed", 0), "train_s": s.get("time/train_s", np.nan),
            "train_tokens_per_s": s.get("tokens_per_s", np.nan), "heldout_acc": s.get("heldout_acc_after", np.nan),
            "epochs": s.get("epochs", np.nan), "rm_accuracy": s.get("rm_accuracy", np.nan),
            # online DPO's sampler refresh interval (never refreshed = inf); NaN for every other method
            "sync_interval": (np.inf if s["sync_interval"] is None else s["sync_interval"]) if "sync_interval" in s else np.nan, "rm_gold_pearson": s.get("rm_gold_pearson", np.nan),
            **{k: s[k] for k in s if k.startswith("time/") and k.endswith("_s")},
            # compute accounting (benchmarks/arms/common.py::compute_record): tokens_forward / _trained / _generated,
            # flops_own, flops_shared (reward model, pi_ref log-probs), flops = the cost of this arm alone
            "params": s.get("params", np.nan),
            **{k[8:]: s[k] for k in s if k.startswith("compute/") and not k.startswith("compute/shared/")}}


def collect(h, run_dir: Path) -> dict:
    """Build and write the suite tables from the finished eval stages of harness ``h``."""
    res = h.results
    evals = {n[5:]: r for n, r in res.items() if n.startswith("eval/")}
    if "sft" not in evals:
        raise RuntimeError("the reference (eval/sft) was not evaluated; every comparison needs it")
    samples = pd.concat([pd.read_parquet(r.path / "samples.parquet") for r in evals.values()], ignore_index=True)
    from benchmarks.tasks.registry import add_judge_scores

    samples = add_judge_scores(h.cfg.task, samples)  # second judges of the same property (the judge claim)
    judge_cols = [c for c in samples.columns if c.startswith("judge:")]
    chosen = pd.read_parquet(res["evalref"].path / "chosen.parquet") if "evalref" in res else None
    key = ["prompt_id", "temperature", "sample_index"]
    sft = samples[samples.arm == "sft"].set_index(key)
    rows = []
    for arm, r in evals.items():
        arm_stage = res.get(f"arm/{arm}")
        meta = _arm_meta(arm, arm_stage.summary if arm_stage else r.summary if "method" in r.summary else None)
        if arm_stage is not None:
            # measured when the stage really ran (a cached stage carries its first run's figure)
            meta["train_peak_rss_mb"] = arm_stage.peak_rss_mb if arm_stage.peak_rss_mb is not None else \
                (arm_stage.first_run or {}).get("peak_rss_mb")
        for temp, g in samples[samples.arm == arm].groupby("temperature"):
            g = g.set_index(key).sort_index()
            ref = sft.loc[g.index]
            ch = chosen.set_index("prompt_id").loc[g.index.get_level_values("prompt_id"), "chosen_gold"].to_numpy() if chosen is not None else None
            m = arm_metrics(g.gold.to_numpy(), ref.gold.to_numpy(), ch, g.seq_kl.to_numpy(), g.length.to_numpy(),
                            g.completion.tolist(), seed=h.cfg.eval.seed)
            m["gold_minus_sft"] = m["gold"] - float(ref.gold.mean())
            m["outside_noise"] = bool(abs(m["gold_minus_sft"]) > NOISE["gold"] and abs(m["win_vs_sft"] - 0.5) > NOISE["win_vs_sft"])
            m.update({c: float(g[c].mean()) for c in judge_cols})
            rows.append({"arm": arm, "temperature": temp, **meta, **m,
                         "eval_generation_s": r.summary.get("generation_s"), "eval_new_tokens": r.summary.get("new_tokens")})
    summary = pd.DataFrame(rows)
    summary["_o"] = summary.method.map(lambda m: method(m).order)
    summary = summary.sort_values(["_o", "method", "loss_type", *HPARAMS, "seed", "temperature"]).drop(columns="_o")
    by_config = _by_config(samples, summary, h.cfg.eval.seed)
    run_dir.mkdir(parents=True, exist_ok=True)
    _atomic_parquet(samples, run_dir / "samples.parquet")
    utils.atomic_write_text(run_dir / "summary.csv", summary.to_csv(index=False))
    utils.atomic_write_text(run_dir / "by_config.csv", by_config.to_csv(index=False))
    from benchmarks.harness import provenance

    failed = dict(getattr(h, "failed", {}))
    from benchmarks.evaluators.diagnostics import RL_RANGES, rl_health_table, run_diagnostics

    curves = {}
    for n, r in res.items():
        if n.startswith("arm/") and (r.path / "train_curve.jsonl").exists():
            curves[n[4:]] = utils.read_jsonl(r.path / "train_curve.jsonl")
    # one-way data flow: the run folder holds everything the report reads (it never reaches into the cache)
    for arm, rows in curves.items():
        utils.write_jsonl(run_dir / "curves" / f"{arm.replace('/', '__')}.jsonl", rows)
    t_main = utils.headline_temperature(summary.temperature)
    diags = run_diagnostics(summary[summary.temperature == t_main].to_dict("records"), curves)
    out = {"suite": h.cfg.name, "run_id": getattr(h, "run_id", None), "provenance": provenance(h.device, h.cfg.dtype), "seeds": h.cfg.seeds,
           "noise_floor": NOISE, "methods": describe(summary.method.unique()), "arms": summary.replace({np.nan: None}).to_dict("records"),
           "by_config": by_config.replace({np.nan: None}).to_dict("records"), "failed_arms": failed,
           "diagnostics": diags,
           "rl_health": {"ranges": RL_RANGES, "arms": rl_health_table(
               summary[summary.temperature == t_main].to_dict("records"), curves)}}
    out["comparisons"] = comparisons(summary[summary.temperature == t_main])
    out["verdict"] = build_verdict(samples, summary, suite=h.cfg.name, temperature=t_main,
                                   commit=out["provenance"].get("git_sha"), seed=h.cfg.eval.seed)
    from benchmarks.evaluators.claims import Tables, count, run_claims

    out["claims"] = run_claims(Tables(summary, samples, curves, {n[4:]: r.summary for n, r in res.items() if n.startswith("arm/")},
                                      temperature=t_main, dtype=h.cfg.dtype, seed=h.cfg.eval.seed,
                                      labelling=getattr(h.cfg.prefs, "labelling", None)))
    out["verdict"]["claims"] = count(out["claims"])
    out["verdict"]["judge"] = next((c for c in out["claims"] if c["id"] == "judge_robustness"), None)
    out["verdict"]["text"] = verdict_text(out["verdict"])
    utils.atomic_write_json(run_dir / "summary.json", out)
    return out


class StaleTablesError(RuntimeError):
    """A run folder whose tables come from another run than its stage index."""


def check_same_run(run_dir: Path) -> None:
    """Refuse a run folder whose summary.json and stages.json were written by different runs (tables of an earlier
    run beside this run's stage index): the report and the gate must never read old numbers as new."""
    import json

    paths = [Path(run_dir) / "summary.json", Path(run_dir) / "stages.json"]
    if not all(p.exists() for p in paths):
        return
    ids = [json.loads(p.read_text()).get("run_id") for p in paths]
    if None not in ids and ids[0] != ids[1]:
        raise StaleTablesError(f"{run_dir}: summary.json is from run {ids[0]} but stages.json from run {ids[1]}: the "
                               f"tables are not this run's (it failed before writing them?). Re-run the suite, or "
                               f"rebuild the tables with `prefbench results --suite <suite>`.")


def comparisons(main: pd.DataFrame) -> dict:
    """The compute-normalised cost of reaching a target gold reward (the frontier comparisons are the verdict's,
    ``benchmarks/evaluators/verdict.py``)."""
    kinds = {m: method(m) for m in main.method.unique()}
    out: dict = {}
    sft = main[main.method.map(lambda m: kinds[m].kind == "reference")]
    trained = main[main.method.map(lambda m: kinds[m].kind not in ("reference", "reranking"))]
    if len(sft) and len(trained):
        # target: halfway between the reference and the best non-oracle arm (an oracle sees gold: excluded)
        best = trained[trained.method.map(lambda m: kinds[m].kind != "oracle")].gold.max()
        target = float(sft.gold.iloc[0] + 0.5 * (best - sft.gold.iloc[0]))
        cost = {}
        for m, g in trained.groupby("method"):
            hit = g[g.gold >= target]
            cost[m] = {"runs_reaching": int(len(hit)), "runs": int(len(g)),
                       "min_train_s": float(hit.train_s.min()) if len(hit) else None,
                       "arm": hit.loc[hit.train_s.idxmin(), "arm"] if len(hit) and hit.train_s.notna().any() else None}
        out["cost_to_target_gold"] = {"target_gold": target, "by_method": cost}
    return out


def _by_config(samples: pd.DataFrame, summary: pd.DataFrame, seed: int) -> pd.DataFrame:
    """One row per configuration (the arm id without its seed) and temperature, aggregated over seeds."""
    cols = ["config", "method", "loss_type", *HPARAMS, "temperature"]
    rows = []
    for k, g in summary.groupby(cols, dropna=False):
        arms = g.arm.tolist()
        rec = dict(zip(cols, k, strict=True))
        rec["n_seeds"] = len(arms)
        # [seeds, prompts] matrix of gold for a two-level bootstrap
        mats = [samples[(samples.arm == a) & (samples.temperature == rec["temperature"])].sort_values(
            ["prompt_id", "sample_index"]).gold.to_numpy() for a in arms]
        if len({len(m) for m in mats}) == 1:
            p, lo, hi = seeds_prompts_ci(np.stack(mats), seed=seed)
            rec.update({"gold": p, "gold_low": lo, "gold_high": hi})
        for c in ("win_vs_sft", "win_vs_chosen", "kl", "length", "distinct_2", "train_s", "flops"):
            if c in g:
                rec[c] = float(g[c].mean())
                rec[c + "_seed_sd"] = float(g[c].std(ddof=1)) if len(g) > 1 else np.nan
        rows.append(rec)
    return pd.DataFrame(rows)


def _atomic_parquet(df: pd.DataFrame, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    df.to_parquet(tmp, index=False)
    tmp.replace(path)


def print_table(summary: dict, temperature: float | None = None) -> str:
    """The headline table as text (one line per arm at one temperature)."""
    arms = summary["arms"]
    temps = sorted({a["temperature"] for a in arms})
    t = temperature if temperature in temps else utils.headline_temperature(temps)
    lines = [f"{'arm':<26} {'T':>4} {'gold [95% CI]':>22} {'win vs SFT':>11} {'win vs ch.':>10} {'KL':>7} {'len':>5} {'dist-2':>6}"]
    for a in arms:
        if a["temperature"] != t:
            continue
        flag = "" if method(a["method"]).kind == "reference" or a["outside_noise"] else " ~"
        wc = a.get("win_vs_chosen")
        lines.append(f"{a['arm']:<26} {t:>4g} {a['gold']:>7.3f} [{a['gold_low']:.3f},{a['gold_high']:.3f}] "
                     f"{a['win_vs_sft']:>11.3f} {wc if wc is not None else float('nan'):>10.3f} {a['kl']:>7.2f} "
                     f"{a['length']:>5.1f} {a['distinct_2']:>6.3f}{flag}")
    lines.append("(~ = within the reference-vs-itself noise floor: |gold diff| <= 0.03 or |win - 0.5| <= 0.03)")
    return "\n".join(lines)
