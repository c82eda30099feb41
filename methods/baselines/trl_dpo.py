"""The peer arm: TRL 1.16's ``DPOTrainer`` on the same pairs, reference and hyper-parameters as ours.

Only the mapping of our ``DPOConfig`` onto TRL's lives here; TRL does the training. Per-step metrics are
read from ``trainer._metrics["train"]`` in a callback (TRL 1.16 keeps them there; its logging callbacks only see averages).
"""

from __future__ import annotations

import tempfile
import time

from methods.dpo.trainer import DPOConfig

_LOSS = {"sigmoid": "sigmoid", "ipo": "ipo", "hinge": "hinge", "robust": "robust"}


def trl_config(cfg: DPOConfig, *, output_dir: str, device: str, precompute_ref: bool, total_steps: int,
               dtype: str = "float32", **overrides):
    from trl import DPOConfig as TRLDPOConfig

    if cfg.loss_type not in _LOSS:
        raise ValueError(f"the TRL peer supports loss types {sorted(_LOSS)}, not {cfg.loss_type!r}")
    if cfg.loss_type == "sigmoid" and cfg.label_smoothing:
        raise ValueError("TRL 1.16 ignores label_smoothing for sigmoid; use loss_type robust or label_smoothing 0")
    # under `accelerate launch` transformers' Trainer gives consecutive batches to the ranks in turn: per-device
    # batches of batch_size / world_size pairs make one optimiser step cover the same global batch as ours
    from methods.distributed import Dist

    local = cfg.batch_size // Dist().world_size
    Dist().shard(cfg.batch_size, "dpo.batch_size")
    per_device = min(cfg.micro, local)
    if local % per_device:
        raise ValueError(f"dpo.micro_batch_size ({cfg.micro}) must divide the per-process batch ({local})")
    kw = dict(
        output_dir=output_dir, beta=cfg.beta, loss_type=[_LOSS[cfg.loss_type]], label_smoothing=cfg.label_smoothing,
        learning_rate=cfg.lr, weight_decay=cfg.weight_decay,
        optim="adamw_torch" if cfg.optimizer == "adamw" else "rmsprop",
        per_device_train_batch_size=per_device, gradient_accumulation_steps=local // per_device,
        max_steps=total_steps, warmup_steps=cfg.warmup_steps, lr_scheduler_type=cfg.scheduler,
        max_grad_norm=cfg.grad_clip, max_length=cfg.max_length, truncation_mode=cfg.truncation_mode,
        precompute_ref_log_probs=precompute_ref, seed=cfg.seed, data_seed=cfg.seed,
        bf16=dtype == "bfloat16", fp16=dtype == "float16", use_cpu=device == "cpu",
        gradient_checkpointing=False, logging_steps=1, report_to="none", save_strategy="no",
        dataloader_num_workers=0, disable_dropout=True, remove_unused_columns=False,
    )
    if not cfg.shuffle:
        kw["train_sampling_strategy"] = "sequential"
    kw.update(overrides)
    return TRLDPOConfig(**kw)


def train_trl_dpo(policy, ref_model, tokenizer, rows: list[dict], cfg: DPOConfig, *, device: str, total_steps: int,
                  precompute_ref: bool = False, dtype: str = "float32", on_log=None, **overrides) -> tuple[list[dict], object]:
    """Train ``policy`` with TRL's DPOTrainer; returns (per-step history, trainer)."""
    import datasets
    from transformers import TrainerCallback
    from trl import DPOTrainer as TRLDPOTrainer

    ds = datasets.Dataset.from_list([{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]} for r in rows])
    history: list[dict] = []

    class _Capture(TrainerCallback):
        def __init__(self):
            self.t0 = time.perf_counter()

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                rec = {"step": state.global_step, "wall_s": time.perf_counter() - self.t0,
                       **{k: float(v) for k, v in logs.items() if isinstance(v, (int, float))}}
                history.append(rec)
                if on_log:
                    on_log(rec)

    import logging

    # TRL warns once per example that byte-level BPE merges across the prompt/completion boundary; our own
    # tokenisation applies the same rule (methods.data), so the message is noise here
    logging.getLogger("trl").setLevel(logging.ERROR)
    out = overrides.pop("output_dir", None) or tempfile.mkdtemp(prefix="trl-dpo-")
    args = trl_config(cfg, output_dir=out, device=device, precompute_ref=precompute_ref, total_steps=total_steps,
                      dtype=dtype, **overrides)
    trainer = TRLDPOTrainer(model=policy, ref_model=ref_model, args=args, train_dataset=ds, processing_class=tokenizer,
                            callbacks=[_Capture()])
    if args.disable_tqdm:  # transformers then prints every log dict; our callback already records them
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)
    trainer.train()
    return history, trainer
