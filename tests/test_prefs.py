import json
import math
import random

import pytest

from benchmarks.tasks.prefs import PreferenceDataError, form_pairs, load_preference_rows, validate_rows


def test_argmax_labels_and_all_pairs():
    pairs = form_pairs([0.1, 0.9, -0.5, 0.3], labelling="argmax", min_gap=0.0, pairs_per_prompt=0,
                       bt_temperature=1.0, rng=random.Random(0))
    assert len(pairs) == 6  # K(K-1)/2 for K = 4, the paper's 6 pairs per prefix
    assert sorted(pairs) == sorted([(1, 0), (0, 2), (3, 0), (1, 2), (1, 3), (3, 2)])


def test_near_ties_dropped():
    pairs = form_pairs([0.0, 0.01, 0.5], labelling="argmax", min_gap=0.05, pairs_per_prompt=0,
                       bt_temperature=1.0, rng=random.Random(0))
    assert sorted(pairs) == [(2, 0), (2, 1)]  # (0, 1) differs by 0.01 < 0.05
    assert form_pairs([0.2, 0.2], labelling="argmax", min_gap=0.0001, pairs_per_prompt=0, bt_temperature=1.0,
                      rng=random.Random(0)) == []


def test_pairs_per_prompt_caps():
    pairs = form_pairs([0.0, 0.3, 0.6, 0.9], labelling="argmax", min_gap=0.0, pairs_per_prompt=2,
                       bt_temperature=1.0, rng=random.Random(1))
    assert len(pairs) == 2 and all(s_c > s_r for s_c, s_r in [((0.0, 0.3, 0.6, 0.9)[c], (0.0, 0.3, 0.6, 0.9)[r]) for c, r in pairs])


def test_bradley_terry_win_probability_matches_sigmoid():
    # r_0 - r_1 = 0.1, temperature 0.1 -> P(0 wins) = sigmoid(1) = 0.731
    rng = random.Random(123)
    n = 20000
    wins = sum(form_pairs([0.6, 0.5], labelling="bradley_terry", min_gap=0.0, pairs_per_prompt=0,
                          bt_temperature=0.1, rng=rng)[0] == (0, 1) for _ in range(n))
    p = 1 / (1 + math.exp(-1.0))
    assert abs(wins / n - p) < 4 * math.sqrt(p * (1 - p) / n)


def test_bradley_terry_at_low_temperature_is_argmax():
    scores = [0.1, 0.9, -0.5, 0.3]
    bt = form_pairs(scores, labelling="bradley_terry", min_gap=0.05, pairs_per_prompt=0, bt_temperature=1e-4,
                    rng=random.Random(0))
    am = form_pairs(scores, labelling="argmax", min_gap=0.05, pairs_per_prompt=0, bt_temperature=1.0,
                    rng=random.Random(0))
    assert sorted(bt) == sorted(am)


GOOD = {"prompt": "The day", "chosen": " was lovely.", "rejected": " was awful."}


@pytest.mark.parametrize(
    "row, what",
    [
        ({"prompt": "x", "chosen": "a"}, "missing column"),
        ({**GOOD, "chosen": ""}, "empty or non-string"),
        ({**GOOD, "rejected": "   "}, "empty or non-string"),
        ({**GOOD, "chosen": 3}, "empty or non-string"),
        ({**GOOD, "rejected": GOOD["chosen"]}, "chosen == rejected"),
        ("just a string", "not a mapping"),
    ],
)
def test_malformed_rows_rejected_with_count_and_first_row(row, what):
    rows = [GOOD, {**GOOD, "chosen": " was grand."}, row, row]
    with pytest.raises(PreferenceDataError) as e:
        validate_rows(rows, source="test.jsonl")
    msg = str(e.value)
    assert "2 of 4 rows are malformed" in msg and what in msg and "first is row 2" in msg


def test_conversational_rows_are_valid():
    validate_rows([{"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "hello"}],
                    "rejected": [{"role": "assistant", "content": "go away"}]}])


def test_empty_dataset_rejected():
    with pytest.raises(PreferenceDataError, match="no rows"):
        validate_rows([])


def test_load_local_formats(tmp_path):
    import pandas as pd

    rows = [GOOD, {**GOOD, "chosen": " was fine."}]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "p.json").write_text(json.dumps(rows))
    pd.DataFrame(rows).to_parquet(tmp_path / "p.parquet")
    for ext in ("jsonl", "json", "parquet"):
        assert load_preference_rows(str(tmp_path / f"p.{ext}")) == rows
    (tmp_path / "bad.jsonl").write_bytes(b'{"prompt": "\xff\xfe"}\n')
    with pytest.raises(PreferenceDataError, match="UTF-8"):
        load_preference_rows(str(tmp_path / "bad.jsonl"))
    (tmp_path / "broken.jsonl").write_text('{"prompt": 1}\n{oops\n')
    with pytest.raises(PreferenceDataError, match="line 2"):
        load_preference_rows(str(tmp_path / "broken.jsonl"))
    with pytest.raises(PreferenceDataError, match="does not exist"):
        load_preference_rows(str(tmp_path / "missing.jsonl"))


def test_duplicate_rows_rejected():
    with pytest.raises(PreferenceDataError, match="duplicate"):
        validate_rows([GOOD, {**GOOD}])


# property-based: random malformed rows never escape the validator as anything but PreferenceDataError
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_values = st.one_of(st.none(), st.integers(), st.floats(allow_nan=True), st.text(max_size=8), st.binary(max_size=8),
                    st.lists(st.text(max_size=3), max_size=2), st.dictionaries(st.text(max_size=3), st.text(max_size=3), max_size=2))
_rows = st.one_of(_values, st.dictionaries(st.sampled_from(["prompt", "chosen", "rejected", "extra"]), _values, max_size=4))


@settings(max_examples=300, deadline=None)
@given(st.lists(_rows, max_size=6))
def test_validator_never_raises_anything_else(rows):
    try:
        validate_rows(rows)
    except PreferenceDataError as e:
        assert "row" in str(e)
