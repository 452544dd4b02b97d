#!/usr/bin/env bash
# Makes CrypTen 0.4.1's virtual environment for the peer benchmarks: bench/peers/.venv-crypten
# (override with VEIL_CRYPTEN_VENV). It reuses the interpreter's installed torch (the pinned 2.13.0 CPU
# wheel, via --system-site-packages) so nothing pulls a CUDA build. CrypTen is installed with --no-deps:
# its declared requirements (torchvision, tensorboard, pandas, sklearn, future) are not used by what the
# benchmarks call; omegaconf is the one missing runtime dependency (pyyaml, onnx, scipy, numpy come from
# the base environment). torch 2.13 needs one shim, written in torch213_shims.py next to this script.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="${VEIL_CRYPTEN_VENV:-$here/../.venv-crypten}"
python="${PYTHON:-python3}"
if [ ! -x "$venv/bin/python" ]; then
  "$python" -m venv --system-site-packages "$venv"
fi
"$venv/bin/python" -m pip install --quiet --no-deps "crypten==0.4.1"
"$venv/bin/python" -m pip install --quiet "omegaconf>=2.1"
"$venv/bin/python" -c "import torch; assert torch.__version__.startswith('2.13'), torch.__version__"
PYTHONPATH="$here" "$venv/bin/python" -c "import torch213_shims, crypten; crypten.init(); crypten.uninit(); print('crypten', crypten.__version__ if hasattr(crypten, '__version__') else '0.4.1', 'ok in', '$venv')"
