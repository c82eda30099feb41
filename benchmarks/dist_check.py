"""Multi-process equality check: short DPO, PPO, RLOO, GRPO and online-DPO runs on a tiny Llama, written so that a
run under ``accelerate launch`` can be compared with the same run in one process.

    python -m benchmarks.dist_check --out results/dist/single
    accelerate launch --config_file benchmarks/configs/accelerate/cpu2.yaml -m benchmarks.dist_check --out results/dist/cpu2
    python -m benchmarks.dist_check --compare results/dist/single results/dist/cpu2

(``ddp.yaml`` on GPUs works the same way: then also run the single-process reference with ``--device cuda``.)
Rank 0 writes ``<out>/result.pt``: the per-step DPO logs and the per-iteration logs of the on-policy runs (timings
dropped), the final weights of every policy (and of the PPO value head, the online-DPO sampler), and the world size. Everything is built in-process
from fixed seeds (tokenizer, model, pairs, prompts), so every process and every run starts from the same
state. ``tests/test_distributed.py`` runs this with 2 CPU processes (gloo) and compares.
"""

from __future__ import annotations

import argparse
import copy
import math
import random
import sys
from pathlib import Path

import torch

WORDS = "good bad fine cat dog sun sea tree lovely awful".split()
TEXTS = ["The cat", "The dog is", "A", "The sea", "The sun is a", "tree", "good", "The"]


def tiny_model():
    """The tests' tiny Llama (tests/conftest.py): BPE tokenizer trained on fixed text, random weights, seed 0."""
    from benchmarks.tasks.models import build_tiny_llama, train_tokenizer

    docs = [f"The {w} is a {a} thing to see today." for w in ("cat", "dog", "sun", "sea", "tree")
            for a in ("good", "bad", "fine")] * 20
    tok = train_tokenizer(docs, vocab_size=300)
    model = build_tiny_llama(tok, n_layers=2, hidden_size=32, n_heads=4, intermediate_size=64,
                             max_position_embeddings=64, seed=0).eval()
    return model, tok


def pair_rows(n: int = 48, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt": "The " + rng.choice(WORDS),
             "chosen": " is " + " ".join(rng.choices(WORDS, k=rng.randint(1, 5))),
             "rejected": " was " + " ".join(rng.choices(WORDS, k=rng.randint(1, 6)))} for _ in range(n)]


def _logs(history: list[dict]) -> list[dict]:
    drop = ("time/", "wall_s", "tokens_per_s")
    return [{k: v for k, v in r.items() if not k.startswith(drop)} for r in history]


def run_dpo(model, tok, device, accelerator) -> dict:
    from methods.dpo.trainer import DPOConfig, DPOTrainer, compute_reference_logps, tokenize_pairs

    cfg = DPOConfig(beta=0.1, lr=1e-3, batch_size=8, micro_batch_size=2, max_steps=4, max_length=32, pack_len=64,
                    scheduler="linear", warmup_steps=1, seed=3)
    ex, _ = tokenize_pairs(tok, pair_rows(), max_length=cfg.max_length, truncation_mode=cfg.truncation_mode)
    ref = compute_reference_logps(model.to(device), ex, pad_id=tok.pad_token_id, layout=cfg.layout)
    policy = copy.deepcopy(model)
    tr = DPOTrainer(policy, ex, ref, cfg, pad_id=tok.pad_token_id, accelerator=accelerator)
    hist = tr.train()
    return {"history": _logs(hist), "weights": {k: v.detach().cpu().clone() for k, v in tr.model_state_dict().items()}}


