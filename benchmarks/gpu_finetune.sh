#!/usr/bin/env bash
# The fine-tuning sweep on a lent GPU machine, which cannot reach ../shared: the data travel as packs written by
# device_pack.py (PACKS, default .devdata; the Lite0 weights package in .devw), each category runs in its own
# background process (setsid), so that a second call can add categories while the first ones run. From the
# repository root there:
#
#   benchmarks/gpu_finetune.sh start BUDGET CATEGORY...   # launch one process per category and return
#   benchmarks/gpu_finetune.sh collect SECONDS            # wait for them (at most SECONDS), merge into $OUT/$NAME.json
#
# Variables: CONFIGS (the finetune.py configurations, in order), SEEDS (default 0; a second start with other SEEDS
# runs them beside the first), MODELS (default glad padim patchcore), NAME (the merged file, default finetune_gpu),
# OMP_NUM_THREADS (per process, default 2), PYTHON (default python3), EXTRA (more arguments).
set -u
DATA=/tmp/anomatune-data
RUNS=/tmp/anomatune-finetune
PYTHON=${PYTHON:-python3}
CONFIGS=${CONFIGS:-backbone backbone_1000_steps backbone_lr1e-4}
SEEDS=${SEEDS:-0}
MODELS=${MODELS:-glad padim patchcore}
NAME=${NAME:-finetune_gpu}
mode=$1
shift
case $mode in
start)
    budget=$1
    shift
    mkdir -p "$DATA" "$RUNS"
    for pack in ${PACKS:-.devdata}; do
        [ -d "$pack" ] && cp -rsn "$PWD/$pack/." "$DATA/"
    done
    for category in "$@"; do
        run="gpu_${category}_${CONFIGS// /_}_seeds_${SEEDS// /_}"
        # shellcheck disable=SC2086
        ANOMATUNE_DATA=$DATA PYTHONPATH=$PWD/src:$PWD/.devw OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} PYTHONUNBUFFERED=1 \
            setsid nohup "$PYTHON" benchmarks/finetune.py --datasets "$category" --configs $CONFIGS --seeds $SEEDS \
            --models $MODELS --last-models --oracle --budget "$budget" --out "$RUNS" \
            --name "$run" ${EXTRA:-} >"$RUNS/$run.log" 2>&1 </dev/null &
    done
    ;;
collect)
    end=$((SECONDS + $1))
    while pgrep -f benchmarks/finetune.py >/dev/null && [ $SECONDS -lt "$end" ]; do
        sleep 5
    done
    pkill -f benchmarks/finetune.py
    PYTHONPATH=$PWD/src "$PYTHON" benchmarks/finetune.py --merge "$RUNS"/gpu_*.json --name "$NAME"
    cp "benchmarks/results/$NAME.json" "${OUT:-.}/"
    for log in "$RUNS"/*.log; do
        echo "== $log"
        # the rows, the fine-tuning's own lines, and a traceback whole
        tr '\r' '\n' <"$log" | awk '/^Traceback/ { t = 1 } t || /^\{|done in|kept|no checkpoint|WARNING/' | cut -c1-2000
    done >"${OUT:-.}/$NAME.log"
    ;;
esac
