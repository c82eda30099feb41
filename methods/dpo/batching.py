"""Turning tokenised preference pairs into model inputs and per-sequence log-probs.

Two layouts, one log-prob core (``methods.logprobs.logps_at``):

* ``padded``: the DPO reference repo's / TRL's layout, chosen rows then rejected rows in one right-padded
  [2B, T] batch (one concatenated forward).
* ``packed``: padding-free and prompt-sharing. Each pair is laid out once as ``prompt | chosen | rejected``
  and pairs are packed back to back into rows of at most ``pack_len`` tokens. A block-sparse 4D attention
  mask lets chosen tokens see the prompt and earlier chosen tokens, rejected tokens see the prompt and
  earlier rejected tokens, and nothing else; position ids restart for each branch. The prompt is computed
  once instead of twice and no padding tokens are computed. Exactly the same log-probs as ``padded``
  (tested to fp32 rounding).
"""

from __future__ import annotations

import torch

from methods.data import PairExample, collate  # noqa: F401 - PairExample re-exported
from methods.logprobs import logps_at, token_logps


def _reduce(lp: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n = mask.sum(-1)
    s = lp.sum(-1)
    return s, s / n.clamp_min(1)


# ------------------------------------------------------------------------------------------------ padded
def padded_batch(examples: list[PairExample], pad_id: int) -> dict[str, torch.Tensor]:
    prompts = [e.prompt for e in examples] * 2
    comps = [e.chosen for e in examples] + [e.rejected for e in examples]
    return collate(prompts, comps, pad_id)


def padded_logps(model, batch: dict[str, torch.Tensor]):
    """-> (chosen_sum, rejected_sum, chosen_mean, rejected_mean), each [B], from one forward of [2B, T]."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    lp, mask = token_logps(logits, batch["labels"])
    s, m = _reduce(lp, mask)
    B = s.shape[0] // 2
    return s[:B], s[B:], m[:B], m[B:]


# ------------------------------------------------------------------------------------------------ packed
def packed_batch(examples: list[PairExample], pad_id: int, pack_len: int | None = None) -> dict[str, torch.Tensor]:
    """Pack pairs into rows; returns input ids, position ids, a boolean 4D mask and the gather indices."""
    if pack_len is None:
        pack_len = sum(e.n_tokens_packed for e in examples)
    rows: list[list[int]] = [[]]
    for i, e in enumerate(examples):
        if e.n_tokens_packed > pack_len:
            raise ValueError(f"pair {i} has {e.n_tokens_packed} tokens, more than pack_len={pack_len}")
        if len(rows[-1]) + e.n_tokens_packed > pack_len:
            rows.append([])
        rows[-1].append(i)
    R, T = len(rows), max(sum(examples[i].n_tokens_packed for i in r) for r in rows)
    ids = torch.full((R, T), pad_id, dtype=torch.long)
    pos = torch.zeros((R, T), dtype=torch.long)
    allow = torch.zeros((R, T, T), dtype=torch.bool)
    # prediction sites: flat index of the position whose logits predict each completion token, and the token
    pred_c, tgt_c, seg_c, pred_r, tgt_r, seg_r = [], [], [], [], [], []
    for r, members in enumerate(rows):
        o = 0
        for i in members:
            e = examples[i]
            p, c, q = len(e.prompt), len(e.chosen), len(e.rejected)
            P, C, Q = slice(o, o + p), slice(o + p, o + p + c), slice(o + p + c, o + p + c + q)
            ids[r, P], ids[r, C], ids[r, Q] = torch.tensor(e.prompt), torch.tensor(e.chosen), torch.tensor(e.rejected)
            pos[r, P] = torch.arange(p)
            pos[r, C] = torch.arange(p, p + c)
            pos[r, Q] = torch.arange(p, p + q)
            tri = lambda n: torch.ones(n, n, dtype=torch.bool).tril()  # noqa: E731 - causal block
            allow[r, P, P] = tri(p)
            allow[r, C, P] = True
            allow[r, C, C] = tri(c)
            allow[r, Q, P] = True
            allow[r, Q, Q] = tri(q)
            base = r * T
            # chosen token j is predicted by the previous token of its branch: last prompt token for j = 0
            pred_c += [base + o + p - 1] + [base + o + p + j - 1 for j in range(1, c)]
            pred_r += [base + o + p - 1] + [base + o + p + c + j - 1 for j in range(1, q)]
            tgt_c += e.chosen
            tgt_r += e.rejected
            seg_c += [i] * c
            seg_r += [i] * q
            o += p + c + q
        allow[r, o:, :] = False
        idx = torch.arange(T)
        allow[r, idx[o:], idx[o:]] = True  # padding rows attend to themselves only (no NaN in softmax)
    return {"input_ids": ids, "position_ids": pos, "attention_mask": allow[:, None, :, :],
            "pred_c": torch.tensor(pred_c), "tgt_c": torch.tensor(tgt_c), "seg_c": torch.tensor(seg_c),
            "pred_r": torch.tensor(pred_r), "tgt_r": torch.tensor(tgt_r), "seg_r": torch.tensor(seg_r),
            "n_pairs": torch.tensor(len(examples))}


def packed_logps(model, batch: dict[str, torch.Tensor]):
    """Same outputs as :func:`padded_logps` from the packed, prompt-sharing layout."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   position_ids=batch["position_ids"], use_cache=False).logits
    flat = logits.reshape(-1, logits.shape[-1])  # [R*T, V]
    B = int(batch["n_pairs"])
    out = []
    for pred, tgt, seg in (("pred_c", "tgt_c", "seg_c"), ("pred_r", "tgt_r", "seg_r")):
        lp = logps_at(flat[batch[pred]], batch[tgt])  # [N_tokens]
        s = torch.zeros(B, dtype=lp.dtype, device=lp.device).index_add_(0, batch[seg], lp)
        n = torch.zeros(B, dtype=lp.dtype, device=lp.device).index_add_(0, batch[seg], torch.ones_like(lp))
        out.append((s, s / n.clamp_min(1)))
    (cs, cm), (rs, rm) = out
    return cs, rs, cm, rm


def make_batch(examples: list[PairExample], pad_id: int, layout: str, pack_len: int | None = None):
    if layout == "padded":
        return padded_batch(examples, pad_id)
    if layout == "packed":
        return packed_batch(examples, pad_id, pack_len)
    raise ValueError(f"layout must be 'padded' or 'packed', got {layout!r}")


def pair_logps(model, batch: dict[str, torch.Tensor]):
    return packed_logps(model, batch) if "pred_c" in batch else padded_logps(model, batch)


def batch_to(batch: dict[str, torch.Tensor], device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}
