"""Resume after a kill: a DPO / PPO run interrupted mid-step (or SIGKILLed mid-rollout) and started again from its
last checkpoint ends with the same history and weights as an uninterrupted run; checkpoint writes are atomic."""

import copy
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import methods.dpo.trainer as dpo_mod
from methods.dpo.trainer import DPOConfig, DPOTrainer, compute_reference_logps, tokenize_pairs
from methods.rlhf.ppo import PPOConfig, PPOTrainer

ROOT = Path(__file__).resolve().parents[1]
WORDS = "good bad fine cat dog sun sea tree lovely awful".split()
TEXTS = ["The cat", "The dog is", "A", "The sea", "The sun is a", "tree", "good", "The"]
TIMING = ("wall_s", "tokens_per_s")  # wall-clock fields: the only ones allowed to differ


class Killed(Exception):
    """Stands in for SIGKILL in the in-process tests: nothing after the raise runs."""


def _same_history(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for ra, rb in zip(a, b, strict=True):
        ka = {k for k in ra if k not in TIMING and not k.startswith("time/")}
        assert ka == {k for k in rb if k not in TIMING and not k.startswith("time/")}
        for k in ka:
            assert ra[k] == pytest.approx(rb[k], abs=1e-6, nan_ok=True), (ra.get("step", ra.get("iteration")), k)


def _same_params(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=1e-6, msg=k)


# ------------------------------------------------------------------------------------------------ DPO
@pytest.fixture(scope="module")
def dpo_setup(tiny_lm):
    ref, tok = tiny_lm
    rng = random.Random(0)
    rows = [{"prompt": "The " + rng.choice(WORDS), "chosen": " is " + " ".join(rng.choices(WORDS, k=rng.randint(1, 4))),
             "rejected": " was " + " ".join(rng.choices(WORDS, k=rng.randint(1, 4)))} for _ in range(10)]
    ex, _ = tokenize_pairs(tok, rows, max_length=64, truncation_mode="keep_start")
    rl = compute_reference_logps(ref, ex, pad_id=tok.pad_token_id)
    return ref, tok, ex, rl


def _dpo_cfg(**kw):
    # 10 pairs / batch 4 -> 2 steps per epoch: 5 steps cross two epoch reshuffles; warm-up + linear decay
    base = dict(beta=0.1, lr=1e-3, batch_size=4, micro_batch_size=2, max_steps=5, warmup_steps=1,
                scheduler="linear", max_length=64, pack_len=128, seed=3)
    return DPOConfig(**{**base, **kw})


def _dpo_trainer(dpo_setup, **kw):
    ref, tok, ex, rl = dpo_setup
    return DPOTrainer(copy.deepcopy(ref), ex, rl, _dpo_cfg(**kw), pad_id=tok.pad_token_id)


@pytest.fixture(scope="module")
def dpo_full(dpo_setup):
    tr = _dpo_trainer(dpo_setup)
    return tr, tr.train()


def test_dpo_resume_after_kill_mid_step(dpo_setup, dpo_full, tmp_path, monkeypatch):
    full, h_full = dpo_full
    ckpt = tmp_path / "dpo.pt"
    real, calls = dpo_mod.dpo_step_loss, {"n": 0}

    def dying(*a, **kw):  # dies in the 2nd micro-batch of step 4: steps 3 and part of 4 are lost
        calls["n"] += 1
        if calls["n"] == 8:
            raise Killed
        return real(*a, **kw)

    monkeypatch.setattr(dpo_mod, "dpo_step_loss", dying)
    first = _dpo_trainer(dpo_setup)
    with pytest.raises(Killed):
        first.train(checkpoint_path=ckpt, checkpoint_every=2)
    monkeypatch.setattr(dpo_mod, "dpo_step_loss", real)
    assert first.step == 3 and torch.load(ckpt, weights_only=True)["step"] == 2  # the last checkpoint: step 2
    assert not [p for p in tmp_path.iterdir() if p != ckpt]  # no temp files left

    again = _dpo_trainer(dpo_setup)  # a new process: fresh pi_ref copy, fresh optimiser and scheduler
    h = again.train(checkpoint_path=ckpt, checkpoint_every=2)
    assert again.step == 5 and [r["step"] for r in h] == [1, 2, 3, 4, 5]
    _same_history(h, h_full)
    assert [r["examples_seen"] for r in h] == [4, 8, 12, 16, 20]
    _same_params(again.model, full.model)
    assert torch.load(ckpt, weights_only=True)["step"] == 5  # the finished run is checkpointed too


def test_dpo_resume_after_stop_and_finished_run_is_a_no_op(dpo_setup, dpo_full, tmp_path):
    full, h_full = dpo_full
    ckpt = tmp_path / "sub" / "dpo.pt"
    first = _dpo_trainer(dpo_setup)
    assert first.load_checkpoint(ckpt) is False  # absent: nothing loaded
    first.train(checkpoint_path=ckpt, checkpoint_every=1, stop=lambda: first.step == 2)
    logged = []
    again = _dpo_trainer(dpo_setup)
    h = again.train(on_log=logged.append, checkpoint_path=ckpt, checkpoint_every=1)
    assert [r["step"] for r in logged] == [3, 4, 5]  # only the new steps are logged
    _same_history(h, h_full)
    _same_params(again.model, full.model)
    assert [r["tokens_seen"] for r in h] == [r["tokens_seen"] for r in h_full]

    done = _dpo_trainer(dpo_setup)  # restarting a finished run trains nothing
    h2 = done.train(on_log=logged.append, checkpoint_path=ckpt)
    assert len(logged) == 3 and done.step == 5
    _same_history(h2, h_full)
    _same_params(done.model, full.model)


def test_dpo_checkpoint_refuses_another_config(dpo_setup, tmp_path):
    ckpt = tmp_path / "dpo.pt"
    tr = _dpo_trainer(dpo_setup, max_steps=1)
    tr.train(checkpoint_path=ckpt)
    with pytest.raises(ValueError, match="different configuration.*beta"):
        _dpo_trainer(dpo_setup, max_steps=1, beta=0.2).load_checkpoint(ckpt)
    assert _dpo_trainer(dpo_setup, max_steps=1, log_every=5).load_checkpoint(ckpt)  # logging only: fine


def test_checkpoint_write_is_atomic(dpo_setup, tmp_path, monkeypatch):
    ckpt = tmp_path / "dpo.pt"
    tr = _dpo_trainer(dpo_setup)
    tr.train(checkpoint_path=ckpt, checkpoint_every=1, stop=lambda: tr.step == 1)
    before = ckpt.read_bytes()
    tr.train(stop=lambda: tr.step == 2)  # the state moved on; the next save fails half-way
    real_save, targets = torch.save, []

    def failing_save(obj, f, *a, **kw):
        name = getattr(f, "name", f)
        targets.append(Path(name))
        if hasattr(f, "write"):
            f.write(b"half a checkpoint")
        else:
            Path(f).write_bytes(b"half a checkpoint")
        assert Path(name).exists()
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="No space left"):
        tr.save_checkpoint(ckpt)
    monkeypatch.setattr(torch, "save", real_save)
    assert len(targets) == 1 and targets[0].parent == tmp_path and targets[0] != ckpt  # temp file, same folder
    assert ckpt.read_bytes() == before  # the previous checkpoint is intact ...
    assert sorted(tmp_path.iterdir()) == [ckpt]  # ... and the temp file is gone
    resumed = _dpo_trainer(dpo_setup)
    assert resumed.load_checkpoint(ckpt) and resumed.step == 1


