#!/usr/bin/env bash
# bench/gpu.sh: the GPU run of issue 22, on the device machine (docs/gpu.md), in at most 8 minutes:
# the CUDA tests, one knee and one brain `masrefine segment` on the GPU with per-stage seconds, a fixed number of
# training steps of the surrogate U-Net and of VoteNet+ with steps/s; one table (gpu-table.md), one JSON
# (gpu-results.json), the log, the two manifests and the tests' output, all in $OUT.
#
# Prepare first, here: bench/gpu_prepare.sh (wheels + data into .gpu/, carried to the device machine).
# Usage:  bash bench/gpu.sh [--device cuda|cpu] [--quick] [--budget-s S] [--knee-cache DIR] [--limit-scale F]
#   --quick: tiny sizes (2 atlases, fast preset, a few steps): the dry run on CPU that checks the script:
#   PYTHON=.venv/bin/python nice -n 19 bash bench/gpu.sh --device cpu --quick --budget-s 2400 --limit-scale 4 \
#       --knee-cache .cache/knee
set -uo pipefail
START=$(date +%s)
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
DEVICE=cuda; QUICK=(); BUDGET=470; EXTRA=()
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE=$2; shift 2 ;;
    --quick) QUICK=(--quick); shift ;;
    --budget-s) BUDGET=$2; shift 2 ;;
    --knee-cache) EXTRA+=(--knee-cache "$2"); shift 2 ;;
    --limit-scale) EXTRA+=(--limit-scale "$2"); shift 2 ;;
    *) echo "gpu.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
OUTDIR=${OUT:-$ROOT/.gpu/out}
WORK=${GPU_WORK:-/tmp/masrefine-gpu}
mkdir -p "$OUTDIR" "$WORK"
exec > >(tee "$OUTDIR/gpu-log.txt") 2>&1

# The image lacks SimpleITK, MONAI, slicerio, pynrrd: install the carried wheels (no index: no internet there).
if "$PY" -c "import SimpleITK, monai, slicerio, nrrd" 2>/dev/null; then
  echo "dependencies: already importable, no wheels installed"
elif [ -f .gpu/wheels.tar.xz ]; then
  SITE=$WORK/site
  rm -rf "$WORK/wheels" "$SITE"
  "$PY" -c "import tarfile, sys; tarfile.open(sys.argv[1]).extractall(sys.argv[2], filter='data')" \
      .gpu/wheels.tar.xz "$WORK" || exit 1
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
      "$WORK"/wheels/*.whl || exit 1
  export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
  echo "dependencies: installed $(cat .gpu/wheels.txt 2>/dev/null) in $(( $(date +%s) - START )) s"
else
  echo "gpu.sh: SimpleITK/monai/slicerio/pynrrd missing and no .gpu/wheels.tar.xz: run bench/gpu_prepare.sh here and carry .gpu" >&2
  exit 1
fi
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}   # MASRefineLib from this checkout (not installed there)
if [ -f .gpu/shared/plan.json ]; then
  export MASREFINE_SHARED=$ROOT/.gpu/shared
elif [ -z "${MASREFINE_SHARED:-}" ] && [ ! -f "$ROOT/../shared/plan.json" ]; then
  echo "gpu.sh: no .gpu/shared/plan.json: run bench/gpu_prepare.sh here and carry .gpu/shared" >&2
  exit 1
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

"$PY" bench/gpu_run.py run --out "$OUTDIR" --work "$WORK" --device "$DEVICE" "${QUICK[@]}" "${EXTRA[@]}" \
    --deadline $((START + BUDGET)) --budget "$BUDGET"
RC=$?
echo "gpu.sh: done in $(( $(date +%s) - START )) s (exit $RC); results in $OUTDIR"
exit $RC
