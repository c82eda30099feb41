"""Reward model for the RLHF arm: a scalar head on a causal-LM backbone, trained with the Bradley-Terry loss
on the same preference pairs (and the same token sequences) that DPO sees.

* :class:`ScalarRewardModel`: the causal LM's base model (e.g. ``LlamaModel``) + ``Linear(hidden, 1)`` on the
  hidden state of the last non-pad token (``pooling="last"``, as TRL/N-details) or the masked mean
  (``pooling="mean"``). ``from_causal_lm`` initialises it from pi_ref, the DPO paper's / Ziegler et al.'s setup.
  ``token_values`` applies the head at every position: the per-token value model of PPO ([N-details]).
* :class:`SeqClsRewardModel`: any ``AutoModelForSequenceClassification`` (``num_labels=1``) as the scorer,
  e.g. an all-MiniLM-L6-v2 encoder (its own tokenizer: score texts, not policy token ids).
* :func:`bradley_terry_loss` is a pure function of the two reward vectors; :func:`train_reward_model` is a
  small loop around it; :func:`gold_correlation` compares RM scores with the gold reward for reports.

Sources:
  [BT]        Bradley & Terry 1952; Ouyang et al. 2022 (InstructGPT) Eq. 1: loss = -log sigma(r_c - r_r)
  [TRL-RM]    huggingface/trl ``RewardTrainer.compute_loss`` (1.16): optional ``margin`` inside the sigmoid,
              ``center_rewards_coefficient * mean((r_c + r_r)**2)`` (Eisenstein et al. 2023, arXiv:2312.09244
              Eq. 2)
  [N-details] Huang et al. 2023, "The N Implementation Details of RLHF with PPO" / vwxyzjn/lm-human-preference-
              details ``ScalarModel``: reward head ``Linear(hidden, 1)`` with weight ~ N(0, 1/sqrt(hidden + 1)),
              bias 0, read at the last non-pad token; the PPO critic is initialised from the reward model.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from methods.data import collate, tokenize_prompt_completions, truncate

FORMAT = "prefbench-reward-model"
FORMAT_VERSION = 1
POOLINGS = ("last", "mean")


# --------------------------------------------------------------------------------------------- the loss
def bradley_terry_loss(
    r_chosen: torch.Tensor,
    r_rejected: torch.Tensor,
    margin: torch.Tensor | None = None,
    center_coef: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Bradley-Terry pairwise loss of a scalar reward model ([BT]; [TRL-RM] ``compute_loss``).

    ``r_chosen``, ``r_rejected``: [B] rewards; ``margin``: optional [B] required reward gap.
      loss = mean(-logsigmoid(r_c - r_r - margin)) + center_coef * mean((r_c + r_r)**2)
    Returns ``(loss, stats)``; stats (detached): ``accuracy`` (share r_c > r_r), ``margin`` (mean r_c - r_r),
    ``bt_loss`` (the first term alone).
    """
    if r_chosen.shape != r_rejected.shape or r_chosen.dim() != 1:
        raise ValueError(
            f"r_chosen {list(r_chosen.shape)} and r_rejected {list(r_rejected.shape)} must both be [B]"
        )
    if not (float(center_coef) >= 0.0):
        raise ValueError(f"center_coef must be >= 0, got {center_coef!r}; TRL recommends 0.01 (0 = off)")
    rc, rr = r_chosen.float(), r_rejected.float()
    diff = rc - rr  # [B]
    if margin is not None:
        if margin.shape != diff.shape:
            raise ValueError(f"margin {list(margin.shape)} must be [B]={list(diff.shape)}")
        diff = diff - margin.to(diff)  # [TRL-RM] logsigmoid(rewards_chosen - rewards_rejected - margin)
    bt = -F.logsigmoid(diff).mean()  # [BT] -log sigma(r_c - r_r)
    loss = bt
    if center_coef:
        # [TRL-RM] loss += center_rewards_coefficient * torch.mean((rewards_chosen + rewards_rejected) ** 2)
        loss = loss + float(center_coef) * ((rc + rr) ** 2).mean()
    with torch.no_grad():
        stats = {"accuracy": (rc > rr).float().mean(), "margin": (rc - rr).mean(), "bt_loss": bt.detach()}
    return loss, stats


