"""Bit-identity check of the on-policy trainers across a refactor: short fixed-seed runs of ``PPOTrainer``,
``GroupRLTrainer`` and ``OnlineDPOTrainer`` on the tests' tiny Llama (tests/conftest.py), every history record
(timings dropped), the final weights (policy, value head / value model, moved reference, sampler) and the last
rollout's tensors.

    .venv/bin/python tests/data/onpolicy_bitcheck.py --save /tmp/onpolicy_before.pt     # before the change
    .venv/bin/python tests/data/onpolicy_bitcheck.py --compare /tmp/onpolicy_before.pt  # after: must be equal

``--compare`` runs the same cases again in this process and demands exact equality (``==`` on every logged value,
NaN equal to NaN; ``torch.equal`` on every tensor); it prints one line per case and exits 1 on any difference.
With ``--checkpoints DIR`` the ``--save`` run also writes each case's checkpoint after iteration 2, and the
``--compare`` run resumes each case from it: a checkpoint of the old code resumed by the new one must end exactly
as the old code's uninterrupted run. Changed checkpoint keys are listed (layout, not numbers).
"""

from __future__ import annotations

import argparse
import copy
import math
import shutil
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.dist_check import TEXTS  # noqa: E402 - the tests' prompts and tiny Llama (tests/conftest.py)
from benchmarks.dist_check import tiny_model as tiny  # noqa: E402


def share_reward(target):
    return lambda ps, cs: torch.tensor([sum(t in target for t in c) / max(1, len(c)) for c in cs])


def _state(m) -> dict:
    return {k: v.detach().cpu().clone() for k, v in m.state_dict().items()}


def _tensors(d: dict | None) -> dict:
    if d is None:
        return {}
    out = {}
    for k, v in d.items():
        if torch.is_tensor(v):
            out[k] = v.detach().cpu().clone()
        elif isinstance(v, list):
            out[k] = copy.deepcopy(v)
    return out


def _hist(h):
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in h]


# ------------------------------------------------------------------------------------------------ cases
def ppo_cases(model, tok, prompts, target):
    from methods.rlhf.ppo import PPOConfig, PPOTrainer
    from methods.rlhf.reward_model import ScalarRewardModel, value_model_from_reward_model

    base = dict(init_kl_coef=0.05, rollout_batch_size=8, minibatch_size=4, ppo_epochs=2, lr=1e-2, max_new_tokens=6,
                iterations=3, seed=0)
    cases = {
        # shared value head, adaptive controller with the hold, running norm, whitening, EOS penalty, EMA ref, anneal
        "ppo_shared_adaptive_hold_running": dict(
            value_model="shared", target_kl=0.3, kl_horizon=40.0, kl_hold_while_rising=True, kl_coef_min=0.01,
            kl_coef_max=0.2, reward_norm=True, reward_norm_stats="running", whiten_rewards=True,
            missing_eos_penalty=0.1, ema_ref_decay=0.5, anneal_lr=True, temperature=0.8, forward_batch_size=3),
        # separate value model (copy of an RM), given reward scale, adaptive with the hold, k3 KL in the reward
        "ppo_separate_given_hold": dict(
            value_model="separate", target_kl=0.3, kl_horizon=40.0, kl_hold_while_rising=True, reward_norm=True,
            reward_norm_stats="given", vf_lr=3e-3, kl_estimator="k3"),
        # shared, first-rollout norm, fixed beta, early stop of the epochs
        "ppo_shared_first_klstop": dict(value_model="shared", reward_norm=True, reward_norm_stats="first",
                                        kl_stop=0.02, ppo_epochs=3),
        # separate, first-rollout norm, no whitening of advantages
        "ppo_separate_first": dict(value_model="separate", reward_norm=True, reward_norm_stats="first",
                                   whiten_advantages=False, temperature=1.3),
    }
    def make(kw):
        cfg = PPOConfig(**{**base, **kw})
        vm = None
        if cfg.value_model == "separate":
            torch.manual_seed(1)
            vm = value_model_from_reward_model(ScalarRewardModel.from_causal_lm(model, init_seed=2),
                                               **({"mean": 0.3, "std": 0.2} if cfg.reward_norm_stats == "given" else {}))
        scale = (0.3, 0.2) if cfg.reward_norm_stats == "given" else None
        return PPOTrainer(copy.deepcopy(model), model, share_reward(target), vm, tok, prompts, cfg, "cpu",
                          reward_scale=scale)

    def extract(tr, h):
        w = {"policy": _state(tr.policy)}
        w["value"] = _state(tr.value_head if tr.value_head is not None else tr.value_model)
        if tr.cfg.ema_ref_decay is not None:
            w["ref"] = _state(tr.ref_model)
        return {"history": _hist(h), "weights": w, "rollout": _tensors(tr.last_rollout),
                "kl": float(tr.kl_ctl.value), "state_keys": sorted(tr.state_dict())}

    return {name: (lambda kw=kw: make(kw), extract) for name, kw in cases.items()}


