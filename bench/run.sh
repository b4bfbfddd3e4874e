#!/usr/bin/env bash
# The cost benchmarks behind the README's "Benchmarks" tables, side by side, one JSON per benchmark in
# bench/results/ and the Markdown tables in bench/results/cost_<device>.md. Runs unchanged on CPU and CUDA.
#
#   bash bench/run.sh                      # THREADS=2 REPEATS=20 by default
#   THREADS=1 taskset -c 1 bash bench/run.sh   # one core, e.g. while something else runs on the other
#
# On CUDA every grid is the full one (m in {1,5,10} x 5/20 ways x meta-batch 4/32 x 1/15 queries, all three
# methods). On CPU the meta-batch-32 grids are cut to what fits beside other work in a session (about 45 minutes
# on one core): the full grid at meta-batch 32 would take ~3 CPU-hours, mostly MAML at 20 ways, 15 queries, m=10.
# CPU at meta-batch 32: 5-way 1-query m in {1,5} for the method ratios; the implementations below add 20-way and
# 15 queries for sign.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=${OUT:-bench/results}
REPEATS=${REPEATS:-20}
WARMUP=${WARMUP:-3}
THREADS=${THREADS:-2}
DEVICE=$($PY -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")
COMMON="--repeats $REPEATS --warmup $WARMUP --threads $THREADS"
mkdir -p "$OUT"

# 1 + 2. sign/fo and sign/maml, and peak memory against m, at meta-batch 4 (the paper's P) and 32.
$PY -m bench.cost --ways 5,20 --queries 1,15 --inner_steps 1,5,10 --meta_batch 4 $COMMON \
    --out "$OUT/cost_algos_p4_$DEVICE.json"
if [ "$DEVICE" = cuda ]; then
    $PY -m bench.cost --ways 5,20 --queries 1,15 --inner_steps 1,5,10 --meta_batch 32 $COMMON \
        --out "$OUT/cost_algos_p32_$DEVICE.json"
else
    $PY -m bench.cost --ways 5 --queries 1 --inner_steps 1,5 --meta_batch 32 $COMMON \
        --out "$OUT/cost_algos_p32_$DEVICE.json"
fi

# 3 + 4. Our loop (eager, channels-last, torch.compile), vmap over tasks and the clone-loop reference, meta-batch 32.
IMPLEMENTATIONS="--implementations ours,channels_last,compile,vmap,reference --inner_steps 1 --meta_batch 32 --memory False"
if [ "$DEVICE" = cuda ]; then
    $PY -m bench.cost --ways 5,20 --queries 1,15 --algos sign,fo,maml $IMPLEMENTATIONS $COMMON \
        --out "$OUT/cost_implementations_$DEVICE.json"
    IMPLEMENTATION_FILES="$OUT/cost_implementations_$DEVICE.json"
else  # CPU: sign and maml at 5-way 1-query, sign alone where a step takes seconds
    $PY -m bench.cost --ways 5 --queries 1 --algos sign,maml $IMPLEMENTATIONS $COMMON \
        --out "$OUT/cost_implementations_5w1q_$DEVICE.json"
    $PY -m bench.cost --ways 20 --queries 1 --algos sign $IMPLEMENTATIONS $COMMON \
        --out "$OUT/cost_implementations_20w1q_$DEVICE.json"
    $PY -m bench.cost --ways 5 --queries 15 --algos sign $IMPLEMENTATIONS $COMMON \
        --out "$OUT/cost_implementations_5w15q_$DEVICE.json"
    IMPLEMENTATION_FILES="$OUT/cost_implementations_5w1q_$DEVICE.json $OUT/cost_implementations_20w1q_$DEVICE.json $OUT/cost_implementations_5w15q_$DEVICE.json"
fi

# shellcheck disable=SC2086  # IMPLEMENTATION_FILES is a list
$PY -m bench.table "$OUT/cost_algos_p4_$DEVICE.json" "$OUT/cost_algos_p32_$DEVICE.json" $IMPLEMENTATION_FILES \
    --out "$OUT/cost_$DEVICE.md"
