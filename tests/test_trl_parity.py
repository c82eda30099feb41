"""TRL 1.16's ``GRPOTrainer`` / ``RLOOTrainer`` configured by our mapping (``methods/baselines/trl_group``) compute
our objective: the same advantages, loss and gradient as ``methods.rlhf.group`` on fixed tensors.

Each parity test builds ``args = trl_config(our_cfg)`` and a real TRL trainer on a tiny Llama, so every attribute
TRL's code reads comes from TRL's own ``__init__`` given our args. Only the two steps that need a model are replaced
on the instance: sampling (``_generate_single_turn``, which returns fixed ragged completions) and the per-token
log-probs (``_get_per_token_logps_and_entropies``, which returns fixed float64 tensors: the rollout policy's, the
reference's, and the current policy's with grad). TRL's own ``_generate_and_score_completions`` then tokenises the
prompts, calls our reward function on its sampled ids and computes the advantages; its ``_compute_loss`` computes
the loss on each minibatch. Tied to TRL's private internals on purpose: when TRL's API differs from the pinned
version these tests FAIL (they never skip), and ``test_trl_is_the_pinned_version`` says why.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
import tomllib
import warnings
from pathlib import Path

import datasets
import pytest
import torch
import trl
from packaging.specifiers import SpecifierSet
from transformers import AutoModelForCausalLM, TrainingArguments
from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer
from trl.trainer.utils import split_tensor_dict

from methods.baselines.trl_group import (
    LEFT_AT_DEFAULT,
    OBJECTIVE_FLAGS,
    normalised_reward,
    objective_flags,
    retokenised_prompts,
    train_trl_group,
    trl_config,
    trl_reward_func,
)
from methods.rlhf.group import grpo_advantages, grpo_loss, kl_penalised_rewards, rloo_advantages, rloo_loss
from methods.rlhf.group_trainer import GroupRLConfig, GroupRLTrainer

D = torch.float64
ROOT = Path(__file__).resolve().parents[1]
TRL_SOURCE_READ = "1.16.0"
"""The TRL release whose grpo_trainer.py / rloo_trainer.py / *_config.py this mapping and these tests were read from."""
CONFIG_CLS = {"grpo": GRPOConfig, "rloo": RLOOConfig}
TRAINER_CLS = {"grpo": GRPOTrainer, "rloo": RLOOTrainer}
TEXTS = ["The cat", "The dog is", "A", "The sea", "The sun is a", "tree", "good", "The"]

PARITY: dict[str, float] = {}
"""Worst |ours - TRL| seen per quantity (printed at the end of the module with -s; quoted in reports)."""


@pytest.fixture(scope="module", autouse=True)
def _print_parity():
    yield
    if PARITY:
        print("\nTRL parity, worst |ours - TRL|: " + ", ".join(f"{k}={v:.2g}" for k, v in sorted(PARITY.items())))


def _close(name, ours, theirs, tol=1e-6, relative=False):
    """|ours - TRL| <= tol (times max(1, |TRL|) when ``relative``: float32 rewards round at their own scale)."""
    assert ours.shape == theirs.shape, f"{name}: shapes {list(ours.shape)} vs {list(theirs.shape)}"
    d = float((ours.detach().to(D) - theirs.detach().to(D)).abs().max())
    if relative:
        d /= max(1.0, float(theirs.detach().abs().max()))
    PARITY[name] = max(PARITY.get(name, 0.0), d)
    assert d <= tol, f"{name}: |ours - TRL| = {d:.3g} > {tol}"


# --------------------------------------------------------------------------- the pin
def test_trl_is_the_pinned_version():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = [d for d in deps if re.match(r"trl\s*[=<>!~]", d)]
    assert len(pins) == 1, f"pyproject.toml should pin trl once, found {pins}"
    spec = SpecifierSet(pins[0][len("trl"):].strip())
    assert trl.__version__ in spec, f"installed trl {trl.__version__} is outside the pin {pins[0]}"
    # the parity tests drive private methods read from this exact release: a new one must be re-read first
    assert trl.__version__ == TRL_SOURCE_READ, (f"trl {trl.__version__} installed; methods/baselines/trl_group.py and "
                                                f"tests/test_trl_parity.py were checked against {TRL_SOURCE_READ}")


# --------------------------------------------------------------------------- the flags
def _own_fields(cls) -> dict[str, dataclasses.Field]:
    base = {f.name for f in dataclasses.fields(TrainingArguments)}
    return {f.name: f for f in dataclasses.fields(cls) if f.name not in base}


def _default(cls, name):
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def _cfg(algorithm, **kw):
    base = dict(beta=0.03, k=4, prompts_per_iteration=16, minibatch_size=16, lr=2e-4, iterations=40,
                max_new_tokens=24, temperature=0.9, adam_eps=1e-5, grad_clip=1.0)
    return GroupRLConfig(algorithm=algorithm, **{**base, **kw})


def _expected_flags(cfg: GroupRLConfig) -> dict:
    """Our config's TRL 1.16 objective flags, written out independently of ``objective_flags``."""
    e = dict(beta=cfg.beta, num_generations=cfg.k, per_device_train_batch_size=cfg.minibatch_size,
             gradient_accumulation_steps=1, steps_per_generation=cfg.prompts_per_iteration * cfg.k // cfg.minibatch_size,
             num_iterations=cfg.epochs, reward_weights=[1.0], mask_truncated_completions=False, sync_ref_model=False,
             disable_dropout=True, router_aux_loss_coef=0.0, max_completion_length=cfg.max_new_tokens,
             temperature=cfg.temperature, top_p=1.0, top_k=0, min_p=None, repetition_penalty=1.0,
             generation_kwargs=None, use_vllm=False, use_transformers_continuous_batching=False)
    if cfg.algorithm == "grpo":
        clip = 0.2 if cfg.clip_eps is None else cfg.clip_eps
        return e | dict(loss_type="bnpo", use_bias_correction_kl=cfg.kl_grad == "k3_ratio",
                        scale_rewards="group" if cfg.scale_rewards else "none",
                        multi_objective_aggregation="sum_then_normalize", importance_sampling_level="token",
                        epsilon=clip, epsilon_high=clip, delta=None, top_entropy_quantile=1.0, entropy_coef=0.0,
                        use_adaptive_entropy=False, off_policy_mask_threshold=None,
                        vllm_importance_sampling_correction=False, cast_lm_head_to_fp32=False)
    clip = math.inf if cfg.clip_eps is None else cfg.clip_eps
    return e | dict(epsilon=clip, epsilon_high=clip, normalize_advantages=False, reward_clip_range=None)


