#!/usr/bin/env bash
# GPU checks for jaxcf, for a session that has a GPU; at most 9 minutes in all.
#
#   bash bench/gpu_check.sh [OUT_DIR]          (default: $OUT, else ./gpu_check_out)
#
# Runs from the repository root with PYTHONPATH=. and installs nothing (the GPU machine has jax 0.11
# with CUDA 13, flax, optax and torch preinstalled, and no network):
#   1. the parity suite on the GPU              pytest -m parity
#   2. jaxcf vs the PyTorch port on the GPU      bench/vs_torch.py (epochs; torch on CUDA)
#   3. the scale benchmark, 20M ratings          bench/scale.py --ratings 2e7
#   4. float32 embedding scatter-add timing, with and without
#      XLA_FLAGS=--xla_backend_extra_options=-nvptx-allow-ftz-atomics   bench/scatter_add.py
#   5. every family's whole fit on the GPU (BPMF, the Bayesian FM, iALS exact and CG, BPR at implicit's
#      settings, EASE, the notebook's model), jaxcf's side of bench/vs_peers.py (the peers are not installed there)
# Each step has its own time cap inside an overall deadline of 540 s; a step that fails or runs out
# of time is recorded as such and the next one still runs. Everything goes into OUT_DIR/gpu_check.json
# (plus each step's own JSON and log). The figures are what this machine measured: nothing here is
# filled in by hand.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-gpu_check_out}}
mkdir -p "$OUT_DIR"
export PYTHONPATH=.
PYTHON=${PYTHON:-python}
DEADLINE=$(( $(date +%s) + ${GPU_CHECK_BUDGET_S:-540} ))  # a smaller budget is for smoke-testing the script

# run NAME CAP_SECONDS COMMAND...: runs with a time cap (never past the deadline), logs, records rc and seconds.
run() {
  local name=$1 cap=$2
  shift 2
  local left=$(( DEADLINE - $(date +%s) ))
  (( cap > left )) && cap=$left
  if (( cap < 10 )); then
    echo "skip" > "$OUT_DIR/$name.rc"; echo 0 > "$OUT_DIR/$name.seconds"
    echo "== $name: skipped, the 9-minute budget is spent"
    return
  fi
  echo "== $name (at most ${cap}s): $*"
  local start=$(date +%s.%N)
  timeout --kill-after=10 "$cap" "$@" > "$OUT_DIR/$name.log" 2>&1
  echo $? > "$OUT_DIR/$name.rc"
  awk "BEGIN { print $(date +%s.%N) - $start }" > "$OUT_DIR/$name.seconds"
  tail -n 5 "$OUT_DIR/$name.log"
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$OUT_DIR/nvidia_smi.txt" 2>&1
$PYTHON -c "import jax; print(jax.__version__, jax.devices())" > "$OUT_DIR/jax_devices.txt" 2>&1

run parity 150 $PYTHON -m pytest -m parity -q -p no:cacheprovider tests
run vs_torch 90 $PYTHON bench/vs_torch.py --repeats 3 --skip-cli --json "$OUT_DIR/vs_torch.json"
run scale 110 $PYTHON bench/scale.py --ratings 2e7 --epochs 2 --csv-dir "${TMPDIR:-/tmp}/jaxcf-bench-scale" \
  --json "$OUT_DIR/scale.json"
run scatter_add 40 $PYTHON bench/scatter_add.py --repeats 5 --json "$OUT_DIR/scatter_add.json"
run families 150 $PYTHON bench/vs_peers.py --sides jaxcf --no-cli --rows bpmf-r20,bfm,ials,ials-cg,bpr,ease,bias \
  --json "$OUT_DIR/families.json"

$PYTHON - "$OUT_DIR" <<'EOF'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
def text(name):
    path = out / name
    return path.read_text().strip() if path.is_file() else None

summary = {"nvidia_smi": text("nvidia_smi.txt"), "jax_devices": text("jax_devices.txt"), "steps": {}}
for step in ("parity", "vs_torch", "scale", "scatter_add", "families"):
    rc = text(f"{step}.rc")
    record = {
        "exit_status": None if rc in (None, "skip") else int(rc),
        "skipped": rc == "skip",
        "timed_out": rc in ("124", "137"),
        "seconds": float(text(f"{step}.seconds") or 0),
        "log_tail": "\n".join((text(f"{step}.log") or "").splitlines()[-15:]),
    }
    result = out / f"{step}.json"
    if result.is_file():
        record["result"] = json.loads(result.read_text())
    summary["steps"][step] = record
(out / "gpu_check.json").write_text(json.dumps(summary, indent=2) + "\n")
print(f"wrote {out / 'gpu_check.json'}")
for step, record in summary["steps"].items():
    print(f"  {step:12s} exit {record['exit_status']}  {record['seconds']:.0f}s"
          + ("  TIMED OUT" if record["timed_out"] else "") + ("  skipped" if record["skipped"] else ""))
EOF
