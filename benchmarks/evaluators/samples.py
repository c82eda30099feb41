"""Evaluation samples: every arm, the same held-out prompts, the same per-(prompt, temperature, index) seeds.

Each sample is one row: prompt id, temperature, completion, gold reward, log pi and log pi_ref of the
completion (both through the shared log-prob path), their difference (the sequence KL sample of the
DPO paper's KL measure), and length.
"""

from __future__ import annotations

import torch

from benchmarks.utils import Timer, text_hash
from methods.data import completion_logps
from methods.sampling import sample


def eval_seed(seed: int, prompt_id: str, temperature: float, k: int) -> int:
    return text_hash(f"eval/{seed}/{prompt_id}/{temperature:.4f}/{k}")


@torch.no_grad()
def generate_eval_samples(model, ref_model, tokenizer, prompts: list[dict], *, temperatures: list[float], n: int,
                          max_new_tokens: int, seed: int, gold_fn, autocast=None, on_batch=None) -> tuple[list[dict], dict]:
    """Rows for every (prompt, temperature, sample index) and per-phase timings; ``gold_fn(texts, prompts)`` is the
    task's gold reward (``benchmarks.tasks.registry.task_gold``)."""
    rows: list[dict] = []
    timing = {"generation_s": 0.0, "reward_s": 0.0, "logprob_s": 0.0, "new_tokens": 0}
    eos = tokenizer.eos_token_id
    for temp in temperatures:
        ids, seeds, meta = [], [], []
        for p in prompts:
            for k in range(n):
                ids.append(p["prompt_ids"])
                seeds.append(eval_seed(seed, p["prompt_id"], temp, k))
                meta.append((p, k))
        t = Timer()
        res = sample(model, ids, max_new_tokens=max_new_tokens, temperature=temp, seeds=seeds, eos_token_id=eos,
                     pad_token_id=tokenizer.pad_token_id, autocast=autocast, on_batch=on_batch)
        timing["generation_s"] += t.elapsed
        timing["new_tokens"] += res.tokens_generated
        texts = tokenizer.batch_decode(res.completions, skip_special_tokens=True)
        t = Timer()
        gold = gold_fn(texts, [p["prompt"] for p, _ in meta])
        timing["reward_s"] += t.elapsed
        # score exactly the sampled tokens (EOS included when the sample ended with it)
        comps = [c + [eos] if ended else c for c, ended in zip(res.completions, res.ended, strict=True)]
        t = Timer()
        lp = completion_logps(model, ids, comps, pad_id=tokenizer.pad_token_id, autocast=autocast)
        lr = completion_logps(ref_model, ids, comps, pad_id=tokenizer.pad_token_id, autocast=autocast)
        timing["logprob_s"] += t.elapsed
        for (p, k), text, g, a, b, c, ended in zip(meta, texts, gold, lp.tolist(), lr.tolist(), comps, res.ended, strict=True):
            rows.append({"prompt_id": p["prompt_id"], "prompt": p["prompt"], "temperature": temp, "sample_index": k,
                         "completion": text, "gold": g, "policy_logp": a, "ref_logp": b, "seq_kl": a - b,
                         "length": len(c), "ended": bool(ended)})
    return rows, timing
