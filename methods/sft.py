"""Maximum-likelihood training of a causal LM: pretraining of the tiny base, SFT (-> pi_ref), and the
Preferred-FT baseline. The loss goes through the shared log-prob path (``methods.logprobs``)."""

from __future__ import annotations

import math
import random
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from tqdm.auto import tqdm

from methods.logprobs import IGNORE_INDEX, token_logps


def pack_documents(docs_ids: list[list[int]], seq_len: int, *, bos_id: int | None, eos_id: int) -> torch.Tensor:
    """Concatenate BOS + doc + EOS for every document and cut the stream into [N, seq_len] windows."""
    stream: list[int] = []
    for ids in docs_ids:
        if bos_id is not None:
            stream.append(bos_id)
        stream.extend(ids)
        stream.append(eos_id)
    n = len(stream) // seq_len
    if n == 0:
        raise ValueError(f"corpus has {len(stream)} tokens, fewer than one sequence of {seq_len}")
    return torch.tensor(stream[: n * seq_len]).view(n, seq_len)


def packed_batches(windows: torch.Tensor, batch_size: int, seed: int) -> Iterator[tuple[torch.Tensor, ...]]:
    """Endless shuffled batches (input_ids, attention_mask, labels) of packed windows, epoch by epoch."""
    rng = random.Random(seed)
    epoch = 0
    while True:
        order = list(range(windows.shape[0]))
        rng.shuffle(order)
        for i in range(0, len(order) - batch_size + 1, batch_size):
            x = windows[order[i : i + batch_size]]
            yield x, torch.ones_like(x), x
        epoch += 1


def completion_batches(prompts: list[list[int]], completions: list[list[int]], batch_size: int, pad_id: int,
                       seed: int) -> Iterator[tuple[torch.Tensor, ...]]:
    """Endless shuffled batches (input_ids, attention_mask, labels) of prompt+completion rows, right-padded;
    only completion tokens are scored (TRL SFTTrainer's completion_only_loss)."""
    from methods.data import collate

    if len(prompts) < batch_size:
        raise ValueError(f"{len(prompts)} SFT examples for a batch of {batch_size}; lower sft.batch_size")
    rng = random.Random(seed)
    while True:
        order = list(range(len(prompts)))
        rng.shuffle(order)
        for i in range(0, len(order) - batch_size + 1, batch_size):
            idx = order[i : i + batch_size]
            b = collate([prompts[j] for j in idx], [completions[j] for j in idx], pad_id)
            yield b["input_ids"], b["attention_mask"], b["labels"]


def lr_lambda(warmup: int, total: int, floor: float = 0.1):
    """Linear warm-up, then cosine decay to ``floor`` x peak."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) / max(1, total - warmup)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    return f


def lm_loss(model, input_ids, attention_mask, labels) -> tuple[torch.Tensor, int]:
    """Mean next-token NLL over scored tokens (labels != IGNORE_INDEX), via the shared log-prob path."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    lp, mask = token_logps(logits, labels)
    n = mask.sum()
    return -(lp.sum() / n.clamp_min(1)), int(n)


class TrainingStopped(Exception):
    """``train_lm`` stopped on ``stop()`` after ``step`` of ``steps``; its checkpoint (if a path was given) is written."""

    def __init__(self, step: int, steps: int):
        super().__init__(f"stopped after step {step} of {steps}")
        self.step, self.steps = step, steps


def train_lm(model, batches: Iterator, *, steps: int, lr: float, warmup_steps: int, weight_decay: float,
             grad_clip: float, device: str, autocast, desc: str, log_every: int = 10, checkpoint_path=None,
             checkpoint_every: int = 0, stop=None, on_resume=None) -> list[dict]:
    """AdamW loop; returns the training curve (step, loss, lr, tokens seen, tokens/s, grad norm).

    Resumable: with ``checkpoint_path`` the model, optimiser, schedule, RNG states and curve are written every
    ``checkpoint_every`` steps (atomically) and when ``stop()`` turns true (then ``TrainingStopped`` is raised);
    a checkpoint found at the start is loaded, ``batches`` (a deterministic iterator) is advanced past the steps
    it covers, ``on_resume(step)`` is called, and the run continues to the same weights as an uninterrupted one."""
    from methods.checkpointing import atomic_torch_save, rng_state, set_rng_state

    model.to(device).train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(warmup_steps, steps))
    history, tokens, start = [], 0, 0
    meta = {"steps": steps, "lr": lr, "warmup_steps": warmup_steps, "desc": desc}

    def save(step: int) -> None:
        atomic_torch_save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                           "step": step, "tokens": tokens, "history": history, "rng": rng_state(), "meta": meta},
                          checkpoint_path)

    if checkpoint_path is not None and Path(checkpoint_path).exists():
        ck = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
        if ck.get("meta") == meta and ck["step"] <= steps:
            model.load_state_dict(ck["model"])
            opt.load_state_dict(ck["opt"])
            sched.load_state_dict(ck["sched"])
            start, tokens, history = ck["step"], ck["tokens"], ck["history"]
            set_rng_state(ck["rng"])
            for _ in range(start):  # the same batches as the uninterrupted run from here on
                next(batches)
            if on_resume is not None:
                on_resume(start)
    t0, tokens0 = time.perf_counter(), tokens
    bar = tqdm(range(start, steps), desc=desc, leave=False, mininterval=2.0, disable=None)  # off when not a TTY
    for step in bar:
        input_ids, attn, labels = (t.to(device) for t in next(batches))
        with autocast:
            loss, n = lm_loss(model, input_ids, attn, labels)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss in phase '{desc}' at step {step}; lower the learning rate")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()
        sched.step()
        tokens += n
        if step % log_every == 0 or step == steps - 1:
            tps = (tokens - tokens0) / (time.perf_counter() - t0)
            history.append({"step": step + 1, "loss": loss.item(), "lr": sched.get_last_lr()[0],
                            "tokens_seen": tokens, "tokens_per_s": tps, "grad_norm": float(gnorm)})
            bar.set_postfix(loss=f"{loss.item():.3f}", tok_s=f"{tps:,.0f}")
        done = step + 1
        if stop is not None and stop():  # (after the last step too: the stage has not finished, the re-run resumes)
            if checkpoint_path is not None:
                save(done)
            raise TrainingStopped(done, steps)
        if checkpoint_path is not None and checkpoint_every and done % checkpoint_every == 0 and done < steps:
            save(done)
    model.eval()
    return history


@torch.no_grad()
def eval_loss(model, windows: torch.Tensor, *, batch_size: int, device: str, autocast) -> float:
    """Mean token NLL of ``windows`` ([N, T] packed, all tokens scored)."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, windows.shape[0], batch_size):
        x = windows[i : i + batch_size].to(device)
        with autocast:
            loss, n = lm_loss(model, x, torch.ones_like(x), x)
        total += loss.item() * n
        count += n
    return total / max(count, 1)


__all__ = ["IGNORE_INDEX", "TrainingStopped", "eval_loss", "lm_loss", "lr_lambda", "pack_documents", "packed_batches", "train_lm"]
