#!/usr/bin/env bash
# The project's one GPU command: installs what the GPU image lacks, runs the `gpu` test tier
# (`pytest -m gpu`: the kernels against float64 oracles, the 125M LMs, the real `hippo` command
# line in bf16 through DeepSpeed) and the performance table, every figure through the production
# path. Exit status: non-zero when a test failed or a table row raised.
#
#   benchmarks/gpu/run.sh [--dry-run] [--part 1|2] OUT_DIR
#
#   OUT_DIR    junit.xml (the tests), perf.md (the table), gpu.log (everything printed)
#   --part 1   the tests only; --part 2 the table only (each under 8 minutes on one H100)
#   --dry-run  the same on this CPU: tiny shapes, gloo, DS_ACCELERATOR=cpu, Triton interpreted,
#              this environment's packages (nothing installed); about 2 minutes on 2 cores
#
# On the device machine (no network) the wheels of `benchmarks/gpu/wheels.py download` travel in
# benchmarks/gpu/wheels/ (the device call carries it) and are installed offline with Hippo itself
# into a --target folder put on PYTHONPATH. HIPPO_PYTHON picks the interpreter (default python3).
set -uo pipefail
cd "$(dirname "$0")/../.."

dry=0 part=all out=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) dry=1 ;;
    --part) part="${2:-}"; shift ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    -*) echo "hippo: error: unknown option $1 (usage: benchmarks/gpu/run.sh [--dry-run] [--part 1|2] OUT_DIR)" >&2; exit 2 ;;
    *) out="$1" ;;
  esac
  shift
done
case "$part" in all|1|2) ;; *) echo "hippo: error: --part must be 1 or 2, got '$part'" >&2; exit 2 ;; esac
[ -n "$out" ] || { echo "hippo: error: OUT_DIR missing (usage: benchmarks/gpu/run.sh [--dry-run] [--part 1|2] OUT_DIR)" >&2; exit 2; }
mkdir -p "$out" && out="$(cd "$out" && pwd)"
py="${HIPPO_PYTHON:-python3}"
exec > >(tee "$out/gpu.log") 2>&1
start=$SECONDS
stamp() { echo "hippo: [$((SECONDS - start)) s] $*"; }

if [ "$dry" = 1 ]; then
  export HIPPO_GPU_DRY_RUN=1 DS_ACCELERATOR=cpu TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""
  stamp "dry run on the CPU with this environment's packages ($("$py" -c 'import sys; print(sys.executable)'))"
else
  site="${HIPPO_GPU_SITE:-/tmp/hippo-site}"
  wheels=(benchmarks/gpu/wheels/*.whl)
  [ -e "${wheels[0]}" ] || { echo "hippo: error: no wheels in benchmarks/gpu/wheels (run: python benchmarks/gpu/wheels.py download, and carry that folder)" >&2; exit 2; }
  stamp "installing ${#wheels[@]} wheels and Hippo into $site"
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "${wheels[@]}" || exit 3
  "$py" -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --upgrade --target "$site" . || exit 3
  rm -rf build
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
"$py" -c 'import torch, hippo.pretrain.cli; print("hippo: torch", torch.__version__, "cuda", torch.cuda.is_available(), "from", hippo.pretrain.cli.__file__)' || exit 3

status=0
if [ "$part" != 2 ]; then
  stamp "pytest -m gpu"
  "$py" -m pytest -m gpu tests/gpu -q -rs -p no:cacheprovider --junitxml "$out/junit.xml" --durations=10 || status=1
fi
if [ "$part" != 1 ]; then
  stamp "performance table"
  dry_flag=(); [ "$dry" = 1 ] && dry_flag=(--dry-run)
  "$py" benchmarks/gpu/perf_table.py "$out" "${dry_flag[@]}" || status=1
fi
stamp "done, exit $status"
exit $status