# where ours differs from TRL 1.16's default (for _cfg's values; use_bias_correction_kl only for kl_grad="k3", the
# clip only where it is not TRL's 0.2, scale_rewards only for scale_rewards=False, RLOO's epsilon only unclipped)
_DIFFER = {
    "grpo": {"beta", "num_generations", "loss_type", "epsilon_high", "disable_dropout", "max_completion_length",
             "temperature", "reward_weights", "router_aux_loss_coef", "vllm_importance_sampling_correction",
             "per_device_train_batch_size", "steps_per_generation"},
    "rloo": {"beta", "num_generations", "epsilon", "epsilon_high", "disable_dropout", "max_completion_length",
             "temperature", "reward_weights", "router_aux_loss_coef", "per_device_train_batch_size",
             "steps_per_generation"},
}


@pytest.mark.parametrize("algorithm", ["grpo", "rloo"])
def test_every_trl_flag_is_mapped_or_named_inert(algorithm):
    """Every field TRL's config declares beyond TrainingArguments is either an objective flag set from ours or named
    with its reason in LEFT_AT_DEFAULT: a new TRL flag fails here until someone decides which it is."""
    own = set(_own_fields(CONFIG_CLS[algorithm]))
    objective = set(OBJECTIVE_FLAGS[algorithm])
    all_fields = {f.name for f in dataclasses.fields(CONFIG_CLS[algorithm])}
    assert objective <= all_fields, f"not {CONFIG_CLS[algorithm].__name__} fields: {objective - all_fields}"
    assert not objective & set(LEFT_AT_DEFAULT), objective & set(LEFT_AT_DEFAULT)
    assert own - objective - set(LEFT_AT_DEFAULT) == set(), f"unclassified TRL flags: {own - objective - set(LEFT_AT_DEFAULT)}"
    every = set(_own_fields(GRPOConfig)) | set(_own_fields(RLOOConfig))
    assert set(LEFT_AT_DEFAULT) <= every, f"stale names in LEFT_AT_DEFAULT: {set(LEFT_AT_DEFAULT) - every}"


