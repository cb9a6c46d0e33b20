#!/usr/bin/env bash
# One prepared call for a session holding a lent GPU (at most ~8 minutes): the detection comparison of #23 at 2
# seeds (det_supervised and soft_teacher from the same MAE encoder, the shipped 6000-step recipes unchanged), the
# four runs side by side on the one GPU, cut CHECK_SECONDS before the deadline; then the device check of #20 in the
# time left (its compile rows last, so a cut keeps the other figures).
#   bash benchmarks/device_session.sh MAE_ENCODER_EXPORT   # BUDGET=465 seconds in all by default
# On a machine that reaches no package registry, wheels carried in .whl/ are installed to /tmp/site and
# Fashion-MNIST carried in .devdata/fashion-mnist is used (SSL_KIT_DATA). Everything lands in $OUT (or
# benchmarks/results/device_check/session/): device_check.json, detection.tar.gz (logs, metrics.csv, result JSONs).
set -uo pipefail
cd "$(dirname "$0")/.."
ENCODER=${1:?usage: bash benchmarks/device_session.sh MAE_ENCODER_EXPORT}
BUDGET=${BUDGET:-465}
CHECK_SECONDS=${CHECK_SECONDS:-170}  # kept for the device check: its eager, 448 px and FSDP rows take ~90 s
OUT=${OUT:-benchmarks/results/device_check/session}
SMOKE=${SMOKE:-0}  # 1: tiny shapes and 2 steps per run, to try the script on a CPU
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
if ! command -v ssl-pretrain >/dev/null || ! python3 -c "import ssl_kit.methods" 2>/dev/null; then
  python3 -m pip install -q --no-deps --no-build-isolation -e . || exit 1
fi
if [ -d .devdata/fashion-mnist ]; then export SSL_KIT_DATA=$PWD/.devdata; fi
left() { echo $((BUDGET - SECONDS)); }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"

runs=runs/device_session
logs=$runs/logs
mkdir -p "$logs"
overrides=()
if [ "$SMOKE" = 1 ]; then
  overrides=(-- --trainer.max_epochs 1 --trainer.limit_train_batches 2 --trainer.limit_val_batches 1 --data.train_scenes 40
             --data.val_scenes 4)
fi
budget_left=$(( $(left) - CHECK_SECONDS ))
for method in det_supervised soft_teacher; do
  for seed in 0 1; do
    # 4 CPU threads each: the four processes share the machine's 16 cores
    OMP_NUM_THREADS=4 timeout "$budget_left" python3 benchmarks/soft_teacher_scenes.py --methods "$method" --inits mae \
      --seeds "$seed" --mae_encoder "$ENCODER" --runs "$runs" --result "device_${method}_s${seed}.json" \
      "${overrides[@]}" >"$logs/${method}_s${seed}.log" 2>&1 &
  done
done
wait
echo "detection runs done at ${SECONDS} s"
pack() {
  cp benchmarks/results/soft_teacher_scenes/device_*_s?.json "$logs/" 2>/dev/null
  tar -czf "$OUT/detection.tar.gz" "$runs"/logs "$runs"/*/metrics.csv 2>/dev/null
}
pack
check_args=(--out "$OUT/device_check.json" --seconds 3)
if [ "$SMOKE" = 1 ]; then check_args+=(--smoke); fi
timeout $(( $(left) - 10 )) python3 benchmarks/device_check.py "${check_args[@]}"
echo "device check done at ${SECONDS} s"

pack
for f in "$logs"/*.log; do echo "== $f"; grep -E "^\{|Error|error" "$f" | tail -3; done
ls -la "$OUT"
