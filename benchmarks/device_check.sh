#!/usr/bin/env bash
# The prepared accelerator check (issue #20), for a session that holds a lent GPU: one command, ~5-8 minutes.
#   bash benchmarks/device_check.sh            # writes $OUT/device_check.json (or benchmarks/results/device_check/)
# Installs ssl_kit first when it is missing: the README's set-up command, or, on a machine that reaches no
# package registry but has torch / timm / Lightning, the package alone without its dependencies.
set -uo pipefail
cd "$(dirname "$0")/.."
if ! python3 -c "import ssl_kit.methods" 2>/dev/null; then
  bash scripts/setup.sh || python3 -m pip install -q --no-deps --no-build-isolation -e . || exit 1
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
timeout 480 python3 benchmarks/device_check.py "$@"
