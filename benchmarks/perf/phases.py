"""Every training / sampling phase of the suites against its compute floor: the ratio of our time to a bare baseline.

Run ``python -m benchmarks.perf.phases`` (``--help`` for the flags; ``make perf`` runs it with the DPO-vs-TRL
benchmark). It prints a table (phase, ours s, floor s, ratio, goal, status) and writes JSON (default
``results/perf/phases.json``, atomically).

Workload
    The tiny model of a suite (default: ``benchmarks/configs/default.yaml``: a Llama-style causal LM of
    ``base.n_layers`` x ``base.hidden_size``, ``base.n_heads`` heads, ``base.intermediate_size``, vocabulary
    ``tokenizer.vocab_size``) built with ``benchmarks.tasks.models.build_tiny_llama`` and random weights (seed
    ``seed``), fp32, no adapters. No tokenizer and no data set: prompts are BOS + 2-8 random token ids
    (``task.prompt_min_tokens``..``prompt_max_tokens``), preference completions random ids + EOS of up to
    ``prefs.max_new_tokens`` tokens; :class:`IdTokenizer` stands in where a method needs a tokenizer (it reads
    text as space-separated ids). Every hyper-parameter that sets the work (batch sizes, rollout/minibatch
    sizes, PPO epochs, new tokens, pooling, layout) is the suite's own (``dpo``, ``rlhf.ppo`` with the first
    ``rlhf.target_kls``, ``rlhf.rm``, ``eval``).

Phases (ours -> floor; each floor does the same work on the same tokens with nothing but the model calls)
    dpo             our DPOTrainer, one optimiser step (the suite's layout, reference log-probs precomputed, not
                    timed) -> forward + backward + clip + AdamW of the policy on the padded [2B, T] batch of the
                    same pairs, trivial loss (``benchmarks.perf.dpo_vs_trl``'s floor: the same helper).
    dpo_reference   the reference log-probs of DPO's pairs, computed once per suite (the ``reflogps`` stage):
                    ``compute_reference_logps`` on 64 pairs (its batch, the suite's layout) -> one bare no-grad
                    forward of the padded [2B, T] batch of the same pairs.
    ppo_generation  PPO's rollout sampling: the trainer's own ``time/generation`` (``methods.sampling.sample``
                    as ``PPOTrainer`` calls it) -> Hugging Face ``model.generate(do_sample=True, use_cache=True,
                    top_k=0, top_p=1.0)`` on the same prompts, same batches, same max_new_tokens / temperature /
                    EOS (pure ancestral sampling, as ours).
    ppo_forwards    PPO's no-grad forwards over the rollouts: ``time/reward`` (reward-model scores) +
                    ``time/ref_value_forward`` (old policy log-probs, reference log-probs, values) -> one bare
                    no-grad forward of each of the four models (policy and reference logits, value model
                    ``token_values``, reward model scores) on the same collated rows.
    ppo_update      all ``ppo_epochs`` x minibatches of one iteration: ``time/update`` -> forward + backward +
                    clip + Adam of policy and value model on the same minibatches (same shuffles and trimming),
                    a trivial loss (mean log-prob + value^2).
    rm              one ``train_reward_model`` step -> forward + backward + clip + AdamW of the reward model on
                    the same [2B, T] rows (chosen then rejected), trivial loss (mean reward).
    eval            evaluation sampling: ``generate_eval_samples``' own ``generation_s`` (what every eval stage
                    runs) -> ``model.generate`` as for ppo_generation on the same prompts.
    The three PPO phases of "ours" come from one PPO trainer run per repeat (one process); every floor is its
    own process. Floor rollouts (ppo_forwards, ppo_update) are sampled with our sampler from the initial policy
    with the trainer's prompts and seeds of each iteration (the ours run samples from the policy being
    trained, so later iterations' tokens can differ slightly; both token counts are recorded).

Goal and status
    ratio = ours median s / floor median s. Goal: ratio <= 1.2 (training and forward phases); generation (ppo_generation,
    eval) >= 0.9x the bare generate speed, i.e. ratio <= 1/0.9. status "pass" or "fail" against it.

Methodology (as ``benchmarks.perf.dpo_vs_trl``)
    * Each (job, repeat) runs in a fresh process (``--worker JOB``) with pinned threads (``--threads``,
      ``OMP_NUM_THREADS``/``MKL_NUM_THREADS``), so allocator state, caches and lazy imports of one cannot leak
      into another. ``--in-process`` runs the jobs in this process instead (fast; for the test).
    * Repeats are interleaved (dpo ours, dpo floor, ppo ours, ppo floors, ..., then again), so slow drifts of a
      shared machine hit ours and the floor alike; ratios are the result, not absolute seconds.
    * Every job runs ``--warmup`` untimed iterations then ``--iters`` timed ones (an iteration = one optimiser
      step, one PPO iteration, one evaluation pass); a worker reports the median of its timed iterations and
      across repeats the median (with min, max, all values) of those is reported.
    * tokens/s divides the phase's token count (documented per phase in the JSON) by its median time.

Never asserts absolute times: the test (tests/test_perf_phases.py) checks the JSON's schema and arithmetic.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from benchmarks.perf.dpo_vs_trl import median, stats, train_floor, train_ours, worker_env

ROOT = Path(__file__).resolve().parents[2]
PHASES = ("dpo", "dpo_reference", "ppo_generation", "ppo_forwards", "ppo_update", "rm", "eval")
GENERATION_PHASES = ("ppo_generation", "eval")
RATIO_GOAL = 1.2
"""Training and forward phases: ours <= 1.2x the floor's time."""
GENERATION_SPEED_GOAL = 0.9
"""Generation phases: ours >= 0.9x the bare ``model.generate`` speed (time ratio <= 1/0.9)."""
DEFAULT_OUT = "results/perf/phases.json"
OURS_JOB = {"dpo": "dpo:ours", "dpo_reference": "dpo_reference:ours", "ppo_generation": "ppo:ours",
            "ppo_forwards": "ppo:ours", "ppo_update": "ppo:ours", "rm": "rm:ours", "eval": "eval:ours"}
