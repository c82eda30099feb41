"""The pipeline's stages: data -> base -> sft (pi_ref) ; prompts ; prefs (labelled pairs)."""

from __future__ import annotations

import random
import statistics
from dataclasses import asdict
from pathlib import Path

import torch

from benchmarks import utils
from benchmarks.harness import Harness, Stage
from benchmarks.tasks import corpus as corpus_mod
from benchmarks.tasks import dialogue, models, prefs, sentiment
from methods import lora
from methods import sft as sft_mod
from methods.data import completion_logps, tokenize_prompt_completions
from methods.sampling import sample


# ------------------------------------------------------------------------------------------------ data
def _data(h: Harness, out: Path) -> dict:
    if h.cfg.task.name == "dialogue":
        return _dialogue_data(h, out)
    c = h.cfg.task.corpus
    general, task_train, task_heldout, per_source = [], [], [], {}
    for src in c.sources:
        docs = corpus_mod.load_documents(src, min_chars=c.min_chars, max_chars=c.max_chars, limit=c.max_docs_per_source)
        per_source[src] = len(docs)
        for d in docs:
            held = (utils.text_hash(d) % 10_000) < c.heldout_fraction * 10_000  # split by document, stable
            if src in c.task_sources:
                (task_heldout if held else task_train).append(d)
            if not held:
                general.append(d)
    utils.atomic_write_json(out / "docs.json", {"general_train": general, "task_train": task_train,
                                                "task_heldout": task_heldout})
    return {"docs_per_source": per_source, "general_train": len(general), "task_train": len(task_train),
            "task_heldout": len(task_heldout), "chars_general": sum(map(len, general))}


def _dialogue_data(h: Harness, out: Path) -> dict:
    """HH-format dataset -> single-turn (prompt, chosen, rejected) pairs of the train and eval splits; the SFT
    text is the chosen conversations (the paper's SFT on preferred completions)."""
    t = h.cfg.task
    summary: dict = {"dataset": t.dataset}
    pairs = {}
    for split_key, split in (("train", t.train_split), ("eval", t.eval_split)):
        raw = dialogue.load_split(t.dataset, split)
        rows, dropped = dialogue.parse_rows(raw, max_human_turns=t.max_human_turns,
                                            source=f"task.dataset '{t.dataset}' split '{split}'")
        utils.write_jsonl(out / f"{split_key}_pairs.jsonl", rows)
        pairs[split_key] = rows
        summary[split_key] = {"split": split, "rows": len(raw), "pairs": len(rows), "dropped": dropped,
                              "prompts": len({r["prompt"] for r in rows})}
    train_docs = [r["prompt"] + r["chosen"] for r in pairs["train"]]
    held_docs = list(dict.fromkeys(r["prompt"] + r["chosen"] for r in pairs["eval"]))
    train_docs = list(dict.fromkeys(train_docs))
    utils.atomic_write_json(out / "docs.json", {"general_train": train_docs, "task_train": train_docs,
                                                "task_heldout": held_docs})
    return {**summary, "general_train": len(train_docs), "task_train": len(train_docs), "task_heldout": len(held_docs),
            "chars_general": sum(map(len, train_docs))}


def _data_key(c) -> dict:
    t = c.task
    if t.name == "dialogue":
        return {"task": "dialogue", "dataset": t.dataset, "train_split": t.train_split, "eval_split": t.eval_split,
                "max_human_turns": t.max_human_turns}
    return {"corpus": asdict(t.corpus)}


def load_docs(h: Harness) -> dict[str, list[str]]:
    import json

    return json.loads((h.path("data") / "docs.json").read_text())