# ------------------------------------------------------------------------------------------------ PPO
@pytest.fixture(scope="module")
def ppo_setup(tiny_lm):
    model, tok = tiny_lm
    prompts = [tok(t)["input_ids"] for t in TEXTS]
    target = set(range(10, 10 + len(tok) // 4))
    return model, tok, prompts, target


def share_reward(target):
    return lambda ps, cs: torch.tensor([sum(t in target for t in c) / len(c) for c in cs])


# rollout 6 of 8 prompts: iterations straddle prompt-permutation epochs. Adaptive KL, running reward
# normalisation, EMA reference and LR annealing: every piece of cross-iteration state is exercised.
PPO_KW = dict(init_kl_coef=0.05, target_kl=0.5, kl_horizon=40.0, rollout_batch_size=6, minibatch_size=3,
              ppo_epochs=2, lr=1e-2, max_new_tokens=5, iterations=4, value_model="shared", reward_norm=True,
              reward_norm_stats="running", ema_ref_decay=0.5, anneal_lr=True, seed=1)


def _ppo_trainer(ppo_setup, reward_fn=None, **kw):
    model, tok, prompts, target = ppo_setup
    return PPOTrainer(copy.deepcopy(model), model, reward_fn or share_reward(target), None, tok, prompts,
                      PPOConfig(**{**PPO_KW, **kw}), "cpu")


@pytest.fixture(scope="module")
def ppo_full(ppo_setup):
    tr = _ppo_trainer(ppo_setup)
    return tr, tr.train()


def test_ppo_resume_after_kill_mid_rollout(ppo_setup, ppo_full, tmp_path):
    full, h_full = ppo_full
    _, _, _, target = ppo_setup
    ckpt = tmp_path / "ppo.pt"
    n = {"calls": 0}

    def dying_reward(ps, cs):  # killed while scoring the rollouts of iteration 3
        n["calls"] += 1
        if n["calls"] == 3:
            raise Killed
        return share_reward(target)(ps, cs)

    first = _ppo_trainer(ppo_setup, reward_fn=dying_reward)
    with pytest.raises(Killed):
        first.train(checkpoint_path=ckpt, checkpoint_every=1)
    assert first.iteration == 2 and torch.load(ckpt, weights_only=True)["iteration"] == 2

    again = _ppo_trainer(ppo_setup)  # fresh policy copy, value head, optimiser, controller, EMA reference
    logged = []
    h = again.train(on_log=logged.append, checkpoint_path=ckpt, checkpoint_every=1)
    assert [r["iteration"] for r in logged] == [3, 4] and again.iteration == 4
    _same_history(h, h_full)
    for a, b in zip(h[2:], h_full[2:], strict=True):
        for k in ("objective/kl", "objective/scores", "policy/approxkl", "objective/kl_coef",
                  "objective/reward_norm_mean", "lr"):
            assert a[k] == pytest.approx(b[k], abs=1e-6), k
    assert h[3]["objective/kl"] != 0 and h[3]["objective/kl_coef"] != PPO_KW["init_kl_coef"]
    _same_params(again.policy, full.policy)
    _same_params(again.value_head, full.value_head)
    _same_params(again.ref_model, full.ref_model)
    assert again.kl_ctl.value == pytest.approx(full.kl_ctl.value, abs=1e-12)
    assert (again.norm.running.n, again.episodes_seen, again.tokens_seen) == (full.norm.running.n, full.episodes_seen,
                                                                              full.tokens_seen)


def test_ppo_resume_separate_value_model_and_frozen_norm(ppo_setup, tmp_path):
    from methods.rlhf.reward_model import ScalarRewardModel, value_model_from_reward_model

    model, tok, prompts, target = ppo_setup
    kw = dict(value_model="separate", reward_norm_stats="first", ema_ref_decay=None, anneal_lr=False,
              vf_lr=3e-3, iterations=3)

    def trainer():
        vm = value_model_from_reward_model(ScalarRewardModel.from_causal_lm(model))
        return PPOTrainer(copy.deepcopy(model), model, share_reward(target), vm, tok, prompts,
                          PPOConfig(**{**PPO_KW, **kw}), "cpu")

    full = trainer()
    h_full = full.train()
    ckpt = tmp_path / "ppo.pt"
    first = trainer()
    first.train(checkpoint_path=ckpt, stop=lambda: first.iteration == 1, checkpoint_every=1)
    again = trainer()
    h = again.train(checkpoint_path=ckpt)
    assert again.norm.frozen == full.norm.frozen is not None
    _same_history(h, h_full)
    _same_params(again.policy, full.policy)
    _same_params(again.value_model, full.value_model)


def test_ppo_checkpoint_refuses_other_prompts(ppo_setup, tmp_path):
    model, tok, prompts, target = ppo_setup
    ckpt = tmp_path / "ppo.pt"
    _ppo_trainer(ppo_setup, iterations=1).train(checkpoint_path=ckpt)
    other = PPOTrainer(copy.deepcopy(model), model, share_reward(target), None, tok, prompts[::-1],
                       PPOConfig(**{**PPO_KW, "iterations": 1}), "cpu")
    with pytest.raises(ValueError, match="other prompts"):
        other.load_checkpoint(ckpt)


SIGKILL_SCRIPT = textwrap.dedent("""
    import json, os, signal, sys
    import torch
    torch.set_num_threads({threads})
    from benchmarks.tasks.models import load_causal_lm
    from methods.rlhf.ppo import PPOConfig, PPOTrainer

    model, tok = load_causal_lm(sys.argv[1], local_only=True)
    model.eval()
    prompts, target, kw = json.loads(open(sys.argv[2]).read())
    target, calls = set(target), [0]

    def reward(ps, cs):
        calls[0] += 1
        if calls[0] == 3:  # the rollouts of iteration 3 are sampled: die without any clean-up
            os.kill(os.getpid(), signal.SIGKILL)
        return torch.tensor([sum(t in target for t in c) / len(c) for c in cs])

    import copy
    tr = PPOTrainer(copy.deepcopy(model), model, reward, None, tok, prompts, PPOConfig(**kw), "cpu")
    tr.train(checkpoint_path=sys.argv[3], checkpoint_every=1)
""")


@pytest.mark.slow  # a real process, SIGKILLed mid-rollout (~5 s of imports)
def test_ppo_resume_after_real_sigkill(ppo_setup, ppo_full, tmp_path):
    full, h_full = ppo_full
    model, tok, prompts, target = ppo_setup
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    (tmp_path / "args.json").write_text(json.dumps([prompts, sorted(target), PPO_KW]))
    script = tmp_path / "run.py"
    script.write_text(SIGKILL_SCRIPT.format(threads=torch.get_num_threads()))
    ckpt = tmp_path / "ckpt" / "ppo.pt"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    p = subprocess.run([sys.executable, str(script), str(tmp_path / "model"), str(tmp_path / "args.json"), str(ckpt)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    assert torch.load(ckpt, weights_only=True)["iteration"] == 2

    again = _ppo_trainer(ppo_setup)
    h = again.train(checkpoint_path=ckpt, checkpoint_every=1)
    _same_history(h, h_full)
    _same_params(again.policy, full.policy)
