"""prefbench win rate as a local `evaluate` module: evaluate.load("<path>/win_rate")."""

import datasets
import evaluate

from benchmarks.evaluators.stats import win_rate_ci

_DESCRIPTION = """Share of paired items where `predictions` (scores of the policy's samples) beat `references`
(scores of the baseline's samples for the same prompts); ties count 1/2. Returns the win rate and a 95 %
bootstrap CI over items — the same computation prefbench's reports use."""
_KWARGS = """predictions: list of float scores of the evaluated policy; references: list of float scores of the
baseline, aligned by prompt; seed: bootstrap seed (default 0)."""


class WinRate(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(description=_DESCRIPTION, citation="", inputs_description=_KWARGS,
                                   features=datasets.Features({"predictions": datasets.Value("float64"),
                                                               "references": datasets.Value("float64")}))

    def _compute(self, predictions, references, seed: int = 0):
        w, lo, hi = win_rate_ci(predictions, references, seed=seed)
        return {"win_rate": w, "win_rate_low": lo, "win_rate_high": hi}
