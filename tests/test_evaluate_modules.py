"""The suite's metrics as local `evaluate` modules give the same numbers as the suite itself."""

from pathlib import Path

import pytest

evaluate = pytest.importorskip("evaluate")

from benchmarks.evaluators.metrics import distinct_n  # noqa: E402
from benchmarks.evaluators.stats import win_rate  # noqa: E402

HF = Path(__file__).resolve().parents[1] / "benchmarks" / "evaluators" / "hf"


def test_modules_load_by_path_and_agree_with_the_suite():
    wr = evaluate.load(str(HF / "win_rate"))
    out = wr.compute(predictions=[0.5, 0.1, 0.9], references=[0.1, 0.1, 1.0])
    assert out["win_rate"] == pytest.approx(win_rate([0.5, 0.1, 0.9], [0.1, 0.1, 1.0])) == pytest.approx(0.5)
    kl = evaluate.load(str(HF / "sequence_kl")).compute(predictions=[-10.0, -12.0], references=[-11.0, -11.5])
    assert kl["kl"] == pytest.approx(0.25) and kl["negative_share"] == 0.5
    texts = ["a b a b", "c d"]
    dn = evaluate.load(str(HF / "distinct_n")).compute(predictions=texts)
    assert dn["distinct_2"] == pytest.approx(distinct_n(texts, 2))
