#!/usr/bin/env bash
# Fetch, here, the wheels a GPU machine without a package index needs beside what it has (python3
# 3.12, torch, torchvision, numpy, click, tqdm, pytest, hypothesis, fsspec, lightning, accelerate,
# scikit-image): cp312 manylinux x86_64 builds of exactly these, without their own dependencies
# (each one's needs are listed below or already there).
#
#   scripts/gpu_wheels.sh            # into .whl/ (ignored by git); docs/gpu.md says how a run carries it
#
# kornia (batched device augmentation) needs kornia_rs, numpy and torch (there);
# webdataset (the bench's webdataset row) needs braceexpand, numpy and pyyaml (there).
set -uo pipefail

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
DEST=${DEST:-.whl}
WHEELS=(kornia==0.9.0 kornia_rs==0.2.0 webdataset==1.0.2 braceexpand==0.1.7)

mkdir -p "$DEST"
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$DEST" "${WHEELS[@]}" || {
    echo "gpu_wheels: pip could not fetch ${WHEELS[*]} (no index reachable?)" >&2
    exit 1
}
for wheel in "${WHEELS[@]}"; do
    name=${wheel%%==*}
    found=$(ls "$DEST"/"${name}"-*.whl "$DEST"/"${name//_/-}"-*.whl 2>/dev/null | head -1)
    [ -n "$found" ] || { echo "gpu_wheels: no wheel of $name in $DEST" >&2; exit 1; }
done
echo "gpu_wheels: $(ls "$DEST"/*.whl | wc -l) wheels, $(du -sh "$DEST" | cut -f1) in $DEST:"
ls "$DEST"/*.whl | sed 's|.*/|  |'
