#!/usr/bin/env bash
# The check to run the day a machine with NVIDIA GPUs is lent (project set up: bash
# scripts/setup.sh, which installs the CUDA torch when a GPU is present):
#   bash benchmarks/gpu_check.sh [LOG_DIR]          (default ./gpu_check_logs)
# It prints the environment, then runs, with Ray Train workers over NCCL in bf16:
#   1. ddp       orchestrator train jobs/debug/ddp.yaml
#   2. zero3     orchestrator train jobs/debug/deepspeed_zero3.yaml (ZeRO-3)
#   3. search    orchestrator search jobs/debug/search.yaml
#   4. mfu-ddp, mfu-zero2: 200 steps of jobs/minilm_mr_finetune.yaml (DDP, DeepSpeed ZeRO-2),
#      samples/s and model FLOP utilisation from benchmarks/mfu.py (the figures for
#      benchmarks/BENCHMARKS.md).
# Each step's output is tee'd to LOG_DIR/<step>.log and its runs go to LOG_DIR/runs/<stamp>/,
# so two invocations never resume or collide with each other. The first failing step ends the
# script with its exit code, its name and the end of its log.
#
# Workers: 2 with 1 GPU each when 2 or more GPUs are visible. With one GPU, 1 worker: NCCL
# refuses two ranks on the same GPU ("Duplicate GPU detected"), and the training loop puts
# local rank N on cuda:N, which does not exist when two workers share GPU 0. To try anyway:
#   GPU_CHECK_WORKERS=2 GPU_CHECK_GPUS_PER_WORKER=0.5 bash benchmarks/gpu_check.sh
# Other settings: PEAK_BF16_TFLOPS (one card's dense bf16 peak, default 989: H100 / H200 SXM),
# MFU_BATCH (per-worker batch of the MFU runs, default 64), MFU_STEPS (default 200), PY.
set -euo pipefail

LOG_DIR=${1:-./gpu_check_logs}
mkdir -p "$LOG_DIR"
LOG_DIR=$(cd "$LOG_DIR" && pwd) # absolute: the steps run from the repository root
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
PEAK=${PEAK_BF16_TFLOPS:-989}
MFU_BATCH=${MFU_BATCH:-64}
MFU_STEPS=${MFU_STEPS:-200}
OUT="$LOG_DIR/runs/$(date +%Y%m%d-%H%M%S)"

trap 'echo "gpu_check: FAILED at line $LINENO (exit $?)" >&2' ERR

# step NAME CMD...: run CMD with its output shown and tee'd to LOG_DIR/NAME.log; on failure
# name the step, show the end of its log and exit with its code.
step() {
  local name=$1
  shift
  local log="$LOG_DIR/$name.log"
  echo
  echo "=== gpu_check: $name: $*"
  local rc=0
  "$@" 2>&1 | tee "$log" || rc=$?
  if [ "$rc" -ne 0 ]; then
    trap - ERR
    {
      echo
      echo "gpu_check: step '$name' FAILED (exit $rc): $*"
      echo "gpu_check: last 40 lines of $log:"
      tail -n 40 "$log"
    } >&2
    exit "$rc"
  fi
  echo "=== gpu_check: $name: ok"
}

if [ ! -x "$PY" ]; then
  echo "gpu_check: $PY not found: set up the project first (bash scripts/setup.sh)" >&2
  exit 1
fi
ORCH=("$PY" -m orchestrator)

# One && chain: set -e does not apply inside a function that step runs with ||.
env_report() {
  nvidia-smi &&
    nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv &&
    "$PY" - <<'EOF'
import sys

import deepspeed
import ray
import torch

print("python", sys.version.split()[0])
print("torch", torch.__version__, "| cuda", torch.version.cuda, "| cudnn",
      torch.backends.cudnn.version())
print("cuda available", torch.cuda.is_available(), "| devices", torch.cuda.device_count())
if not torch.cuda.is_available():
    sys.exit("no CUDA device visible to torch (a CPU-only torch build, or no driver)")
nccl = torch.cuda.nccl.version()  # a tuple in recent torch, an int in old ones
print("nccl", ".".join(map(str, nccl)) if isinstance(nccl, tuple) else nccl,
      "| bf16 supported", torch.cuda.is_bf16_supported())
for i in range(torch.cuda.device_count()):
    print(f"cuda:{i}", torch.cuda.get_device_name(i))
print("deepspeed", deepspeed.__version__, "| ray", ray.__version__)
EOF
}
step environment env_report

NGPU=$("$PY" -c "import torch; print(torch.cuda.device_count())")
if [ "$NGPU" -ge 2 ]; then
  WORKERS=${GPU_CHECK_WORKERS:-2}
else
  WORKERS=${GPU_CHECK_WORKERS:-1}
  echo "gpu_check: 1 GPU: $WORKERS worker(s) (NCCL allows one rank per GPU; see the header)"
fi
GPW=${GPU_CHECK_GPUS_PER_WORKER:-1}
# The GPUs the worker group holds: samples/s in the logs is the whole group's.
GPUS_USED=$("$PY" -c "import math; print(max(1, math.ceil($WORKERS * $GPW)))")
echo "gpu_check: $NGPU GPU(s) visible; $WORKERS workers x $GPW GPU; logs and runs in $LOG_DIR"

GPU=(train.num_workers="$WORKERS" resources.gpus_per_worker="$GPW" train.precision=bf16
  output.dir="$OUT")

step ddp "${ORCH[@]}" train jobs/debug/ddp.yaml name=gpu-check-ddp "${GPU[@]}"
step zero3 "${ORCH[@]}" train jobs/debug/deepspeed_zero3.yaml name=gpu-check-zero3 \
  train.strategy=deepspeed train.zero_stage=3 "${GPU[@]}"
step search "${ORCH[@]}" search jobs/debug/search.yaml name=gpu-check-search "${GPU[@]}"

# Throughput and MFU: the real MiniLM, no evaluation or checkpoints inside the timed steps.
MFU_JOB=jobs/minilm_mr_finetune.yaml
MFU_OVERRIDES=(train.batch_size="$MFU_BATCH" train.max_steps="$MFU_STEPS" train.log_every=20
  train.eval_every=0 train.checkpoint_every=0)
PEAK_ALL=$("$PY" -c "print($PEAK * $GPUS_USED)")
for variant in ddp zero2; do
  if [ "$variant" = ddp ]; then strat=(train.strategy=ddp); else
    strat=(train.strategy=deepspeed train.zero_stage=2)
  fi
  name=mfu-$variant
  step "$name" "${ORCH[@]}" train "$MFU_JOB" name="gpu-check-$name" "${strat[@]}" \
    "${MFU_OVERRIDES[@]}" "${GPU[@]}"
  overrides=()
  for o in "${MFU_OVERRIDES[@]}"; do overrides+=(--override "$o"); done
  step "$name-report" "$PY" benchmarks/mfu.py --job "$MFU_JOB" --log "$LOG_DIR/$name.log" \
    --peak-tflops "$PEAK_ALL" --label "$name ($WORKERS workers, $GPUS_USED GPU(s), bf16)" \
    "${overrides[@]}"
done

echo
echo "gpu_check: all steps passed; logs in $LOG_DIR, runs in $OUT"
grep -h "MFU" "$LOG_DIR"/mfu-*-report.log