@pytest.mark.parametrize("kl_grad", ["k3", "k3_ratio"])
@pytest.mark.parametrize("algorithm", ["grpo", "rloo"])
def test_objective_flags_are_set_explicitly_to_ours(algorithm, kl_grad, monkeypatch):
    cfg = _cfg(algorithm, kl_grad=kl_grad)
    cls = CONFIG_CLS[algorithm]
    passed: dict = {}

    class Recorder(cls):
        def __init__(self, **kw):
            passed.update(kw)
            super().__init__(**kw)

    monkeypatch.setattr(trl, cls.__name__, Recorder)  # trl_config imports it from trl at call time
    args = trl_config(cfg, output_dir="/tmp/unused", device="cpu")
    assert isinstance(args, Recorder)
    expected = _expected_flags(cfg)
    assert set(expected) == set(OBJECTIVE_FLAGS[algorithm]) == set(objective_flags(cfg))
    differ = _DIFFER[algorithm] | ({"use_bias_correction_kl"} if kl_grad == "k3" else set())
    for name, value in expected.items():
        assert name in passed, f"{name} left to TRL's default"
        assert passed[name] == value, f"{name}: passed {passed[name]!r}, ours {value!r}"
        assert getattr(args, name) == value, f"{name}: TRL's __post_init__ turned {value!r} into {getattr(args, name)!r}"
        default = _default(cls, name) if name in {f.name for f in dataclasses.fields(cls)} else None
        assert (default != value) == (name in differ), (name, default, value)
    with pytest.raises(ValueError, match="objective"):
        trl_config(cfg, output_dir="/tmp/unused", device="cpu", beta=0.5)


def test_flags_follow_our_config():
    g = objective_flags(_cfg("grpo", scale_rewards=False, clip_eps=0.1, epochs=2, minibatch_size=8, kl_grad="k3"))
    assert (g["scale_rewards"], g["epsilon"], g["epsilon_high"], g["num_iterations"], g["steps_per_generation"],
            g["use_bias_correction_kl"]) == ("none", 0.1, 0.1, 2, 8, False)
    r = objective_flags(_cfg("rloo", clip_eps=0.3, epochs=2))
    assert (r["epsilon"], r["epsilon_high"], r["num_iterations"]) == (0.3, 0.3, 2)
    with pytest.raises(ValueError, match="adv_eps"):
        objective_flags(_cfg("grpo", adv_eps=1e-6))  # TRL hard-codes std + 1e-4


@pytest.mark.parametrize("algorithm", ["grpo", "rloo"])
def test_trl_peer_config_matches_ours_not_trls_defaults(algorithm):
    a = trl_config(_cfg(algorithm), output_dir="/tmp/unused", device="cpu")
    assert (a.beta, a.num_generations, a.learning_rate, a.temperature, a.max_completion_length) == (0.03, 4, 2e-4, 0.9, 24)
    # 64 completions per generation round (PPO's rollout batch), 16 per optimiser step, 40 rounds, one pass
    assert a.per_device_train_batch_size == 16 and a.steps_per_generation == 4 and a.generation_batch_size == 64
    assert a.max_steps == 160 and a.num_iterations == 1 and a.lr_scheduler_type == "constant" and a.warmup_steps == 0
    assert a.adam_epsilon == 1e-5 and a.max_grad_norm == 1.0 and a.weight_decay == 0.0 and a.top_k == 0
    assert a.disable_dropout and not a.gradient_checkpointing and a.gradient_accumulation_steps == 1
    if algorithm == "grpo":  # ours: clip 0.2, std-scaled groups, token mean over the minibatch, reverse-KL gradient
        assert (a.epsilon, a.epsilon_high, a.scale_rewards, a.loss_type, a.use_bias_correction_kl) == (0.2, 0.2, "group", "bnpo", True)
    else:  # ours: unclipped REINFORCE, raw leave-one-out advantages
        assert a.epsilon == a.epsilon_high == math.inf and not a.normalize_advantages
    with pytest.raises(ValueError, match="minibatch_size"):
        trl_config(GroupRLConfig(algorithm=algorithm, k=4, prompts_per_iteration=3, minibatch_size=8), output_dir="/tmp/x",
                   device="cpu")


