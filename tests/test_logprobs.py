import math

import pytest
import torch

from methods.logprobs import IGNORE_INDEX, build_labels, sequence_logps, token_logps


def _logits_from_probs(probs):
    return torch.log(torch.tensor(probs, dtype=torch.float32))


def test_shift_mask_sum_and_mean_on_hand_made_logits():
    # vocab 3, one sequence of 4 tokens [0, 1, 2, 1]; prompt = first 2 tokens -> scored targets are tokens 2 and 3
    probs = [[0.2, 0.3, 0.5],  # position 0 predicts token 1 (prompt, not scored)
             [0.1, 0.1, 0.8],  # position 1 predicts token 2 -> p = 0.8
             [0.25, 0.5, 0.25],  # position 2 predicts token 3 (= 1) -> p = 0.5
             [1 / 3, 1 / 3, 1 / 3]]  # last position predicts nothing
    logits = _logits_from_probs(probs)[None]  # [1, 4, 3]
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 2, 1]])
    s = sequence_logps(logits, labels)
    m = sequence_logps(logits, labels, average=True)
    assert s.item() == pytest.approx(math.log(0.8) + math.log(0.5), abs=1e-6)
    assert m.item() == pytest.approx((math.log(0.8) + math.log(0.5)) / 2, abs=1e-6)
    lp, mask = token_logps(logits, labels)
    assert lp.shape == (1, 3) and mask.tolist() == [[0.0, 1.0, 1.0]]
    assert lp[0, 0].item() == 0.0  # masked positions contribute exactly zero


def test_logits_are_normalised_and_padding_ignored():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7) * 3
    labels = torch.tensor([[IGNORE_INDEX, 3, 4, IGNORE_INDEX, IGNORE_INDEX], [IGNORE_INDEX, IGNORE_INDEX, 1, 2, 6]])
    expected = []
    for b in range(2):
        tot = 0.0
        for t in range(1, 5):
            if labels[b, t] != IGNORE_INDEX:
                tot += torch.log_softmax(logits[b, t - 1], -1)[labels[b, t]].item()
        expected.append(tot)
    assert sequence_logps(logits, labels).tolist() == pytest.approx(expected, abs=1e-5)
    # changing logits at padded / unscored positions changes nothing
    logits2 = logits.clone()
    logits2[0, 3:] += 100.0
    assert sequence_logps(logits2, labels)[0].item() == pytest.approx(expected[0], abs=1e-5)


def test_bf16_logits_are_scored_in_fp32():
    logits = torch.randn(1, 4, 11)
    labels = torch.tensor([[IGNORE_INDEX, 1, 2, 3]])
    a = sequence_logps(logits.bfloat16(), labels)
    assert a.dtype == torch.float32


def test_build_labels_masks_prompt_and_padding():
    ids = torch.tensor([[5, 6, 7, 8, 0], [5, 6, 7, 0, 0]])
    attn = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]])
    labels = build_labels(ids, attn, torch.tensor([2, 1]))
    assert labels.tolist() == [[-100, -100, 7, 8, -100], [-100, 6, 7, -100, -100]]


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="disagree"):
        token_logps(torch.zeros(1, 4, 3), torch.zeros(1, 5, dtype=torch.long))


def test_completion_logps_skips_prompt_logits_without_changing_values(tiny_lm):
    """completion_logps computes logits only from the shortest prompt on: equal to the full-logits sums."""
    from methods.data import collate, completion_logps

    model, tok = tiny_lm
    prompts = [tok("The cat is")["input_ids"], tok("The dog is a good thing to")["input_ids"], tok("A")["input_ids"]]
    comps = [tok(" a fine thing", add_special_tokens=False)["input_ids"], tok(" see", add_special_tokens=False)["input_ids"],
             tok(" sun is bad today", add_special_tokens=False)["input_ids"]]
    got = completion_logps(model, prompts, comps, pad_id=tok.pad_token_id)
    b = collate(prompts, comps, tok.pad_token_id)
    with torch.no_grad():
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    want = sequence_logps(logits, b["labels"])
    assert torch.allclose(got, want, atol=1e-5) and got.shape == (3,) and (got < 0).all()
    avg = completion_logps(model, prompts, comps, pad_id=tok.pad_token_id, average=True)
    assert torch.allclose(avg, want / torch.tensor([len(c) for c in comps]), atol=1e-5)
