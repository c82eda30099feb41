"""The default task: controlled sentiment generation (DPO paper, Sec. 6.1), made offline.

Prompts are 2-8-token prefixes of documents; the policy must continue them with positive (or negative)
sentiment; the gold reward is VADER's compound score of the completion, in [-1, 1].
"""

from __future__ import annotations

import random
import statistics
from dataclasses import asdict
from pathlib import Path

from benchmarks import utils
from benchmarks.errors import check
from benchmarks.tasks import corpus as corpus_mod
from benchmarks.tasks.gold import gold_reward  # noqa: F401 - the scorer, re-exported
from benchmarks.tasks.registry import Task, load_docs, register_task


def chat_prompt(tokenizer, instruction: str, prefix: str) -> str:
    """The chat-templated prompt text of the instruction-following variant: one user turn
    ``instruction.format(prefix=prefix)`` and the assistant's generation prompt (the model's own template)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("task.chat_instruction is set but the model's tokenizer has no chat template; use an "
                         "instruction-tuned model (e.g. SmolLM2-135M-Instruct) or leave chat_instruction empty")
    return tokenizer.apply_chat_template([{"role": "user", "content": instruction.format(prefix=prefix)}],
                                         add_generation_prompt=True, tokenize=False)


def make_prompts(docs: list[str], tokenizer, *, n: int, min_tokens: int, max_tokens: int, seed: int,
                 id_prefix: str, chat_instruction: str = "") -> list[dict]:
    """``n`` prompts: a prefix of 2-8 (min..max) tokens of distinct documents, as text plus token ids.

    The prefix length is drawn uniformly per document; documents shorter than the prefix + 4 tokens are
    skipped so every prompt leaves something to continue. Prompt ids start with BOS when the tokenizer has one.
    With ``chat_instruction`` (e.g. "Continue this text: {prefix}") the prompt is instead the chat-templated
    user turn built from the prefix, tokenised as the pairs' prompts are (``tokenizer(text)``); the row keeps
    the raw ``prefix``.
    """
    rng = random.Random(seed)
    order = list(range(len(docs)))
    rng.shuffle(order)
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    out = []
    for i in order:
        ids = tokenizer(docs[i], add_special_tokens=False)["input_ids"]
        k = rng.randint(min_tokens, max_tokens)
        if len(ids) < k + 4:
            continue
        text = tokenizer.decode(ids[:k])
        if "\ufffd" in text:  # byte-level BPE cut inside a multi-byte character
            continue
        if chat_instruction:
            chat = chat_prompt(tokenizer, chat_instruction, text)
            out.append({"prompt_id": f"{id_prefix}{len(out)}", "prompt": chat, "prompt_ids": tokenizer(chat)["input_ids"],
                        "prefix": text, "doc_index": i})
        else:
            out.append({"prompt_id": f"{id_prefix}{len(out)}", "prompt": text, "prompt_ids": bos + ids[:k], "doc_index": i})
        if len(out) == n:
            break
    if len(out) < n:
        raise ValueError(
            f"only {len(out)} documents are long enough for {id_prefix.rstrip('-')} prompts, {n} asked; "
            "lower task.n_train_prompts / task.n_eval_prompts or add text sources"
        )
    return out


def chat_sft_examples(docs: list[str], tokenizer, *, instruction: str, min_tokens: int, max_tokens: int,
                      max_completion_tokens: int, seed: int) -> list[tuple[str, str]]:
    """(chat prompt, continuation) SFT pairs of the instruction-following variant: each document is cut after
    a random 2-8-token prefix; the rest (at most ``max_completion_tokens`` tokens) is the assistant's answer."""
    rng = random.Random(seed)
    out = []
    for doc in docs:
        ids = tokenizer(doc, add_special_tokens=False)["input_ids"]
        k = rng.randint(min_tokens, max_tokens)
        if len(ids) < k + 4:
            continue
        prefix, rest = tokenizer.decode(ids[:k]), tokenizer.decode(ids[k : k + max_completion_tokens])
        if "\ufffd" in prefix + rest:
            continue
        out.append((chat_prompt(tokenizer, instruction, prefix), rest))
    return out


# ------------------------------------------------------------------------------------------------ the task
@register_task
class SentimentTask(Task):
    """Controlled sentiment generation: text from ``task.corpus``, prompts = document prefixes, gold = ``task.gold``
    (VADER by default) with the sign of ``task.target``."""

    name = "sentiment"
    default_judges = ("textblob",)

    def validate(self, t, key: str) -> None:
        check(t.corpus is not None, f"{key}.corpus", "required for task 'sentiment': give sources and task_sources")
        check(not t.dataset, f"{key}.dataset", "only the 'dialogue' task reads a dataset; the sentiment task's text is task.corpus")
        if t.chat_instruction:
            check("{prefix}" in t.chat_instruction, f"{key}.chat_instruction",
                  f"must contain '{{prefix}}' where the document prefix goes, got {t.chat_instruction!r}")

    def data_key(self, c) -> dict:
        return {"corpus": asdict(c.task.corpus)}

    def data(self, h, out: Path) -> dict:
        c = h.cfg.task.corpus
        general, task_train, task_heldout, per_source = [], [], [], {}
        for src in c.sources:
            docs = corpus_mod.load_documents(src, min_chars=c.min_chars, max_chars=c.max_chars, limit=c.max_docs_per_source)
            per_source[src] = len(docs)
            for d in docs:
                held = (utils.text_hash(d) % 10_000) < c.heldout_fraction * 10_000  # split by document, stable
                if src in c.task_sources:
                    (task_heldout if held else task_train).append(d)
                if not held:
                    general.append(d)
        utils.atomic_write_json(out / "docs.json", {"general_train": general, "task_train": task_train,
                                                    "task_heldout": task_heldout})
        return {"docs_per_source": per_source, "general_train": len(general), "task_train": len(task_train),
                "task_heldout": len(task_heldout), "chars_general": sum(map(len, general))}

    def prompts_key(self, c) -> dict:
        return {"chat_instruction": c.task.chat_instruction} if c.task.chat_instruction else {}

    def prompts(self, h, out: Path, tokenizer) -> dict:
        t = h.cfg.task
        docs = load_docs(h)
        train = make_prompts(docs["task_train"], tokenizer, n=t.n_train_prompts, min_tokens=t.prompt_min_tokens,
                             max_tokens=t.prompt_max_tokens, seed=h.cfg.seed, id_prefix="train-",
                             chat_instruction=t.chat_instruction)
        ev = make_prompts(docs["task_heldout"], tokenizer, n=t.n_eval_prompts, min_tokens=t.prompt_min_tokens,
                          max_tokens=t.prompt_max_tokens, seed=h.cfg.seed + 1, id_prefix="eval-",
                          chat_instruction=t.chat_instruction)
        utils.write_jsonl(out / "train.jsonl", train)
        utils.write_jsonl(out / "eval.jsonl", ev)
        return {"n_train": len(train), "n_eval": len(ev),
                "mean_prompt_tokens": statistics.mean(len(p["prompt_ids"]) - 1 for p in train + ev)}
