"""Paper-style figures of one suite run (``results/runs/<suite>/``).

Every figure function takes plain data (DataFrames / dicts read from the run folder) and returns a
:class:`matplotlib.figure.Figure` drawn on an Agg canvas: nothing touches ``pyplot`` or the global rc state,
so importing this module (or calling it from a notebook) changes nothing outside the figures it returns.

One style for a two-column paper: 3.3 in single-column / 6.9 in double-column widths, 7-8.5 pt text,
seaborn's colour-blind-safe palette with ONE FIXED COLOUR AND MARKER PER METHOD in every figure
(:func:`method_color`, :func:`method_marker`).

``save_all(run_dir)`` loads the run folder, draws every figure and writes ``figures/<name>.{pdf,png}``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib as mpl
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from benchmarks import utils
from benchmarks.arms import registry

SINGLE_COL_IN = 3.3
DOUBLE_COL_IN = 6.9
PNG_DPI = 200

# seaborn "colorblind" (sns.color_palette("colorblind").as_hex()), fixed here so that a method keeps its colour
# whatever else is in the figure; the test checks the hex values still match seaborn's palette.
COLORBLIND = ["#0173b2", "#de8f05", "#029e73", "#d55e00", "#cc78bc",
              "#ca9161", "#fbafe4", "#949494", "#ece133", "#56b4e9"]

# Methods (label, colour, marker, kind, peer) come from the arm registry (benchmarks/arms/registry.py): one fixed
# colour and marker per method in every figure; peers (an outside implementation of a method) are drawn hollow and
# dashed, so that a peer that reproduces the method exactly does not hide it.
LINESTYLES = ["-", "--", ":", "-."]
# phases are not methods: a sequential palette so that no phase is read as a method colour
PHASES = [("generation", "generation"), ("reward", "reward scoring"),
          ("forward", "reference / value forward"), ("update", "update / train step"), ("other", "other")]
PHASE_COLORS = ["#00204d", "#414d6b", "#7c7b78", "#bcaf6f", "#e6e6e6"]
PHASE_HATCH = ["", "///", "", "...", ""]


def method_color(method: str) -> str:
    """The colour of ``method`` in every figure (hex). Unknown methods get a stable spare colour."""
    return registry.method(method).color


def method_marker(method: str) -> str:
    return registry.method(method).marker


def method_filled(method: str) -> bool:
    return registry.method(method).peer_of is None


def method_linestyle(method: str, i: int = 0) -> str:
    """Line style of the ``i``-th configuration of ``method`` in one panel (peers start dashed)."""
    return LINESTYLES[(i + (0 if method_filled(method) else 1)) % len(LINESTYLES)]


def is_reference(method: str) -> bool:
    return registry.method(method).kind == "reference"


def method_order() -> list[str]:
    """Every registered method in display order (tables and legends)."""
    return list(registry.methods())


FILLSTYLES = ["full", "bottom", "left", "top", "right"]


def marker_style(method: str, i: int = 0) -> dict:
    """Marker keywords of the ``i``-th variant (e.g. loss type) of ``method`` for ``Axes.plot``: the method's
    colour and marker always; variants differ by fill (full, half-filled...), peers are hollow."""
    color = method_color(method)
    kw = {"marker": method_marker(method), "color": color, "mec": color, "mew": 0.8}
    if not method_filled(method):
        return {**kw, "mfc": "white", "fillstyle": "full", "mew": 1.0}
    fs = FILLSTYLES[i % len(FILLSTYLES)]
    return {**kw, "mfc": color, "fillstyle": fs, "mfcalt": "white"} if fs != "full" else \
        {**kw, "mfc": color, "mec": "white", "mew": 0.4}


def method_label(method: str, loss_type: str | None = None) -> str:
    base = registry.method(method).label
    if loss_type and isinstance(loss_type, str) and loss_type != "sigmoid":
        return f"{base} ({loss_type})"
    return base


def method_rank(method: str) -> int:
    return registry.method(method).order


def _num(x: Any) -> float:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return float("nan")
    return v


def best_of_n_n(row: Mapping) -> int | None:
    """N of a best-of-N arm: its ``bon_n`` column (older runs stored it in ``beta``), else the arm name (``bon-n4``)."""
    for col in ("bon_n", "beta"):
        b = _num(row.get(col))
        if not math.isnan(b):
            return int(round(b))
    m = re.search(r"n(\d+)", str(row.get("arm", "")))
    return int(m.group(1)) if m else None


def config_label(row: Mapping) -> str:
    """A short human label of one arm's hyper-parameters (seed left out), from the typed columns."""
    method = str(row.get("method", ""))
    info = registry.method(method)
    if info.kind == "reference":
        return "SFT"
    if info.kl in ("analytic", "estimated") and best_of_n_n(row):
        return f"Best-of-{best_of_n_n(row)}"
    label = method_label(method, row.get("loss_type"))
    tk = _num(row.get("target_kl"))
    if not math.isnan(tk):
        return f"{label} KL\u2192{tk:g}"
    for col in ("beta", "kl_coef"):
        b = _num(row.get(col))
        if not math.isnan(b):
            return f"{label} \u03b2={b:g}"
    return label


