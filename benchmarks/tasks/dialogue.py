"""The DPO paper's single-turn dialogue task (Rafailov et al. 2023, Sec. 6): Anthropic HH, judged by a reward model.

HH rows hold whole conversations: ``chosen = "\\n\\nHuman: q\\n\\nAssistant: a1"`` and ``rejected`` the same
conversation ending in another answer. The prompt is everything up to and including the last
``"\\n\\nAssistant:"`` (the DPO repo's ``split_prompt_and_responses``), the responses are what follows. The gold
reward is a judge reward model's score of (query, response) (e.g. OpenAssistant/reward-model-deberta-v3-large-v2,
used as its model card shows: ``tokenizer(question, answer)`` -> one logit).
"""

from __future__ import annotations

import random
import statistics
from collections import Counter
from pathlib import Path

from benchmarks import utils
from benchmarks.errors import check
from benchmarks.tasks.prefs import PreferenceDataError, _describe
from benchmarks.tasks.registry import Task, load_prompts, register_task

HUMAN = "\n\nHuman:"
ASSISTANT = "\n\nAssistant:"


def split_conversation(text: str) -> tuple[str, str] | None:
    """(prompt ending in "\\n\\nAssistant:", final response), or None without an assistant turn."""
    i = text.rfind(ASSISTANT)
    if i < 0:
        return None
    return text[: i + len(ASSISTANT)], text[i + len(ASSISTANT) :]


def human_turns(prompt: str) -> int:
    return prompt.count(HUMAN)


def parse_rows(rows: list, *, max_human_turns: int, source: str) -> tuple[list[dict], dict[str, int]]:
    """HH rows -> ({'prompt', 'chosen', 'rejected'} pairs, counts of dropped rows by reason).

    Rows of the wrong shape (not a mapping, no 'chosen'/'rejected' string) are an error: the dataset is not in
    the HH format. Rows of the right shape whose content is unusable are dropped and counted: more human turns
    than ``max_human_turns`` (0 = no limit), no assistant turn, chosen and rejected with different prompts,
    an empty or identical response, a response that goes on with a human turn, a duplicate pair.
    """
    if not rows:
        raise PreferenceDataError(f"{source}: no rows")
    bad = [i for i, r in enumerate(rows)
           if not (isinstance(r, dict) and isinstance(r.get("chosen"), str) and isinstance(r.get("rejected"), str))]
    if bad:
        raise PreferenceDataError(
            f"{source}: {len(bad)} of {len(rows)} rows are not HH conversations; first is row {bad[0]}: "
            f"{_describe(rows[bad[0]])}\nEach row needs string columns 'chosen' and 'rejected' holding the whole "
            "conversation (\"\\n\\nHuman: ...\\n\\nAssistant: ...\"); point task.dataset at an HH-format dataset.")
    out, dropped, seen = [], Counter(), set()
    for r in rows:
        c, j = split_conversation(r["chosen"]), split_conversation(r["rejected"])
        if c is None or j is None:
            dropped["no_assistant_turn"] += 1
        elif c[0] != j[0]:
            dropped["prompt_mismatch"] += 1
        elif human_turns(c[0]) == 0:
            dropped["no_human_turn"] += 1
        elif max_human_turns and human_turns(c[0]) > max_human_turns:
            dropped["multi_turn"] += 1
        elif not c[1].strip() or not j[1].strip():
            dropped["empty_response"] += 1
        elif c[1] == j[1]:
            dropped["identical_responses"] += 1
        elif HUMAN in c[1] or HUMAN in j[1]:
            dropped["human_turn_in_response"] += 1
        elif (c[0], c[1], j[1]) in seen:
            dropped["duplicate"] += 1
        else:
            seen.add((c[0], c[1], j[1]))
            out.append({"prompt": c[0], "chosen": c[1], "rejected": j[1]})
    if dropped["no_assistant_turn"] == len(rows):
        raise PreferenceDataError(f"{source}: no row has an '\\n\\nAssistant:' turn; not an HH-format dataset. "
                                  f"First row: {_describe(rows[0])}")
    if not out:
        raise PreferenceDataError(f"{source}: every one of {len(rows)} rows was dropped ({dict(dropped)}); "
                                  "raise task.max_human_turns (0 = no limit) or check the dataset")
    return out, dict(dropped)


def load_split(dataset: str, split: str, key: str = "task.dataset") -> list[dict]:
    """Rows of one split of 'hf:<hub name or local hub-layout folder>' (or a `save_to_disk` DatasetDict folder)."""
    import datasets

    name = dataset[3:] if dataset.startswith("hf:") else dataset
    try:
        p = Path(name).expanduser()
        if (p / "dataset_dict.json").exists():
            ds = datasets.load_from_disk(str(p))[split]
        else:
            ds = datasets.load_dataset(name, split=split)
    except (ValueError, KeyError) as e:  # an unknown split
        raise PreferenceDataError(f"{key} '{dataset}': cannot load split '{split}' ({e}); "
                                  "set task.train_split / task.eval_split to splits it has") from None
    missing = [c for c in ("chosen", "rejected") if c not in ds.column_names]
    if missing:
        raise PreferenceDataError(f"{key} '{dataset}' split '{split}' has no column(s) {missing} (columns: "
                                  f"{ds.column_names}); an HH-format dataset has 'chosen' and 'rejected' conversations")
    return [dict(r) for r in ds.select_columns(["chosen", "rejected"])]


