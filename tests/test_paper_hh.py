"""The paper-hh suite (Anthropic HH single-turn dialogue, Pythia, a judge reward model) resolves, refuses bad
dialogue settings by key, and runs end to end against local stand-ins saved in the hub format: a tiny GPTNeoX
(Pythia's architecture, a tokenizer without a pad token), an HH-like parquet dataset with train/test splits
and some multi-turn rows (which must be dropped), a tiny one-output judge. Loader unit tests: test_dialogue.py."""

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.config import ConfigError, load_suite

ROOT = Path(__file__).resolve().parents[1]


def test_paper_hh_resolves():
    cfg = load_suite("paper-hh")
    t = cfg.task
    assert t.name == "dialogue" and t.dataset == "hf:Anthropic/hh-rlhf" and t.max_human_turns == 1
    assert (t.train_split, t.eval_split) == ("train", "test")
    assert t.gold.startswith("hf-rm:") and cfg.base.model.startswith("EleutherAI/pythia-")
    assert cfg.prefs.source == "dataset" and cfg.dpo.betas == [0.1] and cfg.dpo.optimizer == "rmsprop"
    assert cfg.rlhf.target_kls and cfg.rlhf.best_of_n and cfg.task.corpus is None


@pytest.mark.parametrize("override, key", [
    ("task.gold=vader", "task.gold"),                      # dialogue is judged by a reward model
    ("task.gold=hf-rm:", "task.gold"),
    ("task.dataset=Anthropic/hh-rlhf", "task.dataset"),    # needs 'hf:'
    ("task.dataset=hf:Anthropic/hh-rlhf:test", "task.dataset"),
    ("task.eval_split=train", "task.eval_split"),
    ("task.max_human_turns=-1", "task.max_human_turns"),
    ("task.name=chat", "task.name"),
])
def test_paper_hh_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError) as e:
        load_suite("paper-hh", [override])
    assert f"'{key}'" in str(e.value)


def test_dataset_pairs_need_the_dialogue_task():
    with pytest.raises(ConfigError, match="'prefs.source'"):
        load_suite("smoke", ["prefs.source=dataset"])
    with pytest.raises(ConfigError, match="'task.corpus'"):
        load_suite("paper-hh", ["task.name=sentiment", "task.gold=vader"])


# ------------------------------------------------------------------------------------------------ end to end
QUESTIONS = ["how do i cook rice", "what is a good book", "can you help me sleep", "how do plants grow",
             "what should i name my dog", "why is the sky blue", "how do i learn to swim", "what is rain"]
GOOD = "sure here is a clear helpful answer with kind simple steps and care".split()
BAD = "no i will not help you that is a bad silly question go away".split()


def _conv(*turns: str) -> str:
    return "".join(f"\n\n{'Human' if i % 2 == 0 else 'Assistant'}: {t}" for i, t in enumerate(turns))


def _hh_rows(rng: random.Random, n_single: int, n_multi: int) -> list[dict]:
    rows = []
    for i in range(n_single):
        q = f"{rng.choice(QUESTIONS)} {i}"
        good, bad = " ".join(rng.choices(GOOD, k=rng.randint(4, 10))), " ".join(rng.choices(BAD, k=rng.randint(4, 10)))
        rows.append({"chosen": _conv(q, good), "rejected": _conv(q, bad)})
    for i in range(n_multi):
        q, a, q2 = rng.choice(QUESTIONS), " ".join(rng.choices(GOOD, k=5)), f"{rng.choice(QUESTIONS)} again {i}"
        rows.append({"chosen": _conv(q, a, q2, "yes sure"), "rejected": _conv(q, a, q2, "no go away")})
    rng.shuffle(rows)
    return rows


def _stand_ins(root: Path) -> dict[str, str]:
    import pandas as pd
    import torch
    from tokenizers import processors
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        GPTNeoXConfig,
        GPTNeoXForCausalLM,
        PreTrainedTokenizerFast,
    )

    from benchmarks.tasks.models import train_tokenizer

    rng = random.Random(0)
    train, test = _hh_rows(rng, 120, 10), _hh_rows(rng, 24, 6)
    # HH stand-in in the hub layout: <dir>/data/{train,test}-*.parquet with 'chosen'/'rejected' conversations
    (root / "hh" / "data").mkdir(parents=True)
    pd.DataFrame(train).to_parquet(root / "hh" / "data" / "train-00000-of-00001.parquet")
    pd.DataFrame(test).to_parquet(root / "hh" / "data" / "test-00000-of-00001.parquet")
    base_tok = train_tokenizer([r[k] for r in train for k in ("chosen", "rejected")], vocab_size=400)
    # Pythia stand-in: GPTNeoX; like Pythia's tokenizer, BOS = EOS = <|endoftext|>, no BOS added, no pad token
    backend = base_tok.backend_tokenizer
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    torch.manual_seed(0)
    lm = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                          intermediate_size=64, max_position_embeddings=256,
                                          bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id))
    lm.save_pretrained(root / "pythia")
    tok.save_pretrained(root / "pythia")
    # judge stand-in: a reward model with one output, scoring (query, response) pairs
    judge_tok = train_tokenizer(QUESTIONS + GOOD + BAD, vocab_size=300)
    judge = BertForSequenceClassification(BertConfig(vocab_size=len(judge_tok), hidden_size=16, num_hidden_layers=1,
                                                     num_attention_heads=2, intermediate_size=32, num_labels=1))
    judge.save_pretrained(root / "judge")
    judge_tok.save_pretrained(root / "judge")
    return {"hh": str(root / "hh"), "pythia": str(root / "pythia"), "judge": str(root / "judge")}


