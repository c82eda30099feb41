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


def best_of_n_kl(n: int) -> float:
    """Analytic KL(best-of-n || base) = log n - (n - 1) / n (nats); 0 for n = 1."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"best_of_n_kl needs an integer n >= 1, got {n!r}")
    return math.log(n) - (n - 1) / n
