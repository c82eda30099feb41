"""The paper suites resolve, and their hub loading code runs end to end against local stand-ins saved in the
hub format (a tiny GPT-2 without a pad token, a tiny sentiment classifier, an IMDb-like parquet dataset)."""

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.config import load_suite

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("suite", ["paper-imdb-gpt2", "paper-imdb"])
def test_paper_suites_resolve(suite):
    cfg = load_suite(suite)
    assert cfg.task.gold.startswith("hf:siebert/") and cfg.base.model.startswith("gpt2")
    assert cfg.prefs.samples_per_prompt == 4 and cfg.prefs.pairs_per_prompt == 6  # 4 samples -> 6 pairs
    assert cfg.rlhf.target_kls and len(cfg.dpo.betas) >= 3 and cfg.eval.temperatures == [0.0, 0.25, 0.5, 0.75, 1.0]


def _stand_ins(root: Path) -> dict[str, str]:
    import pandas as pd
    import torch
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        GPT2Config,
        GPT2LMHeadModel,
        PreTrainedTokenizerFast,
    )

    from benchmarks.tasks.models import train_tokenizer

    words = "good great lovely awful bad terrible film movie plot actor the a is was and it this".split()
    rng = random.Random(0)
    texts = [" ".join(rng.choices(words, k=rng.randint(12, 30))) + "." for _ in range(600)]
    # IMDb stand-in in the hub layout: <dir>/data/train-*.parquet with a 'text' column
    (root / "imdb" / "data").mkdir(parents=True)
    pd.DataFrame({"text": texts, "label": [0] * len(texts)}).to_parquet(root / "imdb" / "data" / "train-00000-of-00001.parquet")
    base_tok = train_tokenizer(texts, vocab_size=400)
    # GPT-2 stand-in: like the real one, no pad token (the loader must add one and resize the embeddings)
    tok = PreTrainedTokenizerFast(tokenizer_object=base_tok.backend_tokenizer, bos_token="<|bos|>", eos_token="<|endoftext|>")
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=128, n_embd=32, n_layer=2, n_head=2,
                                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id))
    gpt2.save_pretrained(root / "gpt2")
    tok.save_pretrained(root / "gpt2")
    # sentiment classifier stand-in with the siebert label names
    clf = BertForSequenceClassification(BertConfig(vocab_size=len(base_tok), hidden_size=16, num_hidden_layers=1,
                                                   num_attention_heads=2, intermediate_size=32, num_labels=2,
                                                   id2label={0: "NEGATIVE", 1: "POSITIVE"},
                                                   label2id={"NEGATIVE": 0, "POSITIVE": 1}))
    clf.save_pretrained(root / "judge")
    base_tok.save_pretrained(root / "judge")
    return {"imdb": str(root / "imdb"), "gpt2": str(root / "gpt2"), "judge": str(root / "judge")}


@pytest.mark.slow
def test_paper_suite_runs_end_to_end_on_local_stand_ins(tmp_path):
    p = _stand_ins(tmp_path)
    sets = [f"base.model={p['gpt2']}", f"task.gold=hf:{p['judge']}",
            f"task.corpus.sources=['hf:{p['imdb']}:train:text']", f"task.corpus.task_sources=['hf:{p['imdb']}:train:text']",
            "task.n_train_prompts=48", "task.n_eval_prompts=16", "sft.steps=3", "sft.seq_len=64", "sft.batch_size=4",
            "prefs.max_new_tokens=8", "prefs.pairs_per_prompt=0", "dpo.betas=[0.1]", "dpo.warmup_steps=0",
            "dpo.batch_size=8", "rlhf.target_kls=[3.0]", "rlhf.ppo.iterations=1", "rlhf.ppo.max_new_tokens=8",
            "rlhf.ppo.rollout_batch_size=16", "rlhf.best_of_n=[2]", "rlhf.preferred_ft_steps=2", "eval.max_new_tokens=8",
            "eval.temperatures=[0.0, 1.0]", "seeds=[0]", f"cache_dir={tmp_path}/cache", f"runs_dir={tmp_path}/runs"]
    args = [sys.executable, "-m", "benchmarks", "run", "--suite", "paper-imdb-gpt2"]
    for s in sets:
        args += ["--set", s]
    r = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=900,
                       env={"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PATH": "/usr/bin:/bin",
                            "OMP_NUM_THREADS": "2", "HF_HOME": str(tmp_path / "hf")})
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((tmp_path / "runs" / "paper-imdb-gpt2" / "summary.json").read_text())
    assert not summary["failed_arms"], summary["failed_arms"]
    methods = {a["method"] for a in summary["arms"]}
    assert {"sft", "dpo", "trl_dpo", "ppo", "ppo_gt", "best_of_n", "preferred_ft"} <= methods
    assert all(-1.0 <= a["gold"] <= 1.0 for a in summary["arms"])  # 2 P(positive) - 1 from the judge stand-in
