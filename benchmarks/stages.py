"""The pipeline's stages: data -> base -> sft (pi_ref) ; prompts ; prefs (labelled pairs)."""

from __future__ import annotations

import random
import statistics
from dataclasses import asdict
from pathlib import Path

import torch

from benchmarks import interrupts, progress, utils
from benchmarks.harness import Harness, Stage
from benchmarks.tasks import models, prefs, sentiment
from benchmarks.tasks.registry import load_docs, load_prompts, task_gold, task_of
from methods import lora
from methods import sft as sft_mod
from methods.data import tokenize_prompt_completions
from methods.sampling import sample


# ------------------------------------------------------------------------------------------------ data
def _data(h: Harness, out: Path) -> dict:
    return task_of(h.cfg).data(h, out)


def _data_key(c) -> dict:
    return task_of(c).data_key(c)


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
    hist = _train_lm(h, "base", model, sft_mod.packed_batches(windows, b.train.batch_size, cfg.seed), steps=b.train.steps,
                     lr=b.train.lr, warmup_steps=b.train.warmup_steps, weight_decay=b.train.weight_decay,
                     grad_clip=b.train.grad_clip)
    heldout = sft_mod.eval_loss(model, held, batch_size=64, device=h.device, autocast=h.autocast())
    model.save_pretrained(out / "model")
    tok.save_pretrained(out / "model")
    utils.write_jsonl(out / "train_curve.jsonl", hist)
    return {"model": "tiny", "params": models.n_params(model), "vocab_size": len(tok), "tokenizer_s": tok_s,
            "train_tokens": int(windows.numel()), "final_train_loss": hist[-1]["loss"],
            "heldout_loss": heldout, "tokens_per_s": hist[-1]["tokens_per_s"],
            "chars_per_token": sum(map(len, docs["general_train"])) / max(1, sum(map(len, enc)))}


def _train_lm(h: Harness, stage: str, model, batches, **kw) -> list[dict]:
    """``methods.sft.train_lm`` for stage ``base`` / ``sft``, resumable: a checkpoint every
    ``checkpoint_every_steps`` steps (and on SIGINT/SIGTERM, then exit 130/143 saying how to resume); a re-run
    resumes from it and says so. The checkpoint is dropped when the stage finishes (the harness)."""
    ckpt = h.checkpoint_path(stage)

    def resumed(step: int) -> None:
        h.log(f"[{stage}] resuming from step {step} of {kw['steps']} ({ckpt})")

    with interrupts.graceful():
        try:
            return sft_mod.train_lm(model, batches, device=h.device, autocast=h.autocast(), desc=stage, checkpoint_path=ckpt,
                                    checkpoint_every=h.cfg.checkpoint_every_steps, stop=interrupts.requested,
                                    on_resume=resumed, **kw)
        except sft_mod.TrainingStopped as e:
            interrupts.stop_with_checkpoint(None, None, stage, e.step, e.steps, "step")


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
    hist = _train_lm(h, "sft", model, batches, steps=s.steps, lr=s.lr, warmup_steps=s.warmup_steps,
                     weight_decay=s.weight_decay, grad_clip=s.grad_clip)
    model = lora.merged(model)
    after = sft_mod.eval_loss(model, held, batch_size=64, device=h.device, autocast=h.autocast())
    model.save_pretrained(out / "model")
    tok.save_pretrained(out / "model")
    utils.write_jsonl(out / "train_curve.jsonl", hist)
    return {"heldout_loss_before": before, "heldout_loss_after": after, "final_train_loss": hist[-1]["loss"],
            "train_tokens": n_tokens, "tokens_per_s": hist[-1]["tokens_per_s"]}


# ------------------------------------------------------------------------------------------------ prompts
def _prompts(h: Harness, out: Path) -> dict:
    _, tok = models.load_causal_lm(h.path("base") / "model", local_only=True)
    return task_of(h.cfg).prompts(h, out, tok)


# ------------------------------------------------------------------------------------------------ prefs
def sample_texts(h: Harness, model, tok, prompts: list[dict], *, n: int, temperature: float, max_new_tokens: int,
                 seed: int, desc: str = "sampling") -> tuple[list[list[str]], dict]:
    """n completions per prompt as text; seeds depend only on (seed, prompt id, sample index)."""
    ids, seeds = [], []
    for p in prompts:
        for k in range(n):
            ids.append(p["prompt_ids"])
            seeds.append(utils.text_hash(f"{seed}/{p['prompt_id']}/{k}"))
    t = utils.Timer()
    with torch.inference_mode(), progress.bar(len(ids), desc, unit="sample") as b:
        res = sample(model, ids, max_new_tokens=max_new_tokens, temperature=temperature, seeds=seeds,
                     eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, autocast=h.autocast(),
                     on_batch=lambda rows, toks: b.add(rows, **{"tok/s": toks / max(t.elapsed, 1e-9)}))
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
    ev_gold = task_gold(t, [x[0] for x in ev_texts], [q["prompt"] for q in ev])
    summary["ref_eval_gold_mean"] = statistics.mean(ev_gold)
    summary["ref_eval_gold_sd"] = statistics.pstdev(ev_gold)
    summary["ref_eval_gold_zero_share"] = sum(g == 0 for g in ev_gold) / len(ev_gold)

    if p.source == "generate":
        train = load_prompts(h, "train")
        texts, sstats = sample_texts(h, model, tok, train, n=p.samples_per_prompt, temperature=p.temperature,
                                     max_new_tokens=p.max_new_tokens, seed=h.cfg.seed, desc="prefs: sampling pairs")
        summary["sampling"] = sstats
        rng = random.Random(h.cfg.seed)
        rows = []
        for prm, comps in zip(train, texts, strict=True):
            scores = task_gold(t, comps, [prm["prompt"]] * len(comps))
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
    elif p.source == "dataset":  # the task's own labelled pairs (e.g. the dialogue dataset's), for the train prompts
        rows = task_of(h.cfg).dataset_pairs(h)
    else:
        rows = prefs.load_preference_rows(p.source)
        prefs.validate_rows(rows, source=f"prefs.source '{p.source}'")
        for i, r in enumerate(rows):
            r.setdefault("prompt_id", f"pref-{i}")
            r.setdefault("score_chosen", float("nan"))
            r.setdefault("score_rejected", float("nan"))
    prefs.validate_rows(rows, source="generated pairs")
    ds = datasets.Dataset.from_list(rows)
    ds.save_to_disk(str(out / "pairs"))
    sc = [r["score_chosen"] for r in rows]
    sr = [r["score_rejected"] for r in rows]
    summary.update({"pairs": len(rows), "prompts_with_pairs": len({r["prompt_id"] for r in rows}),
                    "score_chosen_mean": statistics.mean(sc), "score_rejected_mean": statistics.mean(sr),
                    "score_gap_mean": statistics.mean(a - b for a, b in zip(sc, sr, strict=True)),
                    "label_agrees_with_gold": sum(a > b for a, b in zip(sc, sr, strict=True)) / len(rows)})
    return summary


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
                     | task_of(c).prompts_key(c),
                     _prompts),
    "prefs": Stage("prefs", ("sft", "prompts"), lambda c: {"prefs": asdict(c.prefs), "target": c.task.target, "gold": c.task.gold,
                                                           "seed": c.seed, "dtype": c.dtype}, _prefs, version=3),
}

FOUNDATION = ["data", "base", "sft", "prompts", "prefs"]