"""The job whose process measures "ours" of each phase (one PPO trainer run gives all three PPO phases)."""
TOKENS_MEANING = {
    "dpo": "real tokens of a step's pairs in the padded layout (prompt counted twice)",
    "dpo_reference": "real tokens of a 64-pair batch in the padded layout (prompt counted twice)",
    "ppo_generation": "generated tokens per iteration (EOS included)",
    "ppo_forwards": "real tokens of the rollout rows (each of the 4 models reads them once)",
    "ppo_update": "real tokens of all minibatches of an iteration (forward + backward)",
    "rm": "real tokens of a step's [2B, T] rows",
    "eval": "generated tokens per evaluation pass (EOS included)",
}
IMPL = {
    ("dpo", "ours"): "methods.dpo.trainer.DPOTrainer.train (benchmarks.perf.dpo_vs_trl.train_ours)",
    ("dpo", "floor"): "policy fwd+bwd+clip+AdamW on the padded batch (benchmarks.perf.dpo_vs_trl.train_floor)",
    ("dpo_reference", "ours"): "methods.dpo.trainer.compute_reference_logps (as the reflogps stage calls it)",
    ("dpo_reference", "floor"): "one no-grad forward of the padded [2B, T] batch (batch built in the timing)",
    ("ppo_generation", "ours"): "PPOTrainer time/generation: methods.sampling.sample",
    ("ppo_generation", "floor"): "model.generate(do_sample=True, use_cache=True, top_k=0, top_p=1.0)",
    ("ppo_forwards", "ours"): "PPOTrainer time/reward + time/ref_value_forward",
    ("ppo_forwards", "floor"): "one no-grad forward each: policy, reference, value token_values, reward model",
    ("ppo_update", "ours"): "PPOTrainer time/update",
    ("ppo_update", "floor"): "policy + value fwd+bwd+clip+Adam per minibatch, trivial loss",
    ("rm", "ours"): "methods.rlhf.reward_model.train_reward_model",
    ("rm", "floor"): "reward model fwd+bwd+clip+AdamW on the [2B, T] rows, trivial loss",
    ("eval", "ours"): "benchmarks.evaluators.samples.generate_eval_samples generation_s: methods.sampling.sample",
    ("eval", "floor"): "model.generate(do_sample=True, use_cache=True, top_k=0, top_p=1.0)",
}


def goal_of(phase: str) -> dict:
    if phase in GENERATION_PHASES:
        return {"max_ratio": 1.0 / GENERATION_SPEED_GOAL, "min_speed_vs_floor": GENERATION_SPEED_GOAL,
                "text": f">= {GENERATION_SPEED_GOAL}x generate speed"}
    return {"max_ratio": RATIO_GOAL, "text": f"<= {RATIO_GOAL}x floor"}


def status_of(ratio: float | None, goal: dict) -> str:
    if ratio is None or ratio != ratio:
        return "n/a"
    return "pass" if ratio <= goal["max_ratio"] else "fail"


# ================================================================================================ workload
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2  # the special-token ids of benchmarks.tasks.models.train_tokenizer
FIRST_ID = 3


class IdTokenizer:
    """A stand-in tokenizer over raw token ids: text is space-separated ids, ``tok(text)`` prepends BOS (as the
    suites' tokenizer does), EOS is the text " 2". Enough for every method that wants a tokenizer."""

    pad_token_id, bos_token_id, eos_token_id = PAD_ID, BOS_ID, EOS_ID
    eos_token = f" {EOS_ID}"

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size

    def __len__(self) -> int:
        return self.vocab_size

    def __call__(self, text: str, **_) -> dict:
        return {"input_ids": [BOS_ID] + [int(x) for x in text.split()]}

    @staticmethod
    def text(ids) -> str:
        return "".join(f" {int(i)}" for i in ids)

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.text(i for i in ids if not (skip_special_tokens and i < FIRST_ID))

    def batch_decode(self, rows, skip_special_tokens: bool = False) -> list[str]:
        return [self.decode(r, skip_special_tokens) for r in rows]


def _rng(cfg: dict, what: str) -> random.Random:
    return random.Random(f"{cfg['seed']}/{what}")


def _ids(rng: random.Random, cfg: dict, n: int) -> list[int]:
    return [rng.randrange(FIRST_ID, cfg["model"]["vocab_size"]) for _ in range(n)]


def make_prompts(cfg: dict, n: int, what: str) -> list[list[int]]:
    """``n`` prompts: BOS + prompt_tokens[0]..[1] random ids."""
    rng = _rng(cfg, f"prompts/{what}")
    lo, hi = cfg["prompt_tokens"]
    return [[BOS_ID, *_ids(rng, cfg, rng.randint(lo, hi))] for _ in range(n)]


