"""RLOO and GRPO (``methods.rlhf.group``, ``methods.rlhf.group_trainer``, ``benchmarks.arms.group_rl``): advantages
and the k3 KL by hand, loss parity with TRL 1.16's own trainers on fixed tensors, config validation, and the loop on
a tiny Llama (CPU, seconds)."""

import copy
import math
from collections import defaultdict
from types import SimpleNamespace

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


# --------------------------------------------------------------------------- parity with TRL 1.16
#
# TRL 1.16 has no standalone GRPO / RLOO loss function: each lives inside ``<Trainer>._compute_loss``, which first
# runs the model through ``self._get_per_token_logps_and_entropies``. As the DPO parity test does
# (tests/test_dpo_losses.py), we call TRL's real (unbound) method with a duck-typed ``self`` whose
# ``_get_per_token_logps_and_entropies`` returns fixed per-token log-probs, so TRL's own loss code runs on our
# tensors. The advantages are computed in ``_generate_and_score_completions`` (generation + reward functions), which
# cannot run on fixed tensors: its formulas are reproduced below line for line, citing the source. Tied to TRL's
# private internals, so a mismatch in that plumbing skips rather than fails.

_B, _T = 4, 5
_MASK = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 0, 0, 0, 0]])


def _fixed(seed=0):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(_B, _T, generator=g, dtype=D) * 3  # current policy
    old = logp + torch.randn(_B, _T, generator=g, dtype=D) * 0.3  # ratios well outside [0.8, 1.2] for some tokens
    ref = logp + torch.randn(_B, _T, generator=g, dtype=D) * 0.5
    scores = torch.randn(_B, generator=g, dtype=D)
    return logp, old, ref, scores


def _stub(trainer_cls, logp, **attrs):
    identity = lambda x, **_: x  # noqa: E731
    return SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logp, torch.zeros_like(logp), None),
        model=SimpleNamespace(training=True),
        accelerator=SimpleNamespace(device=torch.device("cpu"), num_processes=1, reduce=identity, gather=identity,
                                    gather_for_metrics=identity, sync_gradients=True),
        aux_loss_enabled=False, _metrics=defaultdict(lambda: defaultdict(list)), **attrs)


def _inputs(**extra):
    return {"prompt_ids": torch.ones(_B, 2, dtype=torch.long), "prompt_mask": torch.ones(_B, 2, dtype=torch.long),
            "completion_ids": torch.ones(_B, _T, dtype=torch.long), "completion_mask": _MASK, **extra}


def _trl_grpo_loss(logp, old, ref, adv, beta, eps):
    """TRL 1.16 GRPOTrainer._compute_loss, default loss_type 'dapo', one process, no accumulation."""
    mod = pytest.importorskip("trl.trainer.grpo_trainer")
    compute = getattr(mod.GRPOTrainer, "_compute_loss", None)
    if compute is None:
        pytest.skip("TRL GRPOTrainer has no _compute_loss")
    args = SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1)
    stub = _stub(mod.GRPOTrainer, logp, top_entropy_quantile=1.0, off_policy_mask_threshold=None,
                 importance_sampling_level="token", beta=beta, args=args, loss_type="dapo", epsilon_low=eps,
                 epsilon_high=eps, use_vllm=False, vllm_importance_sampling_correction=False,
                 current_gradient_accumulation_steps=1, _entropy_bonus_enabled=False)
    inputs = _inputs(advantages=adv, old_per_token_logps=old, ref_per_token_logps=ref,
                     num_items_in_batch=_MASK.sum().to(D))
    try:
        return compute(stub, None, inputs)
    except (AttributeError, KeyError, TypeError) as e:  # TRL internals changed: plumbing, not a loss mismatch
        pytest.skip(f"cannot drive TRL GRPOTrainer._compute_loss with a stub: {e!r}")


def _trl_rloo_loss(logp, old_seq, adv, eps):
    """TRL 1.16 RLOOTrainer._compute_loss (sequence-level clipped ratio, mean over sequences)."""
    mod = pytest.importorskip("trl.trainer.rloo_trainer")
    compute = getattr(mod.RLOOTrainer, "_compute_loss", None)
    if compute is None:
        pytest.skip("TRL RLOOTrainer has no _compute_loss")
    stub = _stub(mod.RLOOTrainer, logp, epsilon_low=eps, epsilon_high=eps)
    try:
        return compute(stub, None, _inputs(advantages=adv, old_logps=old_seq))
    except (AttributeError, KeyError, TypeError) as e:
        pytest.skip(f"cannot drive TRL RLOOTrainer._compute_loss with a stub: {e!r}")