# --------------------------------------------------------------------------------------------- style
def paper_rc() -> dict:
    """rc parameters of every figure (seaborn 'ticks' + 'paper', shrunk to 7-8.5 pt)."""
    import seaborn as sns  # lazy: only the figure functions need it

    rc: dict[str, Any] = {}
    rc.update(sns.axes_style("ticks"))
    rc.update(sns.plotting_context("paper"))
    rc.update({
        "font.family": ["sans-serif"],
        "font.sans-serif": ["DejaVu Sans", "Arial", "Liberation Sans", "sans-serif"],  # DejaVu has π β ‖
        "font.size": 8, "axes.labelsize": 8, "axes.titlesize": 8, "axes.titleweight": "bold",
        "xtick.labelsize": 7, "ytick.labelsize": 7, "legend.fontsize": 7, "legend.title_fontsize": 7,
        "axes.linewidth": 0.6, "lines.linewidth": 1.1, "lines.markersize": 4, "patch.linewidth": 0.5,
        "xtick.major.width": 0.6, "ytick.major.width": 0.6, "xtick.major.size": 2.5, "ytick.major.size": 2.5,
        "xtick.minor.size": 1.5, "ytick.minor.size": 1.5, "axes.spines.top": False, "axes.spines.right": False,
        "axes.grid": True, "grid.color": "#e5e5e5", "grid.linewidth": 0.5, "legend.frameon": False,
        "legend.handlelength": 1.8, "legend.columnspacing": 1.0, "legend.borderaxespad": 0.2,
        "figure.dpi": 100, "savefig.dpi": PNG_DPI, "pdf.fonttype": 42, "ps.fonttype": 42,
        "axes.prop_cycle": mpl.cycler(color=COLORBLIND),
        "errorbar.capsize": 1.5, "figure.constrained_layout.h_pad": 0.03, "figure.constrained_layout.w_pad": 0.03,
    })
    return rc


@contextlib.contextmanager
def paper_style() -> Iterator[None]:
    """Apply :func:`paper_rc` for the duration of a block (figure creation and saving)."""
    with mpl.rc_context(paper_rc()):
        yield


def _new_figure(width: float, height: float) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)  # the Agg backend, attached to this figure only (no pyplot, no global backend switch)
    return fig


def _styled(fn: Callable[..., Figure]) -> Callable[..., Figure]:
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with paper_style():
            return fn(*args, **kwargs)

    return wrapper


def _empty(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=7, color="0.4")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.grid(False)


NUMERIC = ["temperature", "beta", "seed", "gold", "gold_low", "gold_high", "win_vs_sft", "win_vs_sft_low",
           "win_vs_sft_high", "win_vs_chosen", "win_vs_chosen_low", "win_vs_chosen_high", "kl", "kl_low", "kl_high",
           "length", "distinct_1", "distinct_2", "train_s", "train_peak_rss_mb", "train_tokens_per_s",
           "rm_accuracy", "rm_gold_pearson", "target_kl", "kl_coef", "bon_n", "params", "tokens_forward",
           "tokens_trained", "tokens_generated", "flops_own", "flops_shared", "flops"]


def tidy_summary(df: pd.DataFrame) -> pd.DataFrame:
    """Numeric columns as floats (None -> NaN), ``loss_type`` as str."""
    df = df.copy()
    for c in NUMERIC:
        if c in df:
            df[c] = pd.to_numeric(df[c], errors="coerce")
    if "loss_type" in df:
        df["loss_type"] = df["loss_type"].map(lambda x: "" if pd.isna(x) else str(x))
    else:
        df["loss_type"] = ""
    if "method" not in df:
        df["method"] = df["arm"].astype(str).str.split("-").str[0]
    return df


def pick_temperature(df: pd.DataFrame, temperature: float | None = 1.0) -> float:
    """``temperature`` if evaluated, else the evaluated temperature closest to it (the highest if None)."""
    temps = sorted(float(t) for t in pd.unique(df["temperature"].dropna()))
    if not temps:
        return float("nan")
    if temperature is None:
        return temps[-1]
    return min(temps, key=lambda t: (abs(t - temperature), -t))


def loss_variants(df: pd.DataFrame) -> dict[tuple[str, str], int]:
    """Index of each (method, loss type) among its method's loss types (default/sigmoid first): the marker fill
    variant of that loss type in every figure drawn from ``df``."""
    out: dict[tuple[str, str], int] = {}
    for method, g in df.groupby("method", sort=False):
        lts = sorted(pd.unique(g.loss_type.fillna("").astype(str)), key=lambda lt: (lt not in ("", "sigmoid"), lt))
        out.update({(str(method), lt): i for i, lt in enumerate(lts)})
    return out


def _err(v: pd.Series, lo: pd.Series | None, hi: pd.Series | None) -> np.ndarray | None:
    if lo is None or hi is None:
        return None
    low = np.clip(np.nan_to_num((v - lo).to_numpy(float)), 0, None)
    high = np.clip(np.nan_to_num((hi - v).to_numpy(float)), 0, None)
    return np.vstack([low, high])


