#!/usr/bin/env bash
# deme's GPU speed numbers in one device call (issue 7): training step throughput (authors' style vs `deme train` vs
# a plain diffusers step) for the CIFAR10 and LSUN-256 UNets, and DDIM-50 sampling (compiled vs eager bf16).
#
#   1. here, on a machine with pip access (once):   bash benchmarks/gpu_session.sh --fetch-wheels
#      downloads the packages the GPU image lacks (diffusers, pydantic, tomli-w, ...) into .whl/ (git-ignored)
#   2. the device call:                              run(command="bash benchmarks/gpu_session.sh",
#                                                        carry=[".whl"], timeout_s=590)
#      writes $OUT/throughput-cifar10.json, $OUT/sample_throughput.json, $OUT/throughput-lsun256.json,
#      $OUT/gpu.txt and $OUT/RESULTS-gpu.md (the rows), each step under its own time limit so a slow step
#      leaves the earlier results in place
#   3. here:  copy the returned .json files into benchmarks/results/ as <card>-runN-<name>.json, then
#      python benchmarks/results_md.py --update benchmarks/RESULTS.md benchmarks/results/<card>-run*.json
#      (this rewrites the whole GPU block: name every run's files; each table names its file and time)
#
# Budget: the device time of a session is 15 minutes, machine start included; this script stops itself after
# DEME_GPU_BUDGET_S seconds (default 560).
set -uo pipefail
cd "$(dirname "$0")/.."

WHEELS=(diffusers==0.42.1 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
        typing-extensions==4.16.0 importlib-metadata==10.2.0 tomli-w==1.2.0)

if [ "${1:-}" = "--fetch-wheels" ]; then
  mkdir -p .whl .git/info
  grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
  exec python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d .whl "${WHEELS[@]}"
fi

OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONWARNINGS=ignore
PY=${PYTHON:-python3}
if ! $PY -c "import diffusers, pydantic, tomli_w" 2>/dev/null; then
  [ -d .whl ] || { echo "diffusers/pydantic/tomli_w missing and no .whl/: run --fetch-wheels here first"; exit 1; }
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

BUDGET=${DEME_GPU_BUDGET_S:-560}
EXTRA=${DEME_BENCH_ARGS:-}   # e.g. "--quick --device cpu" for a smoke run without a GPU
T0=$(date +%s)
left() { echo $(( BUDGET - ($(date +%s) - T0) )); }
step() {  # step SECONDS_MAX NAME CMD...: runs CMD under min(SECONDS_MAX, time left - 5)
  local max=$1 name=$2; shift 2
  local t; t=$(left); t=$(( t - 5 < max ? t - 5 : max ))
  if [ "$t" -lt 30 ]; then echo "== $name: skipped (no time left)"; return; fi
  echo "== $name (limit ${t}s)"
  timeout "$t" "$@" 2>&1 | tee "$OUT/$name.log"
}

{ nvidia-smi -L; $PY -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__)"; } \
  | tee "$OUT/gpu.txt"
step 240 throughput-cifar10 $PY benchmarks/throughput.py --archs cifar10 --out "$OUT/throughput-cifar10.json" $EXTRA
step 150 sample_throughput $PY benchmarks/sample_throughput.py --out "$OUT/sample_throughput.json" $EXTRA
step 300 throughput-lsun256 $PY benchmarks/throughput.py --archs lsun256 --out "$OUT/throughput-lsun256.json" $EXTRA
$PY benchmarks/results_md.py "$OUT"/throughput-cifar10.json "$OUT"/sample_throughput.json \
  "$OUT"/throughput-lsun256.json > "$OUT/RESULTS-gpu.md" 2>/dev/null
cat "$OUT/RESULTS-gpu.md"
echo "total $(( $(date +%s) - T0 )) s"