def _reward_and_prompts(tok):
    prompts = [tok(t)["input_ids"] for t in TEXTS]
    target = set(range(10, 10 + len(tok) // 4))

    def reward_fn(ps, cs):  # share of completion tokens in a fixed quarter of the vocabulary (per row)
        return torch.tensor([sum(t in target for t in c) / len(c) for c in cs])

    return reward_fn, prompts


def run_ppo(model, tok, device, accelerator) -> dict:
    from methods.rlhf.ppo import PPOConfig, PPOTrainer

    reward_fn, prompts = _reward_and_prompts(tok)
    # every statistic that needs the whole rollout batch is switched on: running reward normalisation, reward
    # and advantage whitening, an adaptive KL controller that moves fast, explained variance
    cfg = PPOConfig(init_kl_coef=0.05, target_kl=0.5, kl_horizon=64, rollout_batch_size=16, minibatch_size=8,
                    ppo_epochs=2, lr=1e-2, max_new_tokens=6, iterations=3, value_model="shared", reward_norm=True,
                    reward_norm_stats="running", whiten_rewards=True, missing_eos_penalty=0.1, seed=0)
    policy = copy.deepcopy(model)
    tr = PPOTrainer(policy, model, reward_fn, None, tok, prompts, cfg, device, accelerator=accelerator)
    hist = tr.train()
    weights = {k: v.detach().cpu().clone() for k, v in tr.policy.state_dict().items()}
    weights.update({f"value_head.{k}": v.detach().cpu().clone() for k, v in tr.value_head.state_dict().items()})
    return {"history": _logs(hist), "weights": weights}


def run_group(model, tok, device, accelerator, algorithm: str) -> dict:
    """RLOO (a mean over sequences: ranks weigh their sequences) / GRPO (a token mean: ranks weigh their tokens)."""
    from methods.rlhf.group_trainer import GroupRLConfig, GroupRLTrainer

    reward_fn, prompts = _reward_and_prompts(tok)
    kw = dict(clip_eps=0.2) if algorithm == "rloo" else dict(kl_grad="k3_ratio")
    cfg = GroupRLConfig(algorithm=algorithm, beta=0.05, k=4, prompts_per_iteration=4, minibatch_size=8, epochs=2,
                        lr=1e-2, max_new_tokens=6, iterations=3, reward_norm=True, seed=0, **kw)
    tr = GroupRLTrainer(copy.deepcopy(model), model, reward_fn, tok, prompts, cfg, device, accelerator=accelerator,
                        monitor=lambda ps, cs: [float(len(c)) for c in cs])
    hist = tr.train()
    return {"history": _logs(hist), "weights": {k: v.detach().cpu().clone() for k, v in tr.policy.state_dict().items()}}


def run_online_dpo(model, tok, device, accelerator) -> dict:
    """Online DPO, sampler synced every 2 iterations (iteration 2 samples from a lagging copy: its own forward),
    Bradley-Terry labels, minibatches of 3 pairs: split 2 / 1 over two ranks, and a last one of 1 pair that leaves
    one rank without any (it still joins the collectives)."""
    from methods.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

    reward_fn, prompts = _reward_and_prompts(tok)
    cfg = OnlineDPOConfig(beta=0.1, k=4, prompts_per_iteration=4, minibatch_size=3, epochs=2, lr=1e-2,
                          max_new_tokens=6, iterations=3, sync_interval=2, labels="bradley_terry", anneal_lr=True,
                          reward_norm=True, seed=0)
    tr = OnlineDPOTrainer(copy.deepcopy(model), model, reward_fn, tok, prompts, cfg, device, accelerator=accelerator,
                          monitor=lambda ps, cs: [float(len(c)) for c in cs])
    hist = tr.train()
    weights = {k: v.detach().cpu().clone() for k, v in tr.policy.state_dict().items()}
    weights.update({f"sampler.{k}": v.detach().cpu().clone() for k, v in tr.sampler.state_dict().items()})
    return {"history": _logs(hist), "weights": weights}


def run_harness(root: Path, acc) -> list[dict]:
    """Two toy stages through the harness (the second reads the first's folder), run twice (the second time
    from the cache): what every rank saw, gathered in rank order."""
    from benchmarks.config import load_suite
    from benchmarks.harness import Harness, Stage
    from methods.distributed import Dist

    dist = Dist.from_accelerator(acc)

    def first(h, out: Path) -> dict:
        (out / "who.txt").write_text(str(h.dist.rank))  # only rank 0's folder is committed
        return {"written_by": h.dist.rank}

    def second(h, out: Path) -> dict:
        return {"read": (h.path("first") / "who.txt").read_text()}

    stages = {"first": Stage("first", (), lambda c: {}, first), "second": Stage("second", ("first",), lambda c: {}, second)}
    cfg = load_suite("smoke", ["cache_dir=cache", "runs_dir=runs", "device=cpu"])
    seen = []
    for _ in range(2):
        h = Harness(cfg, dict(stages), root=root, log=lambda *a: None)
        res = h.run(["first", "second"])
        seen.append({n: {"summary": r.summary, "cached": r.cached} for n, r in res.items()})
    leftovers = sorted(p.name for p in (root / "cache").rglob(".*") if "scratch" in p.name or ".tmp-" in p.name)
    return dist.gather_objects([{"rank": dist.rank, "runs": seen, "leftovers": leftovers}])


def run(out: Path, device: str) -> None:
    from benchmarks.harness import launched_accelerator
    from methods.distributed import Dist

    torch.set_num_threads(1)
    acc = launched_accelerator()  # an Accelerator only under accelerate launch (WORLD_SIZE > 1)
    dist = Dist.from_accelerator(acc)
    if acc is not None:
        device = str(acc.device)
    torch.manual_seed(0)
    model, tok = tiny_model()
    res = {"world_size": dist.world_size, "dpo": run_dpo(model, tok, device, acc),
           "ppo": run_ppo(model, tok, device, acc), "rloo": run_group(model, tok, device, acc, "rloo"),
           "grpo": run_group(model, tok, device, acc, "grpo"), "odpo": run_online_dpo(model, tok, device, acc),
           "harness": run_harness(out / "harness", acc)}
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        torch.save(res, out / "result.pt")
        print(f"dist_check: {dist.world_size} process(es), wrote {out / 'result.pt'}")
    dist.barrier()


PARTS = ("dpo", "ppo", "rloo", "grpo", "odpo")
"""The training runs of a result (each: per-step / per-iteration logs and final weights)."""


def compare(a: dict, b: dict, *, rtol: float = 1e-5, atol: float = 1e-6, w_rtol: float = 1e-4,
            w_atol: float = 1e-5, clipfrac_atol: float = 0.02) -> tuple[list[str], dict[str, float]]:
    """Differences of two ``result.pt`` contents beyond the tolerances (|x - y| > atol + rtol * |y|; counts
    and flags exactly; ``*clipfrac`` shares within ``clipfrac_atol``), and the largest observed relative /
    absolute differences of logs and weights."""
    errors: list[str] = []
    worst = {"log_abs": 0.0, "log_rel": 0.0, "weight_abs": 0.0, "weight_rel": 0.0}
    for part in PARTS:
        ha, hb = a[part]["history"], b[part]["history"]
        if len(ha) != len(hb):
            errors.append(f"{part}: {len(ha)} vs {len(hb)} log records")
        for i, (ra, rb) in enumerate(zip(ha, hb, strict=False)):
            if ra.keys() != rb.keys():
                errors.append(f"{part}[{i}]: keys differ: {sorted(ra.keys() ^ rb.keys())}")
            for k in ra.keys() & rb.keys():
                x, y = ra[k], rb[k]
                if x is None or y is None or isinstance(x, bool) or isinstance(x, int) and isinstance(y, int):
                    if x != y:
                        errors.append(f"{part}[{i}] {k}: {x} vs {y}")
                    continue
                x, y = float(x), float(y)
                if math.isnan(x) and math.isnan(y):
                    continue
                d = abs(x - y)
                if k.endswith("clipfrac"):
                    # shares of tokens decided by comparing near-equal floats: with V inside the clip range
                    # (V_clip - R)^2 and (V - R)^2 differ by rounding only, so a token may flip either way
                    worst["clipfrac_abs"] = max(worst.get("clipfrac_abs", 0.0), d)
                    if d > clipfrac_atol:
                        errors.append(f"{part}[{i}] {k}: {x!r} vs {y!r} (|diff| {d:.3g} > {clipfrac_atol})")
                    continue
                worst["log_abs"] = max(worst["log_abs"], d)
                worst["log_rel"] = max(worst["log_rel"], d / max(abs(y), 1e-12))
                if not d <= atol + rtol * abs(y):
                    errors.append(f"{part}[{i}] {k}: {x!r} vs {y!r} (|diff| {d:.3g})")
        wa, wb = a[part]["weights"], b[part]["weights"]
        if wa.keys() != wb.keys():
            errors.append(f"{part}: weight names differ: {sorted(wa.keys() ^ wb.keys())[:5]}")
        for k in wa.keys() & wb.keys():
            x, y = wa[k].double(), wb[k].double()
            d = (x - y).abs()
            worst["weight_abs"] = max(worst["weight_abs"], float(d.max()))
            worst["weight_rel"] = max(worst["weight_rel"], float((d / y.abs().clamp_min(1e-3)).max()))
            if not bool((d <= w_atol + w_rtol * y.abs()).all()):
                errors.append(f"{part} weight {k}: max |diff| {float(d.max()):.3g}")
        start = tiny_model()[0].state_dict()
        if all(torch.equal(start[k], wa[k]) for k in start if k in wa):
            errors.append(f"{part}: the weights did not change (nothing was trained)")
    return errors, worst


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, help="folder for result.pt (written by rank 0)")
    ap.add_argument("--device", default="cpu", help="device of a single-process run (a launch uses its own)")
    ap.add_argument("--compare", nargs=2, type=Path, metavar=("SINGLE", "MULTI"),
                    help="compare two --out folders and exit non-zero if they differ")
    args = ap.parse_args(argv)
    if args.compare:
        a, b = (torch.load(p / "result.pt", weights_only=False) for p in args.compare)
        errors, worst = compare(b, a)
        print(f"world sizes {a['world_size']} vs {b['world_size']}; max differences: "
              + ", ".join(f"{k} {v:.3g}" for k, v in worst.items()))
        print("\n".join(errors) if errors else "equal within tolerance")
        return 1 if errors else 0
    if args.out is None:
        ap.error("--out is required (or --compare)")
    run(args.out, args.device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
