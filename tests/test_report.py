"""The HTML report and figures, built from a small synthetic run folder (no model, no results/runs needed)."""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest
from matplotlib.colors import to_hex

from benchmarks.report import figures as F
from benchmarks.report import html as H

ARMS = [  # arm, method, loss_type, beta, (gold, kl, win) at T=1
    ("sft", "sft", "", None, (0.02, 0.0, 0.5)),
    ("pft-s0", "preferred_ft", "", None, (0.03, 0.5, 0.52)),
    ("bon-n4", "best_of_n", "", 4.0, (0.06, 0.64, 0.55)),
    ("dpo-sigmoid-b0.1-s0", "dpo", "sigmoid", 0.1, (0.10, 4.0, 0.60)),
    ("dpo-sigmoid-b0.5-s0", "dpo", "sigmoid", 0.5, (0.07, 1.5, 0.56)),
    ("dpo-ipo-b0.5-s0", "dpo", "ipo", 0.5, (0.05, 1.0, 0.54)),
    ("trl-sigmoid-b0.1-s0", "trl_dpo", "sigmoid", 0.1, (0.10, 4.0, 0.60)),
    ("ppo-kl0.05-s0", "ppo", "", 0.05, (0.25, 8.0, 0.70)),
]
TEMPS = [0.7, 1.0]
FAILED = {"ppo-kl0.5-s0": "RuntimeError: <boom> & friends"}


def _arm_rows() -> list[dict]:
    rows = []
    for arm, method, lt, beta, (gold, kl, win) in ARMS:
        for t in TEMPS:
            g, k, w = gold * (0.8 if t < 1 else 1.0), kl * (0.7 if t < 1 else 1.0), win
            rows.append({
                "arm": arm, "method": method, "loss_type": lt, "beta": beta, "seed": 0, "temperature": t,
                "gold": g, "gold_low": g - 0.03, "gold_high": g + 0.03, "kl": k, "kl_low": k * 0.9, "kl_high": k * 1.1,
                "win_vs_sft": w, "win_vs_sft_low": w - 0.05 if method != "sft" else w,
                "win_vs_sft_high": w + 0.05 if method != "sft" else w, "win_vs_chosen": w - 0.1,
                "win_vs_chosen_low": w - 0.15, "win_vs_chosen_high": w - 0.05, "length": 14.0, "distinct_1": 0.6,
                "distinct_2": 0.95, "train_s": 0.0 if method == "sft" else 3.0, "train_peak_rss_mb": None,
                "train_tokens_per_s": 1000.0, "outside_noise": method in ("dpo", "trl_dpo", "ppo"),
                "rm_accuracy": 0.64 if method in ("ppo", "best_of_n") else None,
                "rm_gold_pearson": 0.21 if method in ("ppo", "best_of_n") else None, "target_kl": None,
                "flops": 0.0 if method == "sft" else 1e12 * (1 + len(arm)), "tokens_trained": 5e4,
            })
    return rows


def _dpo_curve(n: int = 40, seed: int = 0) -> list[dict]:
    r = np.random.default_rng(seed)
    return [{"step": i + 1, "loss": 0.69 - 0.005 * i + 0.01 * r.standard_normal(),
             "rewards/margins": 0.02 * i, "rewards/accuracies": min(1.0, 0.5 + 0.02 * i),
             "rewards/chosen": 0.01 * i, "rewards/rejected": -0.01 * i, "logps/chosen": -80.0, "logps/rejected": -82.0,
             "examples_seen": 16 * (i + 1), "tokens_seen": 500 * (i + 1)} for i in range(n)]


def _ppo_curve(n: int = 12) -> list[dict]:
    return [{"iteration": i + 1, "episodes_seen": 64 * (i + 1), "tokens_seen": 800 * (i + 1),
             "objective/kl": 0.5 * i, "objective/scores": 0.1 * i, "objective/rlhf_reward": 0.08 * i,
             "objective/gold": 0.02 * i, "policy/entropy": 5.0, "val/explained_variance": 0.5,
             "time/generation": 0.05, "time/reward": 0.01, "time/ref_value_forward": 0.04, "time/update": 0.4}
            for i in range(n)]


