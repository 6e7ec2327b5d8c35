#!/usr/bin/env bash
# One node: torchrun with NGPU processes (GPUs, NCCL) or NPROC CPU processes (gloo) when there is no GPU.
#   CONFIG=lemur NGPU=8 launch/local.sh --set data.path=/data/lemur --resume auto
#   NPROC=2 launch/local.sh                       # CPU, gloo, tiny preset
# Extra arguments go to the trainer (--set a.b=c, --resume auto). A SIGTERM (kill, docker stop) reaches torchrun,
# which passes it to the ranks: they checkpoint and exit; it allows them TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds
# (torchrun 2.12 and later; earlier ones 30 s).
set -euo pipefail
CONFIG=${CONFIG:-tiny}
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-150}
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  NPROC=${NGPU:-$(nvidia-smi -L | wc -l)}
else
  NPROC=${NPROC:-2}
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
fi
exec torchrun --standalone --nnodes 1 --nproc-per-node "$NPROC" -m trainer.train --config "$CONFIG" "$@"