def _legend_below(fig: Figure, ax, ncol: int | None = None) -> None:
    handles, labels = [], []
    for a in fig.axes:
        for h, lab in zip(*a.get_legend_handles_labels(), strict=True):
            if lab and not lab.startswith("_") and lab not in labels:
                handles.append(h)
                labels.append(lab)
    if handles:
        fig.legend(handles, labels, loc="outside lower center", ncol=ncol or min(3, len(labels)))


# --------------------------------------------------------------------------------------------- figures
@_styled
def frontier(summary_df: pd.DataFrame, temperature: float = 1.0) -> Figure:
    """Gold reward vs KL(π‖π_ref) of every arm and hyper-parameter at one temperature (DPO paper Fig. 2).

    Error bars are the bootstrap 95 % CIs of both axes; points of one method (and loss type) are joined in
    order of KL through the means over seeds; best-of-N points carry their N; SFT sits at KL 0.
    """
    df = tidy_summary(summary_df)
    t = pick_temperature(df, temperature)
    df = df[np.isclose(df.temperature, t)]
    fig = _new_figure(SINGLE_COL_IN, 3.0)
    ax = fig.add_subplot()
    if df.empty:
        _empty(ax, "no evaluated arms")
        return fig
    sft = df[df.method.map(is_reference)]
    if not sft.empty:
        ax.axhline(float(sft.gold.mean()), color=method_color(sft.method.iloc[0]), lw=0.7, ls=(0, (4, 3)), zorder=1)
    variants = loss_variants(df)
    groups = sorted(df.groupby(["method", "loss_type"], sort=False),
                    key=lambda kv: (method_rank(kv[0][0]), kv[0][0], variants[kv[0]]))
    for (method, loss_type), g in groups:
        color, marker = method_color(method), method_marker(method)
        variant = variants[(method, loss_type)]
        ls = method_linestyle(method, variant)
        kl = g.kl.fillna(0.0) if is_reference(method) else g.kl
        filled = method_filled(method)
        ax.errorbar(kl, g.gold, xerr=_err(g.kl, g.get("kl_low"), g.get("kl_high")),
                    yerr=_err(g.gold, g.get("gold_low"), g.get("gold_high")), fmt="none", ecolor=color,
                    elinewidth=0.6, alpha=0.8, zorder=2)
        ax.plot(kl, g.gold, ls="none", ms=6 if marker == "*" else (4.2 if filled else 5.2), zorder=4 if filled else 5,
                label=method_label(method, loss_type), **marker_style(method, variant))
        keys = [c for c in ("beta", "bon_n", "kl_coef", "target_kl") if c in g]
        means = g.groupby(keys, dropna=False)[["kl", "gold"]].mean().sort_values("kl") if keys else g[["kl", "gold"]]
        if len(means) > 1:
            ax.plot(means.kl, means.gold, color=color, ls=ls, lw=0.9, zorder=3)
        if registry.method(method).kl in ("analytic", "estimated"):  # best-of-N: label each point with its N
            for _, r in g.iterrows():
                n = best_of_n_n(r)
                if n:
                    ax.annotate(f"N={n}", (r.kl, r.gold), xytext=(3, 3), textcoords="offset points", fontsize=6,
                                color=color)
    ax.set_xlabel("KL(\u03c0 \u2016 \u03c0$_{ref}$)  [nats / sequence]")
    ax.set_ylabel(f"gold reward  (T = {t:g})")
    ax.margins(x=0.08, y=0.12)
    _legend_below(fig, ax, ncol=3)
    return fig


@_styled
def frontier_envelopes(summary_df: pd.DataFrame, samples: pd.DataFrame | None, temperature: float = 1.0,
                       n_boot: int = 500) -> Figure | str:
    """Each compared family's frontier (upper envelope of its configurations' seed means, gold vs KL) with a
    pointwise two-level (seeds, prompts) bootstrap 95 % band; dots are the configurations, hollow when off the
    front (dominated or over-optimised). The verdict's gaps are computed on these envelopes."""
    from benchmarks.evaluators.frontier import envelope_band
    from benchmarks.evaluators.verdict import compared_families, family_configs

    if samples is None or samples.empty:
        return "no samples.parquet in the run folder"
    df = tidy_summary(summary_df)
    t = pick_temperature(df, temperature)
    df = df[np.isclose(df.temperature, t)]
    smp = samples[np.isclose(samples.temperature, t)]
    fig = _new_figure(SINGLE_COL_IN, 3.0)
    ax = fig.add_subplot()
    fams = compared_families(df)
    if not fams:
        _empty(ax, "no family to compare")
        return fig
    ref = df[df.method.map(is_reference)]
    if not ref.empty:
        ax.axhline(float(ref.gold.mean()), color=method_color(ref.method.iloc[0]), lw=0.7, ls=(0, (4, 3)), zorder=1)
    for fam in fams:
        band = envelope_band(family_configs(smp, df, fam, "kl"), n_boot=n_boot)
        color = method_color(fam)
        ax.fill_between(band["x"], band["low"], band["high"], color=color, alpha=0.18, lw=0, zorder=2)
        ax.plot(band["x"], band["gold"], color=color, lw=1.2, zorder=3, label=method_label(fam))
        front = set(band["front"])
        for (x, y), name in zip(band["points"], band["configs"], strict=True):
            on = name in front
            ax.plot([x], [y], ls="none", marker=method_marker(fam), ms=4.5, color=color,
                    mfc=color if on else "white", zorder=4)
    ax.set_xlabel("KL(\u03c0 \u2016 \u03c0$_{ref}$)  [nats / sequence]")
    ax.set_ylabel(f"gold reward  (T = {t:g})")
    ax.margins(x=0.06, y=0.1)
    _legend_below(fig, ax, ncol=3)
    return fig


