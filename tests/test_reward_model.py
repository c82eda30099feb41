"""Reward model: Bradley-Terry loss by hand, learning a separable preference, pooling/padding, save/load,
gold correlation, config validation (tiny Llama, CPU)."""

import copy
import math
import random

import numpy as np
import pytest
import torch

from methods.data import collate, tokenize_prompt_completions
from methods.rlhf.reward_model import (
    RewardModelConfig,
    ScalarRewardModel,
    SeqClsRewardModel,
    bradley_terry_loss,
    gold_correlation,
    load_reward_model,
    make_reward_fn,
    train_reward_model,
    value_model_from_reward_model,
)

WORDS = "cat dog sun sea tree thing is a to see".split()


def _rows(n, seed):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        mid = " ".join(rng.choices(WORDS, k=rng.randint(1, 4)))
        out.append({"prompt": "The " + rng.choice(WORDS), "chosen": f" {mid} good", "rejected": f" {mid} bad",
                    "score_chosen": 1.0, "score_rejected": 0.0})
    return out


def _params_equal(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


# ----------------------------------------------------------------------------------------- the loss
def test_bradley_terry_hand_values():
    loss, st = bradley_terry_loss(torch.tensor([1.0]), torch.tensor([0.0]))
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-1)), abs=1e-6)
    assert st["accuracy"].item() == 1.0 and st["margin"].item() == pytest.approx(1.0)
    # margin inside the sigmoid: -log sigma(1 - 0 - 1) = log 2
    loss, _ = bradley_terry_loss(torch.tensor([1.0]), torch.tensor([0.0]), margin=torch.tensor([1.0]))
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    # centering term: + c * mean((rc + rr)^2)
    loss, st = bradley_terry_loss(torch.tensor([1.0, 0.0]), torch.tensor([0.5, 2.0]), center_coef=0.1)
    bt = (math.log(1 + math.exp(-0.5)) + math.log(1 + math.exp(2.0))) / 2
    assert loss.item() == pytest.approx(bt + 0.1 * (1.5**2 + 2.0**2) / 2, abs=1e-6)
    assert st["bt_loss"].item() == pytest.approx(bt, abs=1e-6)
    assert st["accuracy"].item() == 0.5


def test_bradley_terry_gradient_direction_and_errors():
    rc, rr = torch.tensor([0.3], requires_grad=True), torch.tensor([0.1], requires_grad=True)
    bradley_terry_loss(rc, rr)[0].backward()
    assert rc.grad.item() < 0 < rr.grad.item()  # descent raises the chosen reward, lowers the rejected
    with pytest.raises(ValueError, match="must both be"):
        bradley_terry_loss(torch.zeros(2), torch.zeros(3))
    with pytest.raises(ValueError, match="center_coef"):
        bradley_terry_loss(torch.zeros(2), torch.zeros(2), center_coef=-1.0)


# ----------------------------------------------------------------------------------------- models
@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_padding_invariance(tiny_lm, pooling):
    lm, tok = tiny_lm
    rm = ScalarRewardModel.from_causal_lm(lm, pooling=pooling, init_seed=1).eval()
    p1, (c1,) = tokenize_prompt_completions(tok, "The cat", [" is good"])
    p2, (c2,) = tokenize_prompt_completions(tok, "The sea is a fine thing", [" to see today and a dog"])
    alone = rm.score_ids([p1], [c1], pad_id=tok.pad_token_id)
    batched = rm.score_ids([p1, p2], [c1, c2], pad_id=tok.pad_token_id)
    assert len(p2) + len(c2) > len(p1) + len(c1) + 3  # row 0 really is padded in the batch
    torch.testing.assert_close(batched[0], alone[0], rtol=0, atol=1e-5)
    # left padding (explicit position ids) gives the same score too
    n = len(p1) + len(c1)
    T = len(p2) + len(c2)
    ids = torch.full((1, T), tok.pad_token_id)
    attn = torch.zeros((1, T), dtype=torch.long)
    ids[0, T - n :], attn[0, T - n :] = torch.tensor(p1 + c1), 1
    with torch.no_grad():
        torch.testing.assert_close(rm(ids, attn)[0], alone[0], rtol=0, atol=1e-5)


def test_last_pooling_reads_last_non_pad_position(tiny_lm):
    lm, tok = tiny_lm
    rm = ScalarRewardModel.from_causal_lm(lm, pooling="last").eval()
    b = collate([[1, 5, 6], [1, 7]], [[8, 9, 2], [2]], tok.pad_token_id)
    with torch.no_grad():
        r = rm(b["input_ids"], b["attention_mask"])
        per_pos = rm.token_values(b["input_ids"], b["attention_mask"])  # [B, T]
    torch.testing.assert_close(r, torch.stack([per_pos[0, 5], per_pos[1, 2]]))
    assert not torch.allclose(per_pos[1, 2], per_pos[1, 5])  # a padded position would give another value


