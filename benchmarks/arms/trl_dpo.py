"""TRL 1.16's DPOTrainer as a peer of our DPO: same pairs, same batches, same hyper-parameters, at the first beta
and the first seed (a parity and speed peer: its numbers equal ours)."""

from __future__ import annotations

from pathlib import Path

from benchmarks import utils
from benchmarks.arms.common import compute_record, train_and_heldout_pairs
from benchmarks.arms.dpo import dpo_arm_id, dpo_key, dpo_train_config
from benchmarks.arms.registry import ArmFamily, ArmPlan, Method, register
from benchmarks.harness import Harness, Stage
from benchmarks.stages import load_model
from benchmarks.tasks import models


def _make_trl_stage(loss_type: str, beta: float, seed: int) -> Stage:
    arm = dpo_arm_id(loss_type, beta, seed, "trl")

    def run(h: Harness, out: Path) -> dict:
        import shutil
        import warnings

        from methods.baselines.trl_dpo import train_trl_dpo
        from methods.dpo.trainer import example_order, tokenize_pairs, total_steps_for

        cfg = dpo_train_config(h.cfg, loss_type, beta, seed)
        utils.seed_everything(seed)
        policy, tok = load_model(h.path("sft"), h.device)
        ref, _ = load_model(h.path("sft"), h.device)
        train_rows, _ = train_and_heldout_pairs(h)
        steps = total_steps_for(len(train_rows), cfg)
        # TRL gets exactly our batches: our seeded per-epoch order, laid out as one sequential pass
        seq_rows = [train_rows[i] for i in example_order(len(train_rows), cfg, steps)]
        cfg.shuffle = False
        t = utils.Timer()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            hist, _ = train_trl_dpo(policy, ref, tok, seq_rows, cfg, device=h.device, total_steps=steps,
                                    dtype=h.cfg.dtype, output_dir=str(out / "trl_tmp"), disable_tqdm=True)
        train_s = t.elapsed
        shutil.rmtree(out / "trl_tmp", ignore_errors=True)
        policy.save_pretrained(out / "model")
        tok.save_pretrained(out / "model")
        utils.write_jsonl(out / "train_curve.jsonl", hist)
        # compute: TRL's padded layout (the prompt once per response) and a live reference forward every step
        tokens = sum(e.n_tokens_padded_layout for e in tokenize_pairs(tok, seq_rows[: steps * cfg.batch_size],
                                                                      max_length=cfg.max_length,
                                                                      truncation_mode=cfg.truncation_mode)[0])
        n_par = models.n_params(policy)
        return {"arm": arm, "method": "trl_dpo", "loss_type": loss_type, "beta": beta, "seed": seed, "steps": steps,
                "time/train_s": train_s, "params": n_par,
                **compute_record(trained=[(n_par, tokens)], forward=[(n_par, tokens)]),
                "final": {k: v for k, v in hist[-1].items() if "/" in k or k == "loss"} if hist else {}}

    return Stage(f"arm/{arm}", ("sft", "prefs"), lambda c: dpo_key(c, loss_type, beta, seed) | {"peer": "trl"}, run,
                 version=4)


@register
class TRLDPO(ArmFamily):
    name = "trl_dpo"
    methods = (Method("trl_dpo", "TRL DPO", "#56b4e9", "s", "offline_preference", order=40, peer_of="dpo",
                      curves="preference"),)

    def plan(self, c) -> ArmPlan:
        p = ArmPlan()
        if c.dpo is None or not c.dpo.trl_peer:
            return p
        p.add_arm(_make_trl_stage(c.dpo.loss_type, c.dpo.betas[0], c.seeds[0]))
        return p
