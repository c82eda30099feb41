"""prefbench distinct-n as a local `evaluate` module: evaluate.load("<path>/distinct_n")."""

import datasets
import evaluate

from benchmarks.evaluators.metrics import distinct_n

_DESCRIPTION = """Distinct-n (Li et al. 2016): unique n-grams / all n-grams over a set of texts (whitespace
tokens), for n = 1 and 2 by default."""
_KWARGS = """predictions: list of generated texts; ns: tuple of n values (default (1, 2))."""


class DistinctN(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(description=_DESCRIPTION, citation="", inputs_description=_KWARGS,
                                   features=datasets.Features({"predictions": datasets.Value("string")}))

    def _compute(self, predictions, ns=(1, 2)):
        return {f"distinct_{n}": distinct_n(predictions, n) for n in ns}
