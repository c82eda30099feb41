"""Gold-reward scorers, by the name in ``task.gold``: 'vader' (offline lexicon), 'textblob' (a second, independent
offline lexicon), 'hf:<sentiment classifier>', 'hf-rm:<judge reward model>'. A task's ``gold``
(``benchmarks/tasks/registry.py``) calls one of them; ``task.judges`` names further scorers of the same property
that re-score the evaluation samples (the judge-robustness claim)."""

from __future__ import annotations

from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

_ANALYZER: SentimentIntensityAnalyzer | None = None
_PATTERN = None
SCORERS = ("vader", "textblob")
"""The offline scorers by name; 'hf:<name>' and 'hf-rm:<name>' load a model (hub name or local folder)."""


def _analyzer() -> SentimentIntensityAnalyzer:
    global _ANALYZER
    if _ANALYZER is None:
        _ANALYZER = SentimentIntensityAnalyzer()
    return _ANALYZER


def _pattern():
    """TextBlob's PatternAnalyzer: the Pattern library's adjective lexicon (De Smedt & Daelemans 2012, ~2,900 entries
    with intensifiers and negation), polarity = mean over the sentiment-bearing words, in [-1, 1]. Its lexicon and
    rule set are independent of VADER's (Hutto & Gilbert 2014, ~7,500 entries, summed valence squashed by x/sqrt(x^2+15)).
    Needs no corpus download (``.sentiment`` only; ``.words`` / ``.noun_phrases`` would)."""
    global _PATTERN
    if _PATTERN is None:
        from textblob.en.sentiments import PatternAnalyzer

        _PATTERN = PatternAnalyzer()
    return _PATTERN


def valid_scorer(spec: str) -> bool:
    return spec in SCORERS or (spec.startswith(("hf:", "hf-rm:")) and len(spec.split(":", 1)[1]) > 0)


def gold_reward(texts: list[str], target: str = "positive", scorer: str = "vader",
                prompts: list[str] | None = None) -> list[float]:
    """Gold reward of each completion; sign flipped for target 'negative'.

    scorer 'vader': VADER compound sentiment in [-1, 1] (offline, ships its lexicon). 'textblob': TextBlob's
    Pattern polarity in [-1, 1] (offline, ships its lexicon). scorer 'hf:<name or
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
    if scorer == "textblob":
        a = _pattern()
        return [sign * float(a.analyze(t).polarity) for t in texts]
    if scorer.startswith("hf-rm:"):
        if prompts is None or len(prompts) != len(texts):
            raise ValueError(f"gold reward {scorer!r} judges (prompt, response): give one prompt per text "
                             f"({0 if prompts is None else len(prompts)} prompts for {len(texts)} texts)")
        from benchmarks.tasks.dialogue import judge_scores

        return [sign * x for x in judge_scores(scorer[6:], prompts, texts)]
    if scorer.startswith("hf:"):
        return [sign * x for x in _classifier_scores(scorer[3:], texts)]
    raise ValueError(f"task.gold must be 'vader', 'textblob', 'hf:<classifier name or path>' or 'hf-rm:<reward model>', got {scorer!r}")


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