def test_from_causal_lm_copies_the_backbone(tiny_lm):
    lm, _ = tiny_lm
    rm = ScalarRewardModel.from_causal_lm(lm)
    assert rm.backbone is not lm.base_model
    assert rm.backbone.embed_tokens.weight.data_ptr() != lm.base_model.embed_tokens.weight.data_ptr()
    torch.testing.assert_close(rm.head.weight.std(), torch.tensor(1 / math.sqrt(33)), rtol=0.5, atol=0)
    v = value_model_from_reward_model(rm)
    assert v.head.weight.data_ptr() != rm.head.weight.data_ptr() and _params_equal(v, rm)


@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_value_model_starts_on_the_normalised_scale_with_matching_pooling(tiny_lm, pooling):
    """The critic copy reads states as the RM was trained (prefix means for a mean-pooled RM), and its head is the
    RM's normalised by (mean, std): at each sequence's last token its value is exactly (RM score - mean) / std."""
    rm = ScalarRewardModel.from_causal_lm(tiny_lm[0], pooling=pooling, init_seed=3)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 60, (3, 7), generator=g)
    attn = torch.ones_like(ids)
    attn[1, 5:] = 0  # right padding
    attn[2, 3:] = 0
    mean, std = 0.7, 2.5
    v = value_model_from_reward_model(rm, mean=mean, std=std)
    assert v.token_pooling == ("prefix_mean" if pooling == "mean" else "position")
    with torch.no_grad():
        values = v.token_values(ids, attn)  # [B, T]
        scores = rm(ids, attn)
        last = attn.sum(1) - 1
        torch.testing.assert_close(values[torch.arange(3), last], (scores - mean) / std, rtol=1e-5, atol=1e-5)
        # every prefix: the value at t is the normalised score of the sequence cut after t
        for t in range(1, 7):
            cut = attn.clone()
            cut[:, t + 1:] = 0
            keep = attn[:, t].bool()
            torch.testing.assert_close(values[keep, t], ((rm(ids, cut) - mean) / std)[keep], rtol=1e-5, atol=1e-5)
    assert rm.head.weight.data_ptr() != v.head.weight.data_ptr()  # the RM itself is untouched
    with pytest.raises(ValueError, match="std > 0"):
        value_model_from_reward_model(rm, std=0.0)


def test_learns_separable_preference(tiny_lm):
    lm, tok = tiny_lm
    ref = copy.deepcopy(lm)
    rm = ScalarRewardModel.from_causal_lm(lm, pooling="last", init_seed=0)
    cfg = RewardModelConfig(lr=3e-3, epochs=2, batch_size=16, max_length=64, scheduler="constant", seed=0)
    held = _rows(48, seed=1)
    hist, metrics = train_reward_model(rm, tok, _rows(128, seed=0), held, cfg, "cpu")
    assert metrics["eval/accuracy"] >= 0.9
    assert metrics["train/steps"] == 16 and metrics["train/n_pairs"] == 128
    train_recs = [h for h in hist if "loss" in h]
    assert train_recs[-1]["loss"] < train_recs[0]["loss"]
    assert [h["epoch"] for h in hist if "eval/accuracy" in h] == [1.0, 2.0]
    assert train_recs[-1]["examples_seen"] == 256 and train_recs[-1]["tokens_seen"] > 0
    assert _params_equal(lm, ref)  # pi_ref untouched
    # scoring texts builds the DPO sequences: chosen beats rejected on held-out rows
    sc = rm.score([r["prompt"] for r in held], [r["chosen"] for r in held], tokenizer=tok)
    sr = rm.score([r["prompt"] for r in held], [r["rejected"] for r in held], tokenizer=tok)
    assert (sc > sr).float().mean() >= 0.9


def test_margin_and_centering_options_train(tiny_lm):
    lm, tok = tiny_lm
    rm = ScalarRewardModel.from_causal_lm(lm, pooling="mean")
    cfg = RewardModelConfig(lr=1e-3, epochs=1, batch_size=16, pooling="mean", margin=True, center_coef=0.01,
                            max_length=64)
    hist, metrics = train_reward_model(rm, tok, _rows(32, 0), [], cfg, "cpu")
    assert len(hist) == 2 and "eval/accuracy" not in metrics and math.isfinite(metrics["train/loss"])
    bad = [{k: v for k, v in r.items() if k != "score_rejected"} for r in _rows(4, 0)]
    with pytest.raises(ValueError, match="score_rejected"):
        train_reward_model(rm, tok, bad, [], cfg, "cpu")
    with pytest.raises(ValueError, match="pooling"):
        train_reward_model(rm, tok, _rows(4, 0), [], RewardModelConfig(pooling="last"), "cpu")


