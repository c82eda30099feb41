"""Arm families, one module each, registered in ``benchmarks.arms.registry`` (see its docstring).

Built-in families: the reference (``sft``), our DPO (``dpo``), TRL's DPO peer (``trl_dpo``), PPO with its strong
and oracle variants (``ppo``, on the reward model of ``reward_model``), best-of-N (``best_of_n``) and Preferred-FT
(``preferred_ft``). A suite's ``plugins`` are imported before its stages are built, so a family defined outside
this package registers itself the same way.
"""

from __future__ import annotations

import importlib

from benchmarks.arms import best_of_n, dpo, ppo, preferred_ft, reference, trl_dpo  # noqa: F401 - they register
from benchmarks.arms.common import eval_stage, evalref_stage, split_pairs
from benchmarks.arms.registry import (
    REGISTRY,
    ArmFamily,
    ArmPlan,
    Method,
    config_id,
    method,
    methods,
    register,
)
from benchmarks.harness import Stage
from benchmarks.stages import STAGES

from benchmarks.arms import group_rl  # noqa: F401 # isort: skip - RLOO, GRPO register after the built-ins
from benchmarks.arms import online_dpo  # noqa: F401 # isort: skip - online DPO registers after RLOO, GRPO
from benchmarks.arms import trl_group  # noqa: F401 # isort: skip - TRL's GRPO / RLOO peers, after ours

FOUNDATION = ["data", "base", "sft", "prompts", "prefs"]


def load_plugins(modules: list[str]) -> None:
    for m in modules:
        importlib.import_module(m)


def plan(c) -> tuple[dict[str, Stage], list[str], list[str], list[str]]:
    """(stages, trained arm ids, eval-only arm ids, shared non-arm stages) of every registered family."""
    load_plugins(c.plugins)
    stages: dict[str, Stage] = {}
    trained, eval_only, shared = [], [], []
    for fam in REGISTRY.values():
        p = fam.plan(c)
        stages.update(p.stages)
        trained += p.trained
        eval_only += p.eval_only
        shared += [s for s in p.shared if s not in shared]
    return stages, trained, eval_only, shared


def arm_ids(c) -> list[str]:
    """Every arm of a suite, trained or evaluation-only (the reference ``sft`` first)."""
    _, trained, eval_only, _ = plan(c)
    return ["sft", *trained, *eval_only]


def build_stages(c) -> tuple[dict[str, Stage], list[str]]:
    """All stages of a suite (the foundation plus one train + one eval stage per arm) and the default targets."""
    fam_stages, trained, eval_only, shared = plan(c)
    stages = dict(STAGES)
    stages["evalref"] = evalref_stage()
    stages.update(fam_stages)
    arms = ["sft", *trained]
    for a in arms:
        stages[f"eval/{a}"] = eval_stage(a)
    targets = FOUNDATION + shared + [f"arm/{a}" for a in trained] + ["evalref"] + [f"eval/{a}" for a in arms + eval_only]
    return stages, targets


__all__ = ["REGISTRY", "ArmFamily", "ArmPlan", "Method", "arm_ids", "build_stages", "config_id", "load_plugins",
           "method", "methods", "plan", "register", "split_pairs"]
