#!/bin/sh
# One McMahan grid point, stopped once it reaches its target (tools/MCMAHAN.md):
#   tools/mcmahan_run.sh JOB TARGET RUN_DIR [key=value ...]
# e.g. tools/mcmahan_run.sh jobs/mcmahan_2nn_iid.yaml 0.97 runs/mcmahan/2nn_iid_lr0.1 lr=0.1
# PYTHON, MPIRUN, RANKS and DATA_DIR come from the environment (defaults: python, mpirun, 2, unset).
set -e
job=$1 target=$2 out=$3; shift 3
PYTHON=${PYTHON:-python} MPIRUN=${MPIRUN:-mpirun}
exec "$PYTHON" tools/run_to_target.py "$out" --target "$target" -- \
  "$MPIRUN" -n "${RANKS:-2}" "$PYTHON" -m fedmpi run --config "$job" ${DATA_DIR:+--data-dir "$DATA_DIR"} --out "$out" \
  ${1:+--set "$@"}