def _trl_grpo_advantages(rewards, k):
    """trl/trainer/grpo_trainer.py (1.16) ``_generate_and_score_completions``, lines 2765-2787 and 2810, one reward
    function, scale_rewards='group' (the default):
        mean_grouped_rewards = torch.nanmean(rewards.view(-1, num_generations), dim=1).repeat_interleave(...)
        std_rewards = nanstd(rewards.view(-1, num_generations), dim=1).repeat_interleave(...)
        advantages = (rewards - mean_grouped_rewards) / (std_rewards + 1e-4); nan_to_num(advantages, nan=0.0)"""
    from trl.trainer.utils import nanstd

    mean = torch.nanmean(rewards.view(-1, k), dim=1).repeat_interleave(k, dim=0)
    std = nanstd(rewards.view(-1, k), dim=1).repeat_interleave(k, dim=0)
    return torch.nan_to_num((rewards - mean) / (std + 1e-4), nan=0.0)


def _trl_rloo_advantages(scores, old, ref, mask, beta, k):
    """trl/trainer/rloo_trainer.py (1.16) ``_generate_and_score_completions``, lines 1664-1690 (one reward function):
        per_token_kl = old_per_token_logps - ref_per_token_logps; kl = (per_token_kl * completion_mask).sum(-1)
        rewards = rewards - self.beta * kl
        grouped_rewards = rewards.view(-1, num_generations)
        baselines = (grouped_sum - grouped_rewards) / (scorable_counts - 1); advantages = rewards - baselines"""
    rewards = scores - beta * ((old - ref) * mask).sum(-1)
    grouped = rewards.view(-1, k)
    counts = (~torch.isnan(grouped)).sum(dim=1, keepdim=True)
    baselines = ((torch.nansum(grouped, dim=1, keepdim=True) - grouped) / (counts - 1)).view(-1)
    return torch.nan_to_num(rewards - baselines, nan=0.0)


PARITY: dict[str, float] = {}  # worst |ours - TRL| seen, per quantity (printed by -s, quoted in the report)


def _close(name, ours, theirs, tol=1e-6):
    d = float((ours.detach().to(D) - theirs.detach().to(D)).abs().max())
    PARITY[name] = max(PARITY.get(name, 0.0), d)
    assert d <= tol, f"{name}: |ours - TRL| = {d:.3g} > {tol}"


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(("beta", "eps"), [(0.04, 0.2), (0.5, 0.1), (0.0, 0.3)])
def test_grpo_loss_and_gradient_match_trl(seed, beta, eps):
    logp, old, ref, scores = _fixed(seed)
    adv = grpo_advantages(scores.view(2, 2)).flatten()
    _close("grpo_advantages", adv, _trl_grpo_advantages(scores, 2))
    lp_trl = logp.clone().requires_grad_(True)
    trl_loss = _trl_grpo_loss(lp_trl, old, ref, adv, beta, eps)
    trl_loss.backward()
    lp = logp.clone().requires_grad_(True)
    ours, _ = grpo_loss(lp, old, ref, adv, _MASK, clip_eps=eps, beta=beta)
    ours.backward()
    _close("grpo_loss", ours, trl_loss)
    _close("grpo_grad", lp.grad * _MASK, lp_trl.grad * _MASK)  # TRL leaves garbage gradients on padding at 0 too


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("eps", [0.2, None])
def test_rloo_loss_and_gradient_match_trl(seed, eps):
    logp, old, ref, scores = _fixed(seed)
    beta = 0.05
    rewards, _ = kl_penalised_rewards(scores, old, ref, _MASK, beta)
    adv = rloo_advantages(rewards.view(2, 2)).flatten()
    _close("rloo_advantages", adv, _trl_rloo_advantages(scores, old, ref, _MASK, beta, 2))
    old_seq = (old * _MASK).sum(1)
    lp_trl = logp.clone().requires_grad_(True)
    trl_loss = _trl_rloo_loss(lp_trl, old_seq, adv, 1e9 if eps is None else eps)  # unclipped = TRL with a huge eps
    trl_loss.backward()
    lp = logp.clone().requires_grad_(True)
    ours, _ = rloo_loss(lp, old, adv, _MASK, clip_eps=eps)
    ours.backward()
    _close("rloo_loss", ours, trl_loss)
    _close("rloo_grad", lp.grad * _MASK, lp_trl.grad * _MASK)


