"""Preference pairs: forming and labelling them from gold-scored samples, validating and loading datasets.

Pairs follow the DPO paper's sentiment setup: K samples per prompt from pi_ref, all K(K-1)/2 pairs (or a
set number), the label drawn by Bradley-Terry on the gold scores (a noisy labeller, like humans) or taken
by argmax; near-ties (|r_i - r_j| < min_gap) are dropped.
"""

from __future__ import annotations

import itertools
import json
import math
import random
from pathlib import Path

REQUIRED_COLUMNS = ("prompt", "chosen", "rejected")


class PreferenceDataError(ValueError):
    """Malformed preference rows or an unreadable preference dataset."""


def form_pairs(scores: list[float], *, labelling: str, min_gap: float, pairs_per_prompt: int,
               bt_temperature: float, rng: random.Random) -> list[tuple[int, int]]:
    """(chosen index, rejected index) pairs among one prompt's K scored samples.

    argmax: the higher score wins. bradley_terry: i wins with P = sigmoid((r_i - r_j) / bt_temperature)
    (Bradley & Terry 1952; the labeller model assumed by DPO, Eq. 1). Pairs with |r_i - r_j| < min_gap are
    dropped first; with pairs_per_prompt > 0, that many of the remaining pairs are kept at random.
    """
    if labelling not in ("argmax", "bradley_terry"):
        raise ValueError(f"labelling must be 'argmax' or 'bradley_terry', got {labelling!r}")
    cands = [(i, j) for i, j in itertools.combinations(range(len(scores)), 2) if abs(scores[i] - scores[j]) >= min_gap]
    if pairs_per_prompt and len(cands) > pairs_per_prompt:
        cands = rng.sample(cands, pairs_per_prompt)
    out = []
    for i, j in cands:
        if labelling == "argmax":
            win_i = scores[i] > scores[j]
        else:
            z = (scores[i] - scores[j]) / bt_temperature
            p = 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))  # stable sigmoid
            win_i = rng.random() < p
        out.append((i, j) if win_i else (j, i))
    return out


def _describe(row) -> str:
    s = json.dumps(row, default=str, ensure_ascii=False)
    return s if len(s) <= 200 else s[:200] + "…"


def _is_text(x) -> bool:
    """A non-empty string, or a non-empty conversational list of {role, content} messages."""
    if isinstance(x, str):
        return bool(x.strip())
    if isinstance(x, list) and x:
        return all(isinstance(m, dict) and isinstance(m.get("content"), str) and isinstance(m.get("role"), str) for m in x)
    return False


def validate_rows(rows: list, *, source: str = "preference data") -> None:
    """Reject malformed rows with a count and the first offending row (nothing is written on failure)."""
    if not rows:
        raise PreferenceDataError(f"{source}: no rows; a preference dataset needs prompt/chosen/rejected rows")
    problems: dict[str, list[int]] = {}
    first: dict[str, int] = {}
    seen: dict[str, int] = {}

    def bad(kind: str, i: int) -> None:
        problems.setdefault(kind, []).append(i)
        first.setdefault(kind, i)

    for i, r in enumerate(rows):
        if not isinstance(r, dict):
            bad("not a mapping of columns", i)
            continue
        missing = [c for c in REQUIRED_COLUMNS if c not in r]
        if missing:
            bad(f"missing column(s) {missing}", i)
            continue
        if not all(_is_text(r[c]) for c in REQUIRED_COLUMNS):
            bad("empty or non-string prompt/chosen/rejected", i)
            continue
        if r["chosen"] == r["rejected"]:
            bad("chosen == rejected", i)
            continue
        key = json.dumps([r["prompt"], r["chosen"], r["rejected"]], sort_keys=True, default=str)
        if key in seen:
            bad("duplicate (prompt, chosen, rejected)", i)
        else:
            seen[key] = i
    if problems:
        lines = [f"  - {len(v)} row(s) with {k}; first is row {first[k]}: {_describe(rows[first[k]])}"
                 for k, v in problems.items()]
        n_bad = len(set(itertools.chain.from_iterable(problems.values())))
        raise PreferenceDataError(
            f"{source}: {n_bad} of {len(rows)} rows are malformed:\n" + "\n".join(lines)
            + "\nFix or drop these rows; each needs non-empty string 'prompt', 'chosen', 'rejected' with chosen != rejected."
        )


def with_prompts(rows: list) -> list:
    """Implicit-prompt datasets (chosen/rejected hold the whole dialogue, e.g. Anthropic HH) get their shared
    prefix split off as 'prompt' (TRL's extract_prompt); other rows are returned as they are."""
    if not rows or not all(isinstance(r, dict) and "prompt" not in r and "chosen" in r and "rejected" in r for r in rows):
        return rows
    from trl.data_utils import extract_prompt

    return [{**r, **extract_prompt({"chosen": r["chosen"], "rejected": r["rejected"]})} for r in rows]


def load_preference_rows(source: str) -> list[dict]:
    """Rows of a preference dataset: local .json/.jsonl/.parquet, a `save_to_disk` folder, or 'hf:<name>[:split]'
    (a hub name, or a local folder in the hub layout). Implicit-prompt rows get their prompt extracted."""
    return with_prompts(_load_rows(source))


def _load_rows(source: str) -> list[dict]:
    import datasets

    if source.startswith("hf:"):
        name, _, split = source[3:].partition(":")
        ds = datasets.load_dataset(name, split=split or "train")
        return [dict(r) for r in ds]
    p = Path(source).expanduser()
    if not p.exists():
        raise PreferenceDataError(f"prefs.source '{source}' does not exist; give a file, a save_to_disk folder, 'hf:<name>' or 'generate'")
    if p.is_dir():
        return [dict(r) for r in datasets.load_from_disk(str(p))]
    try:
        if p.suffix == ".parquet":
            import pandas as pd

            return pd.read_parquet(p).to_dict("records")
        text = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise PreferenceDataError(f"prefs.source '{source}': not UTF-8 text ({e}); re-encode the file as UTF-8") from None
    if p.suffix == ".jsonl":
        rows = []
        for i, line in enumerate(text.splitlines()):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise PreferenceDataError(f"prefs.source '{source}': line {i + 1} is not valid JSON ({e})") from None
        return rows
    if p.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise PreferenceDataError(f"prefs.source '{source}': not valid JSON ({e})") from None
        if not isinstance(data, list):
            raise PreferenceDataError(f"prefs.source '{source}': expected a JSON list of rows")
        return data
    raise PreferenceDataError(f"prefs.source '{source}': unsupported file type '{p.suffix}' (use .json, .jsonl, .parquet)")
