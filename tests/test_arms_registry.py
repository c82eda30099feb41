"""Arm families as registered plug-ins: per-arm cache keys (computed from the plan, nothing trained), a toy family
registered from this module alone running end to end, and an import graph without cycles."""

import ast
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest

from benchmarks import utils
from benchmarks.arms import build_stages, registry
from benchmarks.arms.registry import ArmFamily, ArmPlan, Method, register
from benchmarks.config import ConfigError, available_suites, load_suite
from benchmarks.harness import Harness, Stage
from benchmarks.tasks import corpus
from benchmarks.tasks.registry import Task, register_task, unregister_task

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
from test_pipeline import TINY  # noqa: E402


def _plan_hashes(suite: str, overrides: list[str], tmp_path) -> dict[str, str]:
    cfg = load_suite(suite, overrides)
    stages, _ = build_stages(cfg)
    h = Harness(cfg, stages, root=tmp_path, log=lambda *_: None)
    return {n: h.stage_hash(n) for n in stages}


def _changed(a: dict, b: dict) -> set[str]:
    return {n for n in b if a.get(n) != b[n]}


GRID_CHANGES = {  # one new value of each family's grid: (override, the arm ids that value adds, per seed)
    # (and its points of the epochs sweep, where the suite has one)
    "dpo.betas": lambda c: ([f"dpo.betas={[*c.dpo.betas, 0.77]}"], [f"dpo-{c.dpo.loss_type}-b0.77{e}-s{s}" for s in c.seeds
                                                                      for e in ["", *(f"-e{x:g}" for x in c.dpo.epochs_grid
                                                                                      if x != c.dpo.epochs)]]),
    "rlhf.target_kls": lambda c: ([f"rlhf.target_kls={[*c.rlhf.target_kls, 77.0]}"], [f"ppo-tkl77-s{s}" for s in c.seeds]),
    "rlhf.kl_coefs": lambda c: ([f"rlhf.kl_coefs={[*c.rlhf.kl_coefs, 0.77]}"], [f"ppo-kl0.77-s{s}" for s in c.seeds]),
    "rlhf.best_of_n": lambda c: ([f"rlhf.best_of_n={[*c.rlhf.best_of_n, 77]}"], []),
}


@pytest.mark.parametrize("suite", available_suites())
def test_one_new_grid_value_reruns_exactly_its_own_arms(suite, tmp_path):
    """For every suite and every grid it has: adding one value changes no existing stage's hash and adds exactly the
    new value's train and evaluation stages (the README's promise: a change re-runs only what depends on it)."""
    c = load_suite(suite)
    base = _plan_hashes(suite, [], tmp_path)
    tried = 0
    for grid, make in GRID_CHANGES.items():
        section, field_ = grid.split(".")
        sec = getattr(c, section)
        if sec is None or not getattr(sec, field_):
            continue
        overrides, new_arms = make(c)
        after = _plan_hashes(suite, overrides, tmp_path)
        expected = {f"arm/{a}" for a in new_arms} | {f"eval/{a}" for a in new_arms}
        if grid == "rlhf.best_of_n":
            expected = {f"eval/bon-n77-s{s}" for s in c.seeds}
        assert _changed(base, after) == expected, (suite, grid)
        assert set(base) <= set(after)
        tried += 1
    assert tried >= 1


def test_a_new_beta_reruns_only_that_betas_arm_and_eval(tmp_path):
    base = _plan_hashes("smoke", ["seeds=[0]"], tmp_path)
    after = _plan_hashes("smoke", ["seeds=[0]", "dpo.betas=[0.1,0.5]"], tmp_path)
    assert _changed(base, after) == {"arm/dpo-sigmoid-b0.5-s0", "eval/dpo-sigmoid-b0.5-s0"}
    # a hyper-parameter every DPO arm trains with re-runs every DPO arm, the TRL peer and Preferred-FT (its lr)
    lr = _plan_hashes("smoke", ["seeds=[0]", "dpo.lr=1e-3"], tmp_path)
    assert {n for n in _changed(base, lr) if n.startswith("arm/")} == {
        "arm/dpo-sigmoid-b0.1-s0", "arm/trl-sigmoid-b0.1-s0", "arm/pft-s0"}


def test_every_trainer_field_reaches_each_dpo_arm_and_its_key(tmp_path):
    from benchmarks.arms.dpo import dpo_train_config

    c = load_suite("smoke", ["dpo.weight_decay=0.01", "dpo.grad_clip=0.5", "dpo.truncation_mode=keep_end",
                             "dpo.simpo_gamma=1.5", "dpo.pack_len=2048", "dpo.variants=[simpo]"])
    cfg = dpo_train_config(c, "simpo", 0.1, 2)
    assert (cfg.weight_decay, cfg.grad_clip, cfg.truncation_mode, cfg.simpo_gamma, cfg.pack_len, cfg.seed) == (
        0.01, 0.5, "keep_end", 1.5, 2048, 2)
    base = _plan_hashes("smoke", ["seeds=[0]"], tmp_path)
    wd = _plan_hashes("smoke", ["seeds=[0]", "dpo.weight_decay=0.01"], tmp_path)
    assert {n for n in _changed(base, wd) if n.startswith("arm/")} == {"arm/dpo-sigmoid-b0.1-s0", "arm/trl-sigmoid-b0.1-s0"}


