"""RLOO and GRPO (``methods.rlhf.group``, ``methods.rlhf.group_trainer``, ``benchmarks.arms.group_rl``): advantages
and the k3 KL by hand, config validation, and the loop on a tiny Llama (CPU, seconds). Parity with TRL 1.16's own
trainers, and the TRL peer arms: tests/test_trl_parity.py."""

import copy
import math

import pytest
import torch

from methods.rlhf.group import grpo_advantages, grpo_loss, kl_penalised_rewards, rloo_advantages, rloo_loss
from methods.rlhf.group_trainer import GroupRLConfig, GroupRLTrainer

D = torch.float64


# --------------------------------------------------------------------------- advantages by hand
def test_rloo_baseline_excludes_the_sample_itself():
    r = torch.tensor([[1.0, 2.0, 3.0, 6.0], [0.5, -0.5, 0.0, 0.0]], dtype=D)
    a = rloo_advantages(r)
    # row 0: baselines (2+3+6)/3, (1+3+6)/3, (1+2+6)/3, (1+2+3)/3
    expected = torch.tensor([[1 - 11 / 3, 2 - 10 / 3, 3 - 3.0, 6 - 2.0],
                             [0.5 - (-0.5 / 3), -0.5 - 0.5 / 3, 0.0, 0.0]], dtype=D)
    torch.testing.assert_close(a, expected, rtol=0, atol=1e-15)
    # a baseline including the sample itself would be the group mean: smaller by (k - 1) / k
    torch.testing.assert_close(a * 3 / 4, r - r.mean(1, keepdim=True), rtol=0, atol=1e-15)
    torch.testing.assert_close(rloo_advantages(torch.tensor([[3.0, 1.0]])), torch.tensor([[2.0, -2.0]]))


def test_rloo_needs_two_samples_per_prompt():
    with pytest.raises(ValueError, match="k >= 2"):
        rloo_advantages(torch.tensor([[1.0], [2.0]]))
    with pytest.raises(ValueError, match=r"\[P, k\]"):
        rloo_advantages(torch.tensor([1.0, 2.0]))


def test_grpo_advantages_by_hand():
    r = torch.tensor([[1.0, 2.0, 3.0, 6.0]], dtype=D)
    std = math.sqrt((4 + 1 + 0 + 9) / 3)  # deviations -2, -1, 0, 3 from the mean 3; Bessel-corrected (as TRL's nanstd)
    expected = torch.tensor([[-2.0, -1.0, 0.0, 3.0]], dtype=D) / (std + 1e-4)
    torch.testing.assert_close(grpo_advantages(r), expected, rtol=0, atol=1e-15)
    torch.testing.assert_close(grpo_advantages(r, eps=0.5), torch.tensor([[-2.0, -1.0, 0.0, 3.0]], dtype=D) / (std + 0.5))
    torch.testing.assert_close(grpo_advantages(r, scale=False), torch.tensor([[-2.0, -1.0, 0.0, 3.0]], dtype=D))
    # one-sample groups: zero advantage (no NaN from a one-sample std); a constant group: zero too
    torch.testing.assert_close(grpo_advantages(torch.tensor([[5.0], [-2.0]])), torch.zeros(2, 1))
    torch.testing.assert_close(grpo_advantages(torch.full((1, 4), 2.0)), torch.zeros(1, 4))


def test_kl_penalised_rewards_are_k1_summed_over_tokens():
    logp = torch.tensor([[-1.0, -2.0, 9.0], [-0.5, -0.5, -0.5]], dtype=D)
    ref = torch.tensor([[-1.5, -1.0, 0.0], [-0.5, -1.5, -0.25]], dtype=D)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    rewards, kl = kl_penalised_rewards(torch.tensor([1.0, 2.0], dtype=D), logp, ref, mask, 0.1)
    torch.testing.assert_close(kl, torch.tensor([0.5 - 1.0, 0.0 + 1.0 - 0.25], dtype=D))  # padding ignored
    torch.testing.assert_close(rewards, torch.tensor([1.0 + 0.05, 2.0 - 0.075], dtype=D))


