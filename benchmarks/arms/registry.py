"""The arm registry: the only place method names, labels, colours and families live.

An *arm family* is one module under ``benchmarks/arms/`` (or a plug-in module named in a suite's ``plugins``)
holding one :class:`ArmFamily` subclass decorated with :func:`register`. It says which *methods* it produces
(the ``method`` column of the results: label, colour, marker, family kind, how its KL is known), and which stages
it adds to a suite: one train stage (``arm/<id>``) and one evaluation stage (``eval/<id>``) per arm, or only an
evaluation stage for procedures that train nothing (best-of-N). Results, figures, the regression gate and the HTML
report read everything about a method from here.

Arm ids are ``<method prefix>-<hyper-parameters>-s<seed>`` (``dpo-sigmoid-b0.1-s0``, ``ppo-tkl12-s0``); the
configuration id (the id without ``-s<seed>``) groups an arm's seeds.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from benchmarks.config import SuiteConfig
    from benchmarks.harness import Stage

FAMILY_KINDS = ("reference", "offline_preference", "on_policy_rl", "reranking", "baseline", "oracle")
_SPARE_COLORS = ["#fbafe4", "#ece133", "#000000", "#666666"]
_SPARE_MARKERS = ["h", "p", "<", ">", "d"]


@dataclass(frozen=True)
class Method:
    """One value of the ``method`` column."""

    name: str
    label: str
    color: str
    """Hex colour, the same in every figure and table (colour-blind-safe palette for the built-ins)."""
    marker: str
    kind: str
    """One of FAMILY_KINDS: reference / offline_preference / on_policy_rl / reranking / baseline / oracle."""
    order: int = 100
    """Position in tables and legends."""
    peer_of: str | None = None
    """A reimplementation of another method (e.g. TRL's DPO): hollow markers, dashed lines."""
    kl: str = "sampled"
    """How its KL to pi_ref is known: 'sampled' (Monte-Carlo over its samples), 'estimated' (e.g. best-of-N's,
    from its candidates' rewards, under the log N - (N-1)/N bound), 'analytic' (a closed form), 'zero' (the
    reference itself). The regression gate bands sampled KLs only."""
    curves: str | None = None
    """Training-curve layout in the report: 'preference' (margins, accuracy, loss vs examples seen), 'rl'
    (reward, KL, gold vs episodes) or None (no curves)."""

    def __post_init__(self) -> None:
        if self.kind not in FAMILY_KINDS:
            raise ValueError(f"method {self.name!r}: kind must be one of {FAMILY_KINDS}, got {self.kind!r}")
        if self.kl not in ("sampled", "estimated", "analytic", "zero"):
            raise ValueError(f"method {self.name!r}: kl must be sampled / estimated / analytic / zero, got {self.kl!r}")


@dataclass
class ArmPlan:
    """What a family adds to a suite: stages by name, arm ids with a train stage, arm ids evaluated only."""

    stages: dict[str, Stage] = field(default_factory=dict)
    trained: list[str] = field(default_factory=list)
    eval_only: list[str] = field(default_factory=list)
    shared: list[str] = field(default_factory=list)
    """Non-arm stages the family needs run before its arms (e.g. ``arm/rm``), in order."""

    def need(self, stage: Stage) -> None:
        """A non-arm stage this family's arms read (the reward model, pi_ref's log-probs), run before them."""
        self.stages[stage.name] = stage
        if stage.name not in self.shared:
            self.shared.append(stage.name)

    def add_arm(self, stage: Stage, evaluated_only: bool = False) -> None:
        """One arm: its train stage ``arm/<id>`` (or, for a procedure that trains nothing, its ``eval/<id>``)."""
        self.stages[stage.name] = stage
        (self.eval_only if evaluated_only else self.trained).append(stage.name.split("/", 1)[1])


class ArmFamily:
    """Base class of an arm family. Subclasses set ``name`` and ``methods`` and implement ``plan``.

    ``config_cls``: for plug-in families, a dataclass read from the suite's ``arms.<name>`` mapping (validated like
    every section: errors name the dotted key; ``--set arms.<name>.<field>=...`` reaches every field). Built-in
    families read their sections of the suite (``dpo``, ``rlhf``)."""

    name: ClassVar[str]
    methods: ClassVar[tuple[Method, ...]] = ()
    config_cls: ClassVar[type | None] = None

    def plan(self, c: SuiteConfig) -> ArmPlan:  # pragma: no cover - abstract
        raise NotImplementedError

    @staticmethod
    def section(c: SuiteConfig, name: str) -> Any:
        """This family's ``arms.<name>`` config (None when the suite does not list it)."""
        return (c.arms or {}).get(name)


REGISTRY: dict[str, ArmFamily] = {}
_FROM_RUNS: dict[str, Method] = {}
"""Methods known only from a run folder's summary.json (a plug-in not imported by this process, e.g. the report)."""


def register(cls: type[ArmFamily]) -> type[ArmFamily]:
    """Class decorator: add an arm family (its methods become known to results, figures, gate and report)."""
    if not getattr(cls, "name", None):
        raise ValueError(f"{cls.__name__}: an arm family needs a name")
    taken = {m.name: f.name for f in REGISTRY.values() for m in f.methods if f.name != cls.name}
    for m in cls.methods:
        if m.name in taken:
            raise ValueError(f"{cls.__name__}: method {m.name!r} is already registered by family {taken[m.name]!r}")
    REGISTRY[cls.name] = cls()
    return cls


def unregister(name: str) -> None:
    REGISTRY.pop(name, None)


def methods() -> dict[str, Method]:
    """Every registered method by name, in display order."""
    ms = [m for f in REGISTRY.values() for m in f.methods]
    return {m.name: m for m in sorted(ms, key=lambda m: (m.order, m.name))}


def _stable_index(name: str, n: int) -> int:
    return sum(ord(c) * (i + 1) for i, c in enumerate(name)) % n


def remember(described: dict[str, dict]) -> None:
    """Methods described by a run folder (``summary.json``'s ``methods``) that this process has not registered."""
    for name, d in (described or {}).items():
        if name not in methods():
            _FROM_RUNS[name] = Method(**{k: v for k, v in d.items() if k in Method.__dataclass_fields__})


def describe(names) -> dict[str, dict]:
    """What a run folder records about its methods, so that the report reads the run folder only."""
    from dataclasses import asdict

    return {n: asdict(method(n)) for n in names}


def method(name: str) -> Method:
    """The registered method, or a stable stand-in for an unknown name (a spare colour and marker)."""
    m = methods().get(name) or _FROM_RUNS.get(name)
    if m is not None:
        return m
    return Method(name=str(name), label=str(name), color=_SPARE_COLORS[_stable_index(str(name), len(_SPARE_COLORS))],
                  marker=_SPARE_MARKERS[_stable_index(str(name), len(_SPARE_MARKERS))], kind="baseline", order=1000)


_SEED = re.compile(r"-s\d+$")


def config_id(arm: str) -> str:
    """``dpo-sigmoid-b0.1-s2`` -> ``dpo-sigmoid-b0.1``: the arm's configuration, over its seeds."""
    return _SEED.sub("", arm)


def fmt(x: float) -> str:
    return f"{x:g}"

