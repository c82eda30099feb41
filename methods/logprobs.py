"""Logits -> masked per-sequence log-probs: the ONE path every method (SFT, DPO, reward model, PPO, eval)
uses, so a bug here cannot become a fake difference between methods.

Convention (as in the DPO reference repo's ``_get_batch_logps``): ``labels`` is ``input_ids`` with every
position that must not be scored (prompt, padding) set to ``IGNORE_INDEX``; logits at position t predict
the token at t + 1 (the one-token shift).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def token_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs of the labels under the logits, after the one-token shift.

    logits: [B, T, V] (any float dtype; computed in fp32), labels: [B, T] with IGNORE_INDEX where unscored.
    Returns (logps [B, T-1], mask [B, T-1] float), logps zero where masked.
    """
    if logits.shape[:2] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} disagree on [B, T]")
    logits = logits[:, :-1, :]  # [B, T-1, V]: position t predicts token t+1
    labels = labels[:, 1:]  # [B, T-1]
    mask = labels != IGNORE_INDEX
    safe = torch.where(mask, labels, torch.zeros_like(labels))
    logps = logps_at(logits.reshape(-1, logits.shape[-1]), safe.reshape(-1)).view(labels.shape)  # [B, T-1]
    return logps * mask, mask.to(logps.dtype)


def logps_at(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[target] for rows of logits [N, V] and targets [N], computed in fp32.

    The core every log-prob in the project goes through (padded batches via :func:`token_logps`, packed
    prompt-sharing batches by gathering the predicting positions first).
    """
    # log_softmax + gather == -cross_entropy; cross_entropy avoids materialising the [N, V] log-softmax
    return -F.cross_entropy(logits.float(), targets, reduction="none")


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor, *, average: bool = False) -> torch.Tensor:
    """Sum (or mean over scored tokens, for IPO/SimPO) of the label log-probs per sequence: [B]."""
    logps, mask = token_logps(logits, labels)
    total = logps.sum(-1)
    if average:
        return total / mask.sum(-1).clamp_min(1.0)
    return total


def build_labels(input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_lens: torch.Tensor) -> torch.Tensor:
    """Labels for right-padded prompt+completion rows: prompt tokens and padding -> IGNORE_INDEX.

    input_ids/attention_mask: [B, T]; prompt_lens: [B] number of prompt tokens at the start of each row.
    """
    pos = torch.arange(input_ids.shape[1], device=input_ids.device)[None, :]  # [1, T]
    keep = (pos >= prompt_lens[:, None]) & attention_mask.bool()
    return torch.where(keep, input_ids, torch.full_like(input_ids, IGNORE_INDEX))


def token_logps_nocopy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`token_logps` (same core, :func:`logps_at`; bitwise the same log-probs and gradients) without copying
    the shifted [B, T-1, V] slice of the logits: every row of the contiguous [B*T, V] logits is scored (the last
    position, which predicts nothing, against token 0) and the last column dropped after. What the on-policy
    engine's forwards use (``methods.onpolicy``). Returns (logps [B, T-1] zero where masked, mask [B, T-1] float)."""
    if logits.shape[:2] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} disagree on [B, T]")
    B, T, V = logits.shape
    tgt = labels[:, 1:]  # position t predicts token t + 1
    mask = tgt != IGNORE_INDEX
    safe = torch.cat([torch.where(mask, tgt, torch.zeros_like(tgt)), tgt.new_zeros(B, 1)], dim=1)  # [B, T]
    logps = logps_at(logits.reshape(B * T, V), safe.reshape(-1)).view(B, T)[:, :-1]
    return logps * mask, mask.to(logps.dtype)
