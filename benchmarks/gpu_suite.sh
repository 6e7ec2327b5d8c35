#!/usr/bin/env bash
# The GPU benchmark suite on one host: reader throughput at 16 workers, then trainer throughput (samples/s per GPU,
# MFU) for the small and lemur presets with table-wise and row-wise sharding, ZeRO-2, bf16, on every local GPU.
#   OUT=benchmarks/results benchmarks/gpu_suite.sh            # all of it
#   PARTS="train" STEPS=60 benchmarks/gpu_suite.sh            # trainer only
set -uo pipefail
OUT=${OUT:-benchmarks/results}
PARTS=${PARTS:-"data train"}
STEPS=${STEPS:-100}
NGPU=${NGPU:-$(nvidia-smi -L | wc -l)}
if [[ -f .gpu-bundle/activate.sh ]]; then source .gpu-bundle/activate.sh; fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} TOKENIZERS_PARALLELISM=false NCCL_NVLS_ENABLE=0
nvidia-smi -L
if [[ $PARTS == *data* ]]; then
  python3 benchmarks/data_loader.py --workers 0 4 8 16 --seconds 6 --out "$OUT" || echo "data_loader failed"
fi
if [[ $PARTS == *train* ]]; then
  gpu=(--set distributed.zero_stage=2 --set 'training.dtype="bfloat16"' --out "$OUT")
  for sharding in table_wise row_wise; do
    python3 benchmarks/train_throughput.py --preset small --nproc "$NGPU" --steps "$STEPS" --samples 100000 \
      --label "$sharding" --set "embeddings.sharding_types=[\"$sharding\"]" "${gpu[@]}" || echo "small $sharding failed"
  done
  python3 benchmarks/train_throughput.py --preset lemur --nproc "$NGPU" --steps "$((STEPS / 2))" --samples 60000 \
    --label row_wise --set 'embeddings.sharding_types=["row_wise"]' "${gpu[@]}" || echo "lemur failed"
fi
