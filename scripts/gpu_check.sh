#!/usr/bin/env bash
# One prepared run for a machine with a GPU (about 8 minutes on an H100):
#   scripts/gpu_check.sh            # GPU tests, estimate accuracy, boundaries, strategies → $OUT
#   scripts/gpu_check.sh --dry-run  # here, without a GPU: every script imports, the GPU tests collect
# Tables and logs land in $OUT (default ./gpu-out). Wheels in .whl/ (carried to a bare machine)
# are installed first, without the network: scripts/prepare_device_run.sh downloads them here and
# copies the bench workloads into shared/, which travels with the checkout.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-./gpu-out}"
mkdir -p "$OUT"
DRY_RUN=0
[[ "${1:-}" == "--dry-run" ]] && DRY_RUN=1

if [[ -n "${PYTHON:-}" ]]; then
  PY="$PYTHON"
elif [[ $DRY_RUN == 1 && -x .venv/bin/python ]]; then
  PY=.venv/bin/python  # here: the project's venv
else
  PY=python3  # a GPU machine: its own CUDA build of torch (the venv here is CPU-only)
fi
if compgen -G ".whl/*.whl" >/dev/null && [[ $DRY_RUN == 0 ]]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

status=0
step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to $OUT/NAME.log, keep going
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit}s)"
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  [[ $rc != 0 ]] && { echo "== $name failed with exit code $rc"; status=1; }
  return 0
}

if [[ $DRY_RUN == 1 ]]; then
  step dry-pytest 120 "$PY" -m pytest -q -p no:cacheprovider --collect-only tests/gpu
  step dry-probe-strategies 60 "$PY" bench/probe_strategies.py --help
  step dry-synthetic 60 "$PY" bench/probe_strategies.py --synthetic --out "$OUT/probe_strategies_synthetic.md"
  if [[ -f bench/estimate_accuracy.py ]]; then
    step dry-estimate-accuracy 60 "$PY" bench/estimate_accuracy.py --help
  fi
  step dry-probe-cli 60 "$PY" -m tuner.cli probe --help
  exit $status
fi

"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU visible'; \
print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0))" | tee "$OUT/device.txt" || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >>"$OUT/device.txt" 2>/dev/null || true

step pytest-gpu 150 "$PY" -m pytest -q -p no:cacheprovider tests/gpu
# Every measurement below is for an 80 GiB card emulated on this one (the allocator capped at the
# H100's share less its modelled context: probes.cuda.plan_emulation), so that the numbers compare
# with the H100 calibration set in ../shared/calibration/.
CARD="${CARD:-80GiB}"
if [[ -z "${WORKLOAD_DIR:-}" ]]; then
  for dir in ../shared/bench/workloads shared/bench/workloads; do
    [[ -f "$dir/gpt2-124m-seq1024.json" ]] && WORKLOAD_DIR="$dir" && break
  done
fi
if [[ -z "${WORKLOAD_DIR:-}" ]]; then
  # The shared workloads sit beside the checkout here; on a device machine only a shared/ folder
  # inside the checkout travels (scripts/prepare_device_run.sh copies them there).
  echo "== workload steps skipped: no bench workloads found (see the comment above)"; exit 1
fi
GPT2="$WORKLOAD_DIR/gpt2-124m-seq1024.json"
# Real against estimated allocated and reserved bytes, both loop shapes (GPT-2 bf16).
if [[ -f bench/estimate_accuracy.py ]]; then
  step estimate-accuracy 110 "$PY" bench/estimate_accuracy.py --workloads "$GPT2" --batch-sizes 4,16
fi
# The fresh-process boundary the estimate predicts below the calibration process's (46 against
# 51): one fresh process per size, 20 steps each.
step fresh-boundary 90 "$PY" -m tuner.cli probe "$GPT2" --backend cuda --device-memory "$CARD" \
  --verify-steps 20 --json
# Expandable segments on one workload.
step expandable-segments 60 "$PY" -m tuner.cli probe "$GPT2" --backend cuda --device-memory "$CARD" \
  --alloc-conf expandable_segments:True --json
# Every strategy, checkpointing off and on, each answer verified in a fresh process, as many
# workloads as the time budget allows (GPT-2 first).
ORDERED=("$GPT2")
for spec in "$WORKLOAD_DIR"/*.json; do [[ "$spec" != "$GPT2" ]] && ORDERED+=("$spec"); done
step probe-strategies 260 "$PY" bench/probe_strategies.py --verify-steps 20 --time-budget 230 \
  --device-memory "$CARD" --workloads "${ORDERED[@]}" --out "$OUT/probe_strategies.md"
exit $status
