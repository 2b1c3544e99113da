#!/usr/bin/env bash
# The mix model against single-dataset models on each source's validation split of the mix
# (benchmarks/results/mix.md). Every run: EfficientMTNet, phase 3 from scratch, the same image
# size, batch and wall-clock budget, trained on the *mix's* training split (data=mix with the
# other sources' weights 0 for a single-dataset model: the same group-aware, hygiene-checked
# splits for every model), then `src.evaluate data=mix split=val` (per-source sections).
#   nice -n 5 bash benchmarks/mix_compare.sh [budget=4m] [size=96]
# RUNS="name:w_figshare:w_kaggle:w_br35h:extra overrides:budget ..." picks the runs (a run's own budget
# wins over the first argument), e.g. the same total CPU time for one mix as for three single models:
#   RUNS="mix:1:1:0.5::36m figshare_only:1:0:0::12m kaggle_only:0:1:0:model.heads=[class]:12m" \
#     bash benchmarks/mix_compare.sh 12m 96
# CKPT=last|best picks the weights scored (default last: the engine's best.keras is chosen on the
# whole mix validation split, which for a single-dataset model is dominated by sources it never saw).
set -euo pipefail
BUDGET=${1:-4m}
SIZE=${2:-96}
PY=${PY:-python}
OUT=${OUT:-outputs/mix_compare}
CKPT=${CKPT:-last}
COMMON="experiment=mix_joint data.image_size=$SIZE data.batch_size=16 tracking=none paths.output_root=$OUT ${EXTRA:-}"
w() { echo "data.sources.0.weight=$1 data.sources.1.weight=$2 data.sources.2.weight=$3"; }
for spec in ${RUNS:-"mix:1:1:0.5:" "figshare_only:1:0:0:" "kaggle_only:0:1:0:model.heads=[class]" "br35h_only:0:0:1:"}; do
  IFS=: read -r name a b c extra budget <<<"$spec"
  echo "== $name (${budget:-$BUDGET})"
  $PY -m src.train $COMMON trainer.max_time="${budget:-$BUDGET}" $(w "$a" "$b" "$c") task_name="$name" $extra
  run=$(ls -d "$OUT/$name"/*/ | tail -1)
  $PY -m src.evaluate checkpoint="$run/phase3/checkpoints/$CKPT.keras" data=mix split=val tracking=none progress=false gallery=2 \
      data.image_size=$SIZE paths.output_root=$OUT out="$run/eval_mix_val" ${EXTRA:-}
done
