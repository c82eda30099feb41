import json

import pytest
import torch

from benchmarks.tasks.models import ModelLoadError, load_causal_lm
from methods.data import common_prefix_length, tokenize_prompt_completions, truncate


def test_base_model_loads_from_local_save_pretrained_folder(tiny_lm, tmp_path):
    model, tok = tiny_lm
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    m2, t2 = load_causal_lm(tmp_path / "m", local_only=True)
    ids = torch.tensor([tok("The cat is good")["input_ids"]])
    assert torch.equal(model(ids).logits, m2(ids).logits)
    assert t2("The cat")["input_ids"] == tok("The cat")["input_ids"]
    assert t2("The cat")["input_ids"][0] == t2.bos_token_id  # BOS from the post-processor survives saving


def test_bad_model_paths_give_clear_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_causal_lm(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_causal_lm(tmp_path / "empty")
    from transformers import CLIPVisionConfig, CLIPVisionModel

    CLIPVisionModel(CLIPVisionConfig(hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2,
                                     image_size=8, patch_size=4)).save_pretrained(tmp_path / "vision")
    with pytest.raises(ModelLoadError, match="not a causal LM"):
        load_causal_lm(tmp_path / "vision")


def test_tokenizer_without_eos_is_refused(tiny_lm, tmp_path):
    model, tok = tiny_lm
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "tokenizer_config.json").read_text())
    cfg["eos_token"] = None
    (tmp_path / "m" / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="eos_token"):
        load_causal_lm(tmp_path / "m", local_only=True)


def test_prompt_completion_tokenisation_follows_trl(tiny_lm):
    _, tok = tiny_lm
    p, (c, r) = tokenize_prompt_completions(tok, "The cat", [" is good", " is bad"])
    assert p[0] == tok.bos_token_id and c[-1] == tok.eos_token_id and r[-1] == tok.eos_token_id
    assert p + c == tok("The cat is good" + tok.eos_token)["input_ids"]
    assert common_prefix_length([1, 2, 3], [1, 2, 4]) == 2


def test_truncation_modes():
    assert truncate([1, 2], [3, 4, 5], 4, "keep_start") == ([1, 2], [3, 4], True)
    assert truncate([1, 2], [3, 4, 5], 4, "keep_end") == ([2], [3, 4, 5], True)
    assert truncate([1, 2], [3], 4) == ([1, 2], [3], False)
    with pytest.raises(ValueError, match="keep_start"):
        truncate([1, 2], [3, 4, 5], 4, "middle")