# --------------------------------------------------------------------------- the reward
@pytest.fixture(scope="module")
def tiny(tiny_lm, tmp_path_factory):
    """The tiny Llama saved to a folder (TRL builds its reference from the policy's folder, as the arm loads it)."""
    model, tok = tiny_lm
    d = tmp_path_factory.mktemp("trl_parity") / "sft"
    model.save_pretrained(d)
    return model, tok, d


@pytest.mark.parametrize("scale", [None, (3.0, 10.0)])
def test_normalised_reward_is_our_trainers_normalisation(tiny, scale):
    model, tok, _ = tiny
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(16, generator=g) * 7 + 2 for _ in range(3)]
    cfg = GroupRLConfig("grpo", k=4, prompts_per_iteration=4, minibatch_size=16, reward_norm=True)
    ours = GroupRLTrainer(copy.deepcopy(model), model, lambda ps, cs: None, tok, [[1, 2]], cfg, "cpu", reward_scale=scale)
    calls = iter(batches)
    theirs = normalised_reward(lambda ps, cs: next(calls).tolist(), True, scale)
    for raw in batches:
        a, b = ours._normalise(raw.float())[0], theirs([], [])
        assert a.dtype == b.dtype == torch.float32 and torch.equal(a, b)
    assert torch.equal(normalised_reward(lambda ps, cs: batches[0], False)([], []), batches[0])
    with pytest.raises(ValueError, match="scale"):
        normalised_reward(lambda ps, cs: None, True, (0.0, 0.0))


# --------------------------------------------------------------------------- TRL's own code on fixed tensors
P, K = 4, 2  # prompts per round, completions per prompt: 8 completions, ragged lengths 1..5
LENGTHS = [5, 3, 4, 1, 2, 5, 4, 3]


def _rows(tok):
    return [{"prompt": t, "prompt_ids": tok(t)["input_ids"]} for t in TEXTS[:P]]


def _fixed(tok, seed):
    """Completions (some ending with EOS), raw scores, and [B, T] log-probs: the rollout policy's (``old``), the
    reference's and the current policy's; ratios exp(cur - old) fall well outside [1 - eps, 1 + eps]."""
    g = torch.Generator().manual_seed(seed)
    comps = [torch.randint(5, len(tok) - 1, (n,), generator=g).tolist() for n in LENGTHS]
    for i in (1, 4):
        comps[i][-1] = tok.eos_token_id
    B, T = len(comps), max(LENGTHS)
    cur = -torch.rand(B, T, generator=g, dtype=D) * 3
    old = cur + torch.randn(B, T, generator=g, dtype=D) * 0.3
    ref = cur + torch.randn(B, T, generator=g, dtype=D) * 0.5
    raw = torch.randn(B, generator=g) * 4 + 1
    raw[2:4] = raw[2]  # one group with zero std
    return comps, raw, {"old": old, "ref": ref, "cur": cur}