@_styled
def gold_vs_flops(summary_df: pd.DataFrame, temperature: float = 1.0) -> Figure:
    """Gold reward against the estimated training compute of each arm (FLOPs, log axis: 2N per forward and
    generated token, 6N per trained token, shared stages such as the reward model counted in full), at one
    temperature; the reference's gold is the dashed line. Arms without compute records are left out."""
    df = tidy_summary(summary_df)
    df = df[np.isclose(df.temperature, pick_temperature(df, temperature))]
    fig = _new_figure(SINGLE_COL_IN, 3.0)
    ax = fig.add_subplot()
    flops = pd.to_numeric(df.get("flops"), errors="coerce") if "flops" in df else pd.Series(np.nan, index=df.index)
    ref = df[df.method.map(is_reference)]
    pts = df[~df.method.map(is_reference) & (flops > 0)].assign(flops=flops)
    if pts.empty:
        _empty(ax, "no compute records (runs made before compute accounting)")
        return fig
    if not ref.empty:
        ax.axhline(float(ref.gold.mean()), color=method_color(ref.method.iloc[0]), lw=0.7, ls=(0, (4, 3)), zorder=1)
    variants = loss_variants(pts)
    for (method, loss_type), g in sorted(pts.groupby(["method", "loss_type"], sort=False),
                                         key=lambda kv: (method_rank(kv[0][0]), kv[0][0], variants[kv[0]])):
        color = method_color(method)
        ax.errorbar(g.flops, g.gold, yerr=_err(g.gold, g.get("gold_low"), g.get("gold_high")), fmt="none",
                    ecolor=color, elinewidth=0.6, alpha=0.8, zorder=2)
        ax.plot(g.flops, g.gold, ls="none", ms=4.2 if method_filled(method) else 5.2, zorder=4,
                label=method_label(method, loss_type), **marker_style(method, variants[(method, loss_type)]))
    ax.set_xscale("log")
    ax.set_xlabel("training compute of the arm [FLOPs, estimated]")
    ax.set_ylabel("gold reward")
    _legend_below(fig, ax, ncol=2)
    return fig


def cost_table(summary_df: pd.DataFrame, temperature: float = 1.0) -> pd.DataFrame:
    """One row per arm at the headline temperature: tokens, FLOPs (own and with shared stages), wall time, peak
    memory, gold; ordered like every table."""
    df = tidy_summary(summary_df)
    df = df[np.isclose(df.temperature, pick_temperature(df, temperature))]
    cols = ["arm", "method", "params", "tokens_forward", "tokens_trained", "tokens_generated", "flops_own", "flops",
            "train_s", "train_peak_rss_mb", "gold"]
    out = df.reindex(columns=cols).copy()
    out["_o"] = out.method.map(method_rank)
    return out.sort_values(["_o", "arm"]).drop(columns="_o").reset_index(drop=True)


@_styled
def win_vs_temperature(summary_df: pd.DataFrame) -> Figure:
    """Win rate vs the SFT reference against sampling temperature, one line per arm, CIs as error bars
    (DPO paper Fig. 3). With a single temperature the arms are points dodged around it."""
    df = tidy_summary(summary_df)
    df = df[~df.method.map(is_reference)].dropna(subset=["win_vs_sft", "temperature"])
    fig = _new_figure(SINGLE_COL_IN, 3.0)
    ax = fig.add_subplot()
    ax.axhline(0.5, color=method_color("sft"), lw=0.7, ls=(0, (4, 3)), zorder=1, label="SFT (= 0.5)")
    if df.empty:
        _empty(ax, "no arm besides SFT")
        return fig
    temps = sorted(pd.unique(df.temperature))
    gap = float(np.min(np.diff(temps))) if len(temps) > 1 else 0.5
    variants = loss_variants(df)
    first = lambda g: g.iloc[0]  # noqa: E731
    arms = sorted(df.groupby("arm", sort=False), key=lambda kv: (
        method_rank(first(kv[1]).method), variants.get((first(kv[1]).method, str(first(kv[1]).loss_type)), 0),
        np.nan_to_num(_num(first(kv[1]).get("beta")), nan=0.0), kv[0]))
    n = len(arms)
    width = 0.3 * gap
    style_idx: dict[str, dict[str, int]] = {}
    for i, (_arm, g) in enumerate(arms):
        g = g.sort_values("temperature")
        method = g.method.iloc[0]
        label = config_label(g.iloc[0])
        per_method = style_idx.setdefault(method, {})
        ls = method_linestyle(method, per_method.setdefault(label, len(per_method)))
        dx = (i - (n - 1) / 2) * (width / max(n - 1, 1)) if n > 1 else 0.0
        x = g.temperature.to_numpy(float) + dx
        color = method_color(method)
        mk = marker_style(method, variants.get((method, str(g.loss_type.iloc[0])), 0))
        mk.pop("color")
        ax.errorbar(x, g.win_vs_sft, yerr=_err(g.win_vs_sft, g.get("win_vs_sft_low"), g.get("win_vs_sft_high")),
                    color=color, ms=3.6, ls=ls if len(g) > 1 else "none", lw=0.9, elinewidth=0.6, label=label, **mk)
    ax.set_xticks(temps)
    ax.set_xticklabels([f"{t:g}" for t in temps])
    ax.set_xlim(temps[0] - 0.6 * gap, temps[-1] + 0.6 * gap)
    ax.set_xlabel("sampling temperature")
    ax.set_ylabel("win rate vs SFT")
    ax.margins(y=0.15)
    _legend_below(fig, ax, ncol=2)
    return fig


