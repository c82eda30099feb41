"""Our DPO family (``methods/dpo``): the main beta grid and the loss variants, one arm per (loss, beta, seed).

Each arm's cache key is its own resolved ``methods.dpo.trainer.DPOConfig`` plus its inputs, never the grid around it:
adding a beta trains that beta's arms only.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from benchmarks import interrupts, progress, utils
from benchmarks.arms.common import compute_record, heldout_fraction, stage_flops, train_and_heldout_pairs
from benchmarks.arms.registry import ArmFamily, ArmPlan, Method, fmt, register
from benchmarks.harness import Harness, Stage
from benchmarks.stages import load_model, lora_key
from benchmarks.tasks import models
from methods import lora


def dpo_arm_id(loss_type: str, beta: float, seed: int, peer: str = "dpo", epochs: float | None = None) -> str:
    """``epochs``: a point of the epochs sweep (``dpo.epochs_grid``), None for the section's own epoch count."""
    return f"{peer}-{loss_type}-b{fmt(beta)}{'' if epochs is None else f'-e{fmt(epochs)}'}-s{seed}"


def dpo_train_config(c, loss_type: str, beta: float, seed: int, epochs: float | None = None):
    """The trainer's config of one arm: the suite's ``dpo`` section (a ``DPOConfig`` plus the grid) at this point."""
    return c.dpo.arm_config(loss_type, beta, seed, epochs)


def dpo_key(c, loss_type: str, beta: float, seed: int, epochs: float | None = None) -> dict:
    """Everything one DPO arm's output depends on (besides the sft/prefs stages it reads)."""
    return {"train": asdict(dpo_train_config(c, loss_type, beta, seed, epochs)), "heldout": heldout_fraction(c),
            "dtype": c.dtype} | lora_key(c)


def _make_dpo_stage(loss_type: str, beta: float, seed: int, epochs: float | None = None) -> Stage:
    arm = dpo_arm_id(loss_type, beta, seed, epochs=epochs)

    def run(h: Harness, out: Path) -> dict:
        from methods.dpo.trainer import DPOTrainer, tokenize_pairs

        cfg = dpo_train_config(h.cfg, loss_type, beta, seed, epochs)
        utils.seed_everything(seed)
        policy, tok = load_model(h.path("sft"), h.device)
        train_rows, held_rows = train_and_heldout_pairs(h)
        ex, n_cut = tokenize_pairs(tok, train_rows, max_length=cfg.max_length, truncation_mode=cfg.truncation_mode)
        held = tokenize_pairs(tok, held_rows, max_length=cfg.max_length, truncation_mode=cfg.truncation_mode)[0] if held_rows else []
        t = utils.Timer()
        ref_train, ref_held = load_reflogps(h, len(ex), len(held))  # pi_ref's log-probs: one stage for the sweep
        ref_s = t.elapsed
        n_par = models.n_params(policy)
        policy = lora.add_adapters(policy, h.cfg.lora, seed=seed)  # after pi_ref's log-probs: adapters train
        tr = DPOTrainer(policy, ex, ref_train, cfg, pad_id=tok.pad_token_id, autocast=h.autocast(),
                        accelerator=h.accelerator)  # None = single process; else data parallel over the ranks
        nan = {"eval/rewards/accuracies": float("nan"), "eval/rewards/margins": float("nan")}
        before = tr.evaluate(held, ref_held) if held else nan
        t = utils.Timer()
        ckpt = h.checkpoint_path(f"arm/{arm}")
        if ckpt.exists() and tr.load_checkpoint(ckpt):  # (train() loads it too; this is to say so)
            h.log(f"[arm/{arm}] resuming from step {tr.step} of {tr.total_steps} ({ckpt})")
        with progress.bar(tr.total_steps, f"arm/{arm}") as b, interrupts.graceful():
            hist = tr.train(checkpoint_path=ckpt, checkpoint_every=h.cfg.checkpoint_every_steps, stop=interrupts.requested,
                            on_log=lambda r: b.to(r["step"], loss=r["loss"], margin=r.get("rewards/margins"),
                                                  **{"tok/s": r.get("tokens_per_s")}))
            if interrupts.requested():
                interrupts.stop_with_checkpoint(tr, ckpt, f"arm/{arm}", tr.step, tr.total_steps, "step")
        train_s = t.elapsed
        after = tr.evaluate(held, ref_held) if held else nan
        if h.cfg.lora is not None:  # adapters merged: a plain model folder like every other arm's
            policy = lora.merged(policy)
            policy.save_pretrained(out / "model")
        elif h.dist.distributed:  # the full weights (gathered under FSDP/ZeRO-3: every rank takes part)
            policy.save_pretrained(out / "model", state_dict=tr.model_state_dict())
            h.accelerator.free_memory()  # drop the accelerator's references to this arm's model/optimiser
        else:
            policy.save_pretrained(out / "model")
        tok.save_pretrained(out / "model")
        utils.write_jsonl(out / "train_curve.jsonl", hist)
        utils.atomic_write_json(out / "train_config.json", asdict(cfg))
        return {"arm": arm, "method": "dpo", "loss_type": loss_type, "beta": beta, "epochs": cfg.epochs,
                "seed": seed, "train_pairs": len(ex), "heldout_pairs": len(held), "truncated_pairs": n_cut,
                "steps": tr.step, "heldout_acc_before": before["eval/rewards/accuracies"],
                "heldout_acc_after": after["eval/rewards/accuracies"], "heldout_margin_after": after["eval/rewards/margins"],
                "time/reference_s": ref_s, "time/train_s": train_s,
                "tokens_per_s": hist[-1]["tokens_per_s"], "tokens_seen": hist[-1]["tokens_seen"], "params": n_par,
                **compute_record(trained=[(n_par, hist[-1]["tokens_seen"])],  # held-out accuracy: 2 policy forwards
                                 forward=[(n_par, 2 * sum(e.n_tokens_packed for e in held))],
                                 shared={REFLOGPS: stage_flops(h, REFLOGPS)}),
                "final": {k: v for k, v in hist[-1].items() if "/" in k or k == "loss"}}

    return Stage(f"arm/{arm}", ("sft", "prefs", REFLOGPS), lambda c: dpo_key(c, loss_type, beta, seed, epochs), run, version=4)


