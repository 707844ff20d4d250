#!/usr/bin/env bash
# Every accelerator figure in one command: installs what the run needs, then `python -m benchmarks.accelerator`.
#
#   benchmarks/accelerator.sh [--install-only | --no-install] [ARGS of python -m benchmarks.accelerator]
#   benchmarks/accelerator.sh --quick --json accel.json --markdown accel.md
#
# The virtual environment is $ACCELERATOR_VENV (default .venv in the repository), made with $PYTHON
# (default python3) when missing. It gets `pip install -e '.[bench,test]'`; when nvidia-smi lists a
# GPU also jax[cuda13], JAX's CUDA 13 plugin, which matches the CUDA 13 build of torch that PyPI
# serves by default for Linux x86_64 (the project allows torch<=2.14.1). Nothing extra on a CPU.
# The install is skipped when the same pyproject.toml was installed for the same kind of machine
# before. --install-only stops after it (to spend a first, separate command on the download).
#
# On a machine with no package registry (a cluster node, a container image that already holds jax
# with its GPU plugin, torch and timm), set ACCELERATOR_PYTHON to that interpreter: it is used as
# it is, with no virtual environment and nothing installed, and the report records its versions.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"  # no cd: report paths stay relative to the caller

install=1
case "${1:-}" in
    --install-only) install=only; shift ;;
    --no-install) install=0; shift ;;
esac

venv="${ACCELERATOR_VENV:-$repo/.venv}"
python="${ACCELERATOR_PYTHON:-$venv/bin/python}"
pythonpath="$repo${PYTHONPATH:+:$PYTHONPATH}"  # the check and the run import nfnet_jax and benchmarks from here
if nvidia-smi -L 2>/dev/null | grep -q '^GPU'; then
    kind=gpu
    extras=('jax[cuda13]')
else
    kind=cpu
    extras=()
fi

if [ "$install" != 0 ] && [ -z "${ACCELERATOR_PYTHON:-}" ]; then
    began=$SECONDS
    if [ ! -x "$venv/bin/python" ]; then
        echo "accelerator.sh: making the virtual environment $venv" >&2
        if ! "${PYTHON:-python3}" -m venv "$venv"; then  # e.g. a Debian python without ensurepip
            rm -rf "$venv"
            "${PYTHON:-python3}" -m pip install -q --user virtualenv
            "${PYTHON:-python3}" -m virtualenv -q "$venv"
        fi
    fi
    stamp="$kind $(sha256sum "$repo/pyproject.toml" | cut -d' ' -f1)"
    if [ "$(cat "$venv/.accelerator-installed" 2>/dev/null)" != "$stamp" ]; then
        echo "accelerator.sh: installing .[bench,test] ${extras[*]+${extras[*]}} for the $kind into $venv" >&2
        "$python" -m pip install -q --disable-pip-version-check -e "$repo[bench,test]" ${extras[@]+"${extras[@]}"}
        echo "$stamp" > "$venv/.accelerator-installed"
    fi
    echo "accelerator.sh: environment ready in $((SECONDS - began)) s" >&2
fi

# Every package the run imports must be there, and on a GPU both frameworks must see it: otherwise
# stop now rather than spend device time on an import error or on CPU figures.
KIND="$kind" PYTHONPATH="$pythonpath" "$python" - <<'EOF'
import importlib
import os
import sys

needed = (
    'jax', 'flax', 'optax', 'orbax.checkpoint', 'safetensors', 'torch', 'timm', 'tqdm', 'matplotlib',
    'nfnet_jax', 'benchmarks.vs_timm', 'benchmarks.train_step', 'benchmarks.sharded_inference',
    'benchmarks.accelerator.worker',
)
missing = []
for name in needed:
    try:
        importlib.import_module(name)
    except ImportError as error:
        missing.append(f'{name} ({error})')
if missing:
    sys.exit(f'accelerator.sh: {sys.executable} cannot import {", ".join(missing)}; install them, '
             "or leave ACCELERATOR_PYTHON unset so that the script installs '.[bench,test]' itself")

import flax
import jax
import timm
import torch

print(f'accelerator.sh: {sys.executable}: jax {jax.__version__} on {jax.devices()}, flax {flax.__version__}, '
      f'torch {torch.__version__} (CUDA {torch.version.cuda}, available: {torch.cuda.is_available()}), '
      f'timm {timm.__version__}', file=sys.stderr)
if os.environ['KIND'] == 'gpu' and (jax.default_backend() != 'gpu' or not torch.cuda.is_available()):
    sys.exit('accelerator.sh: nvidia-smi lists a GPU, but JAX or torch does not use it; see the lines above')
EOF

if [ "$install" = only ]; then
    exit 0
fi
PYTHONPATH="$pythonpath" exec "$python" -m benchmarks.accelerator "$@"
