#!/usr/bin/env bash
# Packs DeepSpeed 0.19.8 and the dependencies the GPU machine lacks (CPython 3.12, no package
# registry there) into ONE part small enough to carry with a single device run (< 64 MiB):
# the same packages as /work/shared/device/pack_device_pkgs.sh minus DALI and its codecs.
# Run from the project root on a machine with pip access:   bash benchmarks/pack_deepspeed_for_gpu.sh
# Output: .device_pkgs/ds/ (git-ignored): part00, MANIFEST, SHA256SUMS, unpack.sh. The shared pack script
# empties .device_pkgs/, so run this one after it when both are needed.
set -euo pipefail
out=${1:-.device_pkgs/ds}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
plat=(--only-binary=:all: --python-version 3.12 --implementation cp
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
# The GPU image already has numpy, packaging, six, einops, msgpack, ninja, psutil, py-cpuinfo, tqdm,
# typing-extensions, torch, triton, timm, pytest-benchmark.
python3 -m pip download -q --no-deps "${plat[@]}" -d "$work/whl" \
  astunparse gast optree nvtx makefun 'libcst~=1.8' hjson annotated-types typing-inspection 'pydantic>=2,<3'
pyd=$(ls "$work"/whl/pydantic-2*.whl)
core=$(unzip -p "$pyd" '*/METADATA' | sed -n 's/^Requires-Dist: \(pydantic-core==[0-9.]*\).*/\1/p')
python3 -m pip download -q --no-deps "${plat[@]}" -d "$work/whl" "$core"
DS_BUILD_OPS=0 python3 -m pip wheel -q --no-deps -w "$work/whl" deepspeed==0.19.8
mkdir -p "$work/site"
for w in "$work"/whl/*.whl; do unzip -q -o "$w" -d "$work/site"; done
rm -rf "$out"; mkdir -p "$out"
tar -C "$work/site" -cf - . | xz -T2 -9 > "$out/part00"
( cd "$out" && echo part00 > MANIFEST && sha256sum part00 > SHA256SUMS )
cat > "$out/unpack.sh" <<'UNPACK'
#!/usr/bin/env bash
# On the GPU machine: installs the carried packages into python3's site-packages without overwriting
# anything the image already has (idempotent).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
if python3 -c 'import deepspeed' 2>/dev/null; then echo "deepspeed: already installed"; exit 0; fi
(cd "$here" && sha256sum -c --quiet SHA256SUMS)
sp=$(python3 -c 'import site; print(site.getsitepackages()[0])')
xz -d < "$here/part00" | tar -x --skip-old-files -C "$sp"
python3 -c 'import deepspeed; print("deepspeed", deepspeed.__version__, "installed")'
UNPACK
chmod +x "$out/unpack.sh"
echo "wrote $out:"; ls -la "$out"
