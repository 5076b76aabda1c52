#!/usr/bin/env bash
# The fine-tuning sweep on a lent GPU machine, which cannot reach ../shared: the data travel as packs written by
# device_pack.py (.devA, .devB; the Lite0 weights package in .devw), each category runs in its own background process
# (setsid), so that a second call can add categories while the first ones run. From the repository root there:
#
#   benchmarks/gpu_finetune.sh start BUDGET CATEGORY...   # launch one process per category and return
#   benchmarks/gpu_finetune.sh collect SECONDS            # wait for them (at most SECONDS), merge into $OUT
#
# Variables: CONFIGS (the finetune.py configurations, in order), PYTHON (default python3), EXTRA (more arguments).
set -u
DATA=/tmp/anomatune-data
RUNS=/tmp/anomatune-finetune
PYTHON=${PYTHON:-python3}
CONFIGS=${CONFIGS:-backbone backbone_1000_steps backbone_lr1e-4}
mode=$1
shift
case $mode in
start)
    budget=$1
    shift
    mkdir -p "$DATA" "$RUNS"
    for pack in .devA .devB .devC; do
        [ -d "$pack" ] && cp -rsn "$PWD/$pack/." "$DATA/"
    done
    for category in "$@"; do
        # shellcheck disable=SC2086
        ANOMATUNE_DATA=$DATA PYTHONPATH=$PWD/src:$PWD/.devw OMP_NUM_THREADS=2 PYTHONUNBUFFERED=1 \
            setsid nohup "$PYTHON" benchmarks/finetune.py --datasets "$category" --configs $CONFIGS --seeds 0 \
            --models glad padim patchcore --last-models --oracle --budget "$budget" --out "$RUNS" \
            --name "gpu_$category" ${EXTRA:-} >"$RUNS/$category.log" 2>&1 </dev/null &
    done
    ;;
collect)
    end=$((SECONDS + $1))
    while pgrep -f benchmarks/finetune.py >/dev/null && [ $SECONDS -lt "$end" ]; do
        sleep 5
    done
    pkill -f benchmarks/finetune.py
    PYTHONPATH=$PWD/src "$PYTHON" benchmarks/finetune.py --merge "$RUNS"/gpu_*.json --name finetune_gpu
    cp benchmarks/results/finetune_gpu.json "${OUT:-.}/"
    for log in "$RUNS"/*.log; do
        echo "== $log"
        tr '\r' '\n' <"$log" | grep -E '^\{|Error|error|Traceback|done in|kept|no checkpoint' | cut -c1-2000
    done >"${OUT:-.}/finetune_gpu.log"
    ;;
esac
