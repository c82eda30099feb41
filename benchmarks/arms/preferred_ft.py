"""Preferred-FT (the DPO paper's baseline): supervised fine-tuning of pi_ref on the chosen completions, with the
``dpo`` section's learning rate and batch size (the same optimiser budget per step as DPO)."""

from __future__ import annotations

from pathlib import Path

from benchmarks import utils
from benchmarks.arms.common import compute_record, heldout_fraction, train_and_heldout_pairs
from benchmarks.arms.registry import ArmFamily, ArmPlan, Method, register
from benchmarks.harness import Harness, Stage
from benchmarks.stages import load_model, lora_key
from benchmarks.tasks import models
from methods import lora


def _hparams(c) -> dict:
    d = c.dpo
    return {"steps": c.rlhf.preferred_ft_steps, "lr": d.lr if d is not None else 1e-4,
            "batch_size": d.batch_size if d is not None else 32, "warmup_steps": 5, "grad_clip": 1.0}


def _make_pft_stage(seed: int) -> Stage:
    arm = f"pft-s{seed}"

    def run(h: Harness, out: Path) -> dict:
        import random

        from methods.data import collate, tokenize_prompt_completions
        from methods.sft import train_lm

        hp = _hparams(h.cfg)
        policy, tok = load_model(h.path("sft"), h.device)
        train, _ = train_and_heldout_pairs(h)
        data = []
        for r in train:
            p, (c,) = tokenize_prompt_completions(tok, r["prompt"], [r["chosen"]])
            data.append((p, c))
        bs = hp["batch_size"]

        def batches():
            rng = random.Random(seed)
            while True:
                rng.shuffle(data)
                for i in range(0, len(data) - bs + 1, bs):
                    b = collate([x[0] for x in data[i : i + bs]], [x[1] for x in data[i : i + bs]], tok.pad_token_id)
                    yield b["input_ids"], b["attention_mask"], b["labels"]

        utils.seed_everything(seed)
        t = utils.Timer()
        policy = lora.add_adapters(policy, h.cfg.lora, seed=seed)
        hist = train_lm(policy, batches(), steps=hp["steps"], lr=hp["lr"], warmup_steps=hp["warmup_steps"], weight_decay=0.0,
                        grad_clip=hp["grad_clip"], device=h.device, autocast=h.autocast(), desc="preferred-ft")
        policy = lora.merged(policy)
        policy.save_pretrained(out / "model")
        tok.save_pretrained(out / "model")
        utils.write_jsonl(out / "train_curve.jsonl", hist)
        n_par = models.n_params(policy)
        return {"arm": arm, "method": "preferred_ft", "loss_type": "", "seed": seed, "time/train_s": t.elapsed,
                "tokens_per_s": hist[-1]["tokens_per_s"], "final_loss": hist[-1]["loss"], "params": n_par,
                **compute_record(trained=[(n_par, hist[-1]["tokens_seen"])])}

    key = lambda c: {"pft": _hparams(c), "heldout": heldout_fraction(c), "seed": seed, "dtype": c.dtype} | lora_key(c)  # noqa: E731
    return Stage(f"arm/{arm}", ("sft", "prefs"), key, run, version=3)


@register
class PreferredFT(ArmFamily):
    name = "preferred_ft"
    methods = (Method("preferred_ft", "Preferred-FT", "#ca9161", "P", "baseline", order=10),)

    def plan(self, c) -> ArmPlan:
        p = ArmPlan()
        if c.rlhf is None or not c.rlhf.preferred_ft:
            return p
        for seed in c.seeds:
            p.add_arm(_make_pft_stage(seed))
        return p
