#!/usr/bin/env bash
# Every accuracy figure of docs/results.md, each from its command, each writing JSON under results/accuracy/.
#   bash bench/accuracy.sh [NAME ...]      (no NAME: all of them, about 2 hours on a 2-core CPU)
# The workdirs go to runs/accuracy/ (not committed); the JSON files are committed.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=results/accuracy
RUNS=runs/accuracy
mkdir -p "$OUT" "$RUNS"
SWEEP="python -m jaxcf.sweep --config configs/bias.yaml --holdout 0.1 --quiet"

run() {  # run NAME COMMAND...: skipped unless NAME was asked for (or nothing was)
  local name=$1; shift
  if [ "${#WANTED[@]}" -gt 0 ] && [[ ! " ${WANTED[*]} " =~ " ${name} " ]]; then return; fi
  rm -rf "$RUNS/$name"
  echo "== $name: $*" >&2
  "$@"
}

WANTED=("$@")
# ml-latest-small, the notebook's 80/20 split
run best          python -m jaxcf.crossval --config configs/best.yaml --workdir $RUNS/best --out $OUT/best.json
run best-32       python -m jaxcf.crossval --config configs/best.yaml --set ensemble.size=32 --workdir $RUNS/best-32 --out $OUT/best-32.json
run bias          python -m jaxcf.crossval --config configs/bias.yaml --workdir $RUNS/bias --out $OUT/bias.json
run bias-8seeds   python -m jaxcf.crossval --config configs/bias.yaml --set ensemble.size=8 --workdir $RUNS/bias-8seeds --out $OUT/bias-8seeds.json
# ml-100k, the official folds
run bpmf-ml100k   python -m jaxcf.crossval --config configs/bpmf-ml100k.yaml --splits u1,u2,u3,u4,u5 --workdir $RUNS/bpmf-ml100k --out $OUT/bpmf-ml100k.json
# Choosing hyper-parameters on a holdout of the training rows (never the validation split)
run holdout-notebook  $SWEEP --seeds 4 --out $OUT/holdout-notebook.json
run holdout-fastai    $SWEEP --seeds 4 --set optim.learning_rate=5e-3 optim.weight_decay=0.1 optim.schedule=onecycle "model.y_range=[0, 5.5]" --out $OUT/holdout-fastai.json
run holdout-row-l2    $SWEEP --seeds 4 --set optim.name=adam optim.weight_decay=0 train.batch_size=1024 optim.learning_rate=1e-2 optim.schedule=onecycle train.epochs=10 "model.y_range=[0.5, 5.5]" --grid optim.row_l2=0.05,0.1,0.2 --out $OUT/holdout-row-l2.json
run holdout-bpmf-a1.25-32  python -m jaxcf.crossval --config configs/best.yaml --holdout 0.1 --set ensemble.size=32 ensemble.noise_precision=1.25 --workdir $RUNS/holdout-bpmf-a1.25-32 --out $OUT/holdout-bpmf-a1.25-32.json
run holdout-bpmf-32        python -m jaxcf.crossval --config configs/best.yaml --holdout 0.1 --set ensemble.size=32 --workdir $RUNS/holdout-bpmf-32 --out $OUT/holdout-bpmf-32.json
run holdout-bpmf-180       python -m jaxcf.crossval --config configs/best.yaml --holdout 0.1 --workdir $RUNS/holdout-bpmf-180 --out $OUT/holdout-bpmf-180.json
run holdout-ml100k-u1      python -m jaxcf.crossval --config configs/bpmf-ml100k.yaml --splits u1 --holdout 0.1 --set ensemble.size=32 --workdir $RUNS/holdout-ml100k-u1 --out $OUT/holdout-ml100k-u1.json
# Strong generalisation: users held out of training, folded in from 80% of their ratings (jaxcf.strong);
# fold-in's prior scale chosen on the training users only
STRONG="python -m jaxcf.crossval --protocol strong"
run strong-bias          $STRONG --config configs/bias.yaml --choose-prior-scale 0.03,0.06,0.125,0.25,0.5,1 --workdir $RUNS/strong-bias --out $OUT/strong-bias.json
run strong-dot           $STRONG --config configs/dot.yaml --choose-prior-scale 0.125,0.25,0.5,1,2 --workdir $RUNS/strong-dot --out $OUT/strong-dot.json
run strong-bias-ml100k   $STRONG --config configs/bias.yaml --set data.name=ml-100k --choose-prior-scale 0.03,0.06,0.125,0.25,0.5,1 --workdir $RUNS/strong-bias-ml100k --out $OUT/strong-bias-ml100k.json
run strong-ials          $STRONG --config configs/ials.yaml --workdir $RUNS/strong-ials --out $OUT/strong-ials.json
run strong-ials-ml100k   $STRONG --config configs/ials.yaml --set data.name=ml-100k --workdir $RUNS/strong-ials-ml100k --out $OUT/strong-ials-ml100k.json
# Implicit feedback, leave-last-one-out by timestamp
run ials-last1           python -m jaxcf.crossval --config configs/ials.yaml --set data.leave_last=1 --workdir $RUNS/ials-last1 --out $OUT/ials-last1.json
run implicit-best-last1  python -m jaxcf.crossval --config configs/implicit-best.yaml --set data.leave_last=1 --workdir $RUNS/implicit-best-last1 --out $OUT/implicit-best-last1.json
