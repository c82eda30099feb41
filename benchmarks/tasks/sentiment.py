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


def gold_reward(texts: list[str], target: str = "positive", scorer: str = "vader",
                prompts: list[str] | None = None) -> list[float]:
    """Gold reward of each completion; sign flipped for target 'negative'.

    scorer 'vader': VADER compound sentiment in [-1, 1] (offline, ships its lexicon). scorer 'hf:<name or
    path>': a sentiment classifier (e.g. the paper's siebert/sentiment-roberta-large-english), score =
    2 P(positive) - 1. scorer 'hf-rm:<name or path>': a judge reward model's score of (prompt, completion),
    unbounded (the dialogue task's gold; see benchmarks/tasks/dialogue.py); it needs ``prompts``, one per text.
    The sentiment scorers ignore ``prompts``.
    """
    if target not in ("positive", "negative"):
        raise ValueError(f"target must be 'positive' or 'negative', got {target!r}")
    sign = 1.0 if target == "positive" else -1.0
    if scorer == "vader":
        a = _analyzer()
        return [sign * a.polarity_scores(t)["compound"] for t in texts]
    if scorer.startswith("hf-rm:"):
        if prompts is None or len(prompts) != len(texts):
            raise ValueError(f"gold reward {scorer!r} judges (prompt, response): give one prompt per text "
                             f"({0 if prompts is None else len(prompts)} prompts for {len(texts)} texts)")
        from benchmarks.tasks.dialogue import judge_scores

        return [sign * x for x in judge_scores(scorer[6:], prompts, texts)]
    if scorer.startswith("hf:"):
        return [sign * x for x in _classifier_scores(scorer[3:], texts)]
    raise ValueError(f"task.gold must be 'vader', 'hf:<classifier name or path>' or 'hf-rm:<reward model>', got {scorer!r}")


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


def chat_prompt(tokenizer, instruction: str, prefix: str) -> str:
    """The chat-templated prompt text of the instruction-following variant: one user turn
    ``instruction.format(prefix=prefix)`` and the assistant's generation prompt (the model's own template)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("task.chat_instruction is set but the model's tokenizer has no chat template; use an "
                         "instruction-tuned model (e.g. SmolLM2-135M-Instruct) or leave chat_instruction empty")
    return tokenizer.apply_chat_template([{"role": "user", "content": instruction.format(prefix=prefix)}],
                                         add_generation_prompt=True, tokenize=False)


def make_prompts(docs: list[str], tokenizer, *, n: int, min_tokens: int, max_tokens: int, seed: int,
                 id_prefix: str, chat_instruction: str = "") -> list[dict]:
    """``n`` prompts: a prefix of 2-8 (min..max) tokens of distinct documents, as text plus token ids.

    The prefix length is drawn uniformly per document; documents shorter than the prefix + 4 tokens are
    skipped so every prompt leaves something to continue. Prompt ids start with BOS when the tokenizer has one.
    With ``chat_instruction`` (e.g. "Continue this text: {prefix}") the prompt is instead the chat-templated
    user turn built from the prefix, tokenised as the pairs' prompts are (``tokenizer(text)``); the row keeps
    the raw ``prefix``.
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
        if chat_instruction:
            chat = chat_prompt(tokenizer, chat_instruction, text)
            out.append({"prompt_id": f"{id_prefix}{len(out)}", "prompt": chat, "prompt_ids": tokenizer(chat)["input_ids"],
                        "prefix": text, "doc_index": i})
        else:
            out.append({"prompt_id": f"{id_prefix}{len(out)}", "prompt": text, "prompt_ids": bos + ids[:k], "doc_index": i})
        if len(out) == n:
            break
    if len(out) < n:
        raise ValueError(
            f"only {len(out)} documents are long enough for {id_prefix.rstrip('-')} prompts, {n} asked; "
            "lower task.n_train_prompts / task.n_eval_prompts or add text sources"
        )
    return out


def chat_sft_examples(docs: list[str], tokenizer, *, instruction: str, min_tokens: int, max_tokens: int,
                      max_completion_tokens: int, seed: int) -> list[tuple[str, str]]:
    """(chat prompt, continuation) SFT pairs of the instruction-following variant: each document is cut after
    a random 2-8-token prefix; the rest (at most ``max_completion_tokens`` tokens) is the assistant's answer."""
    rng = random.Random(seed)
    out = []
    for doc in docs:
        ids = tokenizer(doc, add_special_tokens=False)["input_ids"]
        k = rng.randint(min_tokens, max_tokens)
        if len(ids) < k + 4:
            continue
        prefix, rest = tokenizer.decode(ids[:k]), tokenizer.decode(ids[k : k + max_completion_tokens])
        if "\ufffd" in prefix + rest:
            continue
        out.append((chat_prompt(tokenizer, instruction, prefix), rest))
    return out