def make_pairs(cfg: dict, n: int, what: str) -> list:
    """``n`` preference pairs (PairExample): a prompt, two completions of completion_tokens random ids + EOS."""
    from methods.data import PairExample

    rng = _rng(cfg, f"pairs/{what}")
    lo, hi = cfg["completion_tokens"]
    prompts = make_prompts(cfg, n, f"pairs/{what}")
    return [PairExample(p, [*_ids(rng, cfg, rng.randint(lo, hi)), EOS_ID], [*_ids(rng, cfg, rng.randint(lo, hi)), EOS_ID])
            for p in prompts]


def build_policy(cfg: dict):
    from benchmarks.tasks.models import build_tiny_llama

    m = cfg["model"]
    model = build_tiny_llama(IdTokenizer(m["vocab_size"]), n_layers=m["n_layers"], hidden_size=m["hidden_size"],
                             n_heads=m["n_heads"], intermediate_size=m["intermediate_size"],
                             max_position_embeddings=m["max_position_embeddings"], seed=cfg["seed"])
    return model.eval()


def _series(times: list[float], tokens: list[int], **extra) -> dict:
    if len(times) != len(tokens):
        raise RuntimeError(f"{len(times)} times but {len(tokens)} token counts")
    return {"iter_s": [float(t) for t in times], "iter_tokens": [int(n) for n in tokens], **extra}


def _total(cfg: dict) -> int:
    return cfg["warmup"] + cfg["iters"]


# ================================================================================================ jobs: DPO
def job_dpo(cfg: dict, variant: str) -> dict:
    from methods.dpo.trainer import DPOConfig

    total = _total(cfg)
    dcfg = DPOConfig(**{**cfg["dpo"], "max_steps": total, "shuffle": False, "log_every": 1})
    B = dcfg.batch_size
    ex = make_pairs(cfg, total * B, "dpo")
    tokens = [sum(e.n_tokens_padded_layout for e in ex[s * B : (s + 1) * B]) for s in range(total)]
    policy = build_policy(cfg)
    if variant == "ours":
        out = train_ours(policy, ex, PAD_ID, dcfg)
        return {"dpo": _series(out["step_s"], tokens, ref_precompute_s=out["ref_precompute_s"])}
    out = train_floor(policy, ex, PAD_ID, batch_size=B, total_steps=total, lr=dcfg.lr, grad_clip=dcfg.grad_clip)
    return {"dpo": _series(out["step_s"], tokens)}


def job_dpo_reference(cfg: dict, variant: str) -> dict:
    import inspect

    import torch

    from methods.dpo.batching import padded_batch
    from methods.dpo.trainer import compute_reference_logps

    B = inspect.signature(compute_reference_logps).parameters["batch_size"].default  # as the reflogps stage
    total = _total(cfg)
    ex = make_pairs(cfg, total * B, "reference")
    model = build_policy(cfg)
    times, tokens = [], []
    for it in range(total):
        chunk = ex[it * B : (it + 1) * B]
        t = time.perf_counter()
        if variant == "ours":
            compute_reference_logps(model, chunk, pad_id=PAD_ID, layout=cfg["dpo"]["layout"])
        else:
            b = padded_batch(chunk, PAD_ID)
            with torch.no_grad():
                model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False)
        times.append(time.perf_counter() - t)
        tokens.append(sum(e.n_tokens_padded_layout for e in chunk))
    return {"dpo_reference": _series(times, tokens)}


# ================================================================================================ jobs: PPO
def _ppo_trainer(cfg: dict):
    """The PPO trainer of the ours run (and, for the floors, its prompts/seeds/models): policy, pi_ref copy, a
    reward model made from pi_ref (the suite's pooling), the value model a copy of it, RM scores as reward."""
    from methods.rlhf.ppo import PPOConfig, PPOTrainer
    from methods.rlhf.reward_model import ScalarRewardModel, make_reward_fn, value_model_from_reward_model

    total = _total(cfg)
    pcfg = PPOConfig(**{**cfg["ppo"], "iterations": total})
    policy = build_policy(cfg)
    ref = copy.deepcopy(policy)
    rm = ScalarRewardModel.from_causal_lm(policy, pooling=cfg["rm"]["pooling"], init_seed=cfg["seed"]).eval()
    value = value_model_from_reward_model(rm) if pcfg.value_model == "separate" else None
    prompts = make_prompts(cfg, pcfg.rollout_batch_size * total, "ppo")
    tok = IdTokenizer(cfg["model"]["vocab_size"])
    # reward_norm_stats "given": the arm reads the RM's gain and bias from the arm/rm-scale stage; timings do not
    # depend on them, so the identity scale stands in
    scale = (0.0, 1.0) if pcfg.reward_norm and pcfg.reward_norm_stats == "given" else None
    tr = PPOTrainer(policy, ref, make_reward_fn(rm, pad_id=PAD_ID), value, tok, prompts, pcfg, "cpu",
                    reward_scale=scale)
    return tr, rm


def _ppo_iteration_prompts(tr, it: int) -> tuple[list[list[int]], list[int]]:
    """Prompts and per-row sampling seeds of PPO iteration ``it``, as ``PPOTrainer._iteration`` draws them."""
    from methods.sampling import derive_seed

    slots = tr._prompt_slots(it)
    return [tr.prompts[i] for i in slots], [derive_seed(tr.cfg.seed, 2, it, i, j) for j, i in enumerate(slots)]


