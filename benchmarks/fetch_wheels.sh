#!/usr/bin/env bash
# Run here (a machine with pip and this project's .venv), before the GPU checks: downloads, for the
# lent GPU machine's Python 3.12, the wheels that its image lacks, at the versions installed in
# .venv (the set the tests passed with), into three folders that each travel in one `run` call
# under its 64 MiB limit: .whl/1 and .whl/2 hold the halves of tensorrt-rtx-cu13-libs (95 MB),
# .whl/3 everything else. benchmarks/gpu_check.sh joins and installs them. See benchmarks/README.md.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP_PLATFORM=(--only-binary=:all: --python-version 3.12 --implementation cp
    --platform manylinux_2_35_x86_64 --platform manylinux_2_34_x86_64 --platform manylinux_2_31_x86_64
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
# What the GPU image (PyTorch 2.11, onnx, onnxruntime, opencv, typer, matplotlib, ...) does not have.
NAMES=(diffusers pydicom nvidia-modelopt pydantic pydantic-core annotated-types typing-inspection
    omegaconf onnx-graphsurgeon polygraphy onnxslim lief pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg
    pylibjpeg-rle tensorrt-rtx-cu13-bindings tensorrt-rtx-cu13-libs)
version() { .venv/bin/python -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1"; }

rm -rf .whl && mkdir -p .whl/1 .whl/2 .whl/3 .whl/download
for name in "${NAMES[@]}"; do
    python3 -m pip download -q --no-deps "${PIP_PLATFORM[@]}" -d .whl/download "$name==$(version "$name")"
done
# The tensorrt_rtx package itself is published as a source archive: built here (pure Python).
python3 -m pip wheel -q --no-deps -w .whl/download "tensorrt-rtx-cu13==$(version tensorrt-rtx-cu13)"

libs=$(ls .whl/download/tensorrt_rtx_cu13_libs-*.whl)
half=$(( ($(stat -c %s "$libs") + 1) / 2 ))
head -c "$half" "$libs" > ".whl/1/$(basename "$libs").part1"
tail -c +"$((half + 1))" "$libs" > ".whl/2/$(basename "$libs").part2"
rm "$libs"
mv .whl/download/*.whl .whl/3/
rmdir .whl/download
du -sh .whl/1 .whl/2 .whl/3
