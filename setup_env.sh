#!/usr/bin/env bash
# setup_env.sh - create/refresh the project's virtual environment in .venv (idempotent; fast when up to date).
#
# Usage: bash setup_env.sh
# Environment:
#   VENV            where to create it                          (default: .venv next to this script)
#   PYTHON          interpreter to build it from                (default: python3.11, else python3)
#   TORCH_SPEC      torch requirement, installed first          (default: torch==2.14.1)
#   TORCHVISION_SPEC torchvision requirement, installed with it (default: torchvision==0.29.1)
# torch/torchvision come first and pinned as a pair: the processors need a torchvision built for the same torch.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
TORCH_SPEC=${TORCH_SPEC:-torch==2.14.1}
TORCHVISION_SPEC=${TORCHVISION_SPEC:-torchvision==0.29.1}
stamp="$VENV/.installed"
want="$TORCH_SPEC $TORCHVISION_SPEC $(sha256sum requirements.txt | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
# pip's exit status is kept; only its noise about local index folders is filtered from stderr
pip_install() { "$VENV/bin/python" -m pip install -q "$@" 2> >(grep -v "is ignored" >&2); }
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
pip_install --upgrade pip
echo "[setup_env] installing $TORCH_SPEC $TORCHVISION_SPEC" >&2
pip_install "$TORCH_SPEC" "$TORCHVISION_SPEC"
echo "[setup_env] installing requirements.txt" >&2
pip_install -r requirements.txt
"$VENV/bin/python" -c "import torch, torchvision, transformers, peft" # fail here, not later, if anything is missing
echo "$want" > "$stamp"