def _trainer(alg, cfg, tiny, reward_fn, tmp_path):
    _, tok, d = tiny
    args = trl_config(cfg, output_dir=str(tmp_path / "trl"), device="cpu")
    ds = datasets.Dataset.from_list(_rows(tok))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tr = TRAINER_CLS[alg](model=AutoModelForCausalLM.from_pretrained(d), reward_funcs=reward_fn, args=args,
                              train_dataset=ds, processing_class=tok)
    # what HF Trainer's loop sets before compute_loss: train mode, the batches in this optimiser step
    tr.model.train()
    tr.current_gradient_accumulation_steps = args.gradient_accumulation_steps
    return tr


def _drive(alg, cfg, tiny, tmp_path, seed, reward_scale):
    """TRL's scoring and loss on fixed tensors vs ours: returns nothing, asserts advantages, loss and gradient."""
    _, tok, _ = tiny
    comps, raw, lp = _fixed(tok, seed)
    B, T = lp["cur"].shape
    seen = []

    def raw_fn(ps, cs):
        seen.append((ps, cs))
        return raw

    tr = _trainer(alg, cfg, tiny, trl_reward_func(normalised_reward(raw_fn, cfg.reward_norm, reward_scale)), tmp_path)
    rows = [r for r in _rows(tok) for _ in range(cfg.k)]  # TRL's RepeatSampler: each prompt k times in a row
    state = {"cur": None}

    def sample(prompt_ids, *a, **k):  # replaces model.generate: the fixed completions
        assert [list(p) for p in prompt_ids] == [r["prompt_ids"] for r in rows]  # TRL's tokenisation = our ids
        return (comps, None) if alg == "grpo" else comps

    def logps(model, input_ids, attention_mask, logits_to_keep, *a, compute_entropy=False, **k):
        if model is tr.ref_model and model is not None:
            t = lp["ref"]
        elif torch.is_grad_enabled():  # _compute_loss: the current policy, one minibatch
            t = state["cur"]
        else:  # _generate_and_score_completions: the rollout policy
            t = lp["old"]
        assert t.shape == (input_ids.shape[0], logits_to_keep)
        return t, torch.zeros_like(t) if compute_entropy else None, None

    tr._generate_single_turn = sample
    tr._get_per_token_logps_and_entropies = logps
    out = tr._generate_and_score_completions(rows)

    # the reward saw our prompt ids and exactly the sampled completion ids
    assert seen == [([r["prompt_ids"] for r in rows], comps)]
    mask = out["completion_mask"]
    assert mask.sum(1).tolist() == LENGTHS
    on_policy = alg == "grpo" and "old_per_token_logps" not in out  # TRL then uses the current log-probs, detached
    assert on_policy == (alg == "grpo" and cfg.rollout_batch_size == cfg.minibatch_size and cfg.epochs == 1)

    # ours: GroupRLTrainer's normalisation and advantages of the same scores
    ours_tr = GroupRLTrainer(copy.deepcopy(tiny[0]), tiny[0], raw_fn, tok, [r["prompt_ids"] for r in _rows(tok)], cfg,
                             "cpu", reward_scale=reward_scale)
    scores = ours_tr._normalise(raw.float())[0]
    if alg == "grpo":
        adv = grpo_advantages(scores.view(P, cfg.k), eps=cfg.adv_eps, scale=cfg.scale_rewards).flatten()
        _close(f"{alg}_advantages", adv, out["advantages"], relative=True)  # both float32, as the rewards
    else:
        rewards, _ = kl_penalised_rewards(scores, lp["old"], lp["ref"], mask, cfg.beta)
        # TRL keeps the float32 rewards' precision where beta = 0 (no float64 KL term in them)
        _close(f"{alg}_advantages", rloo_advantages(rewards.view(P, cfg.k)).flatten(), out["advantages"], relative=True)

    # TRL's loss on each minibatch of the generation batch (its split; the shuffle only permutes rows)
    steps = tr.args.steps_per_generation
    M = B // steps
    for i, mb in enumerate(split_tensor_dict(out, steps)):
        rows_i = slice(i * M, (i + 1) * M)
        state["cur"] = lp["cur"][rows_i].clone().requires_grad_(True)
        theirs = tr._compute_loss(tr.model, mb)
        theirs.backward()
        cur = lp["cur"][rows_i].clone().requires_grad_(True)
        old = cur.detach() if on_policy else lp["old"][rows_i]
        m, a = mb["completion_mask"], mb["advantages"]
        if alg == "grpo":
            ours, _ = grpo_loss(cur, old, lp["ref"][rows_i], a, m, clip_eps=cfg.effective_clip, beta=cfg.beta,
                                kl_grad=cfg.kl_grad)
        else:
            ours, _ = rloo_loss(cur, old, a, m, clip_eps=cfg.effective_clip)
        ours.backward()
        _close(f"{alg}_loss", ours, theirs)
        _close(f"{alg}_grad", cur.grad * m, state["cur"].grad * m)  # both leave padding's gradient at 0
        if not on_policy:  # the fixed ratios leave the clip range: the clip is exercised
            ratio = torch.exp(cur.detach() - old)[m.bool()]
            assert (ratio - 1).abs().max() > (cfg.effective_clip or 0.2)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(("beta", "clip_eps", "scale_rewards"), [(0.04, None, True), (0.5, 0.1, True), (0.1, 0.3, False)])
