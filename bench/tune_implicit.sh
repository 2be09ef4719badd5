#!/usr/bin/env bash
# How the implicit-feedback configs' hyper-parameters were chosen: every grid below was run on a 10% holdout
# of the *training* interactions of ml-latest-small (--holdout 0.1; the test interactions are never seen),
# scored by NDCG@20; each writes its JSON under results/tuning/. Later rounds widened the grid where the
# previous round's best sat on its edge. Each line pins what the shipped config held when it ran (the JSON
# files record the command as it was typed then, against those config values).
#   bash bench/tune_implicit.sh [NAME ...]      (no NAME: all, about 1.5 hours on a 2-core CPU)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=results/tuning
mkdir -p "$OUT"
CV="python -m jaxcf.crossval --holdout 0.1"

run() {  # run NAME COMMAND...: skipped unless NAME was asked for (or nothing was)
  local name=$1; shift
  if [ "${#WANTED[@]}" -gt 0 ] && [[ ! " ${WANTED[*]} " =~ " ${name} " ]]; then return; fi
  echo "== $name: $*" >&2
  "$@"
}

WANTED=("$@")
# iALS, plain L2 (reg_exponent 0): alpha x regularisation, then wider, then with the factors
run ials      $CV --config configs/ials.yaml --workdir runs/tuning/ials --set model.n_factors=64 implicit.alpha=1 implicit.regularization=10 --grid implicit.alpha=0.3,1,3 --grid implicit.regularization=3,10,30,100 --out $OUT/ials.json
run ials-2    $CV --config configs/ials.yaml --workdir runs/tuning/ials-2 --set model.n_factors=64 --grid implicit.alpha=3,10,30 --grid implicit.regularization=10,30,100 --out $OUT/ials-2.json
run ials-3    $CV --config configs/ials.yaml --workdir runs/tuning/ials-3 --grid model.n_factors=64,128 --grid implicit.alpha=3,10,30,100 --grid implicit.regularization=30,100,300 --out $OUT/ials-3.json
# iALS, frequency-scaled L2 (reg_exponent 1, Rendle et al.)
run ials-freq   $CV --config configs/ials.yaml --workdir runs/tuning/ials-freq --set model.n_factors=64 implicit.reg_exponent=1 --grid implicit.alpha=1,3 --grid implicit.regularization=0.01,0.03,0.1,0.3 --out $OUT/ials-freq.json
run ials-freq-2 $CV --config configs/ials.yaml --workdir runs/tuning/ials-freq-2 --set model.n_factors=64 implicit.reg_exponent=1 --grid implicit.alpha=3,10,30 --grid implicit.regularization=0.001,0.003,0.01 --out $OUT/ials-freq-2.json
# EASE: lambda
run ease      $CV --config configs/ease.yaml --workdir runs/tuning/ease --grid implicit.ease_lambda=50,100,200,500,1000,2000 --out $OUT/ease.json
# BPR: learning rate x L2, then lower rates and more L2, then epochs x negatives
run bpr       $CV --config configs/bpr.yaml --workdir runs/tuning/bpr --set model.n_factors=64 train.epochs=30 implicit.negatives=1 --grid optim.learning_rate=0.003,0.01,0.03 --grid implicit.l2=1e-5,1e-4,1e-3 --out $OUT/bpr.json
run bpr-2     $CV --config configs/bpr.yaml --workdir runs/tuning/bpr-2 --set model.n_factors=64 train.epochs=30 implicit.negatives=1 --grid optim.learning_rate=0.001,0.003 --grid implicit.l2=0.001,0.01,0.03 --out $OUT/bpr-2.json
run bpr-3     $CV --config configs/bpr.yaml --workdir runs/tuning/bpr-3 --set model.n_factors=64 optim.learning_rate=0.003 implicit.l2=0.01 --grid train.epochs=30,60 --grid implicit.negatives=1,4 --out $OUT/bpr-3.json
# The blend of the chosen EASE and iALS: EASE's weight
run blend     $CV --config configs/ials.yaml --workdir runs/tuning/blend --set model.kind=blend model.n_factors=128 implicit.alpha=30 implicit.regularization=100 implicit.ease_lambda=200 checkpoint.every_epochs=0 --grid implicit.blend_ease_weight=0.25,0.5,0.75 --out $OUT/blend.json
run bpr-4     $CV --config configs/bpr.yaml --workdir runs/tuning/bpr-4 --set implicit.l2=0.01 --grid model.n_factors=64,128 --grid optim.learning_rate=0.003,0.01 --grid train.epochs=100,200 --grid implicit.negatives=4,16 --out $OUT/bpr-4.json
