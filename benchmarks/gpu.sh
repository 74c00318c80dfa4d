#!/usr/bin/env bash
# W1 on one GPU at 100, 1,000 and 10,000 hospitals: the engine at several chunk widths, the
# Python loop of clients, centralised training, example-level DP-SGD (exact Poisson and a
# truncated gather of 24) and client-level DP. Writes JSON + PNG + log to ${OUT:-/tmp/gpu}.
#   OUT=/tmp/gpu bash benchmarks/gpu.sh
set -uo pipefail
out=${OUT:-/tmp/gpu}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
bench() { local t=$1; shift; timeout $t python3 -m benchmarks.round_throughput --conv=xla --reps=3 --plot=false "$@" 2>&1 | tee -a "$out/log.txt"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/log.txt"
bench 170 --hospitals=100 --chunks=1,10,100 --dp_clipping=vmap --central_batch=1600,64 \
  --rows='engine/*,loop/*,central/*,dp_example_vmap/*,dp_client/*' --out="$out/gpu_w1_100.json"
bench 80 --hospitals=100 --dp_clipping=vmap,ghost --dp_max_batch_size=24 \
  --rows='dp_example_*/engine' --out="$out/gpu_w1_100_dp24.json"
bench 140 --hospitals=1000 --chunks=100,1000 --dp_clipping=vmap --central_batch=16000,1600 \
  --rows='engine/*,central/*,dp_example_vmap/engine,dp_client/engine' --out="$out/gpu_w1_1000.json"
bench 140 --hospitals=10000 --chunks=1000,10000 --dp_clipping=vmap --central_batch=16000 \
  --rows='engine/*/c1000/*,central/*,dp_example_vmap/engine,dp_client/engine' \
  --out="$out/gpu_w1_10000.json"
