#!/usr/bin/env bash
# The DeepSpeed launcher over a hostfile (ssh to each host; lines "host slots=N"):
#   CONFIG=lemur HOSTFILE=launch/hostfile.example launch/deepspeed.sh --set data.path=/shared/lemur
# It sets RANK/LOCAL_RANK/WORLD_SIZE/MASTER_ADDR the way torchrun does, which is all trainer.train reads.
set -euo pipefail
CONFIG=${CONFIG:-lemur}
HOSTFILE=${HOSTFILE:-launch/hostfile.example}
exec deepspeed --hostfile "$HOSTFILE" --no_local_rank --module trainer.train --config "$CONFIG" "$@"
