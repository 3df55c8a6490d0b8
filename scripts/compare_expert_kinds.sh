#!/usr/bin/env bash
# Short training runs of feed-forward experts, attention experts and both (configs/switch-minilm-l6-attn-e4.json,
# 4 experts, with its expert_kinds overridden), same steps, data order and seed, on a frozen backbone so that only
# the Switch layers learn; each evaluated on the same validation examples.
#   bash scripts/compare_expert_kinds.sh [STEPS] [EVAL_EXAMPLES] [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
steps="${1:-200}"
examples="${2:-500}"
out="${3:-runs/compare-expert-kinds}"
mkdir -p "$out"
for kinds in ff aa bb; do
  case "$kinds" in
    ff) name=feed-forward ;;
    aa) name=attention ;;
    bb) name=both ;;
  esac
  # A rerun of the comparison replaces its previous runs.
  python scripts/train.py --config configs/switch-minilm-l6-attn-e4.json --expert-kinds "$kinds" --freeze-backbone \
    --output-dir "$out/$name" --overwrite-output-dir --max-steps "$steps" --save-every "$steps" \
    --learning-rate 1e-3 --warmup-steps 50 > "$out/$name.log" 2>&1
  python scripts/evaluate.py --model "$out/$name/final" --output-dir "$out/$name/eval" \
    --max-examples "$examples" >> "$out/$name.log" 2>&1
done
python scripts/summarize_runs.py "$out"