def test_grpo_default_aggregation_is_trl_dapo_token_mean():
    """TRL 1.16's GRPOConfig.loss_type default is 'dapo' (a token mean over the batch), which differs from its
    'grpo' loss type (mean of per-sequence means) whenever lengths differ: ours is the former."""
    trl_config = pytest.importorskip("trl.trainer.grpo_config")
    assert trl_config.GRPOConfig.__dataclass_fields__["loss_type"].default == "dapo"
    logp, old, ref, scores = _fixed(0)
    adv = grpo_advantages(scores.view(2, 2)).flatten()
    ours, _ = grpo_loss(logp, old, ref, adv, _MASK, clip_eps=0.2, beta=0.1)
    # the same per-token terms aggregated TRL-'grpo'-style (mean of per-sequence means) differ
    rows = [grpo_loss(logp[i : i + 1], old[i : i + 1], ref[i : i + 1], adv[i : i + 1], _MASK[i : i + 1],
                    clip_eps=0.2, beta=0.1)[0] for i in range(_B)]
    n = _MASK.sum(1).to(D)
    torch.testing.assert_close(ours, (torch.stack(rows) * n).sum() / n.sum())
    assert abs(float(ours) - float(torch.stack(rows).mean())) > 1e-3


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


# --------------------------------------------------------------------------- TRL 1.16's trainers as peers
@pytest.mark.parametrize("algorithm", ["grpo", "rloo"])
def test_trl_peer_config_matches_ours_not_trls_defaults(algorithm):
    from methods.baselines.trl_group import trl_config

    cfg = GroupRLConfig(algorithm=algorithm, beta=0.03, k=4, prompts_per_iteration=16, minibatch_size=16, lr=2e-4,
                        iterations=40, max_new_tokens=24, temperature=0.9, adam_eps=1e-5, grad_clip=1.0)
    a = trl_config(cfg, output_dir="/tmp/unused", device="cpu")
    assert (a.beta, a.num_generations, a.learning_rate, a.temperature, a.max_completion_length) == (0.03, 4, 2e-4, 0.9, 24)
    # 64 completions per generation round (PPO's rollout batch), 16 per optimiser step, 40 rounds, one pass
    assert a.per_device_train_batch_size == 16 and a.steps_per_generation == 4 and a.generation_batch_size == 64
    assert a.max_steps == 160 and a.num_iterations == 1 and a.lr_scheduler_type == "constant"
    assert a.adam_epsilon == 1e-5 and a.max_grad_norm == 1.0 and a.top_k == 0 and a.disable_dropout
    if algorithm == "grpo":
        assert a.epsilon == 0.2 and a.scale_rewards == "group"  # ours: clip 0.2, std-scaled groups
    with pytest.raises(ValueError, match="minibatch_size"):
        trl_config(GroupRLConfig(algorithm=algorithm, k=4, prompts_per_iteration=3, minibatch_size=8), output_dir="/tmp/x",
                   device="cpu")


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["grpo", "rloo"])
def test_trl_peer_trains_on_our_reward_of_its_own_samples(setup, tmp_path, algorithm):
    from methods.baselines.trl_group import train_trl_group

    model, tok, prompts, target = setup
    rows = [{"prompt": t, "prompt_ids": p} for t, p in zip(TEXTS, prompts, strict=True)]
    seen = []

    def reward_fn(ps, cs):
        seen.append((ps, cs))
        return share_reward(target)(ps, cs) * 10.0 + 3.0  # an offset and a scale the normalisation must remove

    cfg = GroupRLConfig(algorithm=algorithm, beta=0.05, k=4, prompts_per_iteration=4, minibatch_size=8, lr=1e-2,
                        max_new_tokens=6, iterations=2, reward_norm=True)
    from transformers import AutoModelForCausalLM

    model.save_pretrained(tmp_path / "sft")  # TRL builds its reference from the policy's folder (as the arm loads it)
    policy = AutoModelForCausalLM.from_pretrained(tmp_path / "sft")
    hist = train_trl_group(policy, tok, rows, reward_fn, cfg, device="cpu", output_dir=str(tmp_path),
                           monitor=lambda ps, cs: [float(len(c)) for c in cs])
    # one reward call per generation round of prompts_per_iteration * k completions, each a prompt's exact ids
    assert len(seen) == cfg.iterations and all(len(cs) == 16 for _, cs in seen)
    assert {tuple(p) for ps, _ in seen for p in ps} <= {tuple(p) for p in prompts}
    assert all(len(c) <= cfg.max_new_tokens for _, cs in seen for c in cs)
    # normalised with the first round's statistics, as ours: TRL's logged mean reward of round 1 is 0
    first = next(r for r in hist if "reward" in r)
    assert first["reward"] == pytest.approx(0.0, abs=1e-5)
    assert len(hist) == cfg.iterations * 2 and all("objective/gold" in r for r in hist)
    moved = max(float((p - q).abs().max()) for p, q in zip(policy.parameters(), model.parameters(), strict=True))
    assert moved > 0
