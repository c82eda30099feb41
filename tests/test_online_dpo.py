"""Online DPO (``methods.online_dpo``, ``benchmarks.arms.online_dpo``): the sampler (pi_ref for s = None, the trained
policy after every sync), the pair rule by hand, the loss is our DPO loss, determinism, config validation, resume,
the NaN guard and the arm's plan. Tiny Llama on CPU, one thread, a few seconds in all."""

import copy
import math

import pytest
import torch

from methods.data import completion_logps
from methods.dpo import losses as dpo_losses
from methods.online_dpo import OnlineDPOConfig, OnlineDPOTrainer, best_worst_pairs
from methods.sampling import derive_seed, sample

torch.set_num_threads(1)

TEXTS = ["The cat", "The dog is", "A", "The sea", "The sun is a", "tree", "good", "The"]
BASE = dict(beta=0.1, k=4, prompts_per_iteration=4, minibatch_size=2, lr=1e-2, max_new_tokens=6, iterations=3, seed=0)


@pytest.fixture(scope="module")
def setup(tiny_lm):
    model, tok = tiny_lm
    prompts = [tok(t)["input_ids"] for t in TEXTS]
    target = set(range(10, 10 + len(tok) // 4))  # a quarter of the vocabulary is "rewarded"
    return model, tok, prompts, target


def share_reward(target):
    return lambda ps, cs: torch.tensor([sum(t in target for t in c) / max(1, len(c)) for c in cs])


def _trainer(setup, reward_fn=None, **kw):
    model, tok, prompts, target = setup
    cfg = OnlineDPOConfig(**{**BASE, **kw})
    return OnlineDPOTrainer(copy.deepcopy(model), model, reward_fn or share_reward(target), tok, prompts, cfg, "cpu",
                            monitor=lambda ps, cs: [float(len(c)) for c in cs])


def _no_time(h):
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in h]


def _params_equal(a, b) -> bool:
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    assert pa.keys() == pb.keys()
    return all(torch.equal(pa[n], pb[n]) for n in pa)


# --------------------------------------------------------------------------- (a) s = None samples from pi_ref
def test_sync_none_samples_are_pi_refs_samples_at_every_iteration(setup):
    model, tok, _, _ = setup
    tr = _trainer(setup, sync_interval=None)
    assert tr.sampler is tr.ref_model is model
    batches = []
    h = tr.train(on_log=lambda rec: batches.append(copy.deepcopy(tr.last_batch)))
    assert len(batches) == 3
    k, B = tr.cfg.k, tr.cfg.rollout_batch_size
    for it, b in enumerate(batches, start=1):
        seeds = [derive_seed(0, it, p, j) for p in range(tr.cfg.prompts_per_iteration) for j in range(k)]
        assert b["seeds"] == seeds and len(seeds) == B == len(set(seeds))
        direct = sample(model, b["prompts"], max_new_tokens=6, temperature=1.0, seeds=seeds,
                        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        assert b["samples"] == direct.completions, f"iteration {it}: not pi_ref's completions"
        assert h[it - 1]["objective/kl_sampler"] == 0.0 and h[it - 1]["objective/sampler_lag"] is None
    # the check can fail: the trained policy has moved, and its samples for the same seeds differ
    assert not _params_equal(tr.policy, model)
    moved = sample(tr.policy, batches[-1]["prompts"], max_new_tokens=6, temperature=1.0, seeds=batches[-1]["seeds"],
                   eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    assert moved.completions != batches[-1]["samples"]
    assert h[-1]["objective/kl"] != 0.0 and 0 < h[-1]["objective/kl_ess"] <= 1  # importance-weighted from pi_ref


# --------------------------------------------------------------------------- (b) s = 1: the sampler is the policy
def test_sync_every_iteration_copies_the_trained_weights(setup):
    model, _, _, _ = setup
    tr = _trainer(setup, sync_interval=1)
    assert tr.sampler is not tr.policy and tr.sampler is not model
    checks = []

    def on_log(rec):
        assert rec["sampler/synced"] and tr.last_batch["sampler_is_policy"]
        checks.append(_params_equal(tr.sampler, tr.policy))

    h = tr.train(on_log=on_log)
    assert checks == [True, True, True]
    assert not _params_equal(tr.sampler, model)  # trained away from pi_ref
    assert all(not p.requires_grad for p in tr.sampler.parameters())
    for r in h:  # the sampler held the policy's weights: plain Monte-Carlo KL, uniform weights
        assert r["objective/kl_ess"] == pytest.approx(1.0) and r["objective/sampler_lag"] == 0
        assert r["objective/kl"] == pytest.approx(r["objective/kl_sampler"], abs=1e-6)
    assert h[0]["objective/kl"] == pytest.approx(0.0, abs=1e-5)  # the first samples come from pi_ref itself
    assert h[-1]["objective/kl"] > 0.05


def test_sync_interval_two_refreshes_after_even_iterations(setup):
    model, _, _, _ = setup
    tr = _trainer(setup, sync_interval=2, iterations=4)
    seen = []

    def on_log(rec):
        seen.append((rec["iteration"], rec["sampler/synced"], rec["objective/sampler_lag"],
                     _params_equal(tr.sampler, tr.policy), _params_equal(tr.sampler, model)))

    tr.train(on_log=on_log)
    # after iteration 1 the sampler still holds the initial weights (= pi_ref's), after 2 the policy's, ...
    assert seen == [(1, False, 0, False, True), (2, True, 1, True, False), (3, False, 0, False, False),
                    (4, True, 1, True, False)]


# --------------------------------------------------------------------------- (c) the pair rule by hand
def test_best_worst_pairs_by_hand():
    r = torch.tensor([[1.0, 3.0, 2.0, 3.0],  # best: the first 3 (col 1), worst col 0
                      [0.5, 0.5, 0.5, 0.5],  # all tie: skipped
                      [2.0, -1.0, 0.0, -1.0],  # best col 0, worst: the first -1 (col 1)
                      [0.0, 0.0, 0.0, 1.0]])  # best col 3, worst col 0
    p, c, rj = best_worst_pairs(r)
    assert p.tolist() == [0, 2, 3] and c.tolist() == [1, 0, 3] and rj.tolist() == [0, 1, 0]
    # Bradley-Terry: best chosen when u < sigmoid((r_best - r_worst) / T); prompt 0: sigmoid(2) = 0.881
    u = torch.tensor([0.88, 0.0, 0.96, 0.74], dtype=torch.float64)  # sigmoid(3) = 0.953, sigmoid(1) = 0.731
    p, c, rj = best_worst_pairs(r, labels="bradley_terry", uniforms=u)
    assert p.tolist() == [0, 2, 3] and c.tolist() == [1, 1, 0] and rj.tolist() == [0, 0, 3]
    p, c, rj = best_worst_pairs(r, labels="bradley_terry", uniforms=u, bt_temperature=0.1)  # nearly deterministic
    assert c.tolist() == [1, 0, 3] and rj.tolist() == [0, 1, 0]
    p, _, _ = best_worst_pairs(torch.zeros(3, 2))
    assert p.numel() == 0
    with pytest.raises(ValueError, match="one uniform per prompt"):
        best_worst_pairs(r, labels="bradley_terry")
    with pytest.raises(ValueError, match=r"\[P, k\]"):
        best_worst_pairs(torch.zeros(4))


def test_trainer_pairs_are_the_best_and_worst_of_each_prompt(setup):
    tr = _trainer(setup, iterations=1)
    tr.train()
    b, k = tr.last_batch, tr.cfg.k
    r = b["raw_scores"].view(-1, k)
    ties = int((r.max(1).values == r.min(1).values).sum())
    assert tr.history[0]["pairs"] == r.shape[0] - ties == len(b["chosen_rows"])
    for c, rj in zip(b["chosen_rows"].tolist(), b["rejected_rows"].tolist(), strict=True):
        assert c // k == rj // k  # the same prompt
        assert b["raw_scores"][c] == r[c // k].max() and b["raw_scores"][rj] == r[c // k].min()


# --------------------------------------------------------------------------- (d) the loss is our DPO loss
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_loss_is_methods_dpo_losses_preference_loss(setup, monkeypatch, loss_type):
    model, tok, _, _ = setup
    calls = []
    real = dpo_losses.preference_loss

    def spy(*a, **kw):
        calls.append(kw)
        return real(*a, **kw)

    monkeypatch.setattr(dpo_losses, "preference_loss", spy)
    tr = _trainer(setup, iterations=1, minibatch_size=64, beta=0.3, loss_type=loss_type)  # one step: all pairs
    init = copy.deepcopy(tr.policy)
    rec = tr.train()[0]
    assert len(calls) == rec["policy/updates"] == 1 and calls[0]["beta"] == 0.3 and calls[0]["loss_type"] == loss_type
    b = tr.last_batch
    avg = loss_type == "ipo"
    rows = torch.cat([b["chosen_rows"], b["rejected_rows"]])
    ps, cs = [b["prompts"][i] for i in rows], [b["completions"][i] for i in rows]
    pol = completion_logps(init, ps, cs, pad_id=tok.pad_token_id, average=avg)  # the shared log-prob path, directly
    ref = completion_logps(model, ps, cs, pad_id=tok.pad_token_id, average=avg)
    n = len(b["chosen_rows"])
    torch.testing.assert_close(b["ref_logps"][rows], ref, rtol=0, atol=1e-5)
    losses, rc, rr = real(pol[:n], pol[n:], ref[:n], ref[n:], beta=0.3, loss_type=loss_type)
    assert rec["loss"] == pytest.approx(float(losses.mean()), abs=1e-5)
    assert rec["rewards/margins"] == pytest.approx(float((rc - rr).mean()), abs=1e-5)


# --------------------------------------------------------------------------- (e) same seed, same numbers
def test_same_seed_same_numbers(setup):
    a, b, c = _trainer(setup), _trainer(setup), _trainer(setup, seed=1)
    ha, hb, hc = a.train(), b.train(), c.train()
    assert _no_time(ha) == _no_time(hb)
    assert _params_equal(a.policy, b.policy)
    assert _no_time(ha) != _no_time(hc)
    r = ha[-1]
    assert [x["iteration"] for x in ha] == [1, 2, 3] and r["episodes_seen"] == 3 * 16
    assert r["examples_seen"] == sum(x["pairs"] for x in ha) and all(0 <= x["pairs"] <= 4 for x in ha)
    assert r["tokens/sequence"] == r["tokens/prompt"] + r["tokens/generated"]
    assert r["tokens/forward"] == 2 * r["tokens/sequence"]  # pi_ref + policy; the sampler is the policy (s = 1)
    assert r["objective/gold"] == pytest.approx(r["tokens/generated"] / 16)  # the monitor, logged only
    for key in ("objective/scores", "objective/kl", "loss", "rewards/margins", "grad_norm", "time/update"):
        assert math.isfinite(r[key]), key


def test_anneal_lr_and_bradley_terry_labels_run(setup):
    h = _trainer(setup, anneal_lr=True, labels="bradley_terry", sync_interval=None).train()
    assert [r["lr"] for r in h] == pytest.approx([1e-2, 1e-2 * 2 / 3, 1e-2 / 3])


# --------------------------------------------------------------------------- (f) config validation
@pytest.mark.parametrize(("kw", "field"), [
    ({"beta": 0.0}, "beta"),
    ({"loss_type": "simpo"}, "loss_type"),
    ({"loss_type": "ipo", "label_smoothing": 0.1}, "label_smoothing"),
    ({"k": 1}, "k"),
    ({"sync_interval": 0}, "sync_interval"),
    ({"sync_interval": 1.5}, "sync_interval"),
    ({"labels": "argmax"}, "labels"),
    ({"bt_temperature": 0.0}, "bt_temperature"),
    ({"prompts_per_iteration": 0}, "prompts_per_iteration"),
    ({"iterations": 0}, "iterations"),
    ({"lr": -1.0}, "lr"),
    ({"minibatch_size": 0}, "minibatch_size"),
    ({"epochs": 0}, "epochs"),
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"temperature": 0.0}, "temperature"),
    ({"forward_batch_size": -1}, "forward_batch_size"),
])
def test_config_errors_name_the_field(kw, field):
    with pytest.raises(ValueError, match=rf"\n  - {field} "):
        OnlineDPOConfig(**kw).validate()


def test_suite_section_errors_name_the_key():
    from benchmarks.arms import build_stages
    from benchmarks.config import ConfigError, load_suite

    with pytest.raises(ConfigError, match=r"'arms.online_dpo.sync_intervals\[0\]': must be an integer >= 1 or null"):
        load_suite("smoke", ["arms.online_dpo.sync_intervals=[0]"])
    with pytest.raises(ConfigError, match=r"'arms.online_dpo.betas\[0\]': beta must be > 0"):
        load_suite("smoke", ["arms.online_dpo.betas=[0.0]"])
    with pytest.raises(ConfigError, match=r"'arms.online_dpo.k': must be >= 2"):
        load_suite("smoke", ["arms.online_dpo.k=1"])
    with pytest.raises(ConfigError, match=r"'arms.online_dpo.bogus': unknown key"):
        load_suite("smoke", ["arms.online_dpo.bogus=1"])
    with pytest.raises(ConfigError, match=r"'arms.online_dpo.k': k=3 must divide rlhf.ppo.rollout_batch_size=64"):
        build_stages(load_suite("smoke", ["arms.online_dpo.k=3"]))
    with pytest.raises(ConfigError, match=r"'arms.online_dpo': needs the rlhf section"):
        build_stages(load_suite("smoke", ["rlhf=null", "arms.online_dpo.betas=[0.1]"]))


# --------------------------------------------------------------------------- (g) resume = uninterrupted
def test_resume_from_checkpoint_gives_the_uninterrupted_run(setup, tmp_path):
    full = _trainer(setup, sync_interval=2, iterations=4, anneal_lr=True)
    h_full = full.train()
    ck = tmp_path / "ck.pt"
    killed = _trainer(setup, sync_interval=2, iterations=4, anneal_lr=True)
    killed.train(stop=lambda: killed.iteration >= 3, checkpoint_path=ck, checkpoint_every=1)
    assert killed.iteration == 3  # mid-period: the sampler holds iteration 2's weights, not the policy's
    assert not _params_equal(killed.sampler, killed.policy)
    with pytest.raises(ValueError, match="different configuration"):
        _trainer(setup, sync_interval=1, iterations=4, anneal_lr=True).load_checkpoint(ck)
    resumed = _trainer(setup, sync_interval=2, iterations=4, anneal_lr=True)
    assert _no_time(resumed.train(checkpoint_path=ck)) == _no_time(h_full)
    assert _params_equal(resumed.policy, full.policy) and _params_equal(resumed.sampler, full.sampler)
    assert resumed.opt.param_groups[0]["lr"] == full.opt.param_groups[0]["lr"]


# --------------------------------------------------------------------------- NaN guard
def test_non_finite_scores_raise_and_restore_the_policy(setup):
    model, tok, prompts, _ = setup
    policy = copy.deepcopy(model)
    before = copy.deepcopy(policy.state_dict())
    cfg = OnlineDPOConfig(k=2, prompts_per_iteration=2, max_new_tokens=3, iterations=1)
    tr = OnlineDPOTrainer(policy, model, lambda ps, cs: torch.full((len(cs),), float("nan")), tok, prompts, cfg, "cpu")
    with pytest.raises(FloatingPointError, match=r"online DPO iteration 1: non-finite scores in phase reward"):
        tr.train()
    assert all(torch.equal(v, policy.state_dict()[k]) for k, v in before.items())
    with pytest.raises(ValueError, match="same object"):
        OnlineDPOTrainer(model, model, share_reward(set()), tok, prompts, cfg, "cpu")


# --------------------------------------------------------------------------- the arm's plan
def test_plan_shares_ppo_budget_and_a_new_beta_reruns_only_its_arms(tmp_path):
    from benchmarks.arms import build_stages, method, methods
    from benchmarks.arms.online_dpo import odpo_config
    from benchmarks.config import load_suite
    from benchmarks.harness import Harness

    def hashes(over):
        cfg = load_suite("smoke", ["seeds=[0, 1]", *over])
        stages, targets = build_stages(cfg)
        h = Harness(cfg, stages, root=tmp_path, log=lambda *_: None)
        return cfg, targets, {n: h.stage_hash(n) for n in stages}

    cfg, targets, base = hashes(['arms={"online_dpo": {"sync_intervals": [1, null], "betas": [0.1]}}'])
    for a in ("odpo-s1-b0.1-s0", "odpo-sinf-b0.1-s0", "odpo-s1-b0.1-s1", "odpo-sinf-b0.1-s1"):
        assert f"arm/{a}" in targets and f"eval/{a}" in targets
    assert "arm/rm" in targets
    g, ppo = odpo_config(cfg, None, 0.1, 1), cfg.rlhf.ppo
    assert g.rollout_batch_size * g.iterations == ppo.rollout_batch_size * ppo.iterations  # PPO's episode budget
    assert g.sync_interval is None and g.seed == 1 and g.lr == cfg.dpo.lr and g.minibatch_size == ppo.minibatch_size // 2
    _, _, after = hashes(['arms={"online_dpo": {"sync_intervals": [1, null], "betas": [0.1, 0.3]}}'])
    changed = {n for n in after if base.get(n) != after[n]}
    assert changed == {f"{st}/odpo-{s}-b0.3-s{i}" for st in ("arm", "eval") for s in ("s1", "sinf") for i in (0, 1)}
    m = method("online_dpo")
    assert m.kind == "on_policy_rl" and m.curves == "rl" and m.kl == "sampled"
    others = [x for x in methods().values() if x.name != "online_dpo"]
    assert m.color not in {x.color for x in others} and m.marker not in {x.marker for x in others}
