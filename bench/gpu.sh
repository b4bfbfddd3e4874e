#!/usr/bin/env bash
# Every device benchmark in one prepared run, JSON into one folder: the cost grid (task loop vs vmap vs compile,
# against the clone-and-adapt reference), the backbones benchmark, and the 2-process scaling check. Sized to finish
# in under 8 minutes on one GPU: each part has its own time limit (LIMITS below), and a part that runs over is cut,
# recorded in summary.json, and the next part starts.
#
#   bash bench/gpu.sh [OUT]                 # on the GPU machine; OUT defaults to bench/results/gpu
#   bash bench/gpu.sh --cpu-dry-run [OUT]   # the same parts on CPU at tiny sizes (seconds per part): checks the script
#
# The scaling check runs bench/scaling.py (gloo, CPU ranks pinned one per core): DDP's CUDA path needs one GPU per
# rank, which a one-GPU machine does not have; the GPU machine's idle cores give the clean 2-core bound instead.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
DRY=0
if [ "${1:-}" = "--cpu-dry-run" ]; then DRY=1; shift; fi
OUT=${1:-bench/results/gpu}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if [ "$DRY" = 1 ]; then
    export CUDA_VISIBLE_DEVICES=""  # torch sees no GPU: every part runs on CPU
    COST_GRID="--queries 1 --meta_batch 2 --algos sign --implementations nchw,channels_last,vmap,reference --repeats 1 --warmup 0 --threads 1"
    COST_COMPILE=""  # inductor's C++ build takes minutes on a CPU: the dry run skips this part
    BACKBONES="--backbones conv4 --algos sign --inner_steps 1 --queries 1 --size 28 --meta_batch 1 --extras conv4:channels_last --repeats 1 --threads 1"
    SCALING="--cores 0,0 --meta_batch 2 --steps 1 --warmup 1 --queries 1"
    LIMITS=(300 300 300 300)
else
    COST_GRID="--queries 1,15 --meta_batch 4,32 --algos sign,maml --implementations ours,nchw,channels_last,vmap,reference --repeats 10 --warmup 3"
    COST_COMPILE="--queries 1,15 --meta_batch 32 --algos sign --implementations nchw,channels_last,compile,compile_nchw,vmap --repeats 10 --warmup 3"
    BACKBONES="--backbones conv4,resnet12 --algos sign,fo,maml --inner_steps 1,5 --queries 15 --meta_batch 4 --extras conv4:bf16+compile+channels_last,resnet12:bf16+channels_last --repeats 5"
    SCALING="--cores 0,1 --meta_batch 8 --steps 8 --warmup 2 --queries 15"
    LIMITS=(110 140 150 70)  # seconds: 470 in all, under 8 minutes with the interpreter starts
fi

declare -A WALL STATUS
run_part() {  # name limit command...
    local name=$1 limit=$2; shift 2
    local started=$SECONDS
    if timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; then STATUS[$name]=ok; else STATUS[$name]="failed or cut (exit $?)"; fi
    WALL[$name]=$((SECONDS - started))
    echo "$name: ${STATUS[$name]} in ${WALL[$name]} s" >&2
}

# shellcheck disable=SC2086  # the option strings are word lists
run_part cost_grid "${LIMITS[0]}" $PY -m bench.cost --ways 5 $COST_GRID --memory False --out "$OUT/cost_grid.json"
if [ -n "$COST_COMPILE" ]; then
    # shellcheck disable=SC2086
    run_part cost_compile "${LIMITS[1]}" $PY -m bench.cost --ways 5 $COST_COMPILE --memory False --out "$OUT/cost_compile.json"
fi
# shellcheck disable=SC2086
run_part backbones "${LIMITS[2]}" $PY -m bench.backbones $BACKBONES --out "$OUT/backbones.json"
# shellcheck disable=SC2086
run_part scaling "${LIMITS[3]}" $PY bench/scaling.py $SCALING --out "$OUT/scaling.json"

{
    echo "{\"dry_run\": $([ "$DRY" = 1 ] && echo true || echo false), \"parts\": {"
    first=1
    for name in "${!WALL[@]}"; do
        [ $first = 1 ] || echo ","
        first=0
        printf '  "%s": {"status": "%s", "wall_s": %s}' "$name" "${STATUS[$name]}" "${WALL[$name]}"
    done
    echo "}, \"total_s\": $SECONDS}"
} > "$OUT/summary.json"
cat "$OUT/summary.json"
for name in "${!STATUS[@]}"; do [ "${STATUS[$name]}" = ok ] || exit 1; done
