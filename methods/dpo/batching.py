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
def _fill_rows(sizes: list[int], cap: int) -> list[list[int]]:
    """Pairs back to back in input order, a new row whenever the next pair would pass ``cap`` tokens."""
    rows: list[list[int]] = [[]]
    used = 0
    for i, n in enumerate(sizes):
        if rows[-1] and used + n > cap:
            rows.append([])
            used = 0
        rows[-1].append(i)
        used += n
    return rows


def pack_rows(sizes: list[int], pack_len: int) -> list[list[int]]:
    """Pair indices per row: pairs back to back in input order, the fewest rows of at most ``pack_len`` tokens,
    balanced (the smallest row length that needs no more rows). Attention costs T^2 per row, so one long row and a
    short remainder is the slowest way to hold them; the log-probs do not depend on the arrangement (each pair
    attends only to itself), up to float rounding."""
    for i, n in enumerate(sizes):
        if n > pack_len:
            raise ValueError(f"pair {i} has {n} tokens, more than pack_len={pack_len}")
    n_rows = len(_fill_rows(sizes, pack_len))  # greedy filling needs the fewest rows
    lo, hi = max(sizes, default=0), pack_len  # the row count only falls as the cap grows: bisect the cap
    while lo < hi:
        mid = (lo + hi) // 2
        if len(_fill_rows(sizes, mid)) <= n_rows:
            hi = mid
        else:
            lo = mid + 1
    return _fill_rows(sizes, lo)


def packed_batch(examples: list[PairExample], pad_id: int, pack_len: int | None = None) -> dict[str, torch.Tensor]:
    """Pack pairs into rows (:func:`pack_rows`); returns input ids, position ids, a boolean 4D mask and the
    gather indices."""
    sizes = [e.n_tokens_packed for e in examples]
    rows = pack_rows(sizes, sum(sizes) if pack_len is None else pack_len)
    R, T = len(rows), max(sum(sizes[i] for i in r) for r in rows)
    ids = torch.full((R, T), pad_id, dtype=torch.long)
    pos = torch.zeros((R, T), dtype=torch.long)
    # per position: its pair (-1: padding) and branch (0 prompt, 1 chosen, 2 rejected); the mask is built from
    # them in one vectorised expression (a per-pair loop of small tril/slice writes cost more than the forward
    # on a busy 2-thread CPU)
    pair = torch.full((R, T), -1, dtype=torch.long)
    branch = torch.zeros((R, T), dtype=torch.long)
    # prediction sites: flat index of the position whose logits predict each completion token, and the token
    pred_c, tgt_c, seg_c, pred_r, tgt_r, seg_r = [], [], [], [], [], []
    for r, members in enumerate(rows):
        o = 0
        for i in members:
            e = examples[i]
            p, c, q = len(e.prompt), len(e.chosen), len(e.rejected)
            n = p + c + q
            ids[r, o : o + n] = torch.tensor(e.prompt + e.chosen + e.rejected)
            pos[r, o : o + n] = torch.cat([torch.arange(p + c), torch.arange(p, p + q)])
            pair[r, o : o + n] = i
            branch[r, o + p : o + p + c] = 1
            branch[r, o + p + c : o + n] = 2
            base = r * T
            # chosen token j is predicted by the previous token of its branch: last prompt token for j = 0
            pred_c += [base + o + p - 1] + [base + o + p + j - 1 for j in range(1, c)]
            pred_r += [base + o + p - 1] + [base + o + p + c + j - 1 for j in range(1, q)]
            tgt_c += e.chosen
            tgt_r += e.rejected
            seg_c += [i] * c
            seg_r += [i] * q
            o += n
    # query i may attend key j: same pair, j <= i, and j is a prompt token or in i's own branch (chosen never sees
    # rejected and vice versa); padding attends to itself only (no NaN in softmax)
    idx = torch.arange(T)
    q_pair, k_pair = pair[:, :, None], pair[:, None, :]
    q_br, k_br = branch[:, :, None], branch[:, None, :]
    allow = (q_pair == k_pair) & (idx[None, :, None] >= idx[None, None, :]) & ((k_br == 0) | (k_br == q_br))
    allow &= (q_pair >= 0) | (idx[:, None] == idx[None, :])  # padding query: the diagonal only
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
