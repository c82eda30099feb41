"""HH-format loading for the dialogue task: the prompt/response split at the last assistant turn, the
single-turn filter, malformed rows refused with the row shown, the judge's (query, response) scoring."""

import pytest

from benchmarks.tasks.dialogue import judge_query, judge_scores, parse_rows, split_conversation
from benchmarks.tasks.prefs import PreferenceDataError


def _conv(*turns: str) -> str:
    return "".join(f"\n\n{'Human' if i % 2 == 0 else 'Assistant'}: {t}" for i, t in enumerate(turns))


def test_split_and_filter_hh_rows():
    assert split_conversation(_conv("hi there", "hello")) == ("\n\nHuman: hi there\n\nAssistant:", " hello")
    assert split_conversation("no markers") is None
    rows = [
        {"chosen": _conv("q1", "good answer"), "rejected": _conv("q1", "bad answer")},            # kept
        {"chosen": _conv("q1", "good answer"), "rejected": _conv("q1", "bad answer")},            # duplicate
        {"chosen": _conv("q2", "a", "q3", "good"), "rejected": _conv("q2", "a", "q3", "bad")},   # two human turns
        {"chosen": _conv("q4", "same"), "rejected": _conv("q4", "same")},                         # identical
        {"chosen": _conv("q5", "x"), "rejected": _conv("q6", "y")},                               # prompts differ
        {"chosen": _conv("q7", " "), "rejected": _conv("q7", "y")},                               # empty response
        {"chosen": "just text", "rejected": _conv("q8", "y")},                                   # no assistant turn
    ]
    pairs, dropped = parse_rows(rows, max_human_turns=1, source="t")
    assert pairs == [{"prompt": "\n\nHuman: q1\n\nAssistant:", "chosen": " good answer", "rejected": " bad answer"}]
    assert dropped == {"duplicate": 1, "multi_turn": 1, "identical_responses": 1, "prompt_mismatch": 1,
                       "empty_response": 1, "no_assistant_turn": 1}
    pairs, dropped = parse_rows(rows[2:3], max_human_turns=0, source="t")  # 0 = no turn limit
    assert pairs[0]["prompt"].count("\n\nHuman:") == 2 and not dropped


@pytest.mark.parametrize("rows, match", [
    ([{"chosen": _conv("q", "a")}], "not HH conversations.*row 0"),                  # no 'rejected' column
    ([{"chosen": _conv("q", "a"), "rejected": 3}], "not HH conversations"),
    ([{"prompt": "p", "chosen": "a", "rejected": "b"}], "no row has an '\\\\n\\\\nAssistant:' turn"),
    ([{"chosen": _conv("q", "a", "q", "b"), "rejected": _conv("q", "a", "q", "c")}], "every one of 1 rows was dropped"),
    ([], "no rows"),
])
def test_malformed_hh_rows_are_refused(rows, match):
    with pytest.raises(PreferenceDataError, match=match):
        parse_rows(rows, max_human_turns=1, source="task.dataset 'x'")


def test_judge_query_strips_single_turn_markers():
    assert judge_query("\n\nHuman: How do I bake bread?\n\nAssistant:") == "How do I bake bread?"
    multi = _conv("a", "b", "c") + "\n\nAssistant:"
    assert judge_query(multi) == multi[: -len("\n\nAssistant:")].strip()
    assert judge_query("The movie was") == "The movie was"


def _judge(path, num_labels: int) -> str:
    """A tiny BERT sequence classifier with a locally trained tokenizer, saved in the hub layout."""
    from transformers import BertConfig, BertForSequenceClassification

    from benchmarks.tasks.models import train_tokenizer

    tok = train_tokenizer(["how do i cook rice", "sure here is a clear answer", "no go away"] * 5, vocab_size=300)
    BertForSequenceClassification(BertConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                             intermediate_size=32, num_labels=num_labels)).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def test_judge_scores_query_response_pairs(tmp_path):
    judge = _judge(tmp_path / "judge", num_labels=1)
    prompts = ["\n\nHuman: how do i cook rice\n\nAssistant:"] * 2
    s = judge_scores(judge, prompts, [" sure here is a clear answer", " no go away"])
    assert len(s) == 2 and all(isinstance(x, float) for x in s) and s[0] != s[1]
    with pytest.raises(ValueError, match="2 prompts for 1 responses"):
        judge_scores(judge, prompts, ["x"])
    clf = _judge(tmp_path / "clf", num_labels=2)
    with pytest.raises(ValueError, match="num_labels = 1"):  # a two-class classifier is not a judge
        judge_scores(clf, ["q"], ["x"])
