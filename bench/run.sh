#!/usr/bin/env bash
# Every committed benchmark table (docs/benchmarks.md), side by side, one JSON per benchmark in bench/results/ and
# the Markdown tables in bench/results/cost_<device>.md. Runs unchanged on CPU and CUDA. Each JSON records how loaded
# the machine was before and after (load averages, the busy processes, the cores it was pinned to).
#
#   bash bench/run.sh                                      # THREADS=2 REPEATS=20 by default
#   THREADS=1 OMP_NUM_THREADS=1 taskset -c 0 bash bench/run.sh   # one pinned core (the committed CPU tables)
#   PARTS=layout,efficiency bash bench/run.sh              # only some parts: algos, implementations, layout,
#                                                          # efficiency, backbones (default: all)
#
# On CUDA every grid is the full one (m in {1,5,10} x 5/20 ways x meta-batch 4/32 x 1/15 queries, all three
# methods). On CPU the meta-batch-32 grids are cut to what fits beside other work (about 45 minutes
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
PARTS=${PARTS:-algos,implementations,layout,efficiency,backbones}
part() { [[ ",$PARTS," == *",$1,"* ]]; }
mkdir -p "$OUT"

# 1 + 2. sign/fo and sign/maml, and peak memory against m, at meta-batch 4 (the paper's P) and 32.
if part algos; then
$PY -m bench.cost --ways 5,20 --queries 1,15 --inner_steps 1,5,10 --meta_batch 4 $COMMON \
    --out "$OUT/cost_algos_p4_$DEVICE.json"
if [ "$DEVICE" = cuda ]; then
    $PY -m bench.cost --ways 5,20 --queries 1,15 --inner_steps 1,5,10 --meta_batch 32 $COMMON \
        --out "$OUT/cost_algos_p32_$DEVICE.json"
else
    $PY -m bench.cost --ways 5 --queries 1 --inner_steps 1,5 --meta_batch 32 $COMMON \
        --out "$OUT/cost_algos_p32_$DEVICE.json"
fi
fi

# 3 + 4. Our loop (eager, channels-last, torch.compile), vmap over tasks and the clone-loop reference, meta-batch 32.
IMPLEMENTATIONS="--implementations ours,nchw,channels_last,compile,vmap,reference --inner_steps 1 --meta_batch 32 --memory False"
if ! part implementations; then
    IMPLEMENTATION_FILES=""
elif [ "$DEVICE" = cuda ]; then
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

# 5. Layout: NCHW vs channels-last vs compile, 1 and 15 queries, meta-batch 4 and 32 (conv4 28 px, Omniglot), and
#    per backbone (conv4 84 px, ResNet-12 at base width 16) at 1 and 15 queries.
if part layout; then
    $PY -m bench.cost --ways 5 --queries 1,15 --inner_steps 1 --meta_batch 4,32 --algos sign,maml \
        --implementations nchw,channels_last,compile,reference --memory False $COMMON --out "$OUT/layout_$DEVICE.json"
    for Q in 1 15; do
        $PY -m bench.backbones --backbones conv4,resnet12 --algos sign --inner_steps 1 --queries $Q --resnet12_width 16 \
            --extras conv4:channels_last,resnet12:channels_last --repeats "$REPEATS" --threads "$THREADS" \
            --out "$OUT/backbones_layout_q${Q}_$DEVICE.json"
    done
fi

# 6. Kernel efficiency: the meta-step's FLOP/s against a matmul's on the same core.
if part efficiency; then
    $PY -m bench.efficiency --queries 1,15 --meta_batch 4,32 --repeats "$REPEATS" --warmup "$WARMUP" --threads "$THREADS" \
        --out "$OUT/efficiency_$DEVICE.json"
fi

# 7. Backbones x algorithms (time and memory): the quick grid and the 15-query ResNets.
if part backbones; then
    $PY -m bench.backbones --quick --threads "$THREADS" --out "$OUT/backbones_quick_$DEVICE.json"
    $PY -m bench.backbones --backbones resnet12,resnet18,resnet34 --algos sign,fo,maml --inner_steps 1,5 --queries 15 \
        --resnet12_width 16 --extras none --repeats 1 --threads "$THREADS" --out "$OUT/backbones_q15_$DEVICE.json"
fi

if ! part algos || ! part implementations; then exit 0; fi
# shellcheck disable=SC2086  # IMPLEMENTATION_FILES is a list
$PY -m bench.table "$OUT/cost_algos_p4_$DEVICE.json" "$OUT/cost_algos_p32_$DEVICE.json" $IMPLEMENTATION_FILES \
    --out "$OUT/cost_$DEVICE.md"