# ------------------------------------------------------------------------------------------------ base
def _base(h: Harness, out: Path) -> dict:
    b, cfg = h.cfg.base, h.cfg
    if b.model != "tiny":  # a named / local model is the base as it is
        model, tok = models.load_causal_lm(b.model)
        model.save_pretrained(out / "model")
        tok.save_pretrained(out / "model")
        return {"model": b.model, "params": models.n_params(model)}
    docs = load_docs(h)
    t0 = utils.Timer()
    tok = train_tokenizer_for(h, docs)
    tok_s = t0.elapsed
    model = models.build_tiny_llama(tok, n_layers=b.n_layers, hidden_size=b.hidden_size, n_heads=b.n_heads,
                                    intermediate_size=b.intermediate_size,
                                    max_position_embeddings=b.max_position_embeddings, seed=cfg.seed)
    enc = tok(docs["general_train"], add_special_tokens=False)["input_ids"]
    windows = sft_mod.pack_documents(enc, b.train.seq_len, bos_id=tok.bos_token_id, eos_id=tok.eos_token_id)
    held = sft_mod.pack_documents(tok(docs["task_heldout"], add_special_tokens=False)["input_ids"], b.train.seq_len,
                                  bos_id=tok.bos_token_id, eos_id=tok.eos_token_id)
    hist = sft_mod.train_lm(model, sft_mod.packed_batches(windows, b.train.batch_size, cfg.seed), steps=b.train.steps,
                            lr=b.train.lr, warmup_steps=b.train.warmup_steps, weight_decay=b.train.weight_decay,
                            grad_clip=b.train.grad_clip, device=h.device, autocast=h.autocast(), desc="base")
    heldout = sft_mod.eval_loss(model, held, batch_size=64, device=h.device, autocast=h.autocast())
    model.save_pretrained(out / "model")
    tok.save_pretrained(out / "model")
    utils.write_jsonl(out / "train_curve.jsonl", hist)
    return {"model": "tiny", "params": models.n_params(model), "vocab_size": len(tok), "tokenizer_s": tok_s,
            "train_tokens": int(windows.numel()), "final_train_loss": hist[-1]["loss"],
            "heldout_loss": heldout, "tokens_per_s": hist[-1]["tokens_per_s"],
            "chars_per_token": sum(map(len, docs["general_train"])) / max(1, sum(map(len, enc)))}


def train_tokenizer_for(h: Harness, docs: dict) -> object:
    return models.train_tokenizer(docs["general_train"], h.cfg.tokenizer.vocab_size)


def load_model(path: Path, device: str):
    model, tok = models.load_causal_lm(path / "model", local_only=True)
    return model.to(device).eval(), tok


