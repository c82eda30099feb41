"""Our DPO trainer: parity with TRL 1.16's DPOTrainer, accumulation invariance, layouts, caching, bad input."""

import copy
import random
import warnings

import pytest
import torch

from methods.dpo.trainer import (
    DPOConfig,
    DPOTrainer,
    compute_reference_logps,
    tokenize_pairs,
)

WORDS = "good bad fine cat dog sun sea tree lovely awful".split()


def _rows(n=32, seed=0):
    rng = random.Random(seed)
    return [{"prompt": "The " + rng.choice(WORDS), "chosen": " is " + " ".join(rng.choices(WORDS, k=rng.randint(1, 5))),
             "rejected": " was " + " ".join(rng.choices(WORDS, k=rng.randint(1, 6)))} for _ in range(n)]


@pytest.fixture(scope="module")
def ref_and_tok(tiny_lm):
    model, tok = tiny_lm
    return model, tok


def _ours(ref, tok, rows, cfg):
    ex, _ = tokenize_pairs(tok, rows, max_length=cfg.max_length, truncation_mode=cfg.truncation_mode)
    rl = compute_reference_logps(ref, ex, pad_id=tok.pad_token_id, layout=cfg.layout)
    pol = copy.deepcopy(ref)
    hist = DPOTrainer(pol, ex, rl, cfg, pad_id=tok.pad_token_id).train()
    return hist, pol


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
def test_parity_with_trl_dpo_trainer(ref_and_tok, loss_type):
    from methods.baselines.trl_dpo import train_trl_dpo

    ref, tok = ref_and_tok
    rows = _rows()
    cfg = DPOConfig(beta=0.1, loss_type=loss_type, lr=1e-3, batch_size=4, max_steps=5, scheduler="linear",
                    shuffle=False, layout="padded")
    ours, _ = _ours(ref, tok, rows, cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trl_hist, _ = train_trl_dpo(copy.deepcopy(ref), copy.deepcopy(ref), tok, rows, cfg, device="cpu", total_steps=5,
                                    disable_tqdm=True)
    assert len(ours) == len(trl_hist) == 5
    for a, b in zip(ours, trl_hist, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-4), (a["step"], a["loss"], b["loss"])
        assert a["rewards/accuracies"] == pytest.approx(b["rewards/accuracies"], abs=1e-4)
    assert ours[-1]["loss"] < ours[0]["loss"]  # it learned something, identically


def test_accumulation_equals_big_batch(ref_and_tok):
    ref, tok = ref_and_tok
    rows = _rows()
    big = DPOConfig(beta=0.1, lr=1e-3, batch_size=8, max_steps=3, shuffle=False, layout="padded")
    acc = DPOConfig(beta=0.1, lr=1e-3, batch_size=8, micro_batch_size=2, max_steps=3, shuffle=False, layout="padded")
    h1, p1 = _ours(ref, tok, rows, big)
    h2, p2 = _ours(ref, tok, rows, acc)
    for a, b in zip(h1, h2, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
    for x, y in zip(p1.parameters(), p2.parameters(), strict=True):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_packed_layout_trains_like_padded(ref_and_tok, loss_type):
    ref, tok = ref_and_tok
    rows = _rows()
    h1, _ = _ours(ref, tok, rows, DPOConfig(beta=0.1, loss_type=loss_type, lr=1e-3, batch_size=8, max_steps=4, layout="padded"))
    h2, _ = _ours(ref, tok, rows, DPOConfig(beta=0.1, loss_type=loss_type, lr=1e-3, batch_size=8, max_steps=4, layout="packed",
                                            pack_len=64, max_length=32))
    for a, b in zip(h1, h2, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-4)
        assert a["logps/chosen"] == pytest.approx(b["logps/chosen"], abs=1e-3)


def test_training_raises_margins_and_held_out_accuracy(ref_and_tok):
    ref, tok = ref_and_tok
    # a learnable preference: chosen continuations are positive words, rejected negative ones
    rng = random.Random(1)
    rows = [{"prompt": "The " + rng.choice(["cat", "dog", "sun", "sea"]), "chosen": " is " + rng.choice(["good", "lovely", "fine"]),
             "rejected": " is " + rng.choice(["bad", "awful"])} for _ in range(64)]
    cfg = DPOConfig(beta=0.1, lr=3e-3, batch_size=16, max_steps=12)
    ex, _ = tokenize_pairs(tok, rows, max_length=64, truncation_mode="keep_start")
    rl = compute_reference_logps(ref, ex, pad_id=tok.pad_token_id)
    pol = copy.deepcopy(ref)
    tr = DPOTrainer(pol, ex[:48], {k: v[:48] for k, v in rl.items()}, cfg, pad_id=tok.pad_token_id)
    before = tr.evaluate(ex[48:], {k: v[48:] for k, v in rl.items()})
    hist = tr.train()
    after = tr.evaluate(ex[48:], {k: v[48:] for k, v in rl.items()})
    assert hist[-1]["rewards/margins"] > hist[0]["rewards/margins"]
    assert after["eval/rewards/accuracies"] > max(0.8, before["eval/rewards/accuracies"])
    assert {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
            "logps/rejected", "loss", "grad_norm", "examples_seen", "tokens_seen", "tokens_per_s"} <= set(hist[-1])
    assert hist[-1]["examples_seen"] == 12 * 16


@pytest.mark.parametrize("kw, field", [
    ({"beta": 0.0}, "beta"), ({"beta": -1.0}, "beta"), ({"beta": 0.1, "loss_type": "kto"}, "loss_type"),
    ({"beta": 0.1, "label_smoothing": 0.5}, "label_smoothing"), ({"beta": 0.1, "label_smoothing": -0.1}, "label_smoothing"),
    ({"beta": 0.1, "batch_size": 8, "micro_batch_size": 3}, "micro_batch_size"), ({"beta": 0.1, "lr": 0.0}, "lr"),
])
def test_bad_hyperparameters_refused_before_training(kw, field):
    with pytest.raises(ValueError, match=field):
        DPOConfig(**kw).validate()


def test_truncation_is_counted_and_empty_data_refused(ref_and_tok):
    _, tok = ref_and_tok
    rows = [{"prompt": "The cat", "chosen": " is " + "good " * 30, "rejected": " is bad"}]
    ex, n_cut = tokenize_pairs(tok, rows, max_length=12, truncation_mode="keep_start")
    assert n_cut == 1 and len(ex[0].prompt) + len(ex[0].chosen) == 12
    with pytest.raises(ValueError, match="empty"):
        tokenize_pairs(tok, [], max_length=12, truncation_mode="keep_start")