# --------------------------------------------------------------------------- the k3 KL by hand
def test_grpo_k3_kl_by_hand():
    """k3 = exp(ref - logp) - (ref - logp) - 1 per token, token mean, times beta; its gradient 1 - exp(ref - logp)."""
    logp = torch.tensor([[-1.0, -2.0, -7.0]], dtype=D, requires_grad=True)
    ref = torch.tensor([[-1.5, -1.0, 3.0]], dtype=D)
    mask = torch.tensor([[1, 1, 0]])
    k3 = [math.exp(-0.5) + 0.5 - 1, math.exp(1.0) - 1.0 - 1]  # 0.1065307, 0.7182818
    assert k3[0] == pytest.approx(0.10653066, abs=1e-8) and k3[1] == pytest.approx(0.71828183, abs=1e-8)
    loss, st = grpo_loss(logp, logp.detach(), ref, torch.zeros(1, dtype=D), mask, clip_eps=0.2, beta=0.3)
    assert float(st["kl"]) == pytest.approx(sum(k3) / 2, abs=1e-12)
    assert float(loss.detach()) == pytest.approx(0.3 * sum(k3) / 2, abs=1e-12)  # zero advantage: the KL term alone
    loss.backward()
    expected = [0.3 * (1 - math.exp(-0.5)) / 2, 0.3 * (1 - math.exp(1.0)) / 2, 0.0]  # padding gets no gradient
    torch.testing.assert_close(logp.grad, torch.tensor([expected], dtype=D), rtol=0, atol=1e-12)


def test_rloo_loss_is_reinforce_on_policy():
    logp = torch.tensor([[-1.0, -2.0], [-0.5, 0.0]], dtype=D, requires_grad=True)
    mask = torch.tensor([[1, 1], [1, 0]])
    adv = torch.tensor([2.0, -1.0], dtype=D)
    loss, st = rloo_loss(logp, logp.detach(), adv, mask)
    assert float(loss.detach()) == pytest.approx(-(2.0 - 1.0) / 2) and float(st["ratio_mean"]) == 1.0
    loss.backward()  # -mean_b(A_b grad log pi(y_b)): every completion token of row b gets -A_b / B
    torch.testing.assert_close(logp.grad, torch.tensor([[-1.0, -1.0], [0.5, 0.0]], dtype=D))


# --------------------------------------------------------------------------- config validation
@pytest.mark.parametrize(("kw", "field"), [
    ({"algorithm": "ppo"}, "algorithm"),
    ({"k": 1}, "k"),
    ({"beta": 0.0}, "beta"),  # GRPO: > 0
    ({"algorithm": "rloo", "beta": -0.1}, "beta"),
    ({"prompts_per_iteration": 0}, "prompts_per_iteration"),
    ({"minibatch_size": 7}, "minibatch_size"),  # must divide 16 * 4
    ({"algorithm": "rloo", "epochs": 2}, "epochs"),  # unclipped RLOO is on-policy
    ({"clip_eps": 1.5}, "clip_eps"),
    ({"lr": 0.0}, "lr"),
    ({"iterations": 0}, "iterations"),
    ({"temperature": 0.0}, "temperature"),
    ({"adv_eps": -1.0}, "adv_eps"),
    ({"max_new_tokens": 0}, "max_new_tokens"),
])
def test_config_errors_name_the_field(kw, field):
    cfg = GroupRLConfig(**{"algorithm": "grpo", **kw})
    with pytest.raises(ValueError, match=rf"\n  - {field} "):
        cfg.validate()


def test_valid_configs_and_defaults():
    GroupRLConfig("rloo", beta=0.0).validate()  # RLOO may run without a KL penalty
    GroupRLConfig("rloo", epochs=2, clip_eps=0.2).validate()
    GroupRLConfig("grpo", epochs=2).validate()  # clipped at TRL's 0.2
    assert GroupRLConfig("grpo").effective_clip == 0.2 and GroupRLConfig("rloo").effective_clip is None
    assert GroupRLConfig("grpo").rollout_batch_size == 64


