"""The default task: controlled sentiment generation (DPO paper, Sec. 6.1), made offline.

Prompts are 2-8-token prefixes of documents; the policy must continue them with positive (or negative)
sentiment; the gold reward is VADER's compound score of the completion, in [-1, 1].
"""

from __future__ import annotations

import random

from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

_ANALYZER: SentimentIntensityAnalyzer | None = None


def _analyzer() -> SentimentIntensityAnalyzer:
    global _ANALYZER
    if _ANALYZER is None:
        _ANALYZER = SentimentIntensityAnalyzer()
    return _ANALYZER


def gold_reward(texts: list[str], target: str = "positive") -> list[float]:
    """VADER compound sentiment of each completion; sign flipped for target 'negative'."""
    if target not in ("positive", "negative"):
        raise ValueError(f"target must be 'positive' or 'negative', got {target!r}")
    sign = 1.0 if target == "positive" else -1.0
    a = _analyzer()
    return [sign * a.polarity_scores(t)["compound"] for t in texts]


def make_prompts(docs: list[str], tokenizer, *, n: int, min_tokens: int, max_tokens: int, seed: int,
                 id_prefix: str) -> list[dict]:
    """``n`` prompts: a prefix of 2-8 (min..max) tokens of distinct documents, as text plus token ids.

    The prefix length is drawn uniformly per document; documents shorter than the prefix + 4 tokens are
    skipped so every prompt leaves something to continue. Prompt ids start with BOS when the tokenizer has one.
    """
    rng = random.Random(seed)
    order = list(range(len(docs)))
    rng.shuffle(order)
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    out = []
    for i in order:
        ids = tokenizer(docs[i], add_special_tokens=False)["input_ids"]
        k = rng.randint(min_tokens, max_tokens)
        if len(ids) < k + 4:
            continue
        text = tokenizer.decode(ids[:k])
        if "\ufffd" in text:  # byte-level BPE cut inside a multi-byte character
            continue
        out.append({"prompt_id": f"{id_prefix}{len(out)}", "prompt": text, "prompt_ids": bos + ids[:k], "doc_index": i})
        if len(out) == n:
            break
    if len(out) < n:
        raise ValueError(
            f"only {len(out)} documents are long enough for {id_prefix.rstrip('-')} prompts, {n} asked; "
            "lower task.n_train_prompts / task.n_eval_prompts or add text sources"
        )
    return out