def _family(method: str | None, df: pd.DataFrame) -> str | None:
    """Which row of the training-curve figure an arm goes to: the registry's curve layout of its method."""
    layout = registry.method(method).curves if method else None
    if layout == "preference" or (layout is None and "rewards/margins" in df):
        return "dpo"
    if layout == "rl" or (layout is None and "objective/kl" in df):
        return "ppo"
    return None


def _smooth(y: pd.Series) -> tuple[pd.Series, bool]:
    w = max(1, len(y) // 15)
    return (y.rolling(w, min_periods=1).mean(), True) if w > 1 else (y, False)


@_styled
def training_curves(curves: Mapping[str, pd.DataFrame], methods: Mapping[str, str]) -> Figure:
    """Small multiples of training curves: DPO-family arms (reward margin, reward accuracy, loss vs examples
    seen) on the first row, PPO-family arms (RM score, KL, gold reward if logged vs episodes seen) on the
    second. Long curves are shown raw (faint) plus a running mean."""
    fams = {a: _family(methods.get(a), df) for a, df in curves.items()}
    dpo = sorted((a for a, f in fams.items() if f == "dpo"), key=lambda a: (method_rank(methods.get(a, "")), a))
    ppo = sorted((a for a, f in fams.items() if f == "ppo"), key=lambda a: (method_rank(methods.get(a, "")), a))
    has_gold = any("objective/gold" in curves[a] for a in ppo)
    rows: list[tuple[str, list[str], list[tuple[str, str]], tuple[str, str]]] = []
    if dpo:
        rows.append(("DPO", dpo, [("rewards/margins", "reward margin"), ("rewards/accuracies", "reward accuracy"),
                                  ("loss", "loss")], ("examples_seen", "step")))
    if ppo:
        rows.append(("PPO", ppo, [("objective/scores", "RM score"), ("objective/kl", "KL(\u03c0\u2016\u03c0$_{ref}$)")]
                     + ([("objective/gold", "gold reward")] if has_gold else []), ("episodes_seen", "iteration")))
    fig = _new_figure(DOUBLE_COL_IN, 0.9 + 1.65 * max(len(rows), 1))
    if not rows:
        _empty(fig.add_subplot(), "no DPO or PPO training curves")
        return fig
    axes = fig.subplots(len(rows), 3, squeeze=False)
    many = len(dpo) + len(ppo) > 12  # a big sweep: one legend entry per method, not per arm
    for r, (fam, arms, metrics, (xcol, xfallback)) in enumerate(rows):
        style_idx: dict[str, int] = {}
        styles = {}
        for a in arms:
            m = methods.get(a, "")
            styles[a] = method_linestyle(m, style_idx.setdefault(m, 0))
            style_idx[m] += 1
        for c in range(3):
            ax = axes[r, c]
            if c >= len(metrics):
                ax.set_visible(False)
                continue
            key, title = metrics[c]
            ax.set_title(f"{fam} \u00b7 {title}", loc="left")
            ax.set_ylabel(key, fontsize=6.5, color="0.35")
            drawn, fallback = False, False
            for a in arms:
                df = curves[a]
                if key not in df:
                    continue
                x_name = xcol if xcol in df else xfallback
                fallback |= x_name != xcol
                d = df[[x_name, key]].apply(pd.to_numeric, errors="coerce").dropna()
                if d.empty:
                    continue
                color = method_color(methods.get(a, ""))
                y, smoothed = _smooth(d[key])
                if smoothed:
                    ax.plot(d[x_name], d[key], color=color, lw=0.5, alpha=0.25)
                ax.plot(d[x_name], y, color=color, ls=styles[a], lw=1.0,
                        label=method_label(methods.get(a, "")) if many else a)
                drawn = True
            if not drawn:
                _empty(ax, f"{key} not logged")
            ax.set_xlabel(xcol.replace("_", " ") + (f" (or {xfallback})" if fallback else ""))
            if key == "rewards/accuracies":
                ax.set_ylim(-0.03, 1.03)
            ax.ticklabel_format(axis="x", style="sci", scilimits=(-3, 4), useMathText=True)
    _legend_below(fig, axes[0, 0], ncol=4)
    return fig


@_styled
def ppo_run(curve_df: pd.DataFrame, title: str | None = None, method: str = "ppo") -> Figure:
    """One PPO run across iterations: gold reward (``objective/gold`` if logged, else the reward model's
    ``objective/scores``) on the left axis, KL(π‖π_ref) on the right; so a reader can see it learned."""
    fig = _new_figure(SINGLE_COL_IN, 2.4)
    ax = fig.add_subplot()
    df = curve_df.copy()
    xcol = "iteration" if "iteration" in df else ("episodes_seen" if "episodes_seen" in df else None)
    ykey = "objective/gold" if "objective/gold" in df and df["objective/gold"].notna().any() else "objective/scores"
    if xcol is None or ykey not in df:
        _empty(ax, "no PPO curve")
        return fig
    if xcol == "iteration" and "iteration" not in curve_df:
        df["iteration"] = np.arange(1, len(df) + 1)
    color, kl_color = method_color(method), "#333333"
    d = df[[xcol, ykey] + (["objective/kl"] if "objective/kl" in df else [])].apply(pd.to_numeric, errors="coerce")
    y, smoothed = _smooth(d[ykey])
    ax.plot(d[xcol], d[ykey], color=color, marker="o", ms=2.4, lw=0.6 if smoothed else 1.2,
            alpha=0.5 if smoothed else 1.0, zorder=3)
    if smoothed:
        ax.plot(d[xcol], y, color=color, lw=1.4, zorder=3)
    ax.set_ylabel("gold reward" if ykey == "objective/gold" else "RM score (objective/scores)", color=color)
    ax.tick_params(axis="y", colors=color)
    ax.set_xlabel("PPO iteration" if xcol == "iteration" else "episodes seen")
    if "objective/kl" in d:
        ax2 = ax.twinx()
        ax2.grid(False)
        ax2.spines["right"].set_visible(True)
        ax2.plot(d[xcol], d["objective/kl"], color=kl_color, ls="--", lw=1.0, marker="s", ms=1.8)
        ax2.set_ylabel("KL(\u03c0 \u2016 \u03c0$_{ref}$)", color=kl_color)
        ax2.tick_params(axis="y", colors=kl_color)
    if title:
        ax.set_title(title, loc="left", fontsize=7, fontweight="normal")
    return fig


def phase_table(stages: Mapping[str, Any]) -> pd.DataFrame:
    """Per-arm phase seconds and peak memory from ``stages.json`` (the whole file or its ``stages`` mapping).

    PPO arms log generation / reward / ref+value forward / update (``other`` = train total minus those);
    DPO arms log the reference log-probs (forward) and the train loop (update); other arms the train total.
    """
    st = stages.get("stages", stages) if isinstance(stages, Mapping) else {}
    if any("/" in k for k in st) or "sft" in st:  # stage names: keep the arm stages only
        recs = {k[4:]: v for k, v in st.items() if k.startswith("arm/")}
    else:  # already a mapping arm -> stage record
        recs = dict(st)
    rows = []
    for arm, rec in recs.items():
        if not isinstance(rec, Mapping):
            continue
        s = rec.get("summary") or {}
        g = lambda k, s=s: _num(s.get(k))  # noqa: E731
        ppo_keys = ("time/generation_s", "time/reward_s", "time/ref_value_forward_s", "time/update_s")
        row = {"arm": arm, "method": s.get("method", rec.get("method", arm.split("-")[0])),
               "peak_rss_mb": _num(rec.get("peak_rss_mb")), "wall_s": _num(rec.get("wall_s")),
               "train_s": g("time/train_s")}
        if any(k in s for k in ppo_keys):
            row.update(generation=g(ppo_keys[0]), reward=g(ppo_keys[1]), forward=g(ppo_keys[2]), update=g(ppo_keys[3]))
            parts = np.nansum([row["generation"], row["reward"], row["forward"], row["update"]])
            row["other"] = max(row["train_s"] - parts, 0.0) if not math.isnan(row["train_s"]) else 0.0
        else:
            row.update(generation=0.0, reward=0.0, forward=g("time/reference_s"), update=row["train_s"], other=0.0)
        rows.append(row)
    cols = ["arm", "method", "generation", "reward", "forward", "update", "other", "train_s", "peak_rss_mb", "wall_s"]
    df = pd.DataFrame(rows, columns=cols)
    if not df.empty:
        df["_o"] = df.method.map(method_rank)
        df = df.sort_values(["_o", "arm"]).drop(columns="_o").reset_index(drop=True)
    return df


@_styled
def phase_bars(stages_summary: Mapping[str, Any]) -> Figure:
    """Left: per-phase training wall seconds of each arm as stacked horizontal bars. Right: peak process
    RSS per arm stage (n/a where the stage was reused from the cache and never measured)."""
    df = phase_table(stages_summary)
    n = max(len(df), 1)
    fig = _new_figure(DOUBLE_COL_IN, 0.95 + 0.2 * n)
    ax, ax2 = fig.subplots(1, 2, width_ratios=[2.2, 1], sharey=True)
    if df.empty:
        _empty(ax, "no arm stages")
        _empty(ax2, "")
        return fig
    y = np.arange(len(df))[::-1]
    left = np.zeros(len(df))
    for (key, label), color, hatch in zip(PHASES, PHASE_COLORS, PHASE_HATCH, strict=True):
        v = np.nan_to_num(df[key].to_numpy(float))
        if not v.any():
            continue
        ax.barh(y, v, left=left, color=color, hatch=hatch, edgecolor="white", lw=0.4, height=0.7, label=label)
        left += v
    for yi, tot in zip(y, left, strict=True):
        ax.text(tot, yi, f" {tot:.3g} s", va="center", ha="left", fontsize=6)
    ax.set_xlim(0, max(left.max(), 1e-9) * 1.18)
    ax.set_yticks(y)
    ax.set_yticklabels(df.arm)
    for tick, m in zip(ax.get_yticklabels(), df.method, strict=True):
        tick.set_color(method_color(m))
    ax.set_xlabel("training wall seconds per phase")
    ax.grid(axis="y", visible=False)
    fig.legend(loc="outside upper center", ncol=5)
    rss = df.peak_rss_mb.to_numpy(float)
    ax2.barh(y, np.nan_to_num(rss), color=[method_color(m) for m in df.method], height=0.7, edgecolor="white", lw=0.4)
    top = np.nanmax(rss) if np.isfinite(rss).any() else 1.0
    for yi, v in zip(y, rss, strict=True):
        ax2.text(0 if math.isnan(v) else v, yi, " n/a (cached)" if math.isnan(v) else f" {v:,.0f}", va="center",
                 ha="left", fontsize=6, color="0.4" if math.isnan(v) else "0.15")
    ax2.set_xlim(0, top * 1.35)
    ax2.set_xlabel("peak RSS [MiB]")
    ax2.grid(axis="y", visible=False)
    ax2.tick_params(axis="y", left=False)
    return fig


# --------------------------------------------------------------------------------------------- run folder
@dataclass
class RunData:
    """Everything the report reads from one run folder."""

    run_dir: Path
    summary: dict
    arms: pd.DataFrame
    by_config: pd.DataFrame | None
    samples: pd.DataFrame | None
    stages: dict
    curves: dict[str, pd.DataFrame] = field(default_factory=dict)
    methods: dict[str, str] = field(default_factory=dict)
    config_text: str | None = None
    config: dict | None = None
    missing_curves: list[str] = field(default_factory=list)


def load_run(run_dir: str | Path) -> RunData:
    """Read the run folder only (never the cache): ``summary.json`` (or ``summary.csv``), ``samples.parquet``,
    ``stages.json``, ``resolved_config.yaml`` and ``curves/<arm>.jsonl``. A stage reused from the cache has the peak
    memory measured when it really ran (``first_run`` in ``stages.json``)."""
    run_dir = Path(run_dir)
    from benchmarks.results import check_same_run

    check_same_run(run_dir)
    summary: dict = {}
    if (run_dir / "summary.json").exists():
        summary = json.loads((run_dir / "summary.json").read_text())
        registry.remember(summary.get("methods") or {})  # plug-in methods this process has not imported
        arms = pd.DataFrame(summary.get("arms", []))
    elif (run_dir / "summary.csv").exists():
        arms = pd.read_csv(run_dir / "summary.csv")
    else:
        raise FileNotFoundError(f"{run_dir}: no summary.json or summary.csv (is this a run folder?)")
    arms = tidy_summary(arms) if not arms.empty else arms
    by_config = None
    if summary.get("by_config"):
        by_config = pd.DataFrame(summary["by_config"])
    elif (run_dir / "by_config.csv").exists():
        by_config = pd.read_csv(run_dir / "by_config.csv")
    samples = pd.read_parquet(run_dir / "samples.parquet") if (run_dir / "samples.parquet").exists() else None
    stages = json.loads((run_dir / "stages.json").read_text()) if (run_dir / "stages.json").exists() else {}
    config_text = config = None
    if (run_dir / "resolved_config.yaml").exists():
        import yaml

        config_text = (run_dir / "resolved_config.yaml").read_text()
        with contextlib.suppress(yaml.YAMLError):
            config = yaml.safe_load(config_text)
    config = config or stages.get("config")
    run = RunData(run_dir, summary, arms, by_config, samples, stages, config_text=config_text, config=config)
    if not arms.empty:
        run.methods.update(dict(zip(arms.arm, arms.method, strict=True)))
    dpo_bs = ((config or {}).get("dpo") or {}).get("batch_size")
    for name, rec in (stages.get("stages") or {}).items():
        if not name.startswith("arm/") or not isinstance(rec, dict):
            continue
        arm = name[4:]
        s = rec.get("summary") or {}
        run.methods.setdefault(arm, s.get("method", arm.split("-")[0]))
        first = rec.get("first_run") or {}
        if rec.get("peak_rss_mb") is None and first.get("peak_rss_mb") is not None:
            rec["peak_rss_mb"] = first["peak_rss_mb"]
            rec["peak_rss_source"] = "first run (stage reused from the cache)"
        curve = run_dir / "curves" / f"{arm.replace('/', '__')}.jsonl"
        if not curve.exists():
            run.missing_curves.append(arm)
            continue
        with open(curve, encoding="utf-8") as f:
            df = pd.DataFrame([json.loads(line) for line in f if line.strip()])
        # a peer that logs optimizer steps only (TRL): its global batch is the suite's dpo.batch_size
        if "examples_seen" not in df and "step" in df and registry.method(run.methods[arm]).curves == "preference" and dpo_bs:
            df["examples_seen"] = pd.to_numeric(df["step"], errors="coerce") * int(dpo_bs)
        run.curves[arm] = df
    return run


def headline_temperature(arms: pd.DataFrame) -> float:
    """The temperature of the headline table (``benchmarks.utils.headline_temperature``)."""
    return utils.headline_temperature(pd.unique(arms["temperature"].dropna())) if not arms.empty else float("nan")


def pick_ppo_arm(run: RunData) -> str | None:
    """The PPO run shown on its own: the first PPO arm with a curve (proxy-RM PPO before the others)."""
    cands = [a for a, m in run.methods.items() if registry.method(m).curves == "rl" and a in run.curves]
    cands.sort(key=lambda a: (method_rank(run.methods[a]), a))
    return cands[0] if cands else None


FIGURE_CAPTIONS = {
    "frontier": "Gold reward vs KL(\u03c0\u2016\u03c0_ref) for every arm and hyper-parameter at the headline temperature; "
                "bars are bootstrap 95 % CIs over prompts, lines join one method's configurations in order of KL, "
                "the dashed line is the SFT reference.",
    "win_vs_temperature": "Win rate against the SFT reference's sample for the same prompt (ties count \u00bd) "
                          "across sampling temperatures, bootstrap 95 % CIs; the dashed line is 0.5.",
    "training_curves": "Training curves: DPO-family arms against examples seen, PPO-family arms against episodes "
                       "(prompts) seen; faint lines are raw logs, solid lines a running mean.",
    "ppo_run": "One PPO run: reward (left axis) and KL to the reference (right axis, dashed) per iteration.",
    "phase_bars": "Training wall seconds per phase (left) and peak process RSS per arm stage (right).",
    "frontier_envelopes": "Each compared family's frontier: the upper envelope of its configurations (seed means; "
                          "hollow markers are dominated configurations), with a pointwise 95 % band from a two-level "
                          "bootstrap (seeds within each configuration, then prompts shared by all arms). The verdict "
                          "compares these envelopes over the KL range both families cover.",
    "gold_vs_flops": "Gold reward against each arm's estimated compute (2N FLOPs per forward or generated token, 6N "
                     "per trained token; the reward model and pi_ref's log-probs counted in full for every arm that "
                     "needs them; evaluation left out, except for best-of-N, whose procedure is its evaluation).",
}


def _save(fig: Figure, path: Path, fmt: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    meta = {"CreationDate": None} if fmt == "pdf" else {"Software": None}
    try:
        fig.savefig(tmp, format=fmt, dpi=PNG_DPI, metadata=meta)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def make_figures(run: RunData, temperature: float | None = None) -> tuple[dict[str, dict[str, Path]], dict[str, str]]:
    """Draw and write every figure of ``run``; returns (``{name: {"pdf": path, "png": path}}``,
    ``{name: why it was not drawn}``). One failing figure does not stop the others."""
    out = run.run_dir / "figures"
    out.mkdir(parents=True, exist_ok=True)
    t = headline_temperature(run.arms) if temperature is None else temperature
    ppo_arm = pick_ppo_arm(run)
    makers: dict[str, Callable[[], Figure] | str] = {
        "frontier": lambda: frontier(run.arms, temperature=t),
        "win_vs_temperature": lambda: win_vs_temperature(run.arms),
        "training_curves": (lambda: training_curves(run.curves, run.methods)) if run.curves else "no training curves found",
        "ppo_run": (lambda: ppo_run(run.curves[ppo_arm], title=ppo_arm, method=run.methods[ppo_arm]))
        if ppo_arm else "no PPO arm with a training curve",
        "phase_bars": lambda: phase_bars(run.stages) if run.stages else "no stages.json",
        "gold_vs_flops": lambda: gold_vs_flops(run.arms, temperature=t),
        "frontier_envelopes": lambda: frontier_envelopes(run.arms, run.samples, temperature=t),
    }
    paths: dict[str, dict[str, Path]] = {}
    errors: dict[str, str] = {}
    if run.arms.empty:
        makers["frontier"] = makers["win_vs_temperature"] = makers["frontier_envelopes"] = "no evaluated arms"
    for name, make in makers.items():
        if isinstance(make, str):
            errors[name] = make
            continue
        try:
            fig = make()
            if isinstance(fig, str):
                errors[name] = fig
                continue
            with paper_style():
                paths[name] = {}
                for fmt in ("pdf", "png"):
                    _save(fig, out / f"{name}.{fmt}", fmt)
                    paths[name][fmt] = out / f"{name}.{fmt}"
        except Exception as e:  # a report with one missing figure beats no report
            paths.pop(name, None)
            errors[name] = f"{type(e).__name__}: {e}"
    return paths, errors


def save_all(run_dir: str | Path, temperature: float | None = None) -> dict[str, dict[str, Path]]:
    """Load ``run_dir``, draw every figure and write ``run_dir/figures/<name>.{pdf,png}`` (PNG at 200 dpi),
    each atomically. Returns ``{name: {"pdf": path, "png": path}}`` for the figures drawn."""
    paths, errors = make_figures(load_run(run_dir), temperature)
    for name, why in errors.items():
        print(f"[report] figure {name} not drawn: {why}")
    return paths