def test_suite_section_errors_name_the_key():
    from benchmarks.arms import build_stages
    from benchmarks.config import ConfigError, load_suite

    with pytest.raises(ConfigError, match=r"'arms.grpo.betas\[0\]': beta must be > 0"):
        load_suite("smoke", ["arms.grpo.betas=[0.0]"])
    with pytest.raises(ConfigError, match=r"'arms.rloo.k': must be >= 2"):
        load_suite("smoke", ["arms.rloo.k=1"])
    with pytest.raises(ConfigError, match=r"'arms.rloo.bogus': unknown key"):
        load_suite("smoke", ["arms.rloo.bogus=1"])
    with pytest.raises(ConfigError, match=r"'arms.rloo.k': k=3 must divide rlhf.ppo.rollout_batch_size=64"):
        build_stages(load_suite("smoke", ["arms.rloo.k=3"]))
    with pytest.raises(ConfigError, match=r"'arms.grpo.minibatch_size'"):
        build_stages(load_suite("smoke", ["arms.grpo.minibatch_size=7"]))
    with pytest.raises(ConfigError, match=r"'arms.rloo': needs the rlhf section"):
        build_stages(load_suite("smoke", ["rlhf=null", "arms.rloo.betas=[0.1]"]))


def test_plan_shares_ppo_budget_and_a_new_beta_reruns_only_its_arms(tmp_path):
    from benchmarks.arms import build_stages, method
    from benchmarks.arms.group_rl import group_config
    from benchmarks.config import load_suite
    from benchmarks.harness import Harness

    def hashes(over):
        cfg = load_suite("smoke", ["seeds=[0, 1]", *over])
        stages, targets = build_stages(cfg)
        h = Harness(cfg, stages, root=tmp_path, log=lambda *_: None)
        return cfg, targets, {n: h.stage_hash(n) for n in stages}

    cfg, targets, base = hashes(['arms={"rloo": {"betas": [0.05]}, "grpo": {"betas": [0.05]}}'])
    for a in ("rloo-kl0.05-s0", "rloo-kl0.05-s1", "grpo-kl0.05-s0", "grpo-kl0.05-s1"):
        assert f"arm/{a}" in targets and f"eval/{a}" in targets
    g = group_config(cfg, "grpo", 0.05, 1)
    ppo = cfg.rlhf.ppo
    assert g.rollout_batch_size == ppo.rollout_batch_size and g.iterations == ppo.iterations and g.lr == ppo.lr
    assert g.seed == 1 and g.reward_norm == ppo.reward_norm
    _, _, after = hashes(['arms={"rloo": {"betas": [0.05, 0.2]}, "grpo": {"betas": [0.05]}}'])
    changed = {n for n in after if base.get(n) != after[n]}
    assert changed == {f"{s}/rloo-kl0.2-s{i}" for s in ("arm", "eval") for i in (0, 1)}
    colours = {m: method(m).color for m in ("rloo", "grpo", "ppo", "strong_ppo", "ppo_gt", "dpo", "trl_dpo", "sft",
                                            "best_of_n", "preferred_ft")}
    assert len(set(colours.values())) == len(colours)
    assert method("rloo").kind == method("grpo").kind == "on_policy_rl" and method("grpo").curves == "rl"


# --------------------------------------------------------------------------- the loop on a tiny Llama
TEXTS = ["The cat", "The dog is", "A", "The sea", "The sun is a", "tree", "good", "The"]


