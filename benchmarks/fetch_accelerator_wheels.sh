#!/usr/bin/env bash
# Downloads, into .whl/accelerator_check (git-ignored), the wheels that benchmarks/
# accelerator_check.sh installs on a GPU machine whose image lacks them: grain and its
# array-record and portpicker (the host input pipeline), ml_collections (the configs). The GPU
# image runs CPython 3.12 on x86-64; 3.11 (this machine) and 3.13 come along for smoke tests
# and newer images. About 5 MiB per Python version; carry the folder with the device tool.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=.whl/accelerator_check
mkdir -p "$DEST"
python3 -m pip download -q --no-deps -d "$DEST" ml_collections==1.1.0 portpicker==1.6.0
for v in 3.11 3.12 3.13; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$v" \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$DEST" grain==0.2.18 array_record==0.8.6
done
ls -l "$DEST"
