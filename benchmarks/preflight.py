"""Checks of a suite's external inputs before any stage runs: each bad input is one ConfigError paragraph naming
the file or key and the fix (``prefbench run`` exits 2), and nothing is written before them.

What is checked (cheaply: headers and sizes, never a model load):
  cache_dir, runs_dir   can be created and written (a read-only filesystem, a folder without permission);
  base.model            a local model folder: config.json readable JSON, weights present and every safetensors file
                        complete (its header's byte ranges fit the file: a truncated copy fails here), tokenizer
                        files readable JSON;
  prefs.source          a local preference file or save_to_disk folder: readable, at least one row, no field longer
                        than MAX_FIELD_CHARS characters.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from pathlib import Path

from benchmarks.errors import ConfigError

MAX_FIELD_CHARS = 100_000
"""A prompt / chosen / rejected longer than this is not a preference pair of any suite (the arms keep at most
``dpo.max_length`` tokens): a sign of a broken export, refused with its row number."""


def check_inputs(cfg) -> None:
    """Raise ConfigError on the first bad external input of suite ``cfg``."""
    for key in ("cache_dir", "runs_dir"):
        check_writable(Path(getattr(cfg, key)), key)
    if cfg.base.model != "tiny":
        check_model_folder(cfg.base.model, "base.model")
    src = cfg.prefs.source
    if src not in ("generate", "dataset") and not src.startswith("hf:"):
        check_preference_file(src, "prefs.source")


def check_writable(path: Path, key: str) -> None:
    """Create ``path`` if missing and write (then remove) one temporary file in it."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".prefbench-write-test-", dir=path)
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise ConfigError(f"config key '{key}': cannot write to {path} ({e.strerror or e}: a read-only filesystem or a "
                          f"folder without write permission?). Give a writable folder, e.g. --set {key}=/tmp/prefbench-"
                          f"{key.split('_')[0]}") from None


def _json_file(p: Path, key: str, what: str) -> None:
    try:
        json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"config key '{key}': {what} {p} is damaged ({type(e).__name__}: {e}). Copy the model folder "
                          f"again (or save_pretrained it again)") from None


def safetensors_problem(p: Path) -> str | None:
    """Why safetensors file ``p`` is not complete, or None: the 8-byte header length, the JSON header and every
    tensor's byte range must fit inside the file (a truncated copy ends before the last tensor)."""
    size = p.stat().st_size
    try:
        with p.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return f"{size} bytes: shorter than the 8-byte header length"
            (n,) = struct.unpack("<Q", head)
            if 8 + n > size:
                return f"the header claims {n:,} bytes but the file has {size:,}"
            header = json.loads(f.read(n))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return f"unreadable header ({type(e).__name__}: {e})"
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        return f"truncated: its tensors need {8 + n + end:,} bytes, the file has {size:,}"
    return None


def check_model_folder(name: str, key: str) -> None:
    """A local model folder (a hub name or 'gguf:' is left to the loader, which names it on failure)."""
    p = Path(name).expanduser()
    if name.startswith("gguf:") or not (p.is_absolute() or name.startswith((".", "~")) or p.exists()):
        return
    if not p.exists():
        raise ConfigError(f"config key '{key}': model folder {p} does not exist; give a save_pretrained folder, a hub "
                          f"name or 'tiny'")
    if not p.is_dir():
        raise ConfigError(f"config key '{key}': {p} is a file; give the model's save_pretrained folder (the one holding "
                          f"config.json)")
    if not (p / "config.json").exists():
        raise ConfigError(f"config key '{key}': {p} has no config.json: it is not a save_pretrained model folder")
    _json_file(p / "config.json", key, "the model config")
    weights = sorted(p.glob("*.safetensors")) + sorted(p.glob("pytorch_model*.bin"))
    if not weights:
        raise ConfigError(f"config key '{key}': {p} holds no weights (no *.safetensors or pytorch_model*.bin); copy the "
                          f"whole model folder")
    for w in weights:
        if w.suffix == ".safetensors" and (why := safetensors_problem(w)):
            raise ConfigError(f"config key '{key}': weights file {w} is damaged ({why}). Copy the model folder again")
    for t in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (p / t).exists():
            _json_file(p / t, key, "tokenizer file")


def check_preference_file(src: str, key: str) -> None:
    from benchmarks.tasks.prefs import PreferenceDataError, load_preference_rows

    try:
        rows = load_preference_rows(src)
    except PreferenceDataError as e:
        raise ConfigError(f"config key '{key}': {e}") from None
    except Exception as e:  # noqa: BLE001 - a folder that is no dataset, a broken parquet: name it, never a traceback
        raise ConfigError(f"config key '{key}': cannot read preference data {src} ({type(e).__name__}: {e})") from None
    if not rows:
        raise ConfigError(f"config key '{key}': {src} has no rows; give a file with prompt/chosen/rejected rows, or "
                          f"prefs.source: generate")
    for i, r in enumerate(rows):
        for field, v in r.items():
            if isinstance(v, str) and len(v) > MAX_FIELD_CHARS:
                raise ConfigError(f"config key '{key}': {src} row {i} field '{field}' has {len(v):,} characters (limit "
                                  f"{MAX_FIELD_CHARS:,}, benchmarks/preflight.py): a broken export? Drop or cut that row")
