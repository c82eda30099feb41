"""The DPO paper's single-turn dialogue task (Rafailov et al. 2023, Sec. 6): Anthropic HH, judged by a reward model.

HH rows hold whole conversations: ``chosen = "\\n\\nHuman: q\\n\\nAssistant: a1"`` and ``rejected`` the same
conversation ending in another answer. The prompt is everything up to and including the last
``"\\n\\nAssistant:"`` (the DPO repo's ``split_prompt_and_responses``), the responses are what follows. The gold
reward is a judge reward model's score of (query, response) (e.g. OpenAssistant/reward-model-deberta-v3-large-v2,
used as its model card shows: ``tokenizer(question, answer)`` -> one logit).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from benchmarks.tasks.prefs import PreferenceDataError, _describe

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
