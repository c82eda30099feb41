"""DPO step time: our DPOTrainer vs TRL 1.16's DPOTrainer vs the bare compute floor, on one CPU workload.

Run ``python -m benchmarks.perf.dpo_vs_trl`` (``--help`` for the flags). It prints a table and writes JSON
(default ``results/perf/dpo_vs_trl.json``, atomically).

Workload (identical for every variant)
    A Llama-style model from ``build_tiny_llama`` (default 4 layers, hidden 256, 4 heads, intermediate 1024,
    vocab 4096: ~5 M parameters, the size of the tiny models the suites train) with random weights and a
    byte-level BPE tokenizer trained on Debian fortunes, saved once with ``save_pretrained`` to a temp folder
    that every worker loads (TRL needs a loadable folder / an explicit ``ref_model``). Preference pairs:
    prompt = a 2-8-token prefix of a fortune, chosen / rejected = two different 10-40-token snippets of other
    fortunes (only their lengths matter; fixed seed). Batch 8 pairs per optimiser step, sequential order (no
    shuffle), fp32, AdamW lr 1e-6, weight decay 0, constant schedule, gradient clipping 1.0, no gradient
    checkpointing, same ``max_length`` (no pair is truncated), beta 0.1, sigmoid loss.

Variants
    trl             TRL DPOTrainer, live reference model (``ref_model`` passed, ``precompute_ref_log_probs=False``),
                    ``bf16=False``, ``use_cpu=True``, ``gradient_checkpointing=False``.
    trl_precompute  the same with ``precompute_ref_log_probs=True`` (no reference model kept; the precompute pass
                    is timed separately, not per step).
    ours            our DPOTrainer, packed prompt-sharing padding-free layout, reference log-probs precomputed
                    with the policy itself before training (timed separately).
    ours_padded     our DPOTrainer, padded [2B, T] layout (the loop "as usually defined").
    floor           the compute floor as usually defined: forward + backward + clip + AdamW step of the policy
                    alone on the same padded [2B, T] batch (chosen rows then rejected rows), no reference, a
                    trivial loss (mean sequence log-prob).
    ours_bf16       ours with CPU bf16 autocast; its losses / log-probs are compared with ours in fp32.

Methodology
    * Every (variant, repeat) runs in a fresh process (``--worker VARIANT``), so allocator state, caches, lazy
      imports and peak RSS of one variant cannot leak into another. Threads are pinned (``--threads``,
      ``OMP_NUM_THREADS``/``MKL_NUM_THREADS`` in the child's environment).
    * Runs are interleaved across repeats (trl, trl_precompute, ours, ..., trl, trl_precompute, ...) so that
      slow drifts of a shared machine hit every variant alike.
    * A step's time is the wall time between the ends of consecutive optimiser steps (``time.perf_counter``),
      i.e. everything a step costs inside the training loop: collation of the batch, forwards, backward,
      clipping, optimiser, the trainer's own logging. For TRL the step ends are taken in a ``TrainerCallback``
      (``on_step_end``); its ``on_step_begin``..``on_step_end`` time (which leaves out TRL's batch fetch and
      logging) is reported too as ``trl*_core_s_per_step``. The first ``--warmup-steps`` steps are dropped,
      each worker reports the median of the rest, and across repeats the median (with min and max) of those
      medians is reported.
    * Peak RSS is the process's VmHWM during training (reset with ``reset_peak_rss`` after loading the model
      and data and, where there is one, after precomputing the reference); the whole-process peak (setup and
      reference precompute included) is kept too as ``*_process_peak_rss_mb``.
    * tokens_per_step counts the real (non-pad) tokens of a step's batch in the padded layout, prompt counted
      twice (as TRL processes them); tokens/s of every variant divides this same useful-token count by its
      step time. The tokens the packed layout actually computes are reported as packed_tokens_per_step.
    * Each worker records its per-step losses and first-step log-probs: trl, ours and ours_padded must agree
      (same weights, same first batch) -- a check that all variants did the same work.

Why no absolute assertions
    Absolute times depend on the CPU, its load (this machine is shared) and library versions; the test
    (tests/test_perf_bench.py) only checks that the benchmark runs, writes well-formed numbers and that the
    variants compute the same loss. Speed claims come from this command run on a quiet machine, with the
    provenance (versions, threads, CPU model, load average) stored next to the numbers.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
VARIANTS = ("trl", "trl_precompute", "ours", "ours_padded", "floor", "ours_bf16")
DEFAULT_VARIANTS = VARIANTS
QUICK_VARIANTS = ("trl", "trl_precompute", "ours", "ours_padded", "floor")
DEFAULT_OUT = "results/perf/dpo_vs_trl.json"


# ================================================================================================ workload
def build_workload(cfg: dict, workdir: Path) -> dict:
    """Tokenizer + model saved to ``workdir/model``, preference rows to ``workdir/pairs.json``; returns stats."""
    from benchmarks.tasks.corpus import load_documents
    from benchmarks.tasks.models import build_tiny_llama, n_params, train_tokenizer

    docs = load_documents("fortunes", min_chars=20, max_chars=400, limit=cfg["docs_limit"])
    tok = train_tokenizer(docs, vocab_size=cfg["vocab"])
    model = build_tiny_llama(tok, n_layers=cfg["layers"], hidden_size=cfg["hidden"], n_heads=cfg["heads"],
                             intermediate_size=cfg["intermediate"], max_position_embeddings=cfg["max_position"],
                             seed=cfg["seed"])
    model_dir = workdir / "model"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)

    rng = random.Random(cfg["seed"])
    enc = [tok(d, add_special_tokens=False)["input_ids"] for d in docs]
    pmin, pmax = cfg["prompt_tokens"]
    cmin, cmax = cfg["completion_tokens"]
    long_enough = [i for i, e in enumerate(enc) if len(e) >= cmax]
    if not long_enough:
        raise RuntimeError(f"no fortune has {cmax} tokens; lower --completion-tokens")

    def snippet() -> str:
        n = rng.randint(cmin, cmax)
        e = enc[rng.choice(long_enough)]
        s = rng.randint(0, len(e) - n)
        return tok.decode(e[s : s + n])

    n_pairs = (cfg["warmup_steps"] + cfg["steps"]) * cfg["batch_size"]
    rows = []
    while len(rows) < n_pairs:
        e = enc[rng.randrange(len(enc))]
        if len(e) < pmin + 1:
            continue
        prompt = tok.decode(e[: rng.randint(pmin, min(pmax, len(e) - 1))])
        chosen, rejected = snippet(), snippet()
        if chosen == rejected or not prompt.strip():
            continue
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    (workdir / "pairs.json").write_text(json.dumps(rows))
    return {"n_params": n_params(model), "n_pairs": n_pairs, "n_docs": len(docs), **token_stats(tok, rows, cfg)}


def token_stats(tok, rows: list[dict], cfg: dict) -> dict:
    """Tokens per timed step: real tokens in the padded layout (prompt twice), packed tokens, computed positions."""
    from methods.dpo.batching import make_batch
    from methods.dpo.trainer import tokenize_pairs

    ex, n_cut = tokenize_pairs(tok, rows, max_length=cfg["max_length"], truncation_mode="keep_start")
    if n_cut:
        raise RuntimeError(f"{n_cut} pairs truncated at max_length={cfg['max_length']}; raise --max-length")
    B, w = cfg["batch_size"], cfg["warmup_steps"]
    steps = [ex[i * B : (i + 1) * B] for i in range(w, w + cfg["steps"])]
    padded_real = [sum(e.n_tokens_padded_layout for e in s) for s in steps]
    packed_real = [sum(e.n_tokens_packed for e in s) for s in steps]
    padded_pos = [int(make_batch(s, tok.pad_token_id, "padded")["input_ids"].numel()) for s in steps]
    packed_pos = [int(make_batch(s, tok.pad_token_id, "packed", cfg["pack_len"])["input_ids"].numel()) for s in steps]
    lens = [(len(e.prompt), len(e.chosen), len(e.rejected)) for e in ex]
    mean = statistics.fmean
    return {
        "tokens_per_step": mean(padded_real),
        "packed_tokens_per_step": mean(packed_real),
        "padded_positions_per_step": mean(padded_pos),
        "packed_positions_per_step": mean(packed_pos),
        "mean_prompt_tokens": mean(p for p, _, _ in lens),
        "mean_chosen_tokens": mean(c for _, c, _ in lens),
        "mean_rejected_tokens": mean(r for _, _, r in lens),
        "max_pair_row_tokens": max(p + max(c, r) for p, c, r in lens),
    }


# ================================================================================================ shared helpers
# (also used by benchmarks/perf/phases.py: one definition of the DPO "ours" and "floor" loops, of the timing
# statistics and of a worker's environment)
def median(xs: list[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def intervals(t0: float, ends: list[float]) -> list[float]:
    """Durations between consecutive step ends, the first measured from ``t0``."""
    return [b - a for a, b in zip([t0, *ends[:-1]], ends, strict=True)]


def stats(xs: list[float]) -> dict:
    xs = [x for x in xs if x is not None]
    if not xs:
        return {"min": None, "median": None, "max": None, "values": []}
    return {"min": min(xs), "median": median(xs), "max": max(xs), "values": xs}


def worker_env(threads: int) -> dict:
    """Environment of a fresh benchmark worker process: pinned threads, offline, quiet."""
    return dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false",
                HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TQDM_DISABLE="1",
                HF_DATASETS_DISABLE_PROGRESS_BARS="1", TRANSFORMERS_VERBOSITY="error", PYTHONWARNINGS="ignore")


def train_ours(policy, ex: list, pad_id: int, dcfg, *, autocast_factory=None, on_start=None) -> dict:
    """Our DPOTrainer on ``ex``: reference log-probs precomputed with the (initial) policy itself (timed apart),
    then ``dcfg.max_steps`` steps; returns step times (between consecutive step ends), history, precompute time.
    ``on_start()`` runs just before the timed loop (peak-RSS reset)."""
    import contextlib

    from methods.dpo.trainer import DPOTrainer, compute_reference_logps

    ac = autocast_factory or contextlib.nullcontext
    t = time.perf_counter()  # pi_ref == the initial policy: compute the reference with it, keep no copy
    ref = compute_reference_logps(policy, ex, pad_id=pad_id, batch_size=64, autocast=ac(), layout=dcfg.layout)
    precompute_s = time.perf_counter() - t
    trainer = DPOTrainer(policy, ex, ref, dcfg, pad_id=pad_id, autocast=ac())
    ends: list[float] = []
    if on_start is not None:
        on_start()
    t0 = time.perf_counter()
    hist = trainer.train(on_log=lambda rec: ends.append(time.perf_counter()))
    return {"step_s": intervals(t0, ends), "history": hist, "ref_precompute_s": precompute_s}


def train_floor(policy, ex: list, pad_id: int, *, batch_size: int, total_steps: int, lr: float,
                grad_clip: float = 1.0, on_start=None) -> dict:
    """The DPO compute floor as usually defined: forward + backward + clip + AdamW step of the policy alone on
    the padded [2B, T] batch of each step's pairs (chosen rows then rejected rows, sequential batches), no
    reference, a trivial loss (mean sequence log-prob). Returns step times, losses, first-step log-probs."""
    import torch

    from methods.dpo.batching import padded_batch, padded_logps

    opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    B = batch_size
    policy.train()
    losses, ends, first = [], [], None
    if on_start is not None:
        on_start()
    t0 = time.perf_counter()
    for s in range(total_steps):
        batch = padded_batch(ex[s * B : (s + 1) * B], pad_id)
        opt.zero_grad(set_to_none=True)
        cs, rs, _, _ = padded_logps(policy, batch)
        loss = -(cs.sum() + rs.sum()) / (2 * B)  # trivial loss on the sequence log-probs
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), grad_clip)
        opt.step()
        losses.append(loss.item())
        if first is None:
            first = (cs.detach().mean().item(), rs.detach().mean().item())
        ends.append(time.perf_counter())
    return {"step_s": intervals(t0, ends), "losses": losses, "first_logps_chosen": first[0],
            "first_logps_rejected": first[1]}


# ================================================================================================ worker


def _worker_setup(cfg: dict):
    import warnings

    import torch

    warnings.filterwarnings("ignore")
    torch.set_num_threads(cfg["threads"])
    torch.manual_seed(cfg["seed"])
    try:
        import datasets

        datasets.disable_progress_bars()
    except ImportError:
        pass
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()


def _dpo_config(cfg: dict, layout: str):
    from methods.dpo.trainer import DPOConfig

    return DPOConfig(beta=cfg["beta"], loss_type="sigmoid", lr=cfg["lr"], optimizer="adamw", weight_decay=0.0,
                     batch_size=cfg["batch_size"], max_steps=cfg["warmup_steps"] + cfg["steps"], warmup_steps=0,
                     scheduler="constant_with_warmup", grad_clip=1.0, max_length=cfg["max_length"],
                     truncation_mode="keep_start", layout=layout, pack_len=cfg["pack_len"], shuffle=False,
                     seed=cfg["seed"], log_every=1)


def _run_ours(cfg: dict, workdir: Path, rows: list[dict], *, layout: str, bf16: bool) -> dict:
    import torch

    from benchmarks.tasks.models import load_causal_lm
    from benchmarks.utils import peak_rss_mb, reset_peak_rss
    from methods.dpo.trainer import tokenize_pairs

    policy, tok = load_causal_lm(workdir / "model", local_only=True)
    dcfg = _dpo_config(cfg, layout)
    ex, _ = tokenize_pairs(tok, rows, max_length=dcfg.max_length, truncation_mode=dcfg.truncation_mode)
    ac = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else None
    mark: dict = {}

    def start():
        mark["setup"], mark["reset"] = peak_rss_mb(), reset_peak_rss()

    out = train_ours(policy, ex, tok.pad_token_id, dcfg, autocast_factory=ac, on_start=start)
    hist = out["history"]
    return {"step_s": out["step_s"], "losses": [h["loss"] for h in hist],
            "first_logps_chosen": hist[0]["logps/chosen"], "first_logps_rejected": hist[0]["logps/rejected"],
            "ref_precompute_s": out["ref_precompute_s"], "peak_rss_mb": peak_rss_mb(), "peak_rss_reset": mark["reset"],
            "setup_peak_rss_mb": mark["setup"]}


def _run_floor(cfg: dict, workdir: Path, rows: list[dict]) -> dict:
    from benchmarks.tasks.models import load_causal_lm
    from benchmarks.utils import peak_rss_mb, reset_peak_rss
    from methods.dpo.trainer import tokenize_pairs

    policy, tok = load_causal_lm(workdir / "model", local_only=True)
    ex, _ = tokenize_pairs(tok, rows, max_length=cfg["max_length"], truncation_mode="keep_start")
    mark: dict = {}

    def start():
        mark["setup"], mark["reset"] = peak_rss_mb(), reset_peak_rss()

    out = train_floor(policy, ex, tok.pad_token_id, batch_size=cfg["batch_size"],
                      total_steps=cfg["warmup_steps"] + cfg["steps"], lr=cfg["lr"], on_start=start)
    return {**out, "ref_precompute_s": None, "peak_rss_mb": peak_rss_mb(), "peak_rss_reset": mark["reset"],
            "setup_peak_rss_mb": mark["setup"]}


def _run_trl(cfg: dict, workdir: Path, rows: list[dict], *, precompute: bool) -> dict:
    import datasets
    from transformers import TrainerCallback
    from trl import DPOTrainer as TRLDPOTrainer

    from benchmarks.tasks.models import load_causal_lm
    from benchmarks.utils import peak_rss_mb, reset_peak_rss
    from methods.baselines.trl_dpo import trl_config

    policy, tok = load_causal_lm(workdir / "model", local_only=True)
    # live reference: TRL cannot rebuild a reference from a config-built model (quirk 4), so pass one;
    # precompute: no reference kept, TRL precomputes with the (initial) policy, as ours does
    ref = None if precompute else load_causal_lm(workdir / "model", local_only=True)[0]
    dcfg = _dpo_config(cfg, "padded")
    total = cfg["warmup_steps"] + cfg["steps"]
    args = trl_config(dcfg, output_dir=str(workdir / f"trl-out-{os.getpid()}"), device="cpu",
                      precompute_ref=precompute, total_steps=total, dtype="float32", disable_tqdm=True)
    ds = datasets.Dataset.from_list(rows)
    pre = {"s": 0.0}

    class Timed(TRLDPOTrainer):
        def _precompute_ref_logps(self, *a, **kw):
            t = time.perf_counter()
            out = super()._precompute_ref_logps(*a, **kw)
            pre["s"] += time.perf_counter() - t
            return out

    rec: dict = {"begins": [], "ends": [], "logs": []}

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            rec["reset"] = reset_peak_rss()
            rec["t0"] = time.perf_counter()

        def on_step_begin(self, args, state, control, **kw):
            rec["begins"].append(time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            rec["ends"].append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                rec["logs"].append({k: float(v) for k, v in logs.items() if isinstance(v, (int, float))})

    t = time.perf_counter()
    trainer = Timed(model=policy, ref_model=ref, args=args, train_dataset=ds, processing_class=tok, callbacks=[Clock()])
    init_s = time.perf_counter() - t
    process_peak_setup = peak_rss_mb()
    trainer.train()
    logs = rec["logs"]
    if len(logs) != total or len(rec["ends"]) != total:
        raise RuntimeError(f"TRL ran {len(rec['ends'])} steps / logged {len(logs)}, expected {total}")
    return {"step_s": intervals(rec["t0"], rec["ends"]),
            "core_step_s": [e - b for b, e in zip(rec["begins"], rec["ends"], strict=True)],
            "losses": [g["loss"] for g in logs], "first_logps_chosen": logs[0].get("logps/chosen"),
            "first_logps_rejected": logs[0].get("logps/rejected"),
            "ref_precompute_s": pre["s"] if precompute else None, "trainer_init_s": init_s,
            "peak_rss_mb": peak_rss_mb(), "peak_rss_reset": rec.get("reset", False),
            "setup_peak_rss_mb": process_peak_setup}


def run_worker(variant: str, workdir: Path, result: Path) -> None:
    from benchmarks.utils import atomic_write_json, peak_rss_mb

    cfg = json.loads((workdir / "config.json").read_text())
    rows = json.loads((workdir / "pairs.json").read_text())
    _worker_setup(cfg)
    import torch

    load_start = os.getloadavg()[0]
    t = time.perf_counter()
    if variant in ("trl", "trl_precompute"):
        out = _run_trl(cfg, workdir, rows, precompute=variant == "trl_precompute")
    elif variant in ("ours", "ours_padded", "ours_bf16"):
        out = _run_ours(cfg, workdir, rows, layout="padded" if variant == "ours_padded" else "packed",
                        bf16=variant == "ours_bf16")
    elif variant == "floor":
        out = _run_floor(cfg, workdir, rows)
    else:
        raise SystemExit(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")
    w = cfg["warmup_steps"]
    out.update(variant=variant, pid=os.getpid(), threads=torch.get_num_threads(), total_s=time.perf_counter() - t,
               load_avg_start=load_start, load_avg_end=os.getloadavg()[0],
               s_per_step=median(out["step_s"][w:]), first_loss=out["losses"][0],
               process_peak_rss_mb=max(out["setup_peak_rss_mb"], peak_rss_mb()))
    if "core_step_s" in out:
        out["core_s_per_step"] = median(out["core_step_s"][w:])
    atomic_write_json(result, out)


# ================================================================================================ driver
def _spawn(variant: str, workdir: Path, result: Path, threads: int, timeout: float) -> dict:
    env = worker_env(threads)
    cmd = [sys.executable, "-m", "benchmarks.perf.dpo_vs_trl", "--worker", variant, "--workdir", str(workdir),
           "--result", str(result)]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0 or not result.exists():
        tail = "\n".join((p.stderr or p.stdout).strip().splitlines()[-25:])
        raise RuntimeError(f"worker {variant!r} failed (exit {p.returncode}):\n{tail}")
    return json.loads(result.read_text())


def _provenance(threads: int) -> dict:
    import torch
    import transformers

    from benchmarks.machine import cpu_info, kind_of  # the one reader of CPU model and flags

    try:
        import trl

        trl_v = trl.__version__
    except ImportError:
        trl_v = None
    return {"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl_v,
            "python": platform.python_version(), "threads": threads, **cpu_info(),
            "machine_kind": kind_of(cpu_info()), "cpu_count": os.cpu_count(), "platform": platform.platform(),
            "argv": sys.argv[1:]}


def summarise(cfg: dict, work: dict, runs: dict[str, list[dict]], provenance: dict) -> dict:
    tps = work["tokens_per_step"]
    per: dict[str, dict] = {}
    for v, rs in runs.items():
        s = stats([r["s_per_step"] for r in rs])
        per[v] = {
            "s_per_step": s,
            "tokens_per_s": tps / s["median"] if s["median"] else None,
            "peak_rss_mb": stats([r["peak_rss_mb"] for r in rs]),
            "process_peak_rss_mb": stats([r["process_peak_rss_mb"] for r in rs]),
            "ref_precompute_s": stats([r.get("ref_precompute_s") for r in rs]),
            "first_loss": rs[0]["first_loss"],
            "first_logps_chosen": rs[0]["first_logps_chosen"],
            "first_logps_rejected": rs[0]["first_logps_rejected"],
            "losses": rs[0]["losses"],
        }
        if any("core_s_per_step" in r for r in rs):
            per[v]["core_s_per_step"] = stats([r.get("core_s_per_step") for r in rs])
            per[v]["trainer_init_s"] = stats([r.get("trainer_init_s") for r in rs])

    def med(v: str, key: str = "s_per_step"):
        return per[v][key]["median"] if v in per else None

    def ratio(a, b):
        return a / b if a is not None and b else None

    out: dict = {"config": cfg, "workload": work, "provenance": provenance, "variants": per, "runs": runs}
    for v in VARIANTS:
        out[f"{v}_s_per_step"] = med(v)
        out[f"{v}_tokens_per_s"] = per[v]["tokens_per_s"] if v in per else None
        out[f"{v}_peak_rss_mb"] = med(v, "peak_rss_mb")
        out[f"{v}_process_peak_rss_mb"] = med(v, "process_peak_rss_mb")
    for v in ("trl", "trl_precompute"):
        out[f"{v}_core_s_per_step"] = med(v, "core_s_per_step") if v in per else None
    out["tokens_per_step"] = tps
    out["packed_tokens_per_step"] = work["packed_tokens_per_step"]
    out["speedup_vs_trl"] = ratio(med("trl"), med("ours"))
    out["speedup_vs_trl_precompute"] = ratio(med("trl_precompute"), med("ours"))
    out["speedup_padded_vs_trl"] = ratio(med("trl"), med("ours_padded"))
    out["ours_vs_floor"] = ratio(med("ours"), med("floor"))
    out["ours_padded_vs_floor"] = ratio(med("ours_padded"), med("floor"))
    out["trl_vs_floor"] = ratio(med("trl"), med("floor"))
    out["ours_bf16_speedup_vs_ours"] = ratio(med("ours"), med("ours_bf16"))
    out["ours_ref_precompute_s"] = med("ours", "ref_precompute_s") if "ours" in per else None
    out["trl_ref_precompute_s"] = med("trl_precompute", "ref_precompute_s") if "trl_precompute" in per else None
    # parity: same weights + same first batch => same first-step loss and log-probs
    firsts = {v: per[v]["first_loss"] for v in ("trl", "trl_precompute", "ours", "ours_padded") if v in per}
    out["first_step_loss"] = firsts
    out["first_step_loss_max_abs_diff"] = (max(firsts.values()) - min(firsts.values())) if len(firsts) > 1 else None
    lpc = {v: per[v]["first_logps_chosen"] for v in ("trl", "trl_precompute", "ours", "ours_padded", "floor") if v in per}
    out["first_step_logps_chosen"] = lpc
    if "ours_bf16" in per and "ours" in per:
        a, b = per["ours"], per["ours_bf16"]
        out["ours_bf16_loss_max_abs_diff"] = max(abs(x - y) for x, y in zip(a["losses"], b["losses"], strict=False))
        out["ours_bf16_first_logps_chosen_rel_diff"] = abs(b["first_logps_chosen"] / a["first_logps_chosen"] - 1)
    return out


def format_table(res: dict) -> str:
    per = res["variants"]
    trl = res.get("trl_s_per_step")
    head = ["variant", "s/step median (min-max)", "tokens/s", "peak RSS MiB", "speedup vs TRL"]
    lines = []
    for v in VARIANTS:
        if v not in per:
            continue
        s = per[v]["s_per_step"]
        sp = f"{trl / s['median']:.2f}x" if trl and s["median"] else "-"
        lines.append([v, f"{s['median']:.4f} ({s['min']:.4f}-{s['max']:.4f})", f"{per[v]['tokens_per_s']:,.0f}",
                      f"{per[v]['peak_rss_mb']['median']:.0f}", sp])
    widths = [max(len(r[i]) for r in [head, *lines]) for i in range(len(head))]
    fmt = lambda r: " | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))  # noqa: E731
    out = [fmt(head), "-+-".join("-" * w for w in widths), *map(fmt, lines)]
    w, c, p = res["workload"], res["config"], res["provenance"]
    out.append("")
    out.append(f"model {w['n_params'] / 1e6:.2f} M params ({c['layers']} layers x {c['hidden']}), batch {c['batch_size']} pairs, "
               f"{c['steps']} timed steps after {c['warmup_steps']} warm-up, {c['repeats']} repeats, "
               f"threads {p['threads']}, fp32 unless noted")
    out.append(f"tokens/step: {w['tokens_per_step']:.0f} real in the padded layout (computed incl. padding "
               f"{w['padded_positions_per_step']:.0f}); packed layout computes {w['packed_tokens_per_step']:.0f}")
    extra = []
    if res.get("ours_ref_precompute_s") is not None:
        extra.append(f"ours reference precompute {res['ours_ref_precompute_s']:.2f} s")
    if res.get("trl_ref_precompute_s") is not None:
        extra.append(f"TRL precompute_ref_log_probs {res['trl_ref_precompute_s']:.2f} s")
    if res.get("trl_core_s_per_step") is not None:
        extra.append(f"TRL on_step_begin..end {res['trl_core_s_per_step']:.4f} s/step")
    if extra:
        out.append("not per step: " + "; ".join(extra))
    if res.get("first_step_loss_max_abs_diff") is not None:
        out.append(f"first-step loss parity (trl/ours/padded): max |diff| {res['first_step_loss_max_abs_diff']:.2e}")
    if res.get("ours_bf16_loss_max_abs_diff") is not None:
        out.append(f"bf16 accuracy: loss max |diff| vs fp32 {res['ours_bf16_loss_max_abs_diff']:.2e}, first-step "
                   f"chosen log-prob rel diff {res['ours_bf16_first_logps_chosen_rel_diff']:.2e}")
    loads = [r["load_avg_start"] for rs in res["runs"].values() for r in rs]
    if loads:
        out.append(f"1-min load average when workers started: {min(loads):.2f}-{max(loads):.2f} on "
                   f"{p['cpu_count']} CPUs (well above 0 = shared machine, timings inflated)")
    out.append(f"CPU: {p['cpu_model']}; torch {p['torch']}, transformers {p['transformers']}, trl {p['trl']}")
    return "\n".join(out)


def run(args: argparse.Namespace) -> dict:
    cfg = {
        "layers": args.layers, "hidden": args.hidden, "heads": args.heads,
        "intermediate": args.intermediate or 4 * args.hidden, "vocab": args.vocab, "max_position": 512,
        "batch_size": args.batch_size, "steps": args.steps, "warmup_steps": args.warmup_steps, "repeats": args.repeats,
        "threads": args.threads, "lr": args.lr, "beta": args.beta, "max_length": args.max_length,
        "pack_len": args.pack_len, "seed": args.seed, "docs_limit": args.docs_limit,
        "prompt_tokens": list(args.prompt_tokens), "completion_tokens": list(args.completion_tokens),
        "variants": list(args.variants), "quick": args.quick, "optimizer": "adamw", "grad_clip": 1.0,
        "dtype": "float32", "loss_type": "sigmoid",
    }
    if cfg["hidden"] % cfg["heads"]:
        raise SystemExit(f"--hidden {cfg['hidden']} must be divisible by --heads {cfg['heads']}")
    if cfg["steps"] < 1 or cfg["warmup_steps"] < 0 or cfg["repeats"] < 1 or cfg["batch_size"] < 1:
        raise SystemExit("--steps, --repeats and --batch-size must be >= 1, --warmup-steps >= 0")
    import torch
    from transformers.utils import logging as hf_logging

    torch.set_num_threads(args.threads)
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    load_start = os.getloadavg()
    ncpu = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if load_start[0] > 0.5 * ncpu:
        print(f"WARNING: load average {load_start[0]:.2f} on {ncpu} CPUs: other processes are running, step times "
              f"will be inflated and noisy; run on a quiet machine for numbers worth reporting", flush=True)
    workdir = Path(tempfile.mkdtemp(prefix="dpo-vs-trl-"))
    try:
        (workdir / "config.json").write_text(json.dumps(cfg))
        t = time.perf_counter()
        work = build_workload(cfg, workdir)
        print(f"workload: {work['n_params'] / 1e6:.2f} M params, {work['n_pairs']} pairs, "
              f"{work['tokens_per_step']:.0f} tokens/step (padded layout, real), built in {time.perf_counter() - t:.1f} s",
              flush=True)
        runs: dict[str, list[dict]] = {v: [] for v in cfg["variants"]}
        for r in range(cfg["repeats"]):
            for v in cfg["variants"]:
                t = time.perf_counter()
                res = _spawn(v, workdir, workdir / f"{v}-{r}.json", args.threads, args.worker_timeout)
                runs[v].append(res)
                loss = "trivial" if v == "floor" else f"{res['first_loss']:.6f}"
                print(f"  repeat {r + 1}/{cfg['repeats']} {v:<15} {res['s_per_step']:.4f} s/step  "
                      f"peak RSS {res['peak_rss_mb']:.0f} MiB  first loss {loss}  "
                      f"({time.perf_counter() - t:.1f} s)", flush=True)
    finally:
        if args.keep_workdir:
            print(f"workdir kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    res = summarise(cfg, work, runs, _provenance(args.threads))
    res["load_average"] = {"start": list(load_start), "end": list(os.getloadavg())}
    res["created"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    return res


def _check_finite(res: dict) -> None:
    for k, v in res.items():
        if k.endswith("_s_per_step") and v is not None and not (math.isfinite(v) and v > 0):
            raise RuntimeError(f"{k} = {v}: not a positive finite time")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.perf.dpo_vs_trl",
                                 description="DPO step time: ours vs TRL 1.16 DPOTrainer vs the compute floor (CPU).")
    ap.add_argument("--repeats", type=int, default=None, help="fresh processes per variant, interleaved (default 3)")
    ap.add_argument("--steps", type=int, default=None, help="timed optimiser steps per run (default 12)")
    ap.add_argument("--warmup-steps", type=int, default=None, help="untimed steps first (default 3)")
    ap.add_argument("--batch-size", type=int, default=8, help="preference pairs per optimiser step")
    ap.add_argument("--layers", type=int, default=None, help="default 4")
    ap.add_argument("--hidden", type=int, default=None, help="default 256")
    ap.add_argument("--heads", type=int, default=None, help="default 4")
    ap.add_argument("--intermediate", type=int, default=0, help="MLP size; 0 = 4 x hidden")
    ap.add_argument("--vocab", type=int, default=None, help="tokenizer vocabulary (default 4096)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads in every worker, also OMP_NUM_THREADS (default 2; --quick: 1)")
    ap.add_argument("--lr", type=float, default=None, help="AdamW lr of every variant (default 1e-6; --quick: 1e-3)")
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--max-length", type=int, default=128, help="prompt+completion cap (no pair reaches it)")
    ap.add_argument("--pack-len", type=int, default=1024, help="row length of the packed layout")
    ap.add_argument("--prompt-tokens", type=int, nargs=2, default=(2, 8), metavar=("MIN", "MAX"))
    ap.add_argument("--completion-tokens", type=int, nargs=2, default=(10, 40), metavar=("MIN", "MAX"))
    ap.add_argument("--docs-limit", type=int, default=None, help="fortunes read for the tokenizer (default 20000)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--variants", type=lambda s: [x.strip() for x in s.split(",") if x.strip()], default=None,
                    help=f"comma list from {','.join(VARIANTS)} (default all; --quick: all but ours_bf16)")
    ap.add_argument("--out", default=DEFAULT_OUT, help="JSON output path")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run (for the test; timings meaningless): 2 layers x 64, vocab 512, 1 thread, lr 1e-3 "
                         "(so losses move), 2 repeats, 3 steps after 1 warm-up, no ours_bf16")
    ap.add_argument("--worker-timeout", type=float, default=1800.0, help="seconds before a worker is killed")
    ap.add_argument("--keep-workdir", action="store_true", help="keep the temp folder (model, pairs, worker JSON)")
    ap.add_argument("--worker", metavar="VARIANT", help=argparse.SUPPRESS)
    ap.add_argument("--workdir", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    q = args.quick
    defaults = {"repeats": (3, 2), "steps": (12, 3), "warmup_steps": (3, 1), "layers": (4, 2), "hidden": (256, 64),
                "heads": (4, 2), "vocab": (4096, 512), "docs_limit": (20000, 3000), "threads": (2, 1), "lr": (1e-6, 1e-3),
                "variants": (list(DEFAULT_VARIANTS), list(QUICK_VARIANTS))}
    for k, (full, quick) in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, quick if q else full)
    bad = [v for v in args.variants if v not in VARIANTS]
    if bad:
        ap.error(f"unknown variant(s) {bad}; choose from {', '.join(VARIANTS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        if not (args.workdir and args.result):
            raise SystemExit("--worker needs --workdir and --result")
        run_worker(args.worker, Path(args.workdir), Path(args.result))
        return 0
    from benchmarks.utils import atomic_write_json

    res = run(args)
    atomic_write_json(args.out, res)
    print()
    print(format_table(res))
    print(f"\nwrote {args.out}")
    _check_finite(res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