def test_gold_reward_hf_rm_is_the_judge_and_needs_prompts(tmp_path):
    from benchmarks.tasks.dialogue import judge_scores
    from benchmarks.tasks.sentiment import gold_reward

    p = _stand_ins(tmp_path)
    prompts = ["\n\nHuman: how do i cook rice\n\nAssistant:"] * 2
    s = gold_reward([" sure here is", " no go away"], "positive", f"hf-rm:{p['judge']}", prompts=prompts)
    assert s == judge_scores(p["judge"], prompts, [" sure here is", " no go away"]) and s[0] != s[1]
    with pytest.raises(ValueError, match="one prompt per text"):
        gold_reward(["x"], "positive", f"hf-rm:{p['judge']}")


@pytest.mark.slow
def test_paper_hh_runs_end_to_end_on_local_stand_ins(tmp_path):
    import pandas as pd

    p = _stand_ins(tmp_path)
    sets = [f"base.model={p['pythia']}", f"task.dataset=hf:{p['hh']}", f"task.gold=hf-rm:{p['judge']}",
            "task.n_train_prompts=200", "task.n_eval_prompts=12", "task.prompt_max_tokens=48",
            "sft.steps=3", "sft.seq_len=64", "sft.batch_size=4", "sft.warmup_steps=1", "prefs.max_new_tokens=6",
            "dpo.batch_size=8", "dpo.micro_batch_size=0", "dpo.warmup_steps=0", "dpo.max_length=64",
            "rlhf.target_kls=[6.0]", "rlhf.ppo.iterations=1", "rlhf.ppo.max_new_tokens=6", "rlhf.ppo.rollout_batch_size=8",
            "rlhf.ppo.minibatch_size=8", "rlhf.rm.batch_size=16", "rlhf.best_of_n=[2]", "eval.max_new_tokens=6",
            "eval.temperatures=[1.0]", "seeds=[0]", f"cache_dir={tmp_path}/cache", f"runs_dir={tmp_path}/runs"]
    args = [sys.executable, "-m", "benchmarks", "run", "--suite", "paper-hh"]
    for s in sets:
        args += ["--set", s]
    r = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env={"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PATH": "/usr/bin:/bin",
                            "OMP_NUM_THREADS": "2", "HF_HOME": str(tmp_path / "hf")})
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path / "runs" / "paper-hh"
    summary = json.loads((run / "summary.json").read_text())
    assert not summary["failed_arms"], summary["failed_arms"]
    methods = {a["method"] for a in summary["arms"]}
    assert {"sft", "dpo", "trl_dpo", "ppo", "ppo_gt", "best_of_n"} <= methods
    assert all(0.0 <= a["win_vs_chosen"] <= 1.0 and 0.0 <= a["win_vs_sft"] <= 1.0 for a in summary["arms"])
    # the multi-turn rows were dropped from both splits; every prompt is single-turn
    stages = json.loads((run / "stages.json").read_text())["stages"]
    data = stages["data"]["summary"]
    assert data["train"]["dropped"] == {"multi_turn": 10} and data["train"]["pairs"] == 120
    assert data["eval"]["dropped"] == {"multi_turn": 6} and data["eval"]["pairs"] == 24
    prefs = stages["prefs"]["summary"]
    assert prefs["pairs"] == 120 and 0.0 <= prefs["label_agrees_with_gold"] <= 1.0  # the judge scored the human pairs
    samples = pd.read_parquet(run / "samples.parquet")
    assert samples.prompt.str.count("\n\nHuman:").eq(1).all() and samples.prompt.str.endswith("\n\nAssistant:").all()
    # the chosen reference is the test split's own chosen response, scored by the judge
    chosen = pd.read_parquet(Path(stages["evalref"]["path"]) / "chosen.parquet")
    test_chosen = set(pd.read_parquet(Path(p["hh"]) / "data" / "test-00000-of-00001.parquet").chosen)
    assert len(chosen) == 12 and all(any(c in t for t in test_chosen) for c in chosen.chosen)