def make_run(root, *, failed: dict | None = None, diagnostics: list | None = None):
    """A minimal run folder under ``root`` (no cache: the report must not need one); returns the run folder."""
    run = root / "runs" / "tiny"
    run.mkdir(parents=True)
    cache = root / "cache"
    rows = _arm_rows()
    pd.DataFrame(rows).to_csv(run / "summary.csv", index=False)
    summary = {"suite": "tiny", "seeds": [0], "noise_floor": {"gold": 0.03, "win_vs_sft": 0.03},
               "provenance": {"git_sha": "abc123def", "torch": "2.x", "transformers": "5.x", "trl": "1.16.0",
                              "device": "cpu", "dtype": "float32"},
               "arms": rows, "by_config": [], "failed_arms": failed or {}}
    if diagnostics is not None:
        summary["diagnostics"] = diagnostics
    (run / "summary.json").write_text(json.dumps(summary))
    samples = []
    for arm, *_ in ARMS:
        for t in TEMPS:
            for p in range(10):
                samples.append({"arm": arm, "prompt_id": f"eval-{p}", "prompt": f"Prompt <{p}> says", "temperature": t,
                                "sample_index": 0, "completion": f"{arm} completion {p} <script>x</script>",
                                "gold": 0.1 * p, "policy_logp": -20.0, "ref_logp": -21.0, "seq_kl": 1.0,
                                "length": 12, "ended": True})
    pd.DataFrame(samples).to_parquet(run / "samples.parquet", index=False)
    from benchmarks.evaluators.verdict import build_verdict, verdict_text

    summary["verdict"] = build_verdict(pd.DataFrame(samples), pd.DataFrame(rows), suite="tiny", temperature=1.0, n_boot=50)
    summary["verdict"]["text"] = verdict_text(summary["verdict"])
    summary["claims"] = [{"id": "dpo_sanity", "claim": "DPO's loss at step 0 is ln 2", "source": "Rafailov et al. 2023",
                          "status": "holds", "statistic": 0.05, "low": 0.01, "high": 0.09, "sentence": "moved <up>",
                          "arms": ["dpo-sigmoid-b0.1-s0"]}]
    (run / "summary.json").write_text(json.dumps(summary))
    stages = {}
    for arm, method, lt, beta, _ in ARMS[1:]:
        if method == "best_of_n":
            continue
        folder = cache / "arm" / arm / "h"  # recorded in stages.json, never created: the report reads the run folder only
        summ = {"arm": arm, "method": method, "loss_type": lt, "beta": beta, "seed": 0, "time/train_s": 3.0,
                "tokens_per_s": 1000.0}
        if method == "dpo":
            summ["time/reference_s"] = 0.5
            curve = _dpo_curve(seed=len(arm))
        elif method == "trl_dpo":
            curve = [{k: v for k, v in r.items() if k != "examples_seen"} for r in _dpo_curve()]
        elif method == "ppo":
            summ.update({"time/generation_s": 0.6, "time/reward_s": 0.1, "time/ref_value_forward_s": 0.5,
                         "time/update_s": 1.6, "rm_accuracy": 0.64, "rm_gold_pearson": 0.21})
            curve = _ppo_curve()
        else:
            curve = None  # preferred-ft: no curve file -> listed as missing
        if curve is not None:  # the results step copies each arm's curve into the run folder
            (run / "curves").mkdir(exist_ok=True)
            (run / "curves" / f"{arm}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in curve))
        stages[f"arm/{arm}"] = {"cached": method != "ppo", "path": str(folder), "summary": summ, "wall_s": 3.1,
                                "peak_rss_mb": 600.0 if method == "ppo" else None,
                                "first_run": {"peak_rss_mb": 512.0} if method != "ppo" else None}
    (run / "stages.json").write_text(json.dumps({"suite": "tiny", "wall_s": 12.0, "failed": failed or {},
                                                 "stages": stages, "config": {"dpo": {"batch_size": 16}}}))
    (run / "resolved_config.yaml").write_text("name: tiny\ndpo:\n  batch_size: 16\nseeds: [0]\n")
    return run


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    run = make_run(tmp_path_factory.mktemp("report"), failed=FAILED)
    path = H.build_report(run)
    return run, path, path.read_text(encoding="utf-8")


def test_report_is_self_contained_with_every_section(built):
    run, path, html = built
    assert path == run / "report.html" and path.exists()
    for _anchor, title in H.SECTIONS:
        assert f">{title}</h2>" in html, title
    # no external resource of any kind
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", html, re.I)
    assert not re.search(r"url\(\s*['\"]?(https?:)?//", html, re.I)
    assert "@import" not in html and "<link" not in html.lower() and "<script" not in html.lower()
    imgs = re.findall(r"<img\b[^>]*>", html)
    assert len(imgs) == len(F.FIGURE_CAPTIONS) == 7
    verdict = html[html.index('<section id="verdict">'):html.index('<section id="provenance">')]
    assert html.index('<section id="verdict">') < html.index('<section id="headline">')  # the report opens with it
    assert "On tiny (1 seed per configuration, 10 held-out prompts, T = 1):" in verdict
    assert "DPO vs PPO" in verdict and "DPO vs Best-of-N" in verdict and "Tuning budget" in verdict
    claims = html[html.index('<section id="claims">'):html.index('<section id="provenance">')]
    assert "dpo_sanity" in claims and "<strong>holds</strong>" in claims and "+0.050 [+0.010, +0.090]" in claims
    assert "moved &lt;up&gt;" in claims  # escaped
    assert all(re.search(r'src="data:image/png;base64,[A-Za-z0-9+/=]{100,}"', i) for i in imgs)
    assert "resolved_config.yaml" in html and "<details" in html and "abc123def" in html
    assert "ties count 1/2" in html and "bootstrap 95 %" in html


def test_headline_table_and_warnings(built):
    _, _, html = built
    table = html[html.index('<table class="headline">'): ]
    table = table[: table.index("</table>")]
    for arm, *_ in ARMS:
        assert f"{arm}" in table, arm
    assert table.count("<tr") == 1 + len(ARMS)  # header + one row per arm at the headline temperature
    assert 'class="noise"' in table  # preferred-ft / best-of-N are within the noise floor
    assert "acc 0.64 / r 0.21" in table
    # failed arms: visible warning box, escaped text
    assert 'class="warn"' in html and "ppo-kl0.5-s0" in html
    assert "&lt;boom&gt; &amp; friends" in html and "<boom>" not in html
    assert "<script>x</script>" not in html and "&lt;script&gt;x&lt;/script&gt;" in html
    assert "None computed" in html  # no diagnostics in summary.json
    cost = html[html.index('<section id="cost">'):]
    cost = cost[: cost.index("</table>")]
    assert cost.count("<tr") == 1 + len(ARMS) and "FLOPs (with shared)" in cost
    assert f"{1e12 * (1 + len('ppo-kl0.05-s0')):.2e}" in cost  # each arm's FLOPs, as summary.json has them


def test_report_without_failures_and_with_diagnostics(tmp_path):
    run = make_run(tmp_path, diagnostics=[{"arm": "dpo-sigmoid-b0.1-s0", "flag": "length_drift", "reason": "longer"}])
    html = H.build_report(run, figures=False).read_text()
    assert 'class="warn"' not in html and "None: every arm finished" in html
    assert "length_drift" in html and "None computed" not in html


def test_figures_written_as_pdf_and_png(built):
    from PIL import Image

    run, _, _ = built
    for name in F.FIGURE_CAPTIONS:
        pdf, png = run / "figures" / f"{name}.pdf", run / "figures" / f"{name}.png"
        assert pdf.read_bytes()[:5] == b"%PDF-", name
        with Image.open(png) as im:
            im.verify()
        with Image.open(png) as im:
            w, h = im.size
            assert im.format == "PNG" and w >= 600 and h >= 300, (name, im.size)
            assert len(np.unique(np.asarray(im.convert("L")))) > 10  # not a blank canvas
        assert png.stat().st_size > 5_000
    assert not list((run / "figures").glob(".*tmp*"))  # atomic writes leave no temp files


def test_one_colour_per_method_in_every_figure(built):
    import seaborn as sns

    run, _, _ = built
    assert F.COLORBLIND == sns.color_palette("colorblind").as_hex()
    colours = {m: F.method_color(m) for m in F.method_order()}
    assert len(set(colours.values())) == len(colours)  # distinct
    assert F.method_color("dpo") == F.method_color("dpo") == "#0173b2"  # from the arm registry
    assert F.method_color("some_new_method") == F.method_color("some_new_method")  # stable for unknown methods
    data = F.load_run(run)
    assert not (run.parent.parent / "cache").exists()  # curves and peak memory came from the run folder alone
    assert {"dpo-sigmoid-b0.1-s0", "ppo-kl0.05-s0"} <= set(data.curves)
    assert data.stages["stages"]["arm/dpo-sigmoid-b0.1-s0"]["peak_rss_mb"] == 512.0  # first run's, stage cached
    assert data.curves["trl-sigmoid-b0.1-s0"]["examples_seen"].iloc[0] == 16  # step x dpo.batch_size
    assert "pft-s0" in data.missing_curves
    front = F.frontier(data.arms)
    pts = {ln.get_label(): ln for ln in front.axes[0].get_lines()}
    curves = F.training_curves(data.curves, data.methods)
    lines = {ln.get_label(): ln for ax in curves.axes for ln in ax.get_lines()}
    for method, arm in (("dpo", "dpo-sigmoid-b0.1-s0"), ("ppo", "ppo-kl0.05-s0")):
        in_frontier = to_hex(pts[F.method_label(method)].get_markerfacecolor())
        in_curves = to_hex(lines[arm].get_color())
        assert in_frontier == in_curves == F.method_color(method)
    bars = F.phase_bars(data.stages)
    ticks = {t.get_text(): to_hex(t.get_color()) for t in bars.axes[0].get_yticklabels()}
    assert ticks["ppo-kl0.05-s0"] == F.method_color("ppo")
    # paper widths
    assert front.get_figwidth() == pytest.approx(F.SINGLE_COL_IN)
    assert curves.get_figwidth() == pytest.approx(F.DOUBLE_COL_IN)


def test_single_temperature_and_empty_inputs():
    df = pd.DataFrame(_arm_rows())
    fig = F.win_vs_temperature(df[df.temperature == 1.0])
    assert fig.axes and fig.axes[0].get_xticks().tolist() == [1.0]
    assert F.training_curves({}, {}).axes  # a figure saying there is nothing to draw
    assert F.ppo_run(pd.DataFrame(_ppo_curve())).axes[0].get_ylabel() == "gold reward"
    table = F.phase_table({"stages": {"arm/ppo-x": {"summary": {"method": "ppo", "time/train_s": 2.0,
                                                                 "time/generation_s": 0.5, "time/update_s": 1.0}}}})
    assert table.loc[0, "other"] == pytest.approx(0.5)


def test_cli_prints_report_path(tmp_path, capsys):
    run = make_run(tmp_path)
    assert H.main(["--run", str(run), "--no-figures"]) == 0
    assert capsys.readouterr().out.strip() == str(run / "report.html")
