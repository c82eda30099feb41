"""The task registry: a task says where its text, prompts and preference data come from and how completions are
judged (its gold reward). One module per task (``sentiment.py``, ``dialogue.py``) holds one :class:`Task` subclass
decorated with :func:`register_task`; nothing else in the harness branches on a task's name.

The contract of the stages (``benchmarks/stages.py``):
  data     ``Task.data`` writes ``docs.json`` = {"general_train", "task_train", "task_heldout"}: lists of texts
           (pretraining text, SFT text, held-out text) plus whatever files its other methods read;
  prompts  ``Task.prompts`` writes ``train.jsonl`` and ``eval.jsonl``: rows {"prompt_id", "prompt", "prompt_ids"};
  gold     ``Task.gold(task_cfg, texts, prompts)`` scores completions (higher = better);
  evalref  ``Task.evalref`` writes ``chosen.parquet`` (the reference response of win rate vs chosen) or returns
           None for the default (the best of K pi_ref samples by gold reward);
  prefs    ``Task.dataset_pairs`` gives the task's own preference pairs when ``prefs.source: dataset``.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, ClassVar

from benchmarks import utils
from benchmarks.tasks.gold import gold_reward

if TYPE_CHECKING:
    from pathlib import Path


class Task:
    name: ClassVar[str]
    has_dataset_pairs: ClassVar[bool] = False
    """Whether ``prefs.source: dataset`` (the task's own labelled pairs) is available."""
    default_judges: ClassVar[tuple[str, ...]] = ()
    """Second scorers of the gold reward's property used when ``task.judges`` is unset (None)."""

    def validate(self, t, key: str) -> None:
        """Task-specific checks of the ``task`` section (raise ConfigError naming the dotted key)."""

    def data_key(self, c) -> dict:
        raise NotImplementedError

    def data(self, h, out: Path) -> dict:
        raise NotImplementedError

    def prompts_key(self, c) -> dict:
        """Config the prompts depend on besides the generic task fields (min/max tokens, counts, seed)."""
        return {}

    def prompts(self, h, out: Path, tokenizer) -> dict:
        raise NotImplementedError

    def gold(self, t, texts: list[str], prompts: list[str]) -> list[float]:
        """Gold reward of each completion (``prompts``: one per text); default: the ``task.gold`` scorer."""
        return gold_reward(texts, t.target, t.gold, prompts=prompts)

    def judge(self, t, spec: str, texts: list[str], prompts: list[str]) -> list[float]:
        """A second judge's score of each completion: the gold reward with scorer ``spec`` instead of ``task.gold``."""
        return gold_reward(texts, t.target, spec, prompts=prompts)

    def evalref(self, h, out: Path) -> dict | None:
        return None

    def dataset_pairs(self, h) -> list[dict]:
        raise ValueError(f"task {self.name!r} has no preference pairs of its own; use prefs.source: generate")


TASKS: dict[str, Task] = {}


def register_task(cls: type[Task]) -> type[Task]:
    if not getattr(cls, "name", None):
        raise ValueError(f"{cls.__name__}: a task needs a name")
    TASKS[cls.name] = cls()
    return cls


def unregister_task(name: str) -> None:
    TASKS.pop(name, None)


def task_of(c_or_name: Any) -> Task:
    """The task of a suite config, a task section or a name."""
    name = c_or_name if isinstance(c_or_name, str) else getattr(c_or_name, "task", c_or_name).name
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}; registered tasks: {sorted(TASKS)}")
    return TASKS[name]


def task_gold(t, texts: list[str], prompts: list[str]) -> list[float]:
    """The gold reward of completions under task section ``t`` (the one entry point every arm and stage uses)."""
    return task_of(t.name).gold(t, texts, prompts)


def task_judges(t) -> list[str]:
    """The second judges of task section ``t``: ``t.judges``, or the task's default when unset."""
    return list(task_of(t.name).default_judges if t.judges is None else t.judges)


def judge_column(spec: str) -> str:
    return f"judge:{spec}"


def add_judge_scores(t, samples):
    """``samples`` with one column ``judge:<spec>`` per second judge of ``t`` (scores of the same property as gold)."""
    out = samples.copy()
    for spec in task_judges(t):
        out[judge_column(spec)] = task_of(t.name).judge(t, spec, out.completion.tolist(), out.prompt.tolist())
    return out


# ---------------------------------------------------------------------------- what task stages read back
def load_docs(h) -> dict[str, list[str]]:
    return json.loads((h.path("data") / "docs.json").read_text())


def load_prompts(h, split: str) -> list[dict]:
    return utils.read_jsonl(h.path("prompts") / f"{split}.jsonl")