# ------------------------------------------------------------------------------------------------ judge
def judge_query(prompt: str) -> str:
    """The judge's question: a single-turn HH prompt without its "Human:"/"Assistant:" markers (the form
    reward models like OpenAssistant's were trained on); a longer transcript is passed whole, less the
    trailing "Assistant:"; a prompt without markers (e.g. sentiment) unchanged."""
    q = prompt[: -len(ASSISTANT)] if prompt.endswith(ASSISTANT) else prompt
    if human_turns(q) == 1 and q.startswith(HUMAN):
        q = q[len(HUMAN) :]
    return q.strip()


_JUDGES: dict = {}


def judge_scores(name: str, prompts: list[str], responses: list[str], batch_size: int = 32) -> list[float]:
    """Score of each (prompt, response) by a reward model with one output (``num_labels == 1``)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    if len(prompts) != len(responses):
        raise ValueError(f"judge: {len(prompts)} prompts for {len(responses)} responses")
    if name not in _JUDGES:
        try:
            tok = AutoTokenizer.from_pretrained(name)
            model = AutoModelForSequenceClassification.from_pretrained(name)
        except (OSError, ValueError, ImportError) as e:  # DeBERTa-v3 judges may want sentencepiece for their tokenizer
            raise ValueError(f"task.gold 'hf-rm:{name}': cannot load the judge ({e}). Offline? Point it at a local "
                             "save_pretrained folder. A slow-only tokenizer may need `pip install sentencepiece`") from None
        if model.config.num_labels != 1:
            raise ValueError(f"task.gold 'hf-rm:{name}': a judge reward model has one output (num_labels = 1), this "
                             f"one has {model.config.num_labels}; for a sentiment classifier use 'hf:<name>'")
        if tok.pad_token is None:
            if tok.eos_token is None:
                raise ValueError(f"task.gold 'hf-rm:{name}': the judge's tokenizer has neither a pad nor an eos token")
            tok.pad_token = tok.eos_token
            model.config.pad_token_id = tok.pad_token_id
        device = "cuda" if torch.cuda.is_available() else "cpu"
        max_len = min(512, getattr(model.config, "max_position_embeddings", 512) or 512)
        _JUDGES[name] = (tok, model.to(device).eval(), device, max_len)
    tok, model, device, max_len = _JUDGES[name]
    queries = [judge_query(p) for p in prompts]
    out: list[float] = []
    with torch.no_grad():
        for i in range(0, len(queries), batch_size):
            enc = tok(queries[i : i + batch_size], responses[i : i + batch_size], padding=True, truncation=True,
                      max_length=max_len, return_tensors="pt").to(device)
            out += model(**enc).logits[:, 0].float().cpu().tolist()
    return out


# ------------------------------------------------------------------------------------------------ the task
@register_task
class DialogueTask(Task):
    """The paper's single-turn dialogue (Sec. 6, Anthropic HH): SFT text, train prompts and pairs from
    ``task.dataset``'s train split, eval prompts and the chosen reference response from its eval split, gold =
    the judge reward model of ``task.gold`` scoring (prompt, response)."""

    name = "dialogue"
    has_dataset_pairs = True

    def validate(self, t, key: str) -> None:
        check(t.corpus is None, f"{key}.corpus", "unused by task 'dialogue' (its text is task.dataset); remove it")
        check(t.gold.startswith("hf-rm:"), f"{key}.gold",
              "task 'dialogue' is judged by a reward model: give 'hf-rm:<name or path>', e.g. "
              f"'hf-rm:OpenAssistant/reward-model-deberta-v3-large-v2', got {t.gold!r}")
        check(t.dataset.startswith("hf:") and len(t.dataset) > 3, f"{key}.dataset",
              f"task 'dialogue' needs 'hf:<hub name or local hub-layout folder>', e.g. 'hf:Anthropic/hh-rlhf', got {t.dataset!r}")
        check(":" not in t.dataset[3:], f"{key}.dataset",
              f"give the name only ({t.dataset!r} has a ':'); splits are task.train_split / task.eval_split")
        check(bool(t.train_split.strip()), f"{key}.train_split", "give a split name, e.g. train")
        check(bool(t.eval_split.strip()), f"{key}.eval_split", "give a split name, e.g. test")
        check(t.train_split != t.eval_split, f"{key}.eval_split",
              f"must differ from train_split ({t.train_split!r}): evaluation prompts must be held out")
        check(not t.chat_instruction, f"{key}.chat_instruction", "only the 'sentiment' task builds chat prompts")

    def data_key(self, c) -> dict:
        t = c.task
        return {"task": "dialogue", "dataset": t.dataset, "train_split": t.train_split, "eval_split": t.eval_split,
                "max_human_turns": t.max_human_turns}

    def data(self, h, out: Path) -> dict:
        """HH-format dataset -> single-turn (prompt, chosen, rejected) pairs of the train and eval splits; the SFT
        text is the chosen conversations (the paper's SFT on preferred completions)."""
        t = h.cfg.task
        summary: dict = {"dataset": t.dataset}
        pairs = {}
        for split_key, split in (("train", t.train_split), ("eval", t.eval_split)):
            raw = load_split(t.dataset, split)
            rows, dropped = parse_rows(raw, max_human_turns=t.max_human_turns,
                                       source=f"task.dataset '{t.dataset}' split '{split}'")
            utils.write_jsonl(out / f"{split_key}_pairs.jsonl", rows)
            pairs[split_key] = rows
            summary[split_key] = {"split": split, "rows": len(raw), "pairs": len(rows), "dropped": dropped,
                                  "prompts": len({r["prompt"] for r in rows})}
        train_docs = list(dict.fromkeys(r["prompt"] + r["chosen"] for r in pairs["train"]))
        held_docs = list(dict.fromkeys(r["prompt"] + r["chosen"] for r in pairs["eval"]))
        utils.atomic_write_json(out / "docs.json", {"general_train": train_docs, "task_train": train_docs,
                                                    "task_heldout": held_docs})
        return {**summary, "general_train": len(train_docs), "task_train": len(train_docs), "task_heldout": len(held_docs),
                "chars_general": sum(map(len, train_docs))}

    def prompts_key(self, c) -> dict:
        return {"task": "dialogue"}

    def prompts(self, h, out: Path, tokenizer) -> dict:
        """Distinct prompts of each split (a seeded sample of at most n_train/n_eval_prompts, each at most
        prompt_max_tokens tokens); an eval prompt carries the dataset's chosen response, the win-rate reference."""
        t = h.cfg.task
        summary: dict = {}
        for split, n in (("train", t.n_train_prompts), ("eval", t.n_eval_prompts)):
            chosen: dict[str, str] = {}
            for r in utils.read_jsonl(h.path("data") / f"{split}_pairs.jsonl"):
                chosen.setdefault(r["prompt"], r["chosen"])  # the first pair's chosen response of each prompt
            texts = sorted(chosen)
            random.Random(f"{h.cfg.seed}/{split}").shuffle(texts)
            rows, too_long = [], 0
            for text in texts:
                ids = tokenizer(text)["input_ids"]  # as tokenize_prompt_completions cuts the pairs' prompts
                if len(ids) > t.prompt_max_tokens:
                    too_long += 1
                    continue
                row = {"prompt_id": f"{split}-{len(rows)}", "prompt": text, "prompt_ids": ids}
                rows.append(row | ({"chosen": chosen[text]} if split == "eval" else {}))
                if len(rows) == n:
                    break
            if not rows:
                raise ValueError(f"no {split} prompt of the dialogue dataset has <= task.prompt_max_tokens "
                                 f"({t.prompt_max_tokens}) tokens; raise it")
            utils.write_jsonl(out / f"{split}.jsonl", rows)
            summary.update({f"n_{split}": len(rows), f"{split}_prompts_too_long": too_long,
                            f"{split}_mean_prompt_tokens": statistics.mean(len(r["prompt_ids"]) for r in rows)})
        return summary

    def evalref(self, h, out: Path) -> dict:
        """The reference of win rate vs chosen: the eval split's chosen response of each prompt, scored by the
        judge like every arm's samples."""
        import pandas as pd

        t = h.cfg.task
        prompts = load_prompts(h, "eval")
        gold = self.gold(t, [p["chosen"] for p in prompts], [p["prompt"] for p in prompts])
        df = pd.DataFrame({"prompt_id": [p["prompt_id"] for p in prompts], "chosen": [p["chosen"] for p in prompts],
                           "chosen_gold": gold})
        df.to_parquet(out / "chosen.parquet", index=False)
        return {"prompts": len(df), "chosen_gold_mean": float(df.chosen_gold.mean()), "source": f"{t.dataset}:{t.eval_split}"}

    def dataset_pairs(self, h) -> list[dict]:
        """The dataset's own pairs of the train prompts kept by the prompts stage; the judge scores both responses
        (label_agrees_with_gold = how often the judge sides with the human label)."""
        t = h.cfg.task
        ids = {q["prompt"]: q["prompt_id"] for q in load_prompts(h, "train")}
        rows = [{**r, "prompt_id": ids[r["prompt"]]} for r in utils.read_jsonl(h.path("data") / "train_pairs.jsonl")
                if r["prompt"] in ids]
        prm = [r["prompt"] for r in rows]
        for col in ("chosen", "rejected"):
            for r, g in zip(rows, self.gold(t, [r[col] for r in rows], prm), strict=True):
                r[f"score_{col}"] = g
        return rows
