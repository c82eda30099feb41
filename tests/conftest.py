import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch a hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def tiny_lm():
    """A tiny Llama + locally trained BPE tokenizer (random weights), built once per session."""
    from benchmarks.tasks.models import build_tiny_llama, train_tokenizer

    docs = [f"The {w} is a {a} thing to see today." for w in ("cat", "dog", "sun", "sea", "tree") for a in ("good", "bad", "fine")] * 20
    tok = train_tokenizer(docs, vocab_size=300)
    model = build_tiny_llama(tok, n_layers=2, hidden_size=32, n_heads=4, intermediate_size=64,
                             max_position_embeddings=64, seed=0).eval()
    return model, tok