def _ppo_rollouts(tr, it: int):
    """The collated rollout rows of iteration ``it`` sampled by our sampler from the current policy (untimed)."""
    from methods.data import collate
    from methods.sampling import sample

    prompts, seeds = _ppo_iteration_prompts(tr, it)
    cfg = tr.cfg
    s = sample(tr.policy, prompts, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, seeds=seeds,
               eos_token_id=EOS_ID, pad_token_id=PAD_ID, batch_size=cfg.generation_batch_size)
    comps = [c + [EOS_ID] if e else list(c) for c, e in zip(s.completions, s.ended, strict=True)]
    return prompts, comps, collate(prompts, comps, PAD_ID)


def job_ppo_ours(cfg: dict) -> dict:
    tr, _ = _ppo_trainer(cfg)
    hist = tr.train()
    gen = [r["time/generation"] for r in hist]
    fwd = [r["time/reward"] + r["time/ref_value_forward"] for r in hist]
    upd = [r["time/update"] for r in hist]
    return {
        "ppo_generation": _series(gen, [r["tokens/generated"] for r in hist]),
        "ppo_forwards": _series(fwd, [r["tokens/sequence"] for r in hist],
                                reward_s=[r["time/reward"] for r in hist],
                                ref_value_forward_s=[r["time/ref_value_forward"] for r in hist]),
        "ppo_update": _series(upd, [r["tokens/update"] for r in hist], minibatch_updates=[r["policy/updates"] for r in hist]),
        "iteration_s": [r["time/iteration"] for r in hist],
    }


def generate_floor(model, prompts: list[list[int]], *, max_new_tokens: int, temperature: float, batch_size: int,
                   eos_token_id: int = EOS_ID, pad_token_id: int = PAD_ID) -> int:
    """Bare Hugging Face sampling: ``model.generate(do_sample=True, use_cache=True)`` on left-padded batches of the
    prompts (longest first, ``batch_size`` rows, as our sampler batches them), no top-k / top-p (pure ancestral
    sampling like ours), stopping at EOS or ``max_new_tokens``. Returns the generated tokens (EOS included)."""
    import torch

    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    n_tok = 0
    for b0 in range(0, len(order), batch_size):
        rows = [prompts[i] for i in order[b0 : b0 + batch_size]]
        L = max(len(p) for p in rows)
        ids = torch.full((len(rows), L), pad_token_id, dtype=torch.long)
        attn = torch.zeros((len(rows), L), dtype=torch.long)
        for r, p in enumerate(rows):
            ids[r, L - len(p) :] = torch.tensor(p)
            attn[r, L - len(p) :] = 1
        out = model.generate(input_ids=ids, attention_mask=attn, do_sample=True, use_cache=True,
                             max_new_tokens=max_new_tokens, temperature=temperature, top_k=0, top_p=1.0,
                             eos_token_id=eos_token_id, pad_token_id=pad_token_id)
        for row in out[:, L:].tolist():
            n_tok += row.index(eos_token_id) + 1 if eos_token_id in row else len(row)
    return n_tok


def job_ppo_generation_floor(cfg: dict) -> dict:
    import torch

    tr, _ = _ppo_trainer(cfg)
    pcfg = tr.cfg
    times, tokens = [], []
    for it in range(1, _total(cfg) + 1):
        prompts, _ = _ppo_iteration_prompts(tr, it)
        torch.manual_seed(cfg["seed"] + it)
        t = time.perf_counter()
        n = generate_floor(tr.policy, prompts, max_new_tokens=pcfg.max_new_tokens, temperature=pcfg.temperature,
                           batch_size=pcfg.generation_batch_size)
        times.append(time.perf_counter() - t)
        tokens.append(n)
    return {"ppo_generation": _series(times, tokens)}


def job_ppo_forwards_floor(cfg: dict) -> dict:
    import torch

    tr, rm = _ppo_trainer(cfg)
    times, tokens = [], []
    for it in range(1, _total(cfg) + 1):
        _, _, b = _ppo_rollouts(tr, it)
        ids, attn = b["input_ids"], b["attention_mask"]
        with torch.no_grad():
            t = time.perf_counter()
            tr.policy(input_ids=ids, attention_mask=attn, use_cache=False)
            tr.ref_model(input_ids=ids, attention_mask=attn, use_cache=False)
            if tr.value_model is not None:
                tr.value_model.token_values(ids, attn)
            rm(ids, attn)
            times.append(time.perf_counter() - t)
        tokens.append(int(attn.sum()))
    return {"ppo_forwards": _series(times, tokens)}