def group_cases(model, tok, prompts, target):
    from methods.rlhf.group_trainer import GroupRLConfig, GroupRLTrainer

    base = dict(beta=0.05, k=4, prompts_per_iteration=4, minibatch_size=8, lr=1e-2, max_new_tokens=6, iterations=3,
                seed=0)
    cases = {
        "rloo": dict(algorithm="rloo", reward_norm=True),
        "rloo_clip_2epochs_given": dict(algorithm="rloo", clip_eps=0.2, epochs=2, reward_norm=True,
                                        temperature=0.8, forward_batch_size=5),
        "grpo_k3": dict(algorithm="grpo", kl_grad="k3"),
        "grpo_k3_ratio": dict(algorithm="grpo", kl_grad="k3_ratio", epochs=2, temperature=0.9),
        "grpo_k3_ratio_unscaled": dict(algorithm="grpo", kl_grad="k3_ratio", scale_rewards=False),
    }
    def make(name, kw):
        cfg = GroupRLConfig(**{**base, **kw})
        scale = (0.3, 0.2) if name.endswith("given") else None
        return GroupRLTrainer(copy.deepcopy(model), model, share_reward(target), tok, prompts, cfg, "cpu",
                              monitor=lambda ps, cs: [float(len(c)) for c in cs], reward_scale=scale)

    def extract(tr, h):
        return {"history": _hist(h), "weights": {"policy": _state(tr.policy)}, "rollout": _tensors(tr.last_rollout),
                "state_keys": sorted(tr.state_dict())}

    return {name: (lambda name=name, kw=kw: make(name, kw), extract) for name, kw in cases.items()}


def odpo_cases(model, tok, prompts, target):
    from methods.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

    base = dict(beta=0.1, k=4, prompts_per_iteration=4, minibatch_size=2, lr=1e-2, max_new_tokens=6, iterations=3,
                seed=0)
    cases = {
        "odpo_s1": dict(sync_interval=1),
        "odpo_sNone_bt_anneal": dict(sync_interval=None, labels="bradley_terry", anneal_lr=True, reward_norm=True),
        "odpo_s2_ipo_2epochs": dict(sync_interval=2, loss_type="ipo", epochs=2, iterations=4, forward_batch_size=6,
                                    temperature=0.9),
    }
    def make(kw):
        cfg = OnlineDPOConfig(**{**base, **kw})
        return OnlineDPOTrainer(copy.deepcopy(model), model, share_reward(target), tok, prompts, cfg, "cpu",
                                monitor=lambda ps, cs: [float(len(c)) for c in cs])

    def extract(tr, h):
        w = {"policy": _state(tr.policy), "sampler": _state(tr.sampler)}
        return {"history": _hist(h), "weights": w, "rollout": _tensors(tr.last_batch),
                "state_keys": sorted(tr.state_dict())}

    return {name: (lambda kw=kw: make(kw), extract) for name, kw in cases.items()}