@pytest.fixture(scope="module")
def setup(tiny_lm):
    model, tok = tiny_lm
    prompts = [tok(t)["input_ids"] for t in TEXTS]
    target = set(range(10, 10 + len(tok) // 4))  # a quarter of the vocabulary is "rewarded"
    return model, tok, prompts, target


def share_reward(target):
    return lambda ps, cs: torch.tensor([sum(t in target for t in c) / max(1, len(c)) for c in cs])


def _run(setup, reward_fn=None, checkpoint_path=None, **kw):
    model, tok, prompts, target = setup
    base = dict(beta=0.05, k=4, prompts_per_iteration=4, minibatch_size=8, lr=1e-2, max_new_tokens=6,
                iterations=3, seed=0)
    cfg = GroupRLConfig(**{**base, **kw})
    tr = GroupRLTrainer(copy.deepcopy(model), model, reward_fn or share_reward(target), tok, prompts, cfg, "cpu",
                        monitor=lambda ps, cs: [float(len(c)) for c in cs])
    return tr, tr.train(checkpoint_path=checkpoint_path)


def _no_time(h):
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in h]


@pytest.mark.parametrize("algorithm", ["rloo", "grpo"])
def test_loop_runs_moves_away_from_reference_and_is_deterministic(setup, algorithm):
    model, _, _, _ = setup
    ref_state = copy.deepcopy(model.state_dict())
    tr, h = _run(setup, algorithm=algorithm)
    assert [r["iteration"] for r in h] == [1, 2, 3] and h[-1]["episodes_seen"] == 3 * 16
    assert h[0]["objective/kl"] == pytest.approx(0.0, abs=1e-5)  # the first rollouts come from pi_ref itself
    assert h[-1]["objective/kl"] > 0.05, [r["objective/kl"] for r in h]  # then the policy moves
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in ref_state.items())  # pi_ref untouched
    r = h[-1]
    assert r["policy/updates"] == 2 and r["tokens/update"] == r["tokens/sequence"]  # 16 completions / minibatch 8
    assert r["tokens/sequence"] == r["tokens/prompt"] + r["tokens/generated"]
    assert r["objective/gold"] == pytest.approx(r["tokens/generated"] / 16)  # the monitor, logged only
    for key in ("objective/scores", "objective/rlhf_reward", "policy/loss", "policy/clipfrac", "grad_norm",
                "time/generation", "time/update"):
        assert math.isfinite(r[key]), key
    if algorithm == "grpo":
        assert r["policy/kl_loss"] > 0  # the k3 term in the loss
    _, h2 = _run(setup, algorithm=algorithm)
    assert _no_time(h) == _no_time(h2)  # the same seed gives the same numbers
    _, h3 = _run(setup, algorithm=algorithm, seed=1)
    assert _no_time(h) != _no_time(h3)


def test_resume_from_checkpoint_gives_the_uninterrupted_run(setup, tmp_path):
    model, tok, prompts, target = setup
    _, full = _run(setup, algorithm="grpo", iterations=3)
    ck = tmp_path / "ck.pt"

    def make(**kw):
        cfg = GroupRLConfig(**{**dict(algorithm="grpo", beta=0.05, k=4, prompts_per_iteration=4, minibatch_size=8,
                                      lr=1e-2, max_new_tokens=6, iterations=3, seed=0), **kw})
        return GroupRLTrainer(copy.deepcopy(model), model, share_reward(target), tok, prompts, cfg, "cpu",
                              monitor=lambda ps, cs: [float(len(c)) for c in cs])

    killed = make()
    killed.train(stop=lambda: killed.iteration >= 2, checkpoint_path=ck, checkpoint_every=1)
    assert killed.iteration == 2
    with pytest.raises(ValueError, match="different configuration"):
        make(beta=0.1).load_checkpoint(ck)
    assert _no_time(make().train(checkpoint_path=ck)) == _no_time(full)


def test_non_finite_scores_raise_and_restore_the_policy(setup):
    model, tok, prompts, _ = setup
    cfg = GroupRLConfig("rloo", k=2, prompts_per_iteration=2, minibatch_size=4, max_new_tokens=3, iterations=1)
    policy = copy.deepcopy(model)
    before = copy.deepcopy(policy.state_dict())
    tr = GroupRLTrainer(policy, model, lambda ps, cs: torch.full((len(cs),), float("nan")), tok, prompts, cfg, "cpu")
    with pytest.raises(FloatingPointError, match=r"rloo iteration 1: non-finite scores in phase reward"):
        tr.train()
    assert all(torch.equal(v, policy.state_dict()[k]) for k, v in before.items())
    with pytest.raises(ValueError, match="same object"):
        GroupRLTrainer(model, model, share_reward(set()), tok, prompts, cfg, "cpu")