def _tiny_run_args(tmp_path, overrides: list[str], drop: tuple[str, ...]) -> list[str]:
    """`prefbench run` arguments of the tiny smoke suite in tmp_path, without the TINY keys of sections dropped."""
    sets = [f"cache_dir={tmp_path}/cache", f"runs_dir={tmp_path}/runs", *overrides,
            *(o for o in TINY if not o.startswith(drop))]
    return ["run", "--suite", "smoke", *(x for o in sets for x in ("--set", o))]


# ------------------------------------------------------------------------------------------- a toy family
@dataclass
class ToyConfig:
    scale: float = 0.02
    """Standard deviation of the Gaussian noise added to every weight of pi_ref."""

    def validate(self, key: str) -> None:
        if not self.scale > 0:
            raise ConfigError(f"config key '{key}.scale': must be > 0, got {self.scale}")


class ToyNoise(ArmFamily):
    """pi_ref with Gaussian noise on its weights: a real, different policy, trained in no time."""

    name = "toy"
    methods = (Method("toy", "Toy noise arm", "#123456", "h", "baseline", order=90),)
    config_cls = ToyConfig

    def plan(self, c) -> ArmPlan:
        cfg = self.section(c, "toy")
        p = ArmPlan()
        if cfg is None:
            return p
        for seed in c.seeds:
            arm = f"toy-s{cfg.scale:g}-s{seed}"

            def run(h, out, seed=seed, arm=arm):
                import torch

                from benchmarks.stages import load_model

                model, tok = load_model(h.path("sft"), h.device)
                g = torch.Generator().manual_seed(seed)
                with torch.no_grad():
                    for prm in model.parameters():
                        prm.add_(torch.randn(prm.shape, generator=g) * cfg.scale)
                model.save_pretrained(out / "model")
                tok.save_pretrained(out / "model")
                return {"arm": arm, "method": "toy", "seed": seed}

            p.add_arm(Stage(f"arm/{arm}", ("sft",), lambda c, seed=seed: {"scale": cfg.scale, "seed": seed}, run))
        return p


@pytest.fixture
def toy_family():
    register(ToyNoise)
    yield
    registry.unregister("toy")


def test_toy_family_config_errors_name_the_key(toy_family):
    with pytest.raises(ConfigError, match=r"arms.toy.scale': must be > 0"):
        load_suite("smoke", ["arms.toy.scale=-1"])
    with pytest.raises(ConfigError, match=r"arms.nope': unknown arm family"):
        load_suite("smoke", ["arms.nope.x=1"])
    with pytest.raises(ConfigError, match=r"arms.dpo': family 'dpo' takes no arms section"):
        load_suite("smoke", ["arms.dpo.x=1"])
    with pytest.raises(ConfigError, match=r"plugins\[0\]': cannot import"):
        load_suite("smoke", ["plugins=[no_such_module_here]"])
    assert load_suite("smoke", ["arms.toy.scale=0.5"]).arms["toy"].scale == 0.5


@pytest.mark.slow
@pytest.mark.skipif(not corpus.FORTUNES_DIR.is_dir(), reason="Debian package fortunes not installed")
def test_toy_family_runs_end_to_end_and_shows_in_tables_figures_and_report(toy_family, tmp_path):
    from benchmarks.cli import main
    from benchmarks.report import figures as F
    from benchmarks.report.html import build_report

    args = _tiny_run_args(tmp_path, ["dpo=null", "rlhf=null", "arms.toy.scale=0.02"], drop=("dpo.", "rlhf."))
    assert main(args) == 0
    run = tmp_path / "runs" / "smoke"
    summary = pd.read_csv(run / "summary.csv")
    toy = summary[summary.method == "toy"]
    assert list(toy.arm) == ["toy-s0.02-s0"] and toy.kl.iloc[0] > 0  # a real, moved policy
    assert json.loads((run / "summary.json").read_text())["methods"]["toy"]["color"] == "#123456"
    fig = F.frontier(summary)
    labels = [t.get_text() for leg in fig.legends for t in leg.get_texts()]
    assert "Toy noise arm" in labels
    html = build_report(run, figures=False).read_text()
    assert "Toy noise arm" in html and "#123456" in html
    # results rebuilt from the finished stages, running none: the same table; a stage never run is reported
    before = (run / "summary.csv").read_text()
    (run / "summary.csv").unlink()
    assert main(["results", *args[1:]]) == 0 and (run / "summary.csv").read_text() == before
    registry.unregister("toy")  # the report reads the run folder only: the label survives without the plug-in
    F.load_run(run)
    assert F.method_label("toy") == "Toy noise arm" and F.method_color("toy") == "#123456"
    register(ToyNoise)
    # a configuration none of whose arms has run: no arm succeeds, so the command fails and writes no tables (the
    # previous run's move to previous/, never shown as this run's)
    assert main(["results", *args[1:], "--set", "arms.toy.scale=0.03"]) == 1
    assert not (run / "summary.csv").exists() and (run / "previous" / "summary.csv").read_text() == before