def job_ppo_update_floor(cfg: dict) -> dict:
    import torch

    from methods.logprobs import token_logps
    from methods.sampling import derive_seed

    tr, _ = _ppo_trainer(cfg)
    pcfg = tr.cfg
    R, M = pcfg.rollout_batch_size, pcfg.minibatch_size
    policy, value = tr.policy, tr.value_model
    params = [p for p in policy.parameters() if p.requires_grad]
    if value is not None:
        params += [p for p in value.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=pcfg.lr, eps=pcfg.adam_eps)
    times, tokens = [], []
    for it in range(1, _total(cfg) + 1):
        _, _, b = _ppo_rollouts(tr, it)
        ids, attn, labels = b["input_ids"], b["attention_mask"], b["labels"]
        n_tok = 0
        t = time.perf_counter()
        for epoch in range(pcfg.ppo_epochs):  # the trainer's minibatch shuffles and trimming
            perm = torch.randperm(R, generator=torch.Generator().manual_seed(derive_seed(pcfg.seed, 3, it, epoch)))
            for m0 in range(0, R, M):
                mb = perm[m0 : m0 + M]
                T = int(attn[mb].sum(1).max())
                mids, mattn, mlab = ids[mb, :T], attn[mb, :T], labels[mb, :T]
                lp, mask = token_logps(policy(input_ids=mids, attention_mask=mattn, use_cache=False).logits, mlab)
                loss = -lp.sum() / mask.sum()
                if value is not None:
                    v = value.token_values(mids, mattn)[:, :-1]
                    loss = loss + pcfg.vf_coef * (v * mask).pow(2).sum() / mask.sum()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, pcfg.grad_clip)
                opt.step()
                n_tok += int(attn[mb].sum())
        times.append(time.perf_counter() - t)
        tokens.append(n_tok)
    return {"ppo_update": _series(times, tokens)}


# ================================================================================================ jobs: RM
def job_rm(cfg: dict, variant: str) -> dict:
    import torch

    from methods.data import collate
    from methods.rlhf.reward_model import RewardModelConfig, ScalarRewardModel, train_reward_model

    total = _total(cfg)
    rcfg = RewardModelConfig(**{**cfg["rm"], "epochs": 1.0, "log_every": 1})
    B = rcfg.batch_size
    pairs = make_pairs(cfg, total * B, "rm")
    order = list(range(len(pairs)))
    random.Random(rcfg.seed * 1000 + 0).shuffle(order)  # train_reward_model's first-epoch order
    steps = [[pairs[i] for i in order[s * B : (s + 1) * B]] for s in range(total)]
    tokens = [2 * sum(len(e.prompt) for e in st) + sum(len(e.chosen) + len(e.rejected) for e in st) for st in steps]
    rm = ScalarRewardModel.from_causal_lm(build_policy(cfg), pooling=rcfg.pooling, init_seed=rcfg.seed)
    if variant == "ours":
        tok = IdTokenizer(cfg["model"]["vocab_size"])
        rows = [{"prompt": tok.text(e.prompt[1:]), "chosen": tok.text(e.chosen[:-1]), "rejected": tok.text(e.rejected[:-1])}
                for e in pairs]
        ends: list[float] = []
        t0 = time.perf_counter()
        hist, _ = train_reward_model(rm, tok, rows, None, rcfg, "cpu", on_log=lambda r: ends.append(time.perf_counter()))
        if [h["tokens_seen"] for h in hist] != [sum(tokens[: s + 1]) for s in range(total)]:
            raise RuntimeError("train_reward_model saw other tokens than the floor's batches")
        return {"rm": _series([b - a for a, b in zip([t0, *ends[:-1]], ends, strict=True)], tokens)}
    params = [p for p in rm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=rcfg.lr, weight_decay=rcfg.weight_decay)
    rm.train()
    times = []
    for st in steps:
        t = time.perf_counter()
        b = collate([e.prompt for e in st] * 2, [e.chosen for e in st] + [e.rejected for e in st], PAD_ID)
        loss = rm(b["input_ids"], b["attention_mask"]).mean()  # trivial loss on the [2B] rewards
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, rcfg.grad_clip)
        opt.step()
        times.append(time.perf_counter() - t)
    return {"rm": _series(times, tokens)}


# ================================================================================================ jobs: eval
def _eval_prompts(cfg: dict) -> list[list[int]]:
    return make_prompts(cfg, cfg["eval"]["n_prompts"], "eval")


def job_eval(cfg: dict, variant: str) -> dict:
    import inspect

    import torch

    from methods.sampling import sample

    e = cfg["eval"]
    model = build_policy(cfg)
    prompts = _eval_prompts(cfg)
    times, tokens = [], []
    if variant == "ours":
        from benchmarks.evaluators.samples import generate_eval_samples

        tok = IdTokenizer(cfg["model"]["vocab_size"])
        ref = copy.deepcopy(model)
        rows = [{"prompt_id": f"eval-{i}", "prompt": tok.text(p[1:]), "prompt_ids": p} for i, p in enumerate(prompts)]
        for _ in range(_total(cfg)):
            _, timing = generate_eval_samples(model, ref, tok, rows, temperatures=[e["temperature"]], n=e["samples_per_prompt"],
                                              max_new_tokens=e["max_new_tokens"], seed=e["seed"],
                                              gold_fn=lambda texts, prompts: [0.0] * len(texts))
            times.append(timing["generation_s"])
            tokens.append(timing["new_tokens"])
        return {"eval": _series(times, tokens)}
    batch = inspect.signature(sample).parameters["batch_size"].default  # the sampler's batches, as eval calls it
    rows = [p for p in prompts for _ in range(e["samples_per_prompt"])]
    for it in range(_total(cfg)):
        torch.manual_seed(cfg["seed"] + it)
        t = time.perf_counter()
        n = generate_floor(model, rows, max_new_tokens=e["max_new_tokens"], temperature=e["temperature"], batch_size=batch)
        times.append(time.perf_counter() - t)
        tokens.append(n)
    return {"eval": _series(times, tokens)}


