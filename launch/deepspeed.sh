#!/usr/bin/env bash
# The DeepSpeed launcher over a hostfile (lines "host slots=N", see launch/hostfile.example):
#   CONFIG=lemur HOSTFILE=launch/hostfile.example launch/deepspeed.sh --set data.path=/shared/lemur --resume auto
# It sets RANK/LOCAL_RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT the way torchrun does, which is all trainer.train reads;
# extra arguments go to the trainer.
#
# ssh or not:
#   - a hostfile that lists only this machine (localhost, 127.0.0.1 or this host's name): no ssh, the launcher
#     starts the local ranks itself (DeepSpeed's --no_ssh, node rank 0, MASTER_ADDR 127.0.0.1).
#   - several hosts: the launcher starts every host's ranks over ssh (pdsh); passwordless ssh from this host to
#     each host must work.
#   - several hosts without ssh: run this script on every host with the same hostfile, NO_SSH=1 and NODE_RANK =
#     the host's line in the hostfile counting from 0; MASTER_ADDR is the first host's address (default: its
#     name in the hostfile), MASTER_PORT a free port on it (default 29500):
#       node-001$ NO_SSH=1 NODE_RANK=0 launch/deepspeed.sh --set data.path=/shared/lemur --resume auto
#       node-002$ NO_SSH=1 NODE_RANK=1 launch/deepspeed.sh --set data.path=/shared/lemur --resume auto
#   NO_SSH=0 forces ssh even for a hostfile of this machine only.
set -euo pipefail
CONFIG=${CONFIG:-lemur}
HOSTFILE=${HOSTFILE:-launch/hostfile.example}
[[ -f $HOSTFILE ]] || {
  echo "deepspeed.sh: no hostfile at $HOSTFILE (set HOSTFILE)" >&2
  exit 2
}

mapfile -t hosts < <(awk '$1 !~ /^#/ && NF { print $1 }' "$HOSTFILE")
((${#hosts[@]})) || {
  echo "deepspeed.sh: $HOSTFILE lists no hosts" >&2
  exit 2
}
local_names=" localhost 127.0.0.1 ::1 $(hostname 2>/dev/null || true) $(hostname -s 2>/dev/null || true) "
local_names+="$(hostname -f 2>/dev/null || true) "
this_host() { # true when every host in the hostfile is this machine
  local name
  for name in "${hosts[@]}"; do
    [[ $local_names == *" $name "* ]] || return 1
  done
}
if [[ -n ${NO_SSH:-} ]]; then no_ssh=$NO_SSH; elif this_host; then no_ssh=1; else no_ssh=0; fi

args=(--hostfile "$HOSTFILE")
if [[ $no_ssh == 1 ]]; then
  if ((${#hosts[@]} > 1)) && [[ -z ${NODE_RANK:-} ]]; then
    echo "deepspeed.sh: NO_SSH=1 with ${#hosts[@]} hosts: set NODE_RANK (this host's line in $HOSTFILE, from 0)" >&2
    exit 2
  fi
  if ((${#hosts[@]} == 1)); then default_addr=127.0.0.1; else default_addr=${hosts[0]}; fi
  args+=(--no_ssh --node_rank "${NODE_RANK:-0}" --master_addr "${MASTER_ADDR:-$default_addr}")
fi
[[ -z ${MASTER_PORT:-} ]] || args+=(--master_port "$MASTER_PORT")
exec deepspeed "${args[@]}" --no_local_rank --module trainer.train --config "$CONFIG" "$@"
