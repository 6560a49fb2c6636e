#!/usr/bin/env bash
# The data pipeline's GPU check (issue 5): one prepared run on a GPU machine, about 5-7 minutes.
#
#   bash benchmarks/gpu_data_check.sh [OUT_DIR]          # from the repo root, on the GPU machine
#
# 1. DALI: installs it from the carried parts (.device_pkgs/, see DEVELOPERS.md) if missing; installs
#    this repo editable (--no-deps) if simmim_fast.kernels does not import.
# 2. Writes 8192 JPEGs (longer side 500 px) cut from the photos scikit-image ships.
# 3. Correctness: tests/test_data_gpu.py (the 'dali' backend against 'dali_cpu', bad files, resume,
#    dtypes, sharding) and the CPU data tests, on this machine's torch/torchvision.
# 4. Loader throughput, 500-px JPEGs -> 192 px, batch 128, masks and hand-off to torch included:
#    dali (8 threads; target >= 15,000 img/s), dali_cpu and torch (all cores), synthetic.
# 5. Swin-B SimMIM step (192 px, batch 128, bf16, compiled) fed by 'synthetic' and by 'dali'.
# 6. Prints one table; everything also lands in OUT_DIR (default $OUT, else /tmp/gpu_data_check).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-/tmp/gpu_data_check}}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
data=${SIMMIM_JPEGS:-/tmp/simmim_jpegs}
start=$SECONDS
step() { echo; echo "== [$((SECONDS - start)) s] $*"; }

step "packages"
if ! python3 -c 'import nvidia.dali' 2>/dev/null && [ -e .device_pkgs/unpack.sh ]; then
  bash .device_pkgs/unpack.sh
fi
python3 -c 'import nvidia.dali' || { echo "DALI is not installed and no carried parts are complete: see DEVELOPERS.md"; exit 3; }
if ! python3 -c 'import simmim_fast.kernels' 2>/dev/null; then
  python3 -m pip install -q --no-deps --no-build-isolation -e ./kernels -e . || exit 3
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/device.txt"
python3 -c 'import sys, torch, torchvision, timm, nvidia.dali as d, os
print("python", sys.version.split()[0], "torch", torch.__version__, "torchvision", torchvision.__version__,
      "timm", timm.__version__, "DALI", d.__version__, "cpus", os.cpu_count())' | tee -a "$out/device.txt"
date -u +%F | tee -a "$out/device.txt"

step "data: 8192 JPEGs, 500 px"
[ -d "$data" ] || python3 benchmarks/bench_loader.py --make-jpegs "$data" --images 8192 --side 500

step "correctness"
timeout 240 python3 -m pytest -q -x -p no:cacheprovider tests/test_data_gpu.py tests/test_data_loader.py \
  tests/test_data_views.py tests/test_data_index.py 2>&1 | grep -v '^libpng' | tee "$out/pytest.txt" | tail -n 15

step "loader throughput"
timeout 240 python3 benchmarks/bench_loader.py --data "$data" --backends dali dali_cpu torch synthetic \
  --size 192 --batch 128 --threads 8 --cpu-threads "$(nproc)" --epochs 2 --json "$out/loader.json" 2>&1 \
  | grep -v '^libpng' | tee "$out/loader.txt"
timeout 60 python3 benchmarks/bench_loader.py --data "$data" --backends dali --size 192 --batch 128 --threads 8 \
  --epochs 2 --set data.dali_hw_decoder_load=0.9 --json "$out/loader_hw09.json" 2>&1 | grep -v '^libpng' \
  | tee -a "$out/loader.txt"
timeout 120 python3 benchmarks/bench_loader.py --data "$data" --backends dali dali_cpu --layouts shards --size 192 \
  --batch 128 --threads 8 --cpu-threads "$(nproc)" --epochs 1 --json "$out/loader_shards.json" 2>&1 \
  | grep -v '^libpng' | tee -a "$out/loader.txt"

step "train step: synthetic vs dali (Swin-B, 192 px, batch 128, bf16, compiled)"
timeout 330 python3 benchmarks/bench_train_step.py --config configs/swin_b.json --data "$data" \
  --backends synthetic dali --batch 128 --threads 8 --steps 40 --warmup 15 --compile --json "$out/train.json" 2>&1 \
  | grep -v '^libpng' | tee "$out/train.txt" | tail -n 20

step "summary"
python3 - "$out" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
print(" ".join((out / "device.txt").read_text().split("\n")))
def load(name):
    p = out / name
    return json.loads(p.read_text())["results"] if p.exists() else []
print("loader, 500-px JPEGs -> 192 px, batch 128, masks + hand-off included:")
for r in (load("loader.json") + [dict(r, backend=r["backend"] + " (hw 0.9)") for r in load("loader_hw09.json")]
          + [dict(r, backend=r["backend"] + " (shards)") for r in load("loader_shards.json")]):
    note = "  target >= 15,000" if r["backend"].startswith("dali") and "cpu" not in r["backend"] else ""
    print(f"  {r['backend']:<16} threads {r['threads']:>3}  {r['img_per_s']:>9,.0f} img/s{note}")
rows = load("train.json")
print("SimMIM Swin-B step, 192 px, batch 128, bf16, torch.compile:")
base = next((r["ms_per_step"] for r in rows if r["backend"] == "synthetic"), None)
for r in rows:
    ratio = f"  x{r['ms_per_step'] / base:.3f} of synthetic" if base else ""
    print(f"  {r['backend']:<16} {r['ms_per_step']:8.1f} ms/step {r['img_per_s']:8,.0f} img/s{ratio}")
tail = [l for l in (out / "pytest.txt").read_text().splitlines() if " passed" in l or " failed" in l or "error" in l]
print("tests:", tail[-1] if tail else "no result")
EOF
echo "total $((SECONDS - start)) s"