def cases() -> dict:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model, tok = tiny()
    prompts = [tok(t)["input_ids"] for t in TEXTS]
    target = set(range(10, 10 + len(tok) // 4))
    out = {}
    for fn in (ppo_cases, group_cases, odpo_cases):
        out.update(fn(model, tok, prompts, target))
    return out


def run_all(checkpoints: Path | None = None, resume: bool = False) -> dict:
    """Every case from scratch -> its results. ``checkpoints`` without ``resume``: also write a checkpoint after
    iteration 2 of a second run of each case; with ``resume``: each case resumes from that checkpoint instead."""
    res = {}
    for name, (make, extract) in cases().items():
        ck = None if checkpoints is None else checkpoints / f"{name}.pt"
        tr = make()
        if ck is not None and resume:  # on a copy: train() writes its checkpoint after the last iteration
            with tempfile.TemporaryDirectory() as tmp:
                shutil.copy(ck, Path(tmp) / ck.name)
                h = tr.train(checkpoint_path=Path(tmp) / ck.name)
        else:
            h = tr.train()
            if ck is not None:
                ck.parent.mkdir(parents=True, exist_ok=True)
                ck.unlink(missing_ok=True)
                again = make()
                again.train(checkpoint_path=ck, checkpoint_every=1, stop=lambda t=again: t.iteration >= 2)
        res[name] = extract(tr, h)
    return res


# ------------------------------------------------------------------------------------------------ compare
def _eq(x, y) -> bool:
    if torch.is_tensor(x) or torch.is_tensor(y):
        return torch.is_tensor(x) and torch.is_tensor(y) and x.dtype == y.dtype and torch.equal(x, y)
    if isinstance(x, float) and isinstance(y, float) and math.isnan(x) and math.isnan(y):
        return True
    if isinstance(x, dict) and isinstance(y, dict):
        return x.keys() == y.keys() and all(_eq(x[k], y[k]) for k in x)
    if isinstance(x, list | tuple) and isinstance(y, list | tuple):
        return len(x) == len(y) and all(_eq(a, b) for a, b in zip(x, y, strict=True))
    return type(x) is type(y) and x == y


def diff_case(a: dict, b: dict) -> list[str]:
    errs = []
    ha, hb = a["history"], b["history"]
    if len(ha) != len(hb):
        errs.append(f"{len(ha)} vs {len(hb)} records")
    for i, (ra, rb) in enumerate(zip(ha, hb, strict=False)):
        if ra.keys() != rb.keys():
            errs.append(f"record {i}: keys differ {sorted(ra.keys() ^ rb.keys())}")
        for k in ra.keys() & rb.keys():
            if not _eq(ra[k], rb[k]):
                errs.append(f"record {i} {k}: {ra[k]!r} vs {rb[k]!r}")
    for part in ("weights", "rollout"):
        wa, wb = a[part], b[part]
        if wa.keys() != wb.keys():
            errs.append(f"{part}: keys differ {sorted(wa.keys() ^ wb.keys())}")
        for k in wa.keys() & wb.keys():
            if not _eq(wa[k], wb[k]):
                x, y = wa[k], wb[k]
                if isinstance(x, dict):
                    bad = [n for n in x if n not in y or not torch.equal(x[n], y[n])]
                    d = max((float((x[n].double() - y[n].double()).abs().max()) for n in bad if n in y), default=math.nan)
                    errs.append(f"{part} {k}: {len(bad)} tensors differ (max |diff| {d:.3g})")
                else:
                    errs.append(f"{part} {k} differs")
    if "kl" in a and not _eq(a["kl"], b.get("kl")):
        errs.append(f"kl: {a['kl']!r} vs {b.get('kl')!r}")
    return errs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--save", type=Path)
    g.add_argument("--compare", type=Path)
    ap.add_argument("--checkpoints", type=Path, help="with --save: write a checkpoint after iteration 2 of each case "
                    "there; with --compare: resume each case from it (a checkpoint of the code that --save ran)")
    args = ap.parse_args(argv)
    res = run_all(args.checkpoints, resume=args.compare is not None and args.checkpoints is not None)
    if args.save:
        torch.save(res, args.save)
        print(f"saved {len(res)} cases to {args.save}")
        return 0
    ref = torch.load(args.compare, weights_only=False)
    bad = 0
    for name in sorted(ref.keys() | res.keys()):
        if name not in res or name not in ref:
            print(f"{name}: missing on one side")
            bad += 1
            continue
        errs = diff_case(ref[name], res[name])
        n_rec, n_w = len(ref[name]["history"]), sum(len(v) for v in ref[name]["weights"].values())
        print(f"{name}: {'BIT-IDENTICAL' if not errs else 'DIFFERS'} ({n_rec} records, {n_w} weight tensors, "
              f"{len(ref[name]['rollout'])} rollout entries{', resumed from the saved checkpoint' if args.checkpoints else ''})")
        ka, kb = set(ref[name]["state_keys"]), set(res[name]["state_keys"])
        if ka != kb:  # the checkpoint layout (not a number): reported, not an error
            print(f"    checkpoint keys: removed {sorted(ka - kb)}, added {sorted(kb - ka)}")
        for e in errs[:15]:
            print("   ", e)
        bad += bool(errs)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