# ================================================================================================ worker
JOBS = {
    "dpo:ours": lambda cfg: job_dpo(cfg, "ours"),
    "dpo:floor": lambda cfg: job_dpo(cfg, "floor"),
    "dpo_reference:ours": lambda cfg: job_dpo_reference(cfg, "ours"),
    "dpo_reference:floor": lambda cfg: job_dpo_reference(cfg, "floor"),
    "ppo:ours": job_ppo_ours,
    "ppo_generation:floor": job_ppo_generation_floor,
    "ppo_forwards:floor": job_ppo_forwards_floor,
    "ppo_update:floor": job_ppo_update_floor,
    "rm:ours": lambda cfg: job_rm(cfg, "ours"),
    "rm:floor": lambda cfg: job_rm(cfg, "floor"),
    "eval:ours": lambda cfg: job_eval(cfg, "ours"),
    "eval:floor": lambda cfg: job_eval(cfg, "floor"),
}


def _setup(cfg: dict) -> None:
    import warnings

    import torch
    from transformers.utils import logging as hf_logging

    warnings.filterwarnings("ignore")
    torch.set_num_threads(cfg["threads"])
    torch.manual_seed(cfg["seed"])
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def run_job(job: str, cfg: dict) -> dict:
    """Run one job (in this process) -> {phase: {iter_s, iter_tokens, ...}, ...} plus provenance."""
    if job not in JOBS:
        raise SystemExit(f"unknown job {job!r}; choose from {', '.join(JOBS)}")
    _setup(cfg)
    import contextlib

    import torch

    load = os.getloadavg()[0]
    t = time.perf_counter()
    # bfloat16: the whole job under CPU bf16 autocast with fp32 weights, as `dtype: bfloat16` runs the stages (the
    # trainers' own autocast argument is left unset, so this context is the one that applies)
    ac = torch.autocast("cpu", dtype=torch.bfloat16) if cfg.get("dtype") == "bfloat16" else contextlib.nullcontext()
    with ac:
        out = JOBS[job](cfg)
    out.update(job=job, pid=os.getpid(), threads=torch.get_num_threads(), dtype=cfg.get("dtype", "float32"),
               total_s=time.perf_counter() - t,
               load_avg_start=load, load_avg_end=os.getloadavg()[0])
    return out