# --------------------------------------------------------------------------------------------- models
def _last_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """[B] index of the last attended position (works for right and left padding)."""
    T = attention_mask.shape[1]
    return T - 1 - attention_mask.long().fliplr().argmax(dim=1)


class _RewardModelBase(torch.nn.Module):
    """Shared batching/scoring/saving; subclasses implement ``forward(input_ids, attention_mask) -> [B]``."""

    kind = "base"

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @torch.no_grad()
    def score_ids(self, prompt_ids: Sequence[Sequence[int]], completion_ids: Sequence[Sequence[int]], *,
                  pad_id: int, batch_size: int = 64, autocast=None, max_length: int | None = None) -> torch.Tensor:
        """Scores of prompt+completion token sequences (in this model's vocabulary): [N] fp32 on CPU.

        Rows are built with :func:`methods.data.collate` (right padding), exactly like the DPO batches;
        ``max_length`` truncates each row keeping its start (as training did)."""
        if len(prompt_ids) != len(completion_ids):
            raise ValueError(f"{len(prompt_ids)} prompts but {len(completion_ids)} completions")
        was_training = self.training
        self.eval()
        ctx = autocast if autocast is not None else contextlib.nullcontext()
        out = []
        try:
            for i in range(0, len(prompt_ids), batch_size):
                ps, cs = [], []
                for p, c in zip(prompt_ids[i : i + batch_size], completion_ids[i : i + batch_size], strict=True):
                    p, c, _ = truncate(list(p), list(c), max_length)
                    ps.append(p), cs.append(c)
                b = collate(ps, cs, pad_id)
                with ctx:
                    r = self(b["input_ids"].to(self.device), b["attention_mask"].to(self.device))
                out.append(r.float().cpu())
        finally:
            self.train(was_training)
        return torch.cat(out) if out else torch.zeros(0)

    def score(self, prompts, completions, *, tokenizer=None, pad_id: int | None = None, batch_size: int = 64,
              autocast=None, max_length: int | None = None) -> torch.Tensor:
        """Batched, no-grad scores [N] (fp32, CPU) of prompt+completion pairs.

        Texts (``str``) are tokenised with ``tokenizer`` by :func:`methods.data.tokenize_prompt_completions`
        (EOS appended, TRL's prompt cut), i.e. the sequences DPO and RM training see; token-id lists are used
        as they are (``pad_id`` or ``tokenizer`` needed for padding)."""
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
        if len(prompts) == 0:
            return torch.zeros(0)
        if isinstance(prompts[0], str):
            if tokenizer is None:
                raise ValueError("score(texts) needs tokenizer=; pass the reward model's tokenizer")
            p_ids, c_ids = [], []
            for p, c in zip(prompts, completions, strict=True):
                pi, (ci,) = tokenize_prompt_completions(tokenizer, p, [c])
                p_ids.append(pi), c_ids.append(ci)
        else:
            p_ids, c_ids = prompts, completions
        if pad_id is None:
            if tokenizer is None or tokenizer.pad_token_id is None:
                raise ValueError("score(token ids) needs pad_id= (or a tokenizer with a pad token)")
            pad_id = tokenizer.pad_token_id
        return self.score_ids(p_ids, c_ids, pad_id=pad_id, batch_size=batch_size, autocast=autocast,
                              max_length=max_length)

    def _meta(self) -> dict:
        return {"format": FORMAT, "version": FORMAT_VERSION, "kind": self.kind}

    @staticmethod
    def _write_meta(path: Path, meta: dict) -> None:
        (path / "reward_model.json").write_text(json.dumps(meta, indent=2, sort_keys=True))


