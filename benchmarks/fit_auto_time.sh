#!/usr/bin/env bash
# Wall time of `anomatune fit --detector auto` (search + refit) on each development category, one at a time:
# run it on an idle machine. Writes benchmarks/results/fit_auto_time.md.
set -euo pipefail
cd "$(dirname "$0")/.."
D=${ANOMATUNE_DATA:-../shared/data}
OUT=$(mktemp -d)
RESULT=benchmarks/results/fit_auto_time.md
{
  echo "# Time of fit --detector auto (search + refit), per category"
  echo
  echo "Command: \`bash benchmarks/fit_auto_time.sh\` (each: \`anomatune fit --data ROOT --category C --image-size 256x256 --detector auto --validation-photos \$D/natural/imagen\`; 2-core CPU, idle)."
  echo
  echo "| category | seconds | winner |"
  echo "|---|---|---|"
} > "$RESULT"
for spec in mvtec:transistor mtd:magnetic_tile more:kolektorsdd1 more:bsdata_pitting more:loco_juice_bottle_logical more:elpv_mono; do
  root=${spec%%:*} category=${spec##*:}
  start=$(date +%s.%N)
  .venv/bin/anomatune fit --data "$D/$root" --category "$category" --image-size 256x256 --detector auto \
    --validation-photos "$D/natural/imagen" --out "$OUT/$category" > "$OUT/$category.log" 2>&1
  seconds=$(echo "$(date +%s.%N) - $start" | bc)
  winner=$(.venv/bin/python -c "import json, sys; print(json.load(open(sys.argv[1]))['winner'])" "$OUT/$category/selection.json")
  printf '| %s | %.0f | %s |\n' "$category" "$seconds" "$winner" >> "$RESULT"
done
rm -rf "$OUT"
