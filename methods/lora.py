"""LoRA adapters through ``peft`` (Hu et al. 2021), the same for every trained model of a suite.

One :class:`LoRAConfig` is applied to the SFT model, the DPO policy, the PPO policy and Preferred-FT, and to
the reward/value backbones, so both arms train the same adapters with the same rank. The frozen reference is
never adapted. After training the adapters are merged (``merge_and_unload``), so every saved model is a
plain transformers folder and evaluation does not depend on peft.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

LLAMA_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class LoRAConfig:
    r: int = 16
    """Adapter rank."""
    alpha: float = 32.0
    """Scaling numerator: the update is (alpha / r) * B A."""
    dropout: float = 0.0
    """Dropout on the adapter input (0 keeps training deterministic and the policy's log-probs exact)."""
    target_modules: list[str] = field(default_factory=lambda: list(LLAMA_MODULES))
    """Linear layers that get adapters (names as in the model; Llama's attention and MLP projections)."""

    def validate(self) -> None:
        if not (isinstance(self.r, int) and self.r >= 1):
            raise ValueError(f"lora.r must be an integer >= 1, got {self.r!r}")
        if not self.alpha > 0:
            raise ValueError(f"lora.alpha must be > 0, got {self.alpha!r}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout!r}")
        if not self.target_modules:
            raise ValueError("lora.target_modules must name at least one module, e.g. [q_proj, v_proj]")


def add_adapters(model: torch.nn.Module, cfg: LoRAConfig | None, *, seed: int = 0) -> torch.nn.Module:
    """``model`` with fresh LoRA adapters (only they train; B = 0 so the output is unchanged at start), or
    ``model`` itself when ``cfg`` is None (full fine-tuning). Seeded: the A matrices are random."""
    if cfg is None:
        return model
    from peft import LoraConfig, get_peft_model

    cfg.validate()
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [m for m in cfg.target_modules if m not in present]
    if missing:
        raise ValueError(f"lora.target_modules {missing} are not modules of {type(model).__name__}; "
                         f"linear layers there include {sorted(n for n in present if n.endswith('proj'))[:12]}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return get_peft_model(model, LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                                                target_modules=list(cfg.target_modules), bias="none"))


def merged(model: torch.nn.Module) -> torch.nn.Module:
    """The plain model with its adapters merged into the weights (identity for a model without adapters)."""
    from importlib.util import find_spec

    if find_spec("peft") is None:
        return model
    from peft import PeftModel

    if isinstance(model, PeftModel):
        return model.merge_and_unload()
    return model


def trainable_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    n = sum(p.numel() for p in model.parameters())
    return sum(p.numel() for p in model.parameters() if p.requires_grad), n
