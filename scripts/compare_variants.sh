#!/usr/bin/env bash
# Short training runs of the four starting points (frozen / fine-tuned backbone x random / upcycled experts),
# same steps, data order and seed, each evaluated on the same validation examples.
#   bash scripts/compare_variants.sh [STEPS] [EVAL_EXAMPLES] [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
steps="${1:-200}"
examples="${2:-500}"
out="${3:-runs/compare}"
mkdir -p "$out"
for backbone in frozen finetuned; do
  for experts in random upcycled; do
    name="$backbone-$experts"
    flags=()
    [ "$backbone" = frozen ] && flags+=(--freeze-backbone)
    [ "$experts" = upcycled ] && flags+=(--upcycle)
    # A rerun of the comparison replaces its previous runs.
    python scripts/train.py --output-dir "$out/$name" --overwrite-output-dir --max-steps "$steps" \
      --save-every "$steps" --learning-rate 1e-3 --backbone-learning-rate 1e-4 --warmup-steps 50 "${flags[@]}" \
      > "$out/$name.log" 2>&1
    python scripts/evaluate.py --model "$out/$name/final" --output-dir "$out/$name/eval" \
      --max-examples "$examples" >> "$out/$name.log" 2>&1
  done
done
python scripts/summarize_runs.py "$out"
