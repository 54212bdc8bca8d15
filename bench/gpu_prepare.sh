#!/usr/bin/env bash
# bench/gpu_prepare.sh: run HERE (a machine with internet and ../shared) before a session that has a GPU
# machine. It fills .gpu/ (git-ignored) with what bench/gpu.sh needs there, where there is no internet, no
# ../shared and no SimpleITK/MONAI/slicerio/pynrrd, and prints the device tool's `carry` list and command.
#
#   .gpu/wheels.tar.xz  this project's missing dependencies as cp312 manylinux x86_64 wheels, at the versions of
#                       .venv, repacked uncompressed and xz'd (SimpleITK's 53 MB wheel becomes ~28 MB: the whole
#                       tree that travels is limited to 64 MiB)
#   .gpu/shared/        a ../shared look-alike (MASREFINE_SHARED there): tools/synth_knee.py, the knee label maps
#                       of the tuning split (images are synthesized there), IXI brains of the tuning split plus as
#                       many extra tuning atlases as fit; plan.json names them. Never a REPORT_SUBJECTS subject.
#
# Usage: bench/gpu_prepare.sh [--budget-mib N]   (N: what .gpu/ may hold, default 56)
# Idempotent: the wheels are downloaded and compressed once (xz takes a few CPU minutes, niced).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
PY=${PYTHON:-$ROOT/.venv/bin/python}
BUDGET_MIB=56
while [ $# -gt 0 ]; do
  case "$1" in
    --budget-mib) BUDGET_MIB=$2; shift 2 ;;
    *) echo "gpu_prepare.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
GPU=$ROOT/.gpu
mkdir -p "$GPU/download"

# -- wheels: the dependencies of pyproject.toml that the GPU machine's image lacks (KINDS.md lists what it has;
# dask/bokeh serve `masrefine batch` only, which gpu.sh does not run). Same versions as .venv.
PKGS="SimpleITK monai pynrrd slicerio"
SPECS=$("$PY" - $PKGS <<'PYEOF'
import sys
from importlib.metadata import version
print(" ".join(f"{p}=={version(p)}" for p in sys.argv[1:]))
PYEOF
)
echo "wheels: $SPECS"
if [ -f "$GPU/wheels.tar.xz" ] && [ "$(cat "$GPU/wheels.txt" 2>/dev/null)" = "$SPECS" ]; then
  echo "wheels: .gpu/wheels.tar.xz is up to date"
else
  rm -rf "$GPU/download" "$GPU/stage"; mkdir -p "$GPU/download" "$GPU/stage/wheels"
  # shellcheck disable=SC2086
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      -d "$GPU/download" $SPECS
  # A wheel is a zip; stored (uncompressed) members let xz find the redundancy deflate hides. Same files, same RECORD.
  "$PY" - "$GPU/download" "$GPU/stage/wheels" <<'PYEOF'
import sys, zipfile
from pathlib import Path
src, dst = Path(sys.argv[1]), Path(sys.argv[2])
for whl in sorted(src.glob("*.whl")):
    with zipfile.ZipFile(whl) as zin, zipfile.ZipFile(dst / whl.name, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = zin.read(info)  # before the member's compression is changed below
            info.compress_type = zipfile.ZIP_STORED
            zout.writestr(info, data)
    print(f"  {whl.name}: {whl.stat().st_size / 2**20:.1f} MiB")
PYEOF
  echo "wheels: compressing with xz -9 (a few CPU minutes, niced)"
  tar -C "$GPU/stage" -cf - wheels | nice -n 19 xz -9 -T1 > "$GPU/wheels.tar.xz.tmp"
  mv "$GPU/wheels.tar.xz.tmp" "$GPU/wheels.tar.xz"
  echo "$SPECS" > "$GPU/wheels.txt"
  rm -rf "$GPU/stage"
fi

# -- data (bench/gpu_run.py prepare: the subject choice lives with the code that uses it)
nice -n 19 "$PY" bench/gpu_run.py prepare --gpu-dir "$GPU" --budget-mib "$BUDGET_MIB"

# -- sizes: what travels is tracked + untracked-not-ignored files + the carried paths, 64 MiB at most
CARRY='[".gpu/wheels.tar.xz", ".gpu/wheels.txt", ".gpu/shared"]'
"$PY" - "$ROOT" <<'PYEOF'
import os, subprocess, sys
root = sys.argv[1]
def size(paths):
    return sum(os.path.getsize(os.path.join(root, p)) for p in paths if os.path.isfile(os.path.join(root, p)))
tracked = subprocess.run(["git", "ls-files", "-z"], cwd=root, capture_output=True, text=True).stdout.split("\0")
untracked = subprocess.run(["git", "ls-files", "-z", "--others", "--exclude-standard"], cwd=root, capture_output=True,
                           text=True).stdout.split("\0")
carried = [os.path.relpath(os.path.join(d, f), root) for top in (".gpu/wheels.tar.xz", ".gpu/wheels.txt", ".gpu/shared")
           for d, _, fs in (os.walk(os.path.join(root, top)) if os.path.isdir(os.path.join(root, top))
                            else [(root, [], [top])]) for f in fs]
t, u, c = size(tracked), size(untracked), size(carried)
mib = 2 ** 20
print(f"sizes: tracked {t / mib:.1f} MiB + untracked-not-ignored {u / mib:.1f} MiB + carried {c / mib:.1f} MiB "
      f"= {(t + u + c) / mib:.1f} MiB (limit 64 MiB)")
if t + u + c > 64 * mib:
    print("sizes: OVER THE LIMIT: lower --budget-mib or remove untracked files", file=sys.stderr)
    sys.exit(1)
PYEOF
cat <<EOT

Device tool call (bench/gpu.sh stays under 8 minutes; 600 s leaves room for the start and the wheels):
  carry: $CARRY
  command: bash bench/gpu.sh
  timeout_s: 600
Results come back as \$OUT/gpu-*.{json,md,txt}; commit them under docs/results/gpu/<date>/ (docs/gpu.md).
EOT