@pytest.mark.parametrize("kl_grad", ["k3", "k3_ratio"])
def test_grpo_loss_and_gradient_match_trl(tiny, tmp_path, seed, beta, clip_eps, scale_rewards, kl_grad):
    """Two minibatches per round: TRL computes the rollout log-probs and the later minibatch is off-policy."""
    cfg = GroupRLConfig("grpo", beta=beta, k=K, prompts_per_iteration=P, minibatch_size=4, clip_eps=clip_eps,
                        scale_rewards=scale_rewards, kl_grad=kl_grad, reward_norm=True, max_new_tokens=5)
    _drive("grpo", cfg, tiny, tmp_path, seed, reward_scale=(1.0, 4.0) if seed == 1 else None)


@pytest.mark.parametrize(("minibatch_size", "epochs"), [(8, 1), (8, 2)])
@pytest.mark.parametrize("kl_grad", ["k3", "k3_ratio"])
def test_grpo_on_policy_and_multi_epoch_match_trl(tiny, tmp_path, minibatch_size, epochs, kl_grad):
    """One minibatch, one pass: TRL skips the rollout log-probs (ratio 1); two passes: it computes them."""
    cfg = GroupRLConfig("grpo", beta=0.2, k=K, prompts_per_iteration=P, minibatch_size=minibatch_size, epochs=epochs,
                        kl_grad=kl_grad, max_new_tokens=5)
    _drive("grpo", cfg, tiny, tmp_path, seed=3, reward_scale=None)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(("beta", "clip_eps", "epochs"), [(0.05, None, 1), (0.0, None, 1), (0.5, 0.2, 2)])
def test_rloo_loss_and_gradient_match_trl(tiny, tmp_path, seed, beta, clip_eps, epochs):
    """Ours unclipped (TRL: epsilon = inf) or clipped per sequence, two minibatches per round."""
    cfg = GroupRLConfig("rloo", beta=beta, k=K, prompts_per_iteration=P, minibatch_size=4, clip_eps=clip_eps,
                        epochs=epochs, reward_norm=seed != 2, max_new_tokens=5)
    _drive("rloo", cfg, tiny, tmp_path, seed, reward_scale=(1.0, 4.0) if seed == 1 else None)


