import json

import pytest

from benchmarks.tasks import corpus
from benchmarks.tasks.corpus import CorpusError, clean, load_documents
from benchmarks.tasks.sentiment import gold_reward


def test_clean_strips_whitespace_and_attribution():
    assert clean("  Hello\n\tworld.  ") == "Hello world."
    assert clean("Be kind to others. -- Mark Twain, Letters") == "Be kind to others."


def test_local_text_and_jsonl_sources(tmp_path):
    (tmp_path / "a.txt").write_text("First paragraph here, long enough.\n\nSecond   paragraph\nover two lines.\n\nx\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "A JSON line document of text."}) + "\n")
    docs = load_documents(str(tmp_path), min_chars=5, max_chars=100)
    assert docs == ["First paragraph here, long enough.", "Second paragraph over two lines.", "A JSON line document of text."]
    (tmp_path / "bad.jsonl").write_text('{"body": "no text field"}\n')
    with pytest.raises(CorpusError, match="'text'"):
        load_documents(str(tmp_path / "bad.jsonl"), min_chars=1, max_chars=100)


def test_missing_package_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setattr(corpus, "FORTUNES_DIR", tmp_path / "nope")
    with pytest.raises(CorpusError, match="apt-get install fortunes"):
        load_documents("fortunes", min_chars=1, max_chars=100)
    monkeypatch.setattr(corpus, "WORDNET_DIR", tmp_path / "nope")
    with pytest.raises(CorpusError, match="wordnet-base"):
        load_documents("wordnet", min_chars=1, max_chars=100)
    with pytest.raises(CorpusError, match="task.corpus.sources"):
        load_documents("austen-nowhere", min_chars=1, max_chars=100)


@pytest.mark.skipif(not corpus.FORTUNES_DIR.is_dir(), reason="Debian package fortunes not installed")
def test_packaged_corpora_are_real_english():
    f = load_documents("fortunes", min_chars=20, max_chars=400)
    w = load_documents("wordnet", min_chars=20, max_chars=400, limit=5000)
    assert len(f) > 10_000 and len(w) > 3_000
    assert all("\n" not in d and "  " not in d for d in f[:1000])


def test_gold_reward_is_vader_and_target_flips_sign():
    pos, neg, neu = gold_reward(["What a wonderful, lovely day!", "This is terrible and awful.", "The table."])
    assert pos > 0.5 and neg < -0.5 and neu == 0.0
    assert gold_reward(["What a wonderful, lovely day!"], "negative")[0] == -pos
    with pytest.raises(ValueError, match="target"):
        gold_reward(["x"], "neutral")
