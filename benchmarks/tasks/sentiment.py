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


def gold_reward(texts: list[str], target: str = "positive", scorer: str = "vader") -> list[float]:
    """Gold reward of each completion in [-1, 1]; sign flipped for target 'negative'.

    scorer 'vader': VADER compound sentiment (offline, ships its lexicon). scorer 'hf:<name or path>': a
    sentiment classifier (e.g. the paper's siebert/sentiment-roberta-large-english), score = 2 P(positive) - 1.
    """
    if target not in ("positive", "negative"):
        raise ValueError(f"target must be 'positive' or 'negative', got {target!r}")
    sign = 1.0 if target == "positive" else -1.0
    if scorer == "vader":
        a = _analyzer()
        return [sign * a.polarity_scores(t)["compound"] for t in texts]
    if scorer.startswith("hf:"):
        return [sign * x for x in _classifier_scores(scorer[3:], texts)]
    raise ValueError(f"task.gold must be 'vader' or 'hf:<classifier name or path>', got {scorer!r}")


_CLASSIFIERS: dict = {}


def _classifier_scores(name: str, texts: list[str], batch_size: int = 64) -> list[float]:
    """2 P(positive) - 1 from a sequence classifier whose labels include a positive class."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    if name not in _CLASSIFIERS:
        tok = AutoTokenizer.from_pretrained(name)
        model = AutoModelForSequenceClassification.from_pretrained(name).eval()
        labels = {v.lower(): int(k) for k, v in model.config.id2label.items()}
        pos = next((labels[k] for k in ("positive", "pos", "label_1") if k in labels), None)
        if pos is None:
            raise ValueError(f"classifier {name} has no positive label among {list(labels)}")
        _CLASSIFIERS[name] = (tok, model, pos)
    tok, model, pos = _CLASSIFIERS[name]
    out: list[float] = []
    with torch.no_grad():
        for i in range(0, len(texts), batch_size):
            enc = tok(texts[i : i + batch_size], padding=True, truncation=True, max_length=512, return_tensors="pt")
            p = torch.softmax(model(**enc).logits.float(), -1)[:, pos]
            out += (2 * p - 1).tolist()
    return out


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
