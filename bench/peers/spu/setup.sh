#!/usr/bin/env bash
# Makes SPU's virtual environment for the peer benchmarks: bench/peers/.venv-spu (override with
# VEIL_SPU_VENV). SPU brings its own jax/jaxlib and numpy pins, so this venv does not see the base
# environment's packages. On a platform without an `spu` wheel (it ships manylinux x86_64/aarch64 and
# macOS wheels) pip fails here and the benchmarks print "not measured" with pip's reason.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="${VEIL_SPU_VENV:-$here/../.venv-spu}"
python="${PYTHON:-python3}"
created=0
if [ ! -x "$venv/bin/python" ]; then
  "$python" -m venv "$venv"
  created=1
fi
if ! "$venv/bin/python" -m pip install --quiet "spu==0.9.5"; then
  echo "pip could not install spu==0.9.5 for $("$venv/bin/python" -V) on $(uname -sm)" >&2
  if [ "$created" = 1 ]; then rm -rf "$venv"; fi
  exit 1
fi
"$venv/bin/python" -c "import spu, jax; print('spu', spu.__version__, 'jax', jax.__version__, 'ok in', '$venv')"
