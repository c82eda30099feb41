"""prefbench sequence KL as a local `evaluate` module: evaluate.load("<path>/sequence_kl")."""

import datasets
import evaluate

from benchmarks.evaluators.stats import bootstrap_ci

_DESCRIPTION = """Sequence-level KL(pi || pi_ref) estimated on pi's own samples: the mean over samples of
sum_t log pi(y_t|.) - log pi_ref(y_t|.) (the DPO paper's measure), with a 95 % bootstrap CI and the share of
negative per-sample estimates (a noise diagnostic)."""
_KWARGS = """predictions: per-sample summed log-probs under the policy; references: the same samples' summed
log-probs under the reference."""


class SequenceKL(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(description=_DESCRIPTION, citation="", inputs_description=_KWARGS,
                                   features=datasets.Features({"predictions": datasets.Value("float64"),
                                                               "references": datasets.Value("float64")}))

    def _compute(self, predictions, references, seed: int = 0):
        d = [p - r for p, r in zip(predictions, references, strict=True)]
        k, lo, hi = bootstrap_ci(d, seed=seed)
        return {"kl": k, "kl_low": lo, "kl_high": hi, "negative_share": sum(x < 0 for x in d) / len(d)}
