"""One sampler for every stage (preference pairs, PPO rollouts, best-of-N, evaluation).

KV-cache ancestral sampling with left padding and explicit position ids. Randomness is per *row*: each row
gets its own seed and draws its t-th token by inverse-CDF with the t-th uniform of that seed, so a
completion depends only on (model, prompt, temperature, seed) — not on batch size, batch neighbours or
the order prompts are processed in. Temperature 0 is greedy decoding.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch


@dataclass
class Samples:
    completions: list[list[int]]
    """Sampled token ids per row, EOS excluded."""
    ended: list[bool]
    """True where the row stopped on EOS (False: cut at max_new_tokens)."""
    tokens_generated: int


def derive_seed(*parts: int) -> int:
    """A 62-bit seed derived from integers (numpy SeedSequence hashing: no correlated neighbours); the one way every
    method turns (run seed, iteration, row, ...) into a per-row sampling seed."""
    import numpy as np

    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, dtype=np.uint64)[0] >> 2)


def _cache_kw(model) -> str:
    """transformers >= 5.2x renamed `past_key_values` to `cache`; accept both."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _cache_of(out):
    return out.cache if "cache" in out else out.past_key_values


def _row_uniforms(seeds: list[int], n: int) -> torch.Tensor:
    out = torch.empty(len(seeds), n)
    for i, s in enumerate(seeds):
        g = torch.Generator().manual_seed(int(s) % (2**63 - 1))
        out[i] = torch.rand(n, generator=g)
    return out


@torch.no_grad()
def sample(
    model,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    temperature: float,
    seeds: list[int],
    eos_token_id: int,
    pad_token_id: int,
    batch_size: int = 256,
    autocast=None,
    on_batch=None,
) -> Samples:
    """Sample one completion per prompt (repeat a prompt with different seeds for several); ``on_batch(rows,
    new_tokens)`` is called after each batch (a progress bar)."""
    if len(seeds) != len(prompts):
        raise ValueError(f"need one seed per prompt: {len(prompts)} prompts, {len(seeds)} seeds")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("empty prompt: every prompt needs at least one token (e.g. BOS)")
    max_pos = getattr(model.config, "max_position_embeddings", None)
    longest = max(len(p) for p in prompts)
    if max_pos is not None and longest + max_new_tokens > max_pos:
        raise ValueError(
            f"prompt of {longest} tokens + max_new_tokens {max_new_tokens} exceeds the model's context "
            f"({max_pos}); shorten the prompts or lower max_new_tokens"
        )
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    # longest prompts first keeps padding low; results are put back in input order
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    comps: list[list[int]] = [[] for _ in prompts]
    ended = [False] * len(prompts)
    n_tok = 0
    ctx = autocast if autocast is not None else torch.autocast("cpu", enabled=False)
    for b0 in range(0, len(order), batch_size):
        idx = order[b0 : b0 + batch_size]
        B, L = len(idx), max(len(prompts[i]) for i in idx)
        ids = torch.full((B, L), pad_token_id, dtype=torch.long)
        attn = torch.zeros((B, L), dtype=torch.long)
        for r, i in enumerate(idx):
            p = prompts[i]
            ids[r, L - len(p) :] = torch.tensor(p)
            attn[r, L - len(p) :] = 1
        ids, attn = ids.to(device), attn.to(device)
        pos = (attn.cumsum(-1) - 1).clamp_min(0)
        u = _row_uniforms([seeds[i] for i in idx], max_new_tokens).to(device)  # [B, max_new]
        with ctx:
            out = model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=True)
        past, logits = _cache_of(out), out.logits[:, -1, :].float()  # [B, V]
        finished = torch.zeros(B, dtype=torch.bool, device=device)
        next_pos = pos[:, -1] + 1  # [B]
        toks = []
        for t in range(max_new_tokens):
            if temperature == 0:
                nxt = logits.argmax(-1)
            else:
                cdf = torch.softmax(logits / temperature, dim=-1).cumsum(-1)  # [B, V]
                nxt = torch.searchsorted(cdf, (u[:, t : t + 1] * cdf[:, -1:]).contiguous()).squeeze(-1)
                nxt = nxt.clamp_max(logits.shape[-1] - 1)
            nxt = torch.where(finished, torch.full_like(nxt, pad_token_id), nxt)
            toks.append(nxt)
            n_tok += int((~finished).sum())
            finished = finished | (nxt == eos_token_id)
            if bool(finished.all()) or t == max_new_tokens - 1:
                break
            attn = torch.cat([attn, (~finished | (nxt == eos_token_id)).long()[:, None]], dim=1)
            with ctx:
                out = model(input_ids=nxt[:, None], attention_mask=attn, position_ids=next_pos[:, None],
                            use_cache=True, **{_cache_kw(model): past})
            past, logits = _cache_of(out), out.logits[:, -1, :].float()
            next_pos = next_pos + 1
        gen = torch.stack(toks, dim=1).cpu()  # [B, t]
        for r, i in enumerate(idx):
            row = gen[r].tolist()
            if eos_token_id in row:
                row = row[: row.index(eos_token_id)]
                ended[i] = True
            comps[i] = row
        if on_batch is not None:
            on_batch(len(idx), n_tok)
    model.train(was_training)
    return Samples(completions=comps, ended=ended, tokens_generated=n_tok)
