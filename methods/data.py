"""Prompt/completion tokenisation and batching shared by every method (DPO, reward model, Preferred-FT,
evaluation), so all arms see identical token sequences.

Tokenisation follows TRL 1.16's DPOTrainer exactly (for parity with the TRL peer arm): EOS is appended to
the completion *text*, ``prompt`` and ``prompt + completion`` are tokenised separately (with the
tokenizer's special tokens, e.g. BOS) and the completion starts where the two token lists diverge.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from methods.logprobs import IGNORE_INDEX, sequence_logps


def common_prefix_length(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def tokenize_prompt_completions(tokenizer, prompt: str, completions: list[str], *, add_eos: bool = True):
    """-> (prompt_ids, [completion_ids, ...]) with one prompt cut shared by all completions (TRL's rule)."""
    eos = tokenizer.eos_token or ""
    p_ids = tokenizer(prompt)["input_ids"]
    full = []
    for c in completions:
        text = c + eos if add_eos and not c.endswith(eos) else c
        full.append(tokenizer(prompt + text)["input_ids"])
    cut = min(common_prefix_length(p_ids, f) for f in full)
    return p_ids[:cut], [f[cut:] for f in full]


def truncate(prompt_ids: list[int], completion_ids: list[int], max_length: int | None,
             mode: str = "keep_start") -> tuple[list[int], list[int], bool]:
    """Cut prompt+completion to ``max_length`` tokens. keep_start drops the end of the completion;
    keep_end drops the start of the prompt. Returns (prompt, completion, was_truncated)."""
    if max_length is None or len(prompt_ids) + len(completion_ids) <= max_length:
        return prompt_ids, completion_ids, False
    if mode == "keep_start":
        keep_c = max(0, max_length - len(prompt_ids))
        return prompt_ids[:max_length], completion_ids[:keep_c], True
    if mode == "keep_end":
        keep_p = max(0, max_length - len(completion_ids))
        return prompt_ids[len(prompt_ids) - keep_p :] if keep_p else [], completion_ids[-max_length:], True
    raise ValueError(f"truncation mode must be 'keep_start' or 'keep_end', got {mode!r}")


def collate(prompts: list[list[int]], completions: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch of prompt+completion rows; labels score the completion tokens only."""
    rows = [p + c for p, c in zip(prompts, completions, strict=True)]
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    attn = torch.zeros((len(rows), T), dtype=torch.long)
    labels = torch.full((len(rows), T), IGNORE_INDEX, dtype=torch.long)
    for i, (p, c) in enumerate(zip(prompts, completions, strict=True)):
        n = len(p) + len(c)
        ids[i, :n] = torch.tensor(p + c)
        attn[i, :n] = 1
        labels[i, len(p) : n] = torch.tensor(c, dtype=torch.long)
    return {"input_ids": ids, "attention_mask": attn, "labels": labels}


@torch.no_grad()
def completion_logps(model, prompts: list[list[int]], completions: list[list[int]], *, pad_id: int,
                     batch_size: int = 64, average: bool = False, autocast=None) -> torch.Tensor:
    """log pi(completion | prompt) summed (or averaged) over completion tokens, for many rows: [N] fp32."""
    import contextlib

    model.eval()
    device = next(model.parameters()).device
    out = []
    ctx = autocast if autocast is not None else contextlib.nullcontext()
    for i in range(0, len(prompts), batch_size):
        b = collate(prompts[i : i + batch_size], completions[i : i + batch_size], pad_id)
        b = {k: v.to(device) for k, v in b.items()}
        # only positions that predict a completion token need logits: skip the LM head over the shared prompt
        # part (most of a chat prompt; the head is the costliest layer of a 49k-vocabulary model)
        start = max(0, min(len(p) for p in prompts[i : i + batch_size]) - 1)
        with ctx:
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False,
                           logits_to_keep=b["input_ids"].shape[1] - start).logits
        out.append(sequence_logps(logits, b["labels"][:, start:], average=average).float().cpu())
    return torch.cat(out) if out else torch.zeros(0)


@dataclass
class PairExample:
    prompt: list[int]
    chosen: list[int]
    rejected: list[int]

    @property
    def n_tokens_padded_layout(self) -> int:
        return 2 * len(self.prompt) + len(self.chosen) + len(self.rejected)

    @property
    def n_tokens_packed(self) -> int:
        return len(self.prompt) + len(self.chosen) + len(self.rejected)


def tokenize_pairs(tokenizer, rows, *, max_length: int, truncation_mode: str) -> tuple[list[PairExample], int]:
    """TRL-style tokenisation of prompt/chosen/rejected rows, truncated as configured; returns the number cut."""
    out, n_cut = [], 0
    for r in rows:
        p, (c, j) = tokenize_prompt_completions(tokenizer, r["prompt"], [r["chosen"], r["rejected"]])
        p1, c, cut1 = truncate(p, c, max_length, truncation_mode)
        p2, j, cut2 = truncate(p, j, max_length, truncation_mode)
        if p1 != p2:  # keep_end cut the prompt differently for the two: use the shorter common prompt
            keep = min(len(p1), len(p2))
            p1 = p1[len(p1) - keep :]
            c, j = c[-(max_length - keep) :], j[-(max_length - keep) :]
        if not c or not j:
            raise ValueError(f"pair with prompt {r['prompt'][:60]!r}: the prompt fills max_length={max_length}; raise max_length")
        n_cut += cut1 or cut2
        out.append(PairExample(p1, c, j))
    if not out:
        raise ValueError("empty preference dataset: no pairs to train on")
    return out, n_cut