def _spawn(job: str, workdir: Path, result: Path, threads: int, timeout: float) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.perf.phases", "--worker", job, "--workdir", str(workdir),
           "--result", str(result)]
    p = subprocess.run(cmd, cwd=ROOT, env=worker_env(threads), capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0 or not result.exists():
        tail = "\n".join((p.stderr or p.stdout).strip().splitlines()[-25:])
        raise RuntimeError(f"worker {job!r} failed (exit {p.returncode}):\n{tail}")
    return json.loads(result.read_text())


# ================================================================================================ driver
def build_config(args: argparse.Namespace) -> dict:
    """The resolved workload: the suite's model and hyper-parameters, with the command line's overrides."""
    from benchmarks.config import load_suite
    from benchmarks.utils import headline_temperature

    c = load_suite(args.suite)
    if c.dpo is None or c.rlhf is None:
        raise SystemExit(f"suite {args.suite!r} has no dpo or rlhf section: pick one with both (e.g. default)")
    ppo = asdict(c.rlhf.ppo)
    if c.rlhf.target_kls:
        ppo["target_kl"] = c.rlhf.target_kls[0]  # the PPO arms of the grid run the adaptive controller
    dpo = asdict(c.dpo.arm_config(c.dpo.loss_type, c.dpo.betas[0], c.seed))
    cfg = {
        "suite": args.suite, "seed": c.seed, "threads": args.threads, "warmup": args.warmup, "iters": args.iters,
        "repeats": args.repeats, "phases": list(args.phases), "dtype": getattr(args, "dtype", "float32"),
        "in_process": args.in_process,
        "model": {"n_layers": c.base.n_layers, "hidden_size": c.base.hidden_size, "n_heads": c.base.n_heads,
                  "intermediate_size": c.base.intermediate_size, "vocab_size": c.tokenizer.vocab_size,
                  "max_position_embeddings": c.base.max_position_embeddings},
        "prompt_tokens": [c.task.prompt_min_tokens, c.task.prompt_max_tokens],
        "completion_tokens": [max(1, c.prefs.max_new_tokens // 3), c.prefs.max_new_tokens],
        "dpo": dpo, "ppo": ppo, "rm": asdict(c.rlhf.rm),
        "eval": {"n_prompts": c.task.n_eval_prompts, "samples_per_prompt": c.eval.samples_per_prompt,
                 "max_new_tokens": c.eval.max_new_tokens, "temperature": headline_temperature(c.eval.temperatures),
                 "seed": c.eval.seed},
    }
    if args.tiny:  # a seconds-long smoke workload (the test): timings meaningless
        cfg["model"].update(n_layers=2, hidden_size=32, n_heads=2, intermediate_size=64, vocab_size=128,
                            max_position_embeddings=64)
        cfg["completion_tokens"] = [2, 6]
        cfg["dpo"].update(batch_size=4)
        cfg["ppo"].update(rollout_batch_size=8, minibatch_size=4, ppo_epochs=2, max_new_tokens=6)
        cfg["rm"].update(batch_size=4)
        cfg["eval"].update(n_prompts=8, max_new_tokens=6)
    return cfg


def _jobs(phases: list[str]) -> list[str]:
    """One repeat's job order: each phase's ours job (once, shared by the PPO phases) then its floor."""
    out: list[str] = []
    for ph in phases:
        for j in (OURS_JOB[ph], f"{ph}:floor"):
            if j not in out:
                out.append(j)
    return out


def summarise(cfg: dict, runs: dict[str, list[dict]], machine: dict, provenance: dict) -> dict:
    w = cfg["warmup"]
    phases: dict[str, dict] = {}
    for ph in cfg["phases"]:
        side: dict[str, dict] = {}
        for variant, job in (("ours", OURS_JOB[ph]), ("floor", f"{ph}:floor")):
            series = [r[ph] for r in runs[job]]
            per_repeat = [median(s["iter_s"][w:]) for s in series]
            s = stats(per_repeat)
            tokens = median([median(s_["iter_tokens"][w:]) for s_ in series])
            side[variant] = {"impl": IMPL[(ph, variant)], "s": s, "s_median": s["median"],
                             "iterations_s": [s_["iter_s"] for s_ in series], "tokens": tokens,
                             "tokens_per_s": tokens / s["median"] if s["median"] else None}
        o, f = side["ours"]["s_median"], side["floor"]["s_median"]
        ratio = o / f if o is not None and f else None
        goal = goal_of(ph)
        phases[ph] = {"ours": side["ours"], "floor": side["floor"], "ratio": ratio,
                      "speed_vs_floor": 1.0 / ratio if ratio else None, "goal": goal,
                      "status": status_of(ratio, goal), "tokens_meaning": TOKENS_MEANING[ph]}
    return {"config": cfg, "machine": machine, "provenance": provenance, "phases": phases, "runs": runs,
            "all_pass": all(p["status"] == "pass" for p in phases.values())}


def format_table(res: dict) -> str:
    head = ["phase", "ours s", "floor s", "ratio", "goal", "status"]
    lines = []
    for ph, p in res["phases"].items():
        lines.append([ph, f"{p['ours']['s_median']:.4f}", f"{p['floor']['s_median']:.4f}",
                      f"{p['ratio']:.2f}x" if p["ratio"] is not None else "-", p["goal"]["text"], p["status"]])
    widths = [max(len(r[i]) for r in [head, *lines]) for i in range(len(head))]
    fmt = lambda r: " | ".join(c.ljust(w) if i in (0, 4, 5) else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))  # noqa: E731
    out = [fmt(head), "-+-".join("-" * w for w in widths), *map(fmt, lines)]
    c, m, p = res["config"], res["machine"], res["provenance"]
    mm = c["model"]
    out.append("")
    out.append(f"suite {c['suite']}: {mm['n_layers']} layers x {mm['hidden_size']}, vocab {mm['vocab_size']}, "
               f"{'bf16 autocast' if c.get('dtype') == 'bfloat16' else 'fp32'}; "
               f"{c['iters']} timed iterations after {c['warmup']} warm-up, {c['repeats']} interleaved repeats "
               f"({'in one process' if c['in_process'] else 'fresh process per job'}), threads {c['threads']}")
    out.append(f"machine kind {m.get('kind')}: {m.get('cpu_model')}; fp32 matmul probe "
               f"{(m.get('probe_gflops') or {}).get('float32')} GFLOP/s; load average {p['load_average']['start'][0]:.2f} "
               f"at start on {p['cpu_count']} CPUs (ratios are measured interleaved; absolute seconds are not the result)")
    return "\n".join(out)


def run(args: argparse.Namespace) -> dict:
    cfg = build_config(args)
    import torch
    import transformers

    from benchmarks.machine import machine_info

    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()
    ncpu = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if load_start[0] > 0.5 * ncpu:
        print(f"WARNING: load average {load_start[0]:.2f} on {ncpu} CPUs: other processes are running; the ratios "
              "are measured interleaved but stay noisy", flush=True)
    jobs = _jobs(cfg["phases"])
    runs: dict[str, list[dict]] = {j: [] for j in jobs}
    workdir = Path(tempfile.mkdtemp(prefix="perf-phases-"))
    try:
        (workdir / "config.json").write_text(json.dumps(cfg))
        for r in range(cfg["repeats"]):
            for j in jobs:
                t = time.perf_counter()
                if args.in_process:
                    res = run_job(j, cfg)
                else:
                    res = _spawn(j, workdir, workdir / f"{j.replace(':', '-')}-{r}.json", cfg["threads"], args.worker_timeout)
                runs[j].append(res)
                meds = ", ".join(f"{ph} {median(res[ph]['iter_s'][cfg['warmup']:]):.4f} s" for ph in cfg["phases"] if ph in res)
                print(f"  repeat {r + 1}/{cfg['repeats']} {j:<22} {meds}  ({time.perf_counter() - t:.1f} s)", flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    provenance = {"torch": torch.__version__, "transformers": transformers.__version__,
                  "python": platform.python_version(), "threads": args.threads, "cpu_count": os.cpu_count(),
                  "platform": platform.platform(), "argv": sys.argv[1:],
                  "load_average": {"start": list(load_start), "end": list(os.getloadavg())},
                  "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    return summarise(cfg, runs, dict(machine_info("cpu")), provenance)


def run_grid(args: argparse.Namespace) -> dict:
    """``run`` at every (dtype, threads) of ``--dtypes`` x ``--thread-counts``: the first combination's result is
    the top level of the JSON (as a single run writes it), every combination's is in ``grid``."""
    results = []
    for dtype in args.dtypes:
        for threads in args.thread_counts:
            print(f"== dtype {dtype}, {threads} thread(s)", flush=True)
            a = argparse.Namespace(**{**vars(args), "threads": threads, "dtype": dtype})
            results.append(run(a))
    out = dict(results[0])
    out["grid"] = [{"dtype": r["config"]["dtype"], "threads": r["config"]["threads"], "phases": r["phases"],
                    "all_pass": r["all_pass"], "load_average": r["provenance"]["load_average"]} for r in results]
    return out


def format_grid(res: dict) -> str:
    """Phase x (dtype, threads): ours s, its ratio to the floor, and ours' tokens/s."""
    grid = res["grid"]
    cols = [f"{g['dtype'][:4]}/{g['threads']}t" for g in grid]
    head = ["phase", *[f"{c} ours s (ratio, tok/s)" for c in cols]]
    rows = []
    for ph in res["phases"]:
        row = [ph]
        for g in grid:
            p = g["phases"][ph]
            tps = p["ours"]["tokens_per_s"]
            row.append(f"{p['ours']['s_median']:.4f} ({p['ratio']:.2f}x, {tps:,.0f})" if p["ratio"] else "-")
        rows.append(row)
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    fmt = lambda r: " | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))  # noqa: E731
    ref = grid[0]
    speed = []
    for g in grid[1:]:
        parts = [f"{ph} {ref['phases'][ph]['ours']['s_median'] / g['phases'][ph]['ours']['s_median']:.2f}x"
                 for ph in res["phases"] if g["phases"][ph]["ours"]["s_median"]]
        speed.append(f"  {g['dtype']}/{g['threads']}t vs {ref['dtype']}/{ref['threads']}t (ours, time ratio): " + ", ".join(parts))
    return "\n".join([fmt(head), "-+-".join("-" * w for w in widths), *map(fmt, rows), "", *speed])


def _phase_list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.perf.phases",
                                 description="Each training/sampling phase vs its compute floor (ratio to a bare baseline).")
    ap.add_argument("--phases", type=_phase_list, default=list(PHASES), help=f"comma list from {','.join(PHASES)} (default all)")
    ap.add_argument("--repeats", type=int, default=3, help="fresh processes per job, interleaved (default 3)")
    ap.add_argument("--iters", type=int, default=None, help="timed iterations per job (default 4; --tiny: 1)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed iterations first (default 1)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads per worker (default 2; --tiny: 1)")
    ap.add_argument("--dtypes", type=_phase_list, default=["float32"],
                    help="comma list of float32,bfloat16: the whole benchmark at each (bf16: CPU autocast, fp32 weights)")
    ap.add_argument("--thread-counts", type=lambda t: [int(x) for x in _phase_list(t)], default=None,
                    help="comma list of thread counts, e.g. 1,2: the whole benchmark at each (default: --threads)")
    ap.add_argument("--suite", default="default", help="the suite whose model and hyper-parameters are measured")
    ap.add_argument("--out", default=DEFAULT_OUT, help="JSON output path")
    ap.add_argument("--tiny", action="store_true", help="smoke workload (2 layers x 32, tiny batches): timings meaningless")
    ap.add_argument("--in-process", action="store_true",
                    help="run every job in this process (no fresh process per job; for the test)")
    ap.add_argument("--worker-timeout", type=float, default=1800.0, help="seconds before a worker is killed")
    ap.add_argument("--worker", metavar="JOB", help=argparse.SUPPRESS)
    ap.add_argument("--workdir", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.iters is None:
        args.iters = 1 if args.tiny else 4
    if args.threads is None:
        args.threads = 1 if args.tiny else 2
    if args.thread_counts is None:
        args.thread_counts = [args.threads]
    args.dtype = args.dtypes[0]
    if any(d not in ("float32", "bfloat16") for d in args.dtypes) or not args.dtypes:
        ap.error(f"--dtypes: float32 and/or bfloat16, got {args.dtypes}")
    if any(t < 1 for t in args.thread_counts) or not args.thread_counts:
        ap.error(f"--thread-counts: integers >= 1, got {args.thread_counts}")
    bad = [p for p in args.phases if p not in PHASES]
    if bad:
        ap.error(f"unknown phase(s) {bad}; choose from {', '.join(PHASES)}")
    if not args.phases:
        ap.error("--phases: give at least one phase")
    if args.repeats < 1 or args.iters < 1 or args.warmup < 0 or args.threads < 1:
        ap.error("--repeats, --iters and --threads must be >= 1, --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from benchmarks.utils import atomic_write_json

    if args.worker:
        if not (args.workdir and args.result):
            raise SystemExit("--worker needs --workdir and --result")
        cfg = json.loads((Path(args.workdir) / "config.json").read_text())
        atomic_write_json(args.result, run_job(args.worker, cfg))
        return 0
    grid = len(args.dtypes) * len(args.thread_counts) > 1
    if not grid:
        args.threads = args.thread_counts[0]
    res = run_grid(args) if grid else run(args)
    atomic_write_json(args.out, res)
    print()
    print(format_table(res))
    if grid:
        print("\nevery (dtype, threads), ours s per iteration (ratio to the floor, ours tokens/s):")
        print(format_grid(res))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