# ------------------------------------------------------------------------------------------------ pi_ref log-probs
REFLOGPS = "reflogps"


def _reflogps(h: Harness, out: Path) -> dict:
    """pi_ref's summed and mean log-probs of every training and held-out pair, tokenised exactly as the DPO arms
    tokenise them: computed once for the whole grid (any beta, loss and seed), then read by every arm."""
    import torch

    from methods.dpo.trainer import compute_reference_logps, tokenize_pairs

    d = h.cfg.dpo
    cfg = dpo_train_config(h.cfg, d.loss_type, d.betas[0], 0)  # the tokenisation and layout fields only
    model, tok = load_model(h.path("sft"), h.device)
    train_rows, held_rows = train_and_heldout_pairs(h)
    ex, n_cut = tokenize_pairs(tok, train_rows, max_length=cfg.max_length, truncation_mode=cfg.truncation_mode)
    held = tokenize_pairs(tok, held_rows, max_length=cfg.max_length, truncation_mode=cfg.truncation_mode)[0] if held_rows else []
    t = utils.Timer()
    ref = compute_reference_logps(model, ex + held, pad_id=tok.pad_token_id, autocast=h.autocast(), layout=cfg.layout)
    secs = t.elapsed
    torch.save({k: v.contiguous() for k, v in ref.items()}, out / "reflogps.pt")
    tokens = sum(e.n_tokens_packed for e in ex + held)
    return {"train_pairs": len(ex), "heldout_pairs": len(held), "truncated_pairs": n_cut, "time/reference_s": secs,
            "tokens": tokens, **compute_record(forward=[(models.n_params(model), tokens)])}


def reflogps_stage() -> Stage:
    def key(c) -> dict:
        cfg = dpo_train_config(c, c.dpo.loss_type, c.dpo.betas[0], 0)
        return {"max_length": cfg.max_length, "truncation": cfg.truncation_mode, "layout": cfg.layout,
                "heldout": heldout_fraction(c), "dtype": c.dtype}

    return Stage(REFLOGPS, ("sft", "prefs"), key, _reflogps, optional=True, version=2)


def load_reflogps(h: Harness, n_train: int, n_held: int):
    """(train, held-out) reference log-probs from the ``reflogps`` stage, checked against the pairs' counts."""
    import torch

    ref = torch.load(h.path(REFLOGPS) / "reflogps.pt", weights_only=True)
    n = len(ref["chosen"])
    if n != n_train + n_held:
        raise RuntimeError(f"stage {REFLOGPS}: {n} reference log-probs for {n_train} + {n_held} pairs; "
                           "the stage and the pairs disagree (delete its cache folder)")
    return {k: v[:n_train] for k, v in ref.items()}, {k: v[n_train:] for k, v in ref.items()}


@register
class DPO(ArmFamily):
    """Offline DPO (ours) over the suite's ``dpo.betas`` and, at the first beta, ``dpo.variants`` loss types."""

    name = "dpo"
    methods = (Method("dpo", "DPO", "#0173b2", "o", "offline_preference", order=30, curves="preference"),)

    def plan(self, c) -> ArmPlan:
        p = ArmPlan()
        if c.dpo is None:
            return p
        p.need(reflogps_stage())
        grid = [(c.dpo.loss_type, b) for b in c.dpo.betas] + [(v, c.dpo.betas[0]) for v in c.dpo.variants]
        sweep = [e for e in c.dpo.epochs_grid if e != c.dpo.epochs]  # the section's own count is the plain arm
        for seed in c.seeds:
            for lt, beta in grid:
                p.add_arm(_make_dpo_stage(lt, beta, seed))
            for lt, beta in grid:
                for e in sweep:
                    p.add_arm(_make_dpo_stage(lt, beta, seed, e))
        return p
