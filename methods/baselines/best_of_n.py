"""Best-of-N baseline: sample N completions per prompt from pi_ref with the shared sampler and keep the one the
reward function (the RM; or the gold reward for an oracle arm) scores highest.

KL of best-of-N to the base policy is bounded analytically by log N - (N - 1) / N (Stiennon et al. 2020,
App. G.3; Gao et al. 2022, "Scaling Laws for Reward Model Overoptimization", Sec. 2.2; exact for continuous
rewards without ties; Beirami et al. 2024 show it is an upper bound in general).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from methods.sampling import derive_seed, sample


@dataclass
class BestOfNResult:
    completions: list[list[int]]
    """The chosen completion per prompt (EOS excluded, as ``methods.sampling.Samples``)."""
    ended: list[bool]
    """Whether the chosen completion ended with EOS."""
    scores: torch.Tensor
    """[P, n] reward of every candidate."""
    chosen: list[int]
    """Index (0..n-1) of the chosen candidate per prompt."""
    candidates: list[list[list[int]]]
    """All n candidates per prompt (EOS excluded)."""
    tokens_generated: int


_seed = derive_seed


def best_of_n(model, tokenizer, prompts: Sequence[Sequence[int]], n: int, reward_fn: Callable, max_new_tokens: int,
              temperature: float, seed: int, *, batch_size: int = 256, autocast=None,
              return_details: bool = False) -> list[list[int]] | BestOfNResult:
    """Chosen completion ids (EOS excluded) per prompt: the argmax of ``reward_fn`` over ``n`` samples.

    Candidate j of prompt i is sampled with seed ``(seed, i, j)``, so candidates do not depend on batching and
    the first k candidates of a best-of-n run are those of best-of-k. ``reward_fn(prompt_ids, completion_ids)``
    gets the completions with the EOS token appended where the sample ended (the PPO contract) and returns [N].
    Ties go to the lowest candidate index. ``return_details=True`` returns a :class:`BestOfNResult`.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"best-of-N needs an integer n >= 1, got {n!r}")
    if len(prompts) == 0:
        raise ValueError("best_of_n: no prompts")
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    rows = [list(p) for p in prompts for _ in range(n)]  # prompt-major: row i * n + j
    seeds = [_seed(seed, i, j) for i in range(len(prompts)) for j in range(n)]
    s = sample(model, rows, max_new_tokens=max_new_tokens, temperature=temperature, seeds=seeds,
               eos_token_id=eos, pad_token_id=pad, batch_size=batch_size, autocast=autocast)
    with_eos = [c + [eos] if e else list(c) for c, e in zip(s.completions, s.ended, strict=True)]
    scores = torch.as_tensor(reward_fn(rows, with_eos), dtype=torch.float32).detach().cpu().flatten()
    if scores.numel() != len(rows):
        raise ValueError(f"reward_fn returned {scores.numel()} scores for {len(rows)} completions")
    if not bool(torch.isfinite(scores).all()):
        raise FloatingPointError("best_of_n: reward_fn returned NaN/inf scores")
    scores = scores.view(len(prompts), n)  # [P, n]
    # first index of the row maximum (torch.argmax does not promise the first on ties)
    is_max = scores == scores.max(dim=1, keepdim=True).values
    chosen = [int(torch.nonzero(is_max[i])[0]) for i in range(len(prompts))]
    comps = [s.completions[i * n + j] for i, j in enumerate(chosen)]
    if not return_details:
        return comps
    return BestOfNResult(
        completions=comps,
        ended=[s.ended[i * n + j] for i, j in enumerate(chosen)],
        scores=scores,
        chosen=chosen,
        candidates=[s.completions[i * n : (i + 1) * n] for i in range(len(prompts))],
        tokens_generated=s.tokens_generated,
    )


def best_of_n_kl_estimate(pool_scores, n: int) -> float:
    """KL(best-of-n || base) for one prompt, estimated from an i.i.d. pool of base samples' rewards (e.g. the n
    candidates themselves), counting ties.

    Candidates are grouped by reward value (identical completions score identically; different completions with
    one score are selected uniformly among themselves, so the group-level KL is the completion-level KL). A value
    seen once in the pool is treated as part of a continuous distribution, a value seen c >= 2 times as an atom of
    probability c / pool. Walking up the estimated reward CDF F: an atom of mass p above F0 has best-of-n mass
    q = (F0 + p)^n - F0^n and contributes q log(q / p); a continuous stretch from F0 to F1 (density ratio
    n F^(n-1)) contributes G(F1) - G(F0) with G(u) = u^n (log n + (n - 1) log u - (n - 1) / n). With no ties this
    is exactly the analytic log n - (n - 1) / n; ties (atoms) make it smaller (Beirami et al. 2024).
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"best_of_n_kl_estimate needs an integer n >= 1, got {n!r}")
    x = torch.as_tensor(pool_scores, dtype=torch.float64).flatten()
    if x.numel() == 0:
        raise ValueError("best_of_n_kl_estimate: empty pool")
    values, counts = torch.unique(x, sorted=True, return_counts=True)

    def G(u: float) -> float:
        return 0.0 if u <= 0 else u ** n * (math.log(n) + (n - 1) * math.log(u) - (n - 1) / n)

    total, f0, kl = float(x.numel()), 0.0, 0.0
    for c in counts.tolist():
        p = c / total
        f1 = min(1.0, f0 + p)
        if c == 1:
            kl += G(f1) - G(f0)
        else:
            q = f1 ** n - f0 ** n
            kl += q * math.log(q / p) if q > 0 else 0.0
        f0 = f1
    return kl


def best_of_n_kl(n: int) -> float:
    """Analytic KL(best-of-n || base) = log n - (n - 1) / n (nats); 0 for n = 1."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"best_of_n_kl needs an integer n >= 1, got {n!r}")
    return math.log(n) - (n - 1) / n
