"""Best-of-N: N samples of pi_ref per prompt reranked by the reward model. A sampling procedure, not a trained
policy: it has an evaluation stage only; its KL is estimated per prompt from the N candidates' rewards, ties
counted (``methods.baselines.best_of_n.best_of_n_kl_estimate``), under the analytic bound log N - (N-1)/N.
Typed column: ``bon_n``."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from benchmarks import utils
from benchmarks.arms.common import compute_record, stage_flops
from benchmarks.arms.registry import ArmFamily, ArmPlan, Method, register
from benchmarks.arms.reward_model import RM_STAGE, rm_stage
from benchmarks.harness import Harness, Stage
from benchmarks.stages import load_model, load_prompts
from benchmarks.tasks import models
from methods.sampling import derive_seed


def _make_bon_eval_stage(n: int, seed: int) -> Stage:
    arm = f"bon-n{n}-s{seed}"

    def run(h: Harness, out: Path) -> dict:
        import pandas as pd

        from benchmarks.tasks.registry import task_gold
        from methods.baselines.best_of_n import best_of_n, best_of_n_kl, best_of_n_kl_estimate
        from methods.rlhf.reward_model import load_reward_model, make_reward_fn

        e = h.cfg.eval
        model, tok = load_model(h.path("sft"), h.device)
        rm = load_reward_model(h.path(RM_STAGE) / "rm").to(h.device).eval()
        reward_fn = make_reward_fn(rm, pad_id=tok.pad_token_id, autocast=h.autocast())
        prompts = load_prompts(h, "eval")
        rows, gen_s, prompt_tok, gen_tok = [], 0.0, 0, 0
        for temp in e.temperatures:
            t = utils.Timer()
            res = best_of_n(model, tok, [p["prompt_ids"] for p in prompts], n, reward_fn, e.max_new_tokens,
                            max(temp, 1e-6) if n > 1 else temp, derive_seed(e.seed + int(temp * 1000), n, seed), autocast=h.autocast(),
                            return_details=True)
            gen_s += t.elapsed
            prompt_tok += n * sum(len(p["prompt_ids"]) for p in prompts)
            gen_tok += sum(len(c) for cand in res.candidates for c in cand)
            texts = tok.batch_decode(res.completions, skip_special_tokens=True)
            gold = task_gold(h.cfg.task, texts, [p["prompt"] for p in prompts])
            # KL per prompt estimated from the n candidates' rewards (ties counted); <= the analytic bound
            kl_est = [best_of_n_kl_estimate(res.scores[i], n) for i in range(len(prompts))]
            for p, text, g, c, k in zip(prompts, texts, gold, res.completions, kl_est, strict=True):
                rows.append({"prompt_id": p["prompt_id"], "prompt": p["prompt"], "temperature": temp, "sample_index": 0,
                             "completion": text, "gold": g, "policy_logp": float("nan"), "ref_logp": float("nan"),
                             "seq_kl": k, "length": len(c), "ended": None})
        df = pd.DataFrame(rows)
        df.insert(0, "arm", arm)
        df.to_parquet(out / "samples.parquet", index=False)
        # compute: the procedure itself is the "arm" (N samples + N reward-model scores per prompt, every temperature)
        n_pol, n_rm = models.n_params(model), models.n_params(rm)
        compute = compute_record(generated=[(n_pol, prompt_tok + gen_tok)], forward=[(n_rm, prompt_tok + gen_tok)],
                                 shared={RM_STAGE: stage_flops(h, RM_STAGE)})
        return {"arm": arm, "method": "best_of_n", "bon_n": n, "seed": seed, "samples": len(df), "generation_s": gen_s,
                "new_tokens": res.tokens_generated * len(e.temperatures), "kl_bound": best_of_n_kl(n),
                "params": n_pol, **compute}

    key = lambda c: {"eval": asdict(c.eval), "n": n, "seed": seed, "target": c.task.target, "gold": c.task.gold, "dtype": c.dtype}  # noqa: E731
    return Stage(f"eval/{arm}", ("sft", "prompts", RM_STAGE), key, run, version=5)


@register
class BestOfN(ArmFamily):
    name = "best_of_n"
    methods = (Method("best_of_n", "Best-of-N", "#cc78bc", "D", "reranking", order=20, kl="estimated"),)

    def plan(self, c) -> ArmPlan:
        p = ArmPlan()
        if c.rlhf is None or not c.rlhf.best_of_n:
            return p
        p.need(rm_stage())
        for seed in c.seeds:  # a seed is a fresh draw of the N candidates per prompt
            for n in c.rlhf.best_of_n:
                p.add_arm(_make_bon_eval_stage(n, seed), evaluated_only=True)
        return p
