"""Per-arm evaluation metrics from sample rows: gold reward, win rates, KL, diversity, length.

Inputs are plain lists/arrays so every metric is testable on hand-made values.
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import torch

from benchmarks.evaluators.stats import bootstrap_ci, win_rate_ci


def distinct_n(texts: list[str], n: int) -> float:
    """Distinct-n (Li et al. 2016): unique n-grams / total n-grams over all texts (whitespace tokens)."""
    grams: list[tuple[str, ...]] = []
    for t in texts:
        w = t.split()
        grams += [tuple(w[i : i + n]) for i in range(len(w) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def unigram_entropy(texts: list[str]) -> float:
    """Entropy (nats) of the word distribution over all texts: a corpus-level diversity measure."""
    c = Counter(w for t in texts for w in t.split())
    n = sum(c.values())
    return -sum(v / n * math.log(v / n) for v in c.values()) if n else 0.0


@torch.no_grad()
def exact_token_kl(model, ref_model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum over completion tokens of KL(pi(.|prefix) || pi_ref(.|prefix)) from full next-token distributions,
    on given (sampled) sequences: the cross-check of the sample-based sequence KL. Returns [B]."""
    ids, attn, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    lp = torch.log_softmax(model(input_ids=ids, attention_mask=attn).logits[:, :-1].float(), -1)
    lq = torch.log_softmax(ref_model(input_ids=ids, attention_mask=attn).logits[:, :-1].float(), -1)
    kl_t = (lp.exp() * (lp - lq)).sum(-1)  # [B, T-1]
    mask = (labels[:, 1:] != -100).float()
    return (kl_t * mask).sum(-1)


def arm_metrics(arm_gold, sft_gold, chosen_gold, seq_kl, lengths, texts, *, seed: int = 0) -> dict:
    """Headline metrics of one arm at one temperature; all arrays aligned by prompt (one sample each)."""
    g, lo, hi = bootstrap_ci(arm_gold, seed=seed)
    w, wlo, whi = win_rate_ci(arm_gold, sft_gold, seed=seed)
    out = {"gold": g, "gold_low": lo, "gold_high": hi, "win_vs_sft": w, "win_vs_sft_low": wlo, "win_vs_sft_high": whi}
    if chosen_gold is not None:
        wc, clo, chi = win_rate_ci(arm_gold, chosen_gold, seed=seed)
        out.update({"win_vs_chosen": wc, "win_vs_chosen_low": clo, "win_vs_chosen_high": chi})
    k, klo, khi = bootstrap_ci(seq_kl, seed=seed)
    out.update({"kl": k, "kl_low": klo, "kl_high": khi, "negative_kl_share": float((np.asarray(seq_kl) < 0).mean()),
                "length": float(np.mean(lengths)), "distinct_1": distinct_n(texts, 1), "distinct_2": distinct_n(texts, 2),
                "word_entropy": unigram_entropy(texts), "n": len(arm_gold)})
    return out