# ------------------------------------------------------------------------------------------------ sft
def _sft(h: Harness, out: Path) -> dict:
    s, cfg = h.cfg.sft, h.cfg
    model, tok = load_model(h.path("base"), h.device)
    docs = load_docs(h)
    held = sft_mod.pack_documents(tok(docs["task_heldout"], add_special_tokens=False)["input_ids"], s.seq_len,
                                  bos_id=tok.bos_token_id, eos_id=tok.eos_token_id)
    if cfg.task.chat_instruction:  # instruction-following variant: (chat prompt, continuation), completion-only loss
        ex = sentiment.chat_sft_examples(docs["task_train"], tok, instruction=cfg.task.chat_instruction,
                                         min_tokens=cfg.task.prompt_min_tokens, max_tokens=cfg.task.prompt_max_tokens,
                                         max_completion_tokens=s.seq_len // 2, seed=cfg.seed + 1)
        p_ids, c_ids = [], []
        for prompt, completion in ex:
            pi, (ci,) = tokenize_prompt_completions(tok, prompt, [completion])
            p_ids.append(pi), c_ids.append(ci)
        batches = sft_mod.completion_batches(p_ids, c_ids, s.batch_size, tok.pad_token_id, cfg.seed + 1)
        n_tokens = sum(map(len, c_ids))
        held = held[:64]  # a real model is slow to score: 64 held-out windows measure the same thing
    else:
        enc = tok(docs["task_train"], add_special_tokens=False)["input_ids"]
        windows = sft_mod.pack_documents(enc, s.seq_len, bos_id=tok.bos_token_id, eos_id=tok.eos_token_id)
        batches = sft_mod.packed_batches(windows, s.batch_size, cfg.seed + 1)
        n_tokens = int(windows.numel())
    before = sft_mod.eval_loss(model, held, batch_size=64, device=h.device, autocast=h.autocast())
    model = lora.add_adapters(model, cfg.lora, seed=cfg.seed)
    hist = sft_mod.train_lm(model, batches, steps=s.steps, lr=s.lr,
                            warmup_steps=s.warmup_steps, weight_decay=s.weight_decay, grad_clip=s.grad_clip,
                            device=h.device, autocast=h.autocast(), desc="sft")
    model = lora.merged(model)
    after = sft_mod.eval_loss(model, held, batch_size=64, device=h.device, autocast=h.autocast())
    model.save_pretrained(out / "model")
    tok.save_pretrained(out / "model")
    utils.write_jsonl(out / "train_curve.jsonl", hist)
    return {"heldout_loss_before": before, "heldout_loss_after": after, "final_train_loss": hist[-1]["loss"],
            "train_tokens": n_tokens, "tokens_per_s": hist[-1]["tokens_per_s"]}


# ------------------------------------------------------------------------------------------------ prompts
def _prompts(h: Harness, out: Path) -> dict:
    t = h.cfg.task
    _, tok = models.load_causal_lm(h.path("base") / "model", local_only=True)
    if t.name == "dialogue":
        return _dialogue_prompts(h, out, tok)
    docs = load_docs(h)
    train = sentiment.make_prompts(docs["task_train"], tok, n=t.n_train_prompts, min_tokens=t.prompt_min_tokens,
                                   max_tokens=t.prompt_max_tokens, seed=h.cfg.seed, id_prefix="train-",
                                   chat_instruction=t.chat_instruction)
    ev = sentiment.make_prompts(docs["task_heldout"], tok, n=t.n_eval_prompts, min_tokens=t.prompt_min_tokens,
                                max_tokens=t.prompt_max_tokens, seed=h.cfg.seed + 1, id_prefix="eval-",
                                chat_instruction=t.chat_instruction)
    utils.write_jsonl(out / "train.jsonl", train)
    utils.write_jsonl(out / "eval.jsonl", ev)
    return {"n_train": len(train), "n_eval": len(ev),
            "mean_prompt_tokens": statistics.mean(len(p["prompt_ids"]) - 1 for p in train + ev)}


def _dialogue_prompts(h: Harness, out: Path, tok) -> dict:
    """Distinct prompts of each split (a seeded sample of at most n_train/n_eval_prompts, each at most
    prompt_max_tokens tokens); an eval prompt carries the dataset's chosen response, the win-rate reference."""
    t = h.cfg.task
    summary: dict = {}
    for split, n in (("train", t.n_train_prompts), ("eval", t.n_eval_prompts)):
        chosen: dict[str, str] = {}
        for r in utils.read_jsonl(h.path("data") / f"{split}_pairs.jsonl"):
            chosen.setdefault(r["prompt"], r["chosen"])  # the first pair's chosen response of each prompt
        texts = sorted(chosen)
        random.Random(f"{h.cfg.seed}/{split}").shuffle(texts)
        rows, too_long = [], 0
        for text in texts:
            ids = tok(text)["input_ids"]  # as tokenize_prompt_completions cuts the pairs' prompts
            if len(ids) > t.prompt_max_tokens:
                too_long += 1
                continue
            row = {"prompt_id": f"{split}-{len(rows)}", "prompt": text, "prompt_ids": ids}
            rows.append(row | ({"chosen": chosen[text]} if split == "eval" else {}))
            if len(rows) == n:
                break
        if not rows:
            raise ValueError(f"no {split} prompt of the dialogue dataset has <= task.prompt_max_tokens "
                             f"({t.prompt_max_tokens}) tokens; raise it")
        utils.write_jsonl(out / f"{split}.jsonl", rows)
        summary.update({f"n_{split}": len(rows), f"{split}_prompts_too_long": too_long,
                        f"{split}_mean_prompt_tokens": statistics.mean(len(r["prompt_ids"]) for r in rows)})
    return summary


def load_prompts(h: Harness, split: str) -> list[dict]:
    return utils.read_jsonl(h.path("prompts") / f"{split}.jsonl")


# ------------------------------------------------------------------------------------------------ prefs
def sample_texts(h: Harness, model, tok, prompts: list[dict], *, n: int, temperature: float, max_new_tokens: int,
                 seed: int) -> tuple[list[list[str]], dict]:
    """n completions per prompt as text; seeds depend only on (seed, prompt id, sample index)."""
    ids, seeds = [], []
    for p in prompts:
        for k in range(n):
            ids.append(p["prompt_ids"])
            seeds.append(utils.text_hash(f"{seed}/{p['prompt_id']}/{k}"))
    t = utils.Timer()
    with torch.inference_mode():
        res = sample(model, ids, max_new_tokens=max_new_tokens, temperature=temperature, seeds=seeds,
                     eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, autocast=h.autocast())
    texts = tok.batch_decode(res.completions, skip_special_tokens=True)
    stats = {"samples": len(texts), "new_tokens": res.tokens_generated, "wall_s": t.elapsed,
             "tokens_per_s": res.tokens_generated / max(t.elapsed, 1e-9), "ended_with_eos": sum(res.ended) / len(texts)}
    return [texts[i * n : (i + 1) * n] for i in range(len(prompts))], stats


def _prefs(h: Harness, out: Path) -> dict:
    import datasets

    p, t = h.cfg.prefs, h.cfg.task
    model, tok = load_model(h.path("sft"), h.device)
    summary: dict = {"source": p.source}
    # the reference's gold-reward distribution on held-out prompts (what every arm must beat)
    ev = load_prompts(h, "eval")
    ev_texts, _ = sample_texts(h, model, tok, ev, n=1, temperature=1.0, max_new_tokens=p.max_new_tokens,
                               seed=h.cfg.seed + 7)
    ev_gold = sentiment.gold_reward([x[0] for x in ev_texts], t.target, t.gold, prompts=[q["prompt"] for q in ev])
    summary["ref_eval_gold_mean"] = statistics.mean(ev_gold)
    summary["ref_eval_gold_sd"] = statistics.pstdev(ev_gold)
    summary["ref_eval_gold_zero_share"] = sum(g == 0 for g in ev_gold) / len(ev_gold)

    if p.source == "generate":
        train = load_prompts(h, "train")
        texts, sstats = sample_texts(h, model, tok, train, n=p.samples_per_prompt, temperature=p.temperature,
                                     max_new_tokens=p.max_new_tokens, seed=h.cfg.seed)
        summary["sampling"] = sstats
        rng = random.Random(h.cfg.seed)
        rows = []
        for prm, comps in zip(train, texts, strict=True):
            scores = sentiment.gold_reward(comps, t.target, t.gold, prompts=[prm["prompt"]] * len(comps))
            ok = [k for k, c in enumerate(comps) if c.strip()]  # an empty completion cannot be a pair member
            scores_ok = [scores[k] for k in ok]
            for a, b in prefs.form_pairs(scores_ok, labelling=p.labelling, min_gap=p.min_gap,
                                         pairs_per_prompt=p.pairs_per_prompt, bt_temperature=p.bt_temperature, rng=rng):
                i, j = ok[a], ok[b]
                if comps[i] == comps[j]:
                    continue
                rows.append({"prompt_id": prm["prompt_id"], "prompt": prm["prompt"], "chosen": comps[i],
                             "rejected": comps[j], "score_chosen": scores[i], "score_rejected": scores[j]})
        summary["candidate_pairs"] = len(train) * p.samples_per_prompt * (p.samples_per_prompt - 1) // 2
        uniq = {(r["prompt"], r["chosen"], r["rejected"]): r for r in rows}  # identical samples make identical pairs
        summary["duplicate_pairs_dropped"] = len(rows) - len(uniq)
        rows = list(uniq.values())
    elif p.source == "dataset":  # the dialogue dataset's own pairs, for the train prompts kept by the prompts stage
        ids = {q["prompt"]: q["prompt_id"] for q in load_prompts(h, "train")}
        rows = [{**r, "prompt_id": ids[r["prompt"]]} for r in utils.read_jsonl(h.path("data") / "train_pairs.jsonl")
                if r["prompt"] in ids]
        # the judge scores both responses: label_agrees_with_gold = how often the judge sides with the human label
        prm = [r["prompt"] for r in rows]
        for col in ("chosen", "rejected"):
            judged = sentiment.gold_reward([r[col] for r in rows], t.target, t.gold, prompts=prm)
            for r, g in zip(rows, judged, strict=True):
                r[f"score_{col}"] = g
    else:
        rows = prefs.load_preference_rows(p.source)
        prefs.validate_rows(rows, source=f"prefs.source '{p.source}'")
        for i, r in enumerate(rows):
            r.setdefault("prompt_id", f"pref-{i}")
            r.setdefault("score_chosen", float("nan"))
            r.setdefault("score_rejected", float("nan"))
    prefs.validate_rows(rows, source="generated pairs")
    # reference log-probs of every pair (the shared tokenisation and log-prob path), cached with the pairs
    p_ids, c_ids, r_ids = [], [], []
    for r in rows:
        pi, (ci, ri) = tokenize_prompt_completions(tok, r["prompt"], [r["chosen"], r["rejected"]])
        p_ids.append(pi), c_ids.append(ci), r_ids.append(ri)
    lp_c = completion_logps(model, p_ids, c_ids, pad_id=tok.pad_token_id, autocast=h.autocast())
    lp_r = completion_logps(model, p_ids, r_ids, pad_id=tok.pad_token_id, autocast=h.autocast())
    for r, a, b in zip(rows, lp_c.tolist(), lp_r.tolist(), strict=True):
        r["ref_chosen_logps"], r["ref_rejected_logps"] = a, b
    ds = datasets.Dataset.from_list(rows)
    ds.save_to_disk(str(out / "pairs"))
    sc = [r["score_chosen"] for r in rows]
    sr = [r["score_rejected"] for r in rows]
    summary.update({"pairs": len(rows), "prompts_with_pairs": len({r["prompt_id"] for r in rows}),
                    "score_chosen_mean": statistics.mean(sc), "score_rejected_mean": statistics.mean(sr),
                    "score_gap_mean": statistics.mean(a - b for a, b in zip(sc, sr, strict=True)),
                    "label_agrees_with_gold": sum(a > b for a, b in zip(sc, sr, strict=True)) / len(rows),
                    "ref_logps_chosen_mean": float(lp_c.mean()), "ref_logps_rejected_mean": float(lp_r.mean())})
    return summary


def dialogue_evalref(h: Harness, out: Path) -> dict:
    """'dialogue': the reference of win rate vs chosen is the eval split's chosen response of each prompt,
    scored by the judge like every arm's samples."""
    import pandas as pd

    t = h.cfg.task
    prompts = load_prompts(h, "eval")
    gold = sentiment.gold_reward([p["chosen"] for p in prompts], t.target, t.gold, prompts=[p["prompt"] for p in prompts])
    df = pd.DataFrame({"prompt_id": [p["prompt_id"] for p in prompts], "chosen": [p["chosen"] for p in prompts],
                       "chosen_gold": gold})
    df.to_parquet(out / "chosen.parquet", index=False)
    return {"prompts": len(df), "chosen_gold_mean": float(df.chosen_gold.mean()), "source": f"{t.dataset}:{t.eval_split}"}


def load_pairs(h: Harness):
    import datasets

    return datasets.load_from_disk(str(h.path("prefs") / "pairs"))


# ------------------------------------------------------------------------------------------------ registry
def lora_key(c) -> dict:
    """Cache-key part of the LoRA settings (absent for full fine-tuning, so those keys are unchanged)."""
    return {"lora": asdict(c.lora)} if c.lora is not None else {}


STAGES: dict[str, Stage] = {
    "data": Stage("data", (), _data_key, _data),
    "base": Stage("base", ("data",), lambda c: {"base": asdict(c.base), "tokenizer": asdict(c.tokenizer), "seed": c.seed,
                                                "dtype": c.dtype}, _base),
    "sft": Stage("sft", ("base", "data"), lambda c: {"sft": asdict(c.sft), "seed": c.seed, "dtype": c.dtype} | lora_key(c)
                 | ({"chat_instruction": c.task.chat_instruction} if c.task.chat_instruction else {}), _sft),
    "prompts": Stage("prompts", ("base", "data"),
                     lambda c: {k: getattr(c.task, k) for k in ("prompt_min_tokens", "prompt_max_tokens",
                                                                "n_train_prompts", "n_eval_prompts")} | {"seed": c.seed}
                     | ({"task": "dialogue"} if c.task.name == "dialogue" else {})
                     | ({"chat_instruction": c.task.chat_instruction} if c.task.chat_instruction else {}),
                     _prompts),
    "prefs": Stage("prefs", ("sft", "prompts"), lambda c: {"prefs": asdict(c.prefs), "target": c.task.target, "gold": c.task.gold,
                                                           "seed": c.seed, "dtype": c.dtype}, _prefs, version=2),
}

FOUNDATION = ["data", "base", "sft", "prompts", "prefs"]