def test_grpo_aggregation_is_trl_bnpo_not_its_default_dapo(tiny, tmp_path):
    """TRL 1.16's default loss_type 'dapo' divides a minibatch's token sum by the generation batch's tokens /
    steps_per_generation; ours (and 'bnpo') by the minibatch's own tokens; TRL's 'grpo' averages per-sequence means.
    With ragged lengths all three differ, so the mapping's explicit 'bnpo' matters."""
    assert GRPOConfig.__dataclass_fields__["loss_type"].default == "dapo"
    cfg = GroupRLConfig("grpo", beta=0.1, k=K, prompts_per_iteration=P, minibatch_size=4, max_new_tokens=5)
    _, tok, _ = tiny
    comps, raw, lp = _fixed(tok, 0)
    tr = _trainer("grpo", cfg, tiny, trl_reward_func(lambda ps, cs: raw), tmp_path)
    tr._generate_single_turn = lambda *a, **k: (comps, None)
    state = {}
    tr._get_per_token_logps_and_entropies = lambda model, ids, am, n, *a, compute_entropy=False, **k: (
        lp["ref"] if model is tr.ref_model else state.get("cur", lp["old"]), torch.zeros(ids.shape[0], n, dtype=D), None)
    out = tr._generate_and_score_completions([r for r in _rows(tok) for _ in range(K)])
    mb = split_tensor_dict(out, 2)[0]
    state["cur"] = lp["cur"][:4]
    m = mb["completion_mask"]
    ours, _ = grpo_loss(lp["cur"][:4], lp["old"][:4], lp["ref"][:4], mb["advantages"], m, clip_eps=0.2, beta=0.1,
                        kl_grad=cfg.kl_grad)
    losses = {}
    for lt in ("bnpo", "dapo", "grpo"):
        tr.loss_type = lt
        with torch.no_grad():
            losses[lt] = float(tr._compute_loss(tr.model, mb))
    assert losses["bnpo"] == pytest.approx(float(ours), abs=1e-12)
    assert abs(losses["dapo"] - losses["bnpo"]) > 1e-3 and abs(losses["grpo"] - losses["bnpo"]) > 1e-3, losses
    n_mb, n_gen = float(m.sum()), float(out["completion_mask"].sum())
    assert losses["dapo"] == pytest.approx(losses["bnpo"] * n_mb / (n_gen / 2), rel=1e-9)  # dapo's normaliser


# --------------------------------------------------------------------------- the KL gradients by hand
@pytest.mark.parametrize("kl_grad", ["k3", "k3_ratio"])
def test_kl_gradients_by_hand(kl_grad):
    """On-policy (old = logp, ratio 1, inside the clip): d loss / d logp_t = (-A_b + beta * g_t) / n_tokens with
    g = logp - ref for k3_ratio (the reverse-KL gradient) and g = 1 - exp(ref - logp) for k3."""
    g = torch.Generator().manual_seed(0)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]])
    logp = (-torch.rand(3, 4, generator=g, dtype=D) * 2).requires_grad_(True)
    ref = logp.detach() + torch.randn(3, 4, generator=g, dtype=D) * 0.7
    adv = torch.tensor([0.5, -1.0, 0.25], dtype=D)
    beta, n = 0.3, int(mask.sum())
    loss, _ = grpo_loss(logp, logp.detach(), ref, adv, mask, clip_eps=0.2, beta=beta, kl_grad=kl_grad)
    loss.backward()
    lp = logp.detach()
    kl_g = lp - ref if kl_grad == "k3_ratio" else 1 - torch.exp(ref - lp)
    expected = torch.where(mask.bool(), (-adv[:, None] + beta * kl_g) / n, torch.zeros((), dtype=D))
    torch.testing.assert_close(logp.grad, expected, rtol=0, atol=1e-14)