class ScalarRewardModel(_RewardModelBase):
    """Causal-LM backbone (base model, no LM head) + linear head on the last non-pad token or the mean.

    ``forward(input_ids, attention_mask) -> [B]`` rewards; ``token_values(...) -> [B, T]`` the head at every
    position (the PPO value model when initialised from the RM, [N-details]).
    """

    kind = "scalar"

    def __init__(self, backbone: torch.nn.Module, hidden_size: int, *, pooling: str = "last",
                 head: torch.nn.Linear | None = None, init_seed: int = 0) -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        self.backbone = backbone
        self.pooling = pooling
        self.hidden_size = int(hidden_size)
        if head is None:
            head = torch.nn.Linear(self.hidden_size, 1)
            g = torch.Generator().manual_seed(int(init_seed))
            with torch.no_grad():
                # [N-details] layer_init(nn.Linear(hidden, 1), std=1 / np.sqrt(hidden + 1)), bias 0
                head.weight.copy_(torch.randn(head.weight.shape, generator=g) / math.sqrt(self.hidden_size + 1))
                head.bias.zero_()
            head = head.to(next(backbone.parameters()).device)
        self.head = head

    @classmethod
    def from_causal_lm(cls, path_or_model, *, pooling: str = "last", init_seed: int = 0,
                       dtype: torch.dtype = torch.float32) -> ScalarRewardModel:
        """Reward model whose backbone is a *copy* of a causal LM's base model (pi_ref in the paper's setup):
        a ``save_pretrained`` folder / hub name, or a loaded ``AutoModelForCausalLM`` (never modified)."""
        if isinstance(path_or_model, str | Path):
            from transformers import AutoModelForCausalLM

            lm = AutoModelForCausalLM.from_pretrained(str(path_or_model), dtype=dtype)
            backbone = lm.base_model
        else:
            backbone = copy.deepcopy(path_or_model.base_model)  # [B, T] -> hidden; pi_ref stays untouched
        hidden = getattr(backbone.config, "hidden_size", None)
        if hidden is None:
            raise ValueError(f"cannot find hidden_size in the config of {type(backbone).__name__}")
        return cls(backbone, hidden, pooling=pooling, init_seed=init_seed)

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Last-layer hidden states [B, T, H]; explicit position ids so left padding also works."""
        pos = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=pos, use_cache=False)
        return out.last_hidden_state

    token_pooling: str = "position"
    """How ``token_values`` reads the states: ``position`` (the head on each position's state, as a last-token RM
    is trained) or ``prefix_mean`` (the head on the mean of the states up to each position, as a mean-pooled RM is
    trained: the value at the last token is then exactly the RM's score)."""

    def token_values(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The head applied at every position: [B, T] (fp32), on the states pooled as ``token_pooling`` says."""
        h = self.hidden_states(input_ids, attention_mask)  # [B, T, H]
        if self.token_pooling == "prefix_mean":
            m = attention_mask.to(h.dtype).unsqueeze(-1)  # [B, T, 1]
            h = (h * m).cumsum(1) / m.cumsum(1).clamp_min(1.0)  # mean over the unmasked states up to t
        return self.head(h.to(self.head.weight.dtype)).squeeze(-1).float()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.hidden_states(input_ids, attention_mask)  # [B, T, H]
        if self.pooling == "last":
            idx = _last_index(attention_mask)  # [B]
            pooled = h[torch.arange(h.shape[0], device=h.device), idx]  # [B, H]  [N-details] last non-pad token
        else:
            m = attention_mask.to(h.dtype).unsqueeze(-1)  # [B, T, 1]
            pooled = (h * m).sum(1) / m.sum(1).clamp_min(1.0)  # [B, H] masked mean
        return self.head(pooled.to(self.head.weight.dtype)).squeeze(-1).float()  # [B]

    def save_pretrained(self, path: str | Path, tokenizer=None) -> None:
        """Folder: ``backbone/`` (``save_pretrained``), ``head.pt``, ``reward_model.json`` (+ tokenizer)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.backbone.save_pretrained(path / "backbone")
        torch.save({k: v.detach().cpu() for k, v in self.head.state_dict().items()}, path / "head.pt")
        self._write_meta(path, {**self._meta(), "pooling": self.pooling, "hidden_size": self.hidden_size})
        if tokenizer is not None:
            tokenizer.save_pretrained(path / "tokenizer")

    @classmethod
    def from_pretrained(cls, path: str | Path, *, dtype: torch.dtype = torch.float32) -> ScalarRewardModel:
        from transformers import AutoModel

        path = Path(path)
        meta = _read_meta(path, cls.kind)
        backbone = AutoModel.from_pretrained(str(path / "backbone"), dtype=dtype)
        head = torch.nn.Linear(meta["hidden_size"], 1)
        head.load_state_dict(torch.load(path / "head.pt", weights_only=True))
        return cls(backbone, meta["hidden_size"], pooling=meta["pooling"], head=head.to(dtype))


class SeqClsRewardModel(_RewardModelBase):
    """Any ``AutoModelForSequenceClassification`` with one label as the reward model (its own pooling:
    last non-pad token for decoder models, which needs ``config.pad_token_id``; the pooler for encoders)."""

    kind = "seqcls"

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        if getattr(model.config, "num_labels", 1) != 1:
            raise ValueError(f"sequence-classification reward model needs num_labels=1, got {model.config.num_labels}")
        self.model = model

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, *, pad_token_id: int | None = None,
                        dtype: torch.dtype = torch.float32) -> SeqClsRewardModel:
        from transformers import AutoModelForSequenceClassification

        src = Path(name_or_path)
        if (src / "reward_model.json").exists():
            _read_meta(src, cls.kind)
            src = src / "backbone"
        model = AutoModelForSequenceClassification.from_pretrained(str(src), num_labels=1, dtype=dtype)
        if pad_token_id is not None:
            model.config.pad_token_id = pad_token_id
        return cls(model)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits[:, 0].float()  # [B]

    def save_pretrained(self, path: str | Path, tokenizer=None) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(path / "backbone")
        self._write_meta(path, self._meta())
        if tokenizer is not None:
            tokenizer.save_pretrained(path / "tokenizer")


def _read_meta(path: Path, kind: str | None = None) -> dict:
    f = path / "reward_model.json"
    if not f.exists():
        raise FileNotFoundError(f"{path} is not a saved reward model (no reward_model.json)")
    meta = json.loads(f.read_text())
    if meta.get("format") != FORMAT or meta.get("version") != FORMAT_VERSION:
        raise ValueError(f"{f}: unsupported reward-model format {meta.get('format')!r} v{meta.get('version')!r}")
    if kind is not None and meta.get("kind") != kind:
        raise ValueError(f"{f}: holds a {meta.get('kind')!r} reward model, not {kind!r}; use load_reward_model")
    return meta


def load_reward_model(path: str | Path, *, dtype: torch.dtype = torch.float32) -> _RewardModelBase:
    """Load a folder written by ``save_pretrained`` of either reward-model class."""
    kind = _read_meta(Path(path))["kind"]
    return {"scalar": ScalarRewardModel, "seqcls": SeqClsRewardModel}[kind].from_pretrained(path, dtype=dtype)


def value_model_from_reward_model(rm: ScalarRewardModel, *, mean: float = 0.0, std: float = 1.0) -> ScalarRewardModel:
    """PPO critic initialised from the reward model's backbone and head ([N-details]); an independent copy.

    Started on the returns' scale: with the scores the trainer optimises normalised as ``(r - mean) / std`` (the RM's
    gain and bias under pi_ref, N-details), the head becomes ``(w h + b - mean) / std``, so the critic's first
    predictions are the normalised scores, not the raw ones (a constant offset in V survives GAE's last TD residual
    and biases every position towards or against stopping). Its per-token pooling matches the RM's training:
    a mean-pooled RM's copy reads prefix means (``token_pooling='prefix_mean'``), a last-token RM's each position."""
    if not hasattr(rm, "token_values"):
        raise TypeError(f"{type(rm).__name__} has no per-token head; use a ScalarRewardModel as the value model")
    if not (math.isfinite(mean) and std > 0):
        raise ValueError(f"value_model_from_reward_model: need a finite mean and std > 0, got {mean!r}, {std!r}")
    v = copy.deepcopy(rm)
    v.token_pooling = "prefix_mean" if rm.pooling == "mean" else "position"
    with torch.no_grad():
        v.head.weight.div_(std)
        v.head.bias.sub_(mean).div_(std)
    return v


def make_reward_fn(rm: _RewardModelBase, *, pad_id: int | None = None, batch_size: int = 64, autocast=None,
                   max_length: int | None = None, policy_tokenizer=None,
                   rm_tokenizer=None) -> Callable[[list[list[int]], list[list[int]]], torch.Tensor]:
    """A PPO/best-of-N ``reward_fn(prompt_ids, completion_ids) -> [N]`` backed by ``rm``.

    Same vocabulary (an RM made from pi_ref): token ids are scored as they are, padded with ``pad_id``.
    Another tokenizer (e.g. a MiniLM RM): give ``policy_tokenizer`` and ``rm_tokenizer``; texts are decoded
    without special tokens and re-tokenised as in training."""
    if rm_tokenizer is not None:
        if policy_tokenizer is None:
            raise ValueError("make_reward_fn: rm_tokenizer needs policy_tokenizer to decode the policy's tokens")

        def text_fn(prompt_ids, completion_ids):
            ps = policy_tokenizer.batch_decode(prompt_ids, skip_special_tokens=True)
            cs = policy_tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
            return rm.score(ps, cs, tokenizer=rm_tokenizer, batch_size=batch_size, autocast=autocast,
                            max_length=max_length)

        return text_fn
    if pad_id is None:
        raise ValueError("make_reward_fn: give pad_id (the policy tokenizer's pad token id)")

    def ids_fn(prompt_ids, completion_ids):
        return rm.score_ids(prompt_ids, completion_ids, pad_id=pad_id, batch_size=batch_size, autocast=autocast,
                            max_length=max_length)

    return ids_fn


# --------------------------------------------------------------------------------------------- training
@dataclass
class RewardModelConfig:
    lr: float = 5e-5
    """Peak learning rate (AdamW)."""
    epochs: float = 1.0
    """Passes over the training pairs (fractional allowed); N-details trains the RM for one epoch."""
    batch_size: int = 32
    """Pairs per optimiser step (chosen and rejected share one forward of 2 x batch_size rows)."""
    weight_decay: float = 0.0
    warmup_steps: int = 0
    """Linear warm-up steps, then the ``scheduler``."""
    scheduler: str = "linear"
    """Any transformers scheduler name: linear (N-details: lr decayed linearly to 0), cosine, constant_with_warmup."""
    grad_clip: float = 1.0
    pooling: str = "last"
    """last (hidden state of the last non-pad token, TRL/N-details) | mean (masked mean over the sequence)."""
    center_coef: float = 0.0
    """TRL's center_rewards_coefficient (Eisenstein et al. 2023): pushes rewards to mean 0; 0 = off, TRL suggests 0.01."""
    margin: bool = False
    """Use score_chosen - score_rejected of each row as the margin inside the sigmoid (TRL's ``margin``)."""
    seed: int = 0
    """Shuffling seed (and head initialisation when the model is built by the caller with the same seed)."""
    max_length: int = 512
    """prompt+completion tokens kept per sequence (keep_start truncation, as DPO)."""
    eval_batch_size: int = 64
    log_every: int = 1

    def validate(self) -> None:
        checks = [
            (self.lr > 0 and math.isfinite(self.lr), "lr", "must be > 0"),
            (self.epochs > 0 and math.isfinite(self.epochs), "epochs", "must be > 0"),
            (isinstance(self.batch_size, int) and self.batch_size >= 1, "batch_size", "must be an integer >= 1"),
            (self.weight_decay >= 0, "weight_decay", "must be >= 0"),
            (self.warmup_steps >= 0, "warmup_steps", "must be >= 0"),
            (self.grad_clip > 0, "grad_clip", "must be > 0"),
            (self.pooling in POOLINGS, "pooling", f"must be one of {POOLINGS}"),
            (self.center_coef >= 0 and math.isfinite(self.center_coef), "center_coef", "must be >= 0 (0 = off)"),
            (isinstance(self.margin, bool), "margin", "must be true or false"),
            (self.max_length >= 2, "max_length", "must be >= 2"),
            (self.eval_batch_size >= 1, "eval_batch_size", "must be >= 1"),
            (self.log_every >= 1, "log_every", "must be >= 1"),
        ]
        bad = [f"rm.{key} {msg}, got {getattr(self, key)!r}" for ok, key, msg in checks if not ok]
        if bad:
            raise ValueError("invalid reward-model config: " + "; ".join(bad))


@dataclass
class _Pair:
    prompt: list[int]
    chosen: list[int]
    rejected: list[int]
    margin: float


def _tokenize_rows(tokenizer, rows, cfg: RewardModelConfig, what: str) -> tuple[list[_Pair], int]:
    from methods.data import tokenize_pairs  # the DPO arm's tokenisation: identical sequences

    if not rows:
        raise ValueError(f"empty {what} set: no preference pairs")
    if cfg.margin:
        missing = [i for i, r in enumerate(rows) if "score_chosen" not in r or "score_rejected" not in r]
        if missing:
            raise ValueError(f"rm.margin is on but {what} rows {missing[:5]} lack score_chosen/score_rejected")
    ex, n_cut = tokenize_pairs(tokenizer, rows, max_length=cfg.max_length, truncation_mode="keep_start")
    out = []
    for e, r in zip(ex, rows, strict=True):
        m = float(r["score_chosen"]) - float(r["score_rejected"]) if cfg.margin else 0.0
        out.append(_Pair(e.prompt, e.chosen, e.rejected, m))
    return out, n_cut


def _pair_forward(rm, pairs: list[_Pair], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor, int]:
    """One forward of [2B, T] rows (chosen then rejected) -> (r_chosen [B], r_rejected [B], real tokens)."""
    prompts = [p.prompt for p in pairs] * 2
    comps = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    b = collate(prompts, comps, pad_id)
    attn = b["attention_mask"].to(device)
    r = rm(b["input_ids"].to(device), attn)  # [2B]
    B = len(pairs)
    return r[:B], r[B:], int(attn.sum())


@torch.no_grad()
def evaluate_reward_model(rm, pairs: list[_Pair], *, pad_id: int, batch_size: int, margin: bool, center_coef: float,
                          autocast=None) -> dict[str, float]:
    was = rm.training
    rm.eval()
    ctx = autocast if autocast is not None else contextlib.nullcontext()
    rcs, rrs = [], []
    for i in range(0, len(pairs), batch_size):
        with ctx:
            rc, rr, _ = _pair_forward(rm, pairs[i : i + batch_size], pad_id, rm.device)
        rcs.append(rc.float().cpu()), rrs.append(rr.float().cpu())
    rm.train(was)
    rc, rr = torch.cat(rcs), torch.cat(rrs)
    m = torch.tensor([p.margin for p in pairs]) if margin else None
    loss, st = bradley_terry_loss(rc, rr, m, center_coef)
    allr = torch.cat([rc, rr])
    return {"eval/loss": float(loss), "eval/accuracy": float(st["accuracy"]), "eval/margin": float(st["margin"]),
            "eval/reward_mean": float(allr.mean()), "eval/reward_std": float(allr.std()) if len(allr) > 1 else 0.0,
            "eval/n_pairs": len(pairs)}


def train_reward_model(rm, tokenizer, train_rows: list[dict], eval_rows: list[dict] | None, cfg: RewardModelConfig,
                       device: str | torch.device, autocast=None, on_log: Callable[[dict], None] | None = None,
                       ) -> tuple[list[dict], dict]:
    """Bradley-Terry training of ``rm`` on rows ``{prompt, chosen, rejected[, score_chosen, score_rejected]}``.

    Sequences are tokenised exactly as the DPO arm does (methods.data.tokenize_pairs, keep_start
    truncation to cfg.max_length). Returns ``(history, metrics)``: history has one record per logged step
    (``loss``, ``accuracy``, ``margin``, ``lr``, ``grad_norm``, ``examples_seen``, ``tokens_seen``, ``wall_s``)
    and one ``eval/*`` record per epoch; metrics hold the final held-out ``eval/accuracy``, ``eval/loss``,
    ``eval/margin``, ``eval/reward_mean``, ``eval/reward_std`` (empty eval set: only train metrics).
    """
    from transformers import get_scheduler

    cfg.validate()
    if rm.kind == "scalar" and rm.pooling != cfg.pooling:
        raise ValueError(f"rm.pooling is {cfg.pooling!r} but the model was built with pooling={rm.pooling!r}")
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        raise ValueError("the tokenizer has no pad token; set tokenizer.pad_token")
    train, n_cut = _tokenize_rows(tokenizer, train_rows, cfg, "train")
    held, _ = _tokenize_rows(tokenizer, eval_rows, cfg, "eval") if eval_rows else ([], 0)
    rm.to(device)
    steps_per_epoch = max(1, math.ceil(len(train) / cfg.batch_size))
    total = max(1, int(round(cfg.epochs * steps_per_epoch)))
    params = [p for p in rm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = get_scheduler(cfg.scheduler, opt, num_warmup_steps=cfg.warmup_steps, num_training_steps=total)
    ctx = autocast if autocast is not None else contextlib.nullcontext()
    history: list[dict] = []
    order: list[int] = []
    epoch = 0
    seen = tokens = 0
    t0 = time.perf_counter()
    rm.train()
    for step in range(1, total + 1):
        if len(order) < cfg.batch_size:  # next epoch: a fresh seeded shuffle, last short batch kept
            idx = list(range(len(train)))
            random.Random(cfg.seed * 1000 + epoch).shuffle(idx)
            order += idx
            epoch += 1
        batch_idx, order = order[: cfg.batch_size], order[cfg.batch_size :]
        pairs = [train[i] for i in batch_idx]
        with ctx:
            rc, rr, n_tok = _pair_forward(rm, pairs, pad_id, device)
        margin = torch.tensor([p.margin for p in pairs], device=rc.device) if cfg.margin else None
        loss, st = bradley_terry_loss(rc, rr, margin, cfg.center_coef)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite reward-model loss at step {step}; lower rm.lr or check the pairs")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        sched.step()
        seen += len(pairs)
        tokens += n_tok
        if step % cfg.log_every == 0 or step == total:
            rec = {"step": step, "loss": float(loss.detach()), "accuracy": float(st["accuracy"]), "margin": float(st["margin"]),
                   "lr": sched.get_last_lr()[0], "grad_norm": float(gnorm), "examples_seen": seen,
                   "tokens_seen": tokens, "wall_s": time.perf_counter() - t0}
            history.append(rec)
            if on_log:
                on_log(rec)
        if held and (step % steps_per_epoch == 0 or step == total):
            ev = evaluate_reward_model(rm, held, pad_id=pad_id, batch_size=cfg.eval_batch_size, margin=cfg.margin,
                                       center_coef=cfg.center_coef, autocast=autocast)
            rec = {"step": step, "epoch": step / steps_per_epoch, "examples_seen": seen, **ev}
            history.append(rec)
            if on_log:
                on_log(rec)
    rm.eval()
    metrics: dict = {"train/steps": total, "train/n_pairs": len(train), "train/n_truncated": n_cut,
                     "train/wall_s": time.perf_counter() - t0}
    train_recs = [h for h in history if "loss" in h and "eval/loss" not in h]
    metrics["train/loss"] = train_recs[-1]["loss"]
    if held:
        metrics.update({k: v for k, v in history[-1].items() if k.startswith("eval/")})
    return history, metrics


def config_dict(cfg: RewardModelConfig) -> dict:
    return asdict(cfg)


# --------------------------------------------------------------------------------------------- reports
def _ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks with ties given their average rank (scipy.stats.rankdata 'average')."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    ranks = np.empty(len(x), dtype=np.float64)
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and xs[j + 1] == xs[i]:
            j += 1
        ranks[order[i : j + 1]] = 0.5 * (i + j) + 1.0
        i = j + 1
    return ranks


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    den = math.sqrt(float((a * a).sum()) * float((b * b).sum()))
    return float((a * b).sum() / den) if den > 0 else math.nan


def gold_correlation(rm_scores, gold_scores) -> dict[str, float]:
    """Pearson and Spearman (Pearson of average ranks) correlation of RM scores with gold rewards;
    NaN when either side is constant or has fewer than 2 values."""
    a = np.asarray(rm_scores, dtype=np.float64).ravel()
    b = np.asarray(gold_scores, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"rm_scores ({a.size}) and gold_scores ({b.size}) differ in length")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("gold_correlation: scores contain NaN or inf")
    if a.size < 2:
        return {"pearson": math.nan, "spearman": math.nan}
    return {"pearson": _pearson(a, b), "spearman": _pearson(_ranks(a), _ranks(b))}