def test_save_load_round_trip(tiny_lm, tmp_path):
    lm, tok = tiny_lm
    rm = ScalarRewardModel.from_causal_lm(lm, pooling="mean", init_seed=3).eval()
    prompts = ["The cat", "A dog is"]
    comps = [" is good", " a bad thing to see"]
    before = rm.score(prompts, comps, tokenizer=tok)
    rm.save_pretrained(tmp_path / "rm", tokenizer=tok)
    for loaded in (ScalarRewardModel.from_pretrained(tmp_path / "rm"), load_reward_model(tmp_path / "rm")):
        assert isinstance(loaded, ScalarRewardModel) and loaded.pooling == "mean"
        torch.testing.assert_close(loaded.score(prompts, comps, tokenizer=tok), before, rtol=0, atol=0)
    with pytest.raises(ValueError, match="scalar"):
        SeqClsRewardModel.from_pretrained(tmp_path / "rm")
    with pytest.raises(FileNotFoundError, match="reward_model.json"):
        load_reward_model(tmp_path)


def test_seqcls_reward_model_round_trip(tiny_lm, tmp_path):
    from transformers import LlamaForSequenceClassification

    lm, tok = tiny_lm
    cfg = copy.deepcopy(lm.config)
    cfg.num_labels = 1
    torch.manual_seed(0)
    rm = SeqClsRewardModel(LlamaForSequenceClassification(cfg)).eval()
    p_ids, (c_ids,) = tokenize_prompt_completions(tok, "The cat", [" is good"])
    before = rm.score([p_ids, p_ids], [c_ids, c_ids[:1]], pad_id=tok.pad_token_id)
    assert before.shape == (2,) and before[0] != before[1]
    rm.save_pretrained(tmp_path / "seq")
    loaded = load_reward_model(tmp_path / "seq")
    assert isinstance(loaded, SeqClsRewardModel)
    torch.testing.assert_close(loaded.score([p_ids, p_ids], [c_ids, c_ids[:1]], pad_id=tok.pad_token_id), before)


def test_make_reward_fn_matches_score(tiny_lm):
    lm, tok = tiny_lm
    rm = ScalarRewardModel.from_causal_lm(lm).eval()
    p, (c1, c2) = tokenize_prompt_completions(tok, "The sun", [" is fine", " is a bad"])
    fn = make_reward_fn(rm, pad_id=tok.pad_token_id, batch_size=1)
    torch.testing.assert_close(fn([p, p], [c1, c2]), rm.score_ids([p, p], [c1, c2], pad_id=tok.pad_token_id))
    # text path (another tokenizer): decode + re-tokenise gives the same sequences here
    text_fn = make_reward_fn(rm, policy_tokenizer=tok, rm_tokenizer=tok)
    torch.testing.assert_close(text_fn([p, p], [c1, c2]), fn([p, p], [c1, c2]), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="pad_id"):
        make_reward_fn(rm)


# ----------------------------------------------------------------------------------------- reports
def test_gold_correlation_known_arrays():
    x = np.array([1.0, 2.0, 3.0, 4.0])
    c = gold_correlation(x, x**3)
    assert c["spearman"] == pytest.approx(1.0) and 0.9 < c["pearson"] < 1.0
    assert gold_correlation(x, -x)["pearson"] == pytest.approx(-1.0)
    assert gold_correlation(x, -np.exp(x))["spearman"] == pytest.approx(-1.0)
    # ties get average ranks: ranks [1, 2.5, 2.5, 4] vs [1, 2, 3, 4] -> 4.5 / sqrt(4.5 * 5)
    assert gold_correlation([1, 2, 2, 3], [1, 2, 3, 4])["spearman"] == pytest.approx(4.5 / math.sqrt(22.5))
    assert math.isnan(gold_correlation([1, 1, 1], [1, 2, 3])["pearson"])
    with pytest.raises(ValueError, match="length"):
        gold_correlation([1, 2], [1, 2, 3])


# ----------------------------------------------------------------------------------------- config
@pytest.mark.parametrize("field,value", [("lr", 0.0), ("epochs", -1.0), ("batch_size", 0), ("pooling", "max"),
                                         ("center_coef", -0.1), ("grad_clip", 0.0), ("max_length", 1),
                                         ("warmup_steps", -1)])
def test_config_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=rf"rm\.{field}"):
        RewardModelConfig(**{field: value}).validate()
    RewardModelConfig().validate()


def test_config_reports_every_bad_field():
    with pytest.raises(ValueError) as e:
        RewardModelConfig(lr=-1.0, pooling="cls").validate()
    assert "rm.lr" in str(e.value) and "rm.pooling" in str(e.value)
