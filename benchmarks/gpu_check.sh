#!/usr/bin/env bash
# GPU check: DeepSpeed ZeRO-2 and ZeRO-3 in bf16 over NCCL on 1 GPU, for the debug job and the
# real MiniLM job; prints samples/s and model FLOP utilisation (MFU) against the card's bf16
# peak. Run once on a machine with an NVIDIA GPU and the project set up (bash scripts/setup.sh):
#   bash benchmarks/gpu_check.sh [PEAK_BF16_TFLOPS]     (default 989: H100/H200 SXM dense bf16)
# The figures it prints go into benchmarks/BENCHMARKS.md. Without a GPU it exits 1 and prints why.
set -euo pipefail
cd "$(dirname "$0")/.."
PEAK=${1:-989}
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
if ! "$PY" -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: no CUDA device visible to torch; nothing measured" >&2
  exit 1
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$PY" -c "import torch, deepspeed, ray; print('torch', torch.__version__, 'deepspeed', deepspeed.__version__, 'ray', ray.__version__, 'nccl', torch.cuda.nccl.version())"
OUT=$(mktemp -d)
for job in jobs/debug/deepspeed_zero3.yaml jobs/minilm_mr_finetune.yaml; do
  for stage in 2 3; do
    name=gpu-check-$(basename "$job" .yaml)-z$stage
    "$PY" -m orchestrator train "$job" name="$name" output.dir="$OUT" \
      train.strategy=deepspeed train.zero_stage=$stage train.precision=bf16 \
      train.num_workers=1 resources.gpus_per_worker=1 resources.cpus_per_worker=4 \
      train.max_steps=200 train.log_every=20 train.eval_every=0 train.checkpoint_every=0 \
      2>&1 | tee "$OUT/$name.log" | grep -E "^\[orchestrator\]|samples/s|final metrics|accuracy" || true
    "$PY" benchmarks/mfu.py --job "$job" --log "$OUT/$name.log" --peak-tflops "$PEAK" --label "$name"
  done
done
