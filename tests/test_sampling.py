import pytest
import torch

from methods.sampling import sample


def _prompts(tok):
    return [tok(t)["input_ids"] for t in ("The cat", "The dog is", "A", "The sea is a good")]


def test_completion_depends_only_on_prompt_and_seed(tiny_lm):
    model, tok = tiny_lm
    ps = _prompts(tok)
    kw = dict(max_new_tokens=8, temperature=1.0, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    a = sample(model, ps, seeds=[1, 2, 3, 4], batch_size=4, **kw)
    b = sample(model, ps[::-1], seeds=[4, 3, 2, 1], batch_size=1, **kw)  # other order, other batching
    assert a.completions == b.completions[::-1]
    c = sample(model, ps, seeds=[5, 6, 7, 8], batch_size=4, **kw)
    assert a.completions != c.completions  # different seeds, different samples


def test_greedy_matches_full_recompute(tiny_lm):
    model, tok = tiny_lm
    ps = _prompts(tok)
    out = sample(model, ps, max_new_tokens=6, temperature=0.0, seeds=[0] * 4, eos_token_id=tok.eos_token_id,
                 pad_token_id=tok.pad_token_id)
    for p, comp in zip(ps, out.completions, strict=True):
        ids = list(p)
        for _ in range(6):  # argmax by recomputing the whole sequence, no cache, no padding
            nxt = int(model(torch.tensor([ids])).logits[0, -1].argmax())
            if nxt == tok.eos_token_id:
                break
            ids.append(nxt)
        assert comp == ids[len(p):]


def test_sampling_frequencies_follow_the_distribution(tiny_lm):
    model, tok = tiny_lm
    p = tok("The cat")["input_ids"]
    probs = torch.softmax(model(torch.tensor([p])).logits[0, -1], -1)
    n = 3000
    out = sample(model, [p] * n, max_new_tokens=1, temperature=1.0, seeds=list(range(n)), eos_token_id=-1,
                 pad_token_id=tok.pad_token_id, batch_size=1000)
    top = int(probs.argmax())
    freq = sum(c[0] == top for c in out.completions) / n
    assert abs(freq - probs[top].item()) < 4 * (probs[top].item() * (1 - probs[top].item()) / n) ** 0.5 + 1e-3


def test_context_overflow_is_refused(tiny_lm):
    model, tok = tiny_lm
    with pytest.raises(ValueError, match="context"):
        sample(model, [[1] * 60], max_new_tokens=10, temperature=1.0, seeds=[0], eos_token_id=tok.eos_token_id,
               pad_token_id=tok.pad_token_id)