# --------------------------------------------------------------------------- a tiny end-to-end run
def share_reward(target):
    return lambda ps, cs: torch.tensor([sum(t in target for t in c) / max(1, len(c)) for c in cs])


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["grpo", "rloo"])
def test_trl_peer_trains_on_our_reward_of_its_own_samples(tiny, tmp_path, algorithm, monkeypatch):
    model, tok, d = tiny
    prompts = [tok(t)["input_ids"] for t in TEXTS]
    target = set(range(10, 10 + len(tok) // 4))  # a quarter of the vocabulary is "rewarded"
    rows = [{"prompt": t, "prompt_ids": p} for t, p in zip(TEXTS, prompts, strict=True)]
    assert retokenised_prompts(tok, rows) == 0  # TRL conditions the policy on exactly our prompt ids
    seen, sampled = [], []
    real = TRAINER_CLS[algorithm]._generate_single_turn

    def record(self, *a, **k):  # what model.generate sampled, as TRL hands it on
        out = real(self, *a, **k)
        sampled.append([list(c) for c in (out[0] if algorithm == "grpo" else out)])
        return out

    monkeypatch.setattr(TRAINER_CLS[algorithm], "_generate_single_turn", record)

    def reward_fn(ps, cs):
        seen.append((ps, cs))
        return share_reward(target)(ps, cs) * 10.0 + 3.0  # an offset and a scale the normalisation must remove

    cfg = GroupRLConfig(algorithm=algorithm, beta=0.05, k=4, prompts_per_iteration=4, minibatch_size=8, lr=1e-2,
                        max_new_tokens=6, iterations=2, reward_norm=True)
    scale = None if algorithm == "grpo" else (3.0, 10.0)  # first-round statistics / the arm/rm-scale stage's
    policy = AutoModelForCausalLM.from_pretrained(d)
    hist = train_trl_group(policy, tok, rows, reward_fn, cfg, device="cpu", output_dir=str(tmp_path),
                           monitor=lambda ps, cs: [float(len(c)) for c in cs], reward_scale=scale)
    # one reward call per generation round of prompts_per_iteration * k completions: exactly the sampled ids
    assert len(seen) == cfg.iterations and all(len(cs) == 16 for _, cs in seen)
    assert [cs for _, cs in seen] == sampled
    assert {tuple(p) for ps, _ in seen for p in ps} <= {tuple(p) for p in prompts}
    assert all(len(c) <= cfg.max_new_tokens for _, cs in seen for c in cs)
    # normalised as ours: TRL's logged mean reward of round 1 is 0 (first-round statistics) or (mean - 3) / 10
    first = next(r for r in hist if "reward" in r)
    raw1 = (share_reward(target)(*seen[0]) * 10.0 + 3.0).double()
    assert first["reward"] == pytest.approx(0.0 if scale is None else float((raw1.mean() - 3.0) / 10.0), abs=1e-5)
    assert len(hist) == cfg.iterations * 2 and all("objective/gold" in r for r in hist)
    moved = max(float((p.detach() - q.detach()).abs().max()) for p, q in zip(policy.parameters(), model.parameters(), strict=True))
    assert moved > 0


# --------------------------------------------------------------------------- the peer arms' plan
@pytest.mark.parametrize("stats", ["given", "first"])
def test_peer_arms_use_the_rm_scale_stage_as_ours(tmp_path, stats):
    from benchmarks.arms import build_stages
    from benchmarks.config import load_suite
    from benchmarks.harness import Harness

    def plan(*over):
        cfg = load_suite("smoke", ["seeds=[0]", "rlhf.ppo.reward_norm=true", f"rlhf.ppo.reward_norm_stats={stats}",
                                   'arms={"rloo": {"betas": [0.05], "trl_peer": true}, '
                                   '"grpo": {"betas": [0.05], "trl_peer": true}}', *over])
        stages, targets = build_stages(cfg)
        return stages, Harness(cfg, stages, root=tmp_path, log=lambda *_: None)

    stages, h = plan()
    for alg in ("grpo", "rloo"):
        ours, peer = stages[f"arm/{alg}-kl0.05-s0"], stages[f"arm/trl-{alg}-kl0.05-s0"]
        assert set(peer.deps) == set(ours.deps) and ("arm/rm-scale" in peer.deps) == (stats == "given")
        key = peer.key(h.cfg)
        assert key["trl_objective"] == objective_flags(GroupRLConfig(**key["group"]))
        assert ("reward_scale" in key) == (stats == "given")
    assert ("arm/rm-scale" in stages) == (stats == "given")
    # a change of the objective (here GRPO's KL gradient) reruns the peer
    _, h2 = plan('arms.grpo.kl_grad=k3')
    assert h2.stage_hash("arm/trl-grpo-kl0.05-s0") != h.stage_hash("arm/trl-grpo-kl0.05-s0")
    assert h2.stage_hash("arm/trl-rloo-kl0.05-s0") == h.stage_hash("arm/trl-rloo-kl0.05-s0")