# ------------------------------------------------------------------------------------------- import graph
def _module_imports(path: Path, modules: set[str]) -> set[str]:
    """Top-level (import-time) imports of one module, resolved to module names (TYPE_CHECKING blocks skipped):
    ``from pkg import sub`` imports the submodule ``pkg.sub``, ``from pkg import name`` the package ``pkg``."""
    tree = ast.parse(path.read_text())
    out = set()
    for node in tree.body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        for sub in ast.walk(node) if isinstance(node, (ast.Import, ast.ImportFrom, ast.If, ast.Try)) else []:
            if isinstance(sub, ast.Import):
                out |= {a.name for a in sub.names}
            elif isinstance(sub, ast.ImportFrom) and sub.module and sub.level == 0:
                for a in sub.names:
                    out.add(f"{sub.module}.{a.name}" if f"{sub.module}.{a.name}" in modules else sub.module)
    return out


def test_imports_have_no_cycle_and_methods_never_import_benchmarks():
    mods = {}
    for pkg in ("methods", "benchmarks"):
        for p in (ROOT / pkg).rglob("*.py"):
            name = ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            mods[name] = p
    graph = {m: {i for i in _module_imports(p, set(mods)) if i in mods and i != m} for m, p in mods.items()}
    bad = [(m, i) for m, deps in graph.items() if m.startswith("methods") for i in deps if i.startswith("benchmarks")]
    assert not bad, bad
    state: dict[str, int] = {}

    def visit(m, stack):
        state[m] = 1
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*stack[stack.index(d):], d]))
            if d not in state:
                visit(d, [*stack, d])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])


# ------------------------------------------------------------------------------------------- a toy task
class VowelsTask(Task):
    """Synthetic text; the gold reward is the share of the letter 'e' among a completion's letters."""

    name = "toy_vowels"

    def data_key(self, c) -> dict:
        return {"toy_vowels": 1}

    def data(self, h, out) -> dict:
        import random

        rng = random.Random(0)
        words = ["tree", "see", "bee", "cat", "dog", "sun", "moon", "green", "red", "blue", "free", "run", "tall"]
        docs = [" ".join(rng.choice(words) for _ in range(rng.randint(6, 14))) + "." for _ in range(1500)]
        utils.atomic_write_json(out / "docs.json", {"general_train": docs[:1400], "task_train": docs[:1400],
                                                    "task_heldout": docs[1400:]})
        return {"docs": len(docs)}

    def prompts(self, h, out, tokenizer) -> dict:
        from benchmarks.tasks.registry import load_docs
        from benchmarks.tasks.sentiment import make_prompts

        t, docs = h.cfg.task, load_docs(h)
        for split, src, n, seed in (("train", "task_train", t.n_train_prompts, 0), ("eval", "task_heldout", t.n_eval_prompts, 1)):
            rows = make_prompts(docs[src], tokenizer, n=n, min_tokens=t.prompt_min_tokens, max_tokens=t.prompt_max_tokens,
                                seed=seed, id_prefix=f"{split}-")
            utils.write_jsonl(out / f"{split}.jsonl", rows)
        return {}

    def gold(self, t, texts, prompts) -> list[float]:
        return [sum(ch == "e" for ch in x) / max(1, sum(ch.isalpha() for ch in x)) for x in texts]


@pytest.fixture
def toy_task():
    register_task(VowelsTask)
    yield
    unregister_task("toy_vowels")


def test_unknown_task_names_the_key_and_the_registered_tasks():
    with pytest.raises(ConfigError, match=r"task.name': unknown task 'nope'; registered tasks: \['dialogue', 'sentiment'"):
        load_suite("smoke", ["task.name=nope"])


@pytest.mark.slow
def test_toy_task_runs_end_to_end(toy_task, tmp_path):
    from benchmarks.cli import main

    args = _tiny_run_args(tmp_path, ["task.name=toy_vowels", "task.corpus=null", "rlhf=null"],
                          drop=("task.corpus", "rlhf."))
    assert main(args) == 0
    summary = pd.read_csv(tmp_path / "runs" / "smoke" / "summary.csv")
    assert set(summary.arm) == {"sft", "dpo-sigmoid-b0.1-s0", "trl-sigmoid-b0.1-s0"}
    assert summary.gold.between(0, 1).all() and (summary.gold > 0).all()  # the toy task's own gold reward
    stages = json.loads((tmp_path / "runs" / "smoke" / "stages.json").read_text())["stages"]
    assert stages["prefs"]["summary"]["pairs"] > 10  # pairs labelled by that gold reward
