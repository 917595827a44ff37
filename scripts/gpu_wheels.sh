#!/usr/bin/env bash
# Fetch, on this machine, the wheels that scripts/gpu_check.sh installs on a lent GPU machine.
#
# That machine has no network; its image (Python 3.12) holds torch, torchvision, onnx, onnxscript,
# onnxruntime (CPU build), numpy, pandas, pyarrow, pillow, matplotlib, tqdm, pytest and
# pytest-benchmark, but not camshaft's array and scheduling libraries or the peers. The versions
# are the ones tested here. The folder .whl/ must be ignored by git (.git/info/exclude) and
# carried with the call. onnxruntime-gpu cannot travel (its wheel is over the 64 MiB limit).
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >>.git/info/exclude
rm -rf .whl && mkdir .whl
platforms=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
    platforms+=(--platform "$tag")
done
# compiled packages: the machine's own build of each
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" \
    -d .whl numcodecs==0.16.6 google-crc32c==1.9.0
# pure Python (grad-cam and ttach come as source only: built into wheels that install anywhere)
python3 -m pip wheel -q --no-deps -w .whl \
    dask==2026.8.0 partd==1.4.2 locket==1.0.0 zarr==3.1.6 donfig==0.8.1.post1 \
    captum==0.9.0 torchcam==0.5.0 grad-cam==1.5.7 ttach==0.0.3
du -sh .whl && ls .whl
