#!/usr/bin/env bash
# Wall time of `anomatune fit --detector auto` (search + final fit) beside `anomatune fit --detector padim`, on each
# development category, one after the other: run it on an idle machine. Writes benchmarks/results/fit_auto_time.md.
#   bash benchmarks/fit_auto_time.sh                      # the six
#   bash benchmarks/fit_auto_time.sh mvtec:transistor     # root:category pairs
#   AUTO_ARGS="--search-detectors padim,glad,patchcore" bash benchmarks/fit_auto_time.sh   # more options of the auto fit
#   IMAGE_SIZE=256x256 bash benchmarks/fit_auto_time.sh   # squashed (default: 256, the short side, as fit runs)
set -euo pipefail
cd "$(dirname "$0")/.."
D=${ANOMATUNE_DATA:-../shared/data}
OUT=$(mktemp -d)
RESULT=benchmarks/results/fit_auto_time.md
SPECS=("$@")
[ ${#SPECS[@]} -gt 0 ] || SPECS=(mvtec:transistor mtd:magnetic_tile more:kolektorsdd1 more:bsdata_pitting more:loco_juice_bottle_logical more:elpv_mono)
AUTO_ARGS=${AUTO_ARGS:-}
IMAGE_SIZE=${IMAGE_SIZE:-256}
seconds() {  # seconds of one fit; its log in $OUT
  local start extra=()
  [ "$3" = auto ] && read -ra extra <<< "$AUTO_ARGS"
  start=$(date +%s.%N)
  .venv/bin/anomatune fit --data "$D/$1" --category "$2" --image-size "$IMAGE_SIZE" --detector "$3" \
    --validation-photos "$D/natural/imagen" "${extra[@]}" --out "$OUT/$2-$3" > "$OUT/$2-$3.log" 2>&1
  printf '%.0f' "$(echo "$(date +%s.%N) - $start" | bc)"
}
{
  echo "# Time of fit --detector auto (search + final fit) beside fit --detector padim, per category"
  echo
  echo "Command: \`${AUTO_ARGS:+AUTO_ARGS=\"$AUTO_ARGS\" }IMAGE_SIZE=$IMAGE_SIZE bash benchmarks/fit_auto_time.sh\` (each: \`anomatune fit --data ROOT --category C --image-size $IMAGE_SIZE --detector auto|padim --validation-photos \$D/natural/imagen\`; $(nproc)-core CPU, idle, $(date -u +%Y-%m-%d))."
  echo
  echo "| category | auto s | padim s | ratio | auto's pick | search s |"
  echo "|---|---|---|---|---|---|"
} > "$RESULT"
for spec in "${SPECS[@]}"; do
  root=${spec%%:*} category=${spec##*:}
  auto=$(seconds "$root" "$category" auto)
  padim=$(seconds "$root" "$category" padim)
  read -r winner search < <(.venv/bin/python -c "import json, sys; s = json.load(open(sys.argv[1])); print(s['winner'].replace(' ', '_'), s['search_seconds'])" "$OUT/$category-auto/versions/v1/selection.json")
  printf '| %s | %s | %s | %.2f | %s | %.0f |\n' "$category" "$auto" "$padim" "$(echo "$auto / $padim" | bc -l)" "${winner//_/ }" "$search" >> "$RESULT"
done
rm -rf "$OUT"
