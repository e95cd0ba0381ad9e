#!/usr/bin/env bash
# Run here (a machine with pip and this project's .venv) before the GPU checks: fetches, for the lent
# GPU machine's Python 3.12, what its image lacks, at the versions installed in .venv (the set the
# tests passed with), into one folder per `run` call of benchmarks/gpu_check.sh:
#   .whl/1  what the PyTorch checks need (diffusers, pydicom and its decoders), and the first part
#           of TensorRT for RTX's libraries;
#   .whl/2  the rest of those libraries, TensorRT for RTX's Python package, and the export tools.
# A call carries at most 64 MiB, working tree included. The libraries' wheel alone is 91 MiB, so it
# travels repacked as xz (64 MiB) and split across the two calls; gpu_check.sh joins and unpacks it
# (repacking takes ~3 min here on 2 cores). Fails, saying so, where a call would carry too much.
set -euo pipefail
cd "$(dirname "$0")/.."
LIMIT=$((64 * 1024 * 1024))
MARGIN=$((4 * 1024 * 1024))  # for what the tool counts beyond file contents
PIP_PLATFORM=(--only-binary=:all: --python-version 3.12 --implementation cp
    --platform manylinux_2_35_x86_64 --platform manylinux_2_34_x86_64 --platform manylinux_2_31_x86_64
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
. benchmarks/carried.sh
download() {
    local folder=$1 name
    shift
    for name in "$@"; do
        python3 -m pip download -q --no-deps "${PIP_PLATFORM[@]}" -d "$folder" "$name==$(version "$name")"
    done
}
bytes() { du -cb "$@" | tail -n 1 | cut -f 1; }

rm -rf .whl && mkdir -p .whl/1 .whl/2 .whl/libs
download .whl/1 "${FIRST[@]}"
download .whl/2 "${SECOND[@]}"
python3 -m pip wheel -q --no-deps -w .whl/2 "$SOURCE_ONLY==$(version "$SOURCE_ONLY")"

download .whl/libs "$LIBS"
unzip -q .whl/libs/tensorrt_rtx_cu13_libs-*.whl -d .whl/libs/unpacked
tar -C .whl/libs/unpacked -cf - . | xz -9 -T0 > .whl/libs/trt-libs.tar.xz

tree=$(git ls-files -co --exclude-standard -z | du -cb --files0-from=- | tail -n 1 | cut -f 1)
first=$((LIMIT - MARGIN - tree - $(bytes .whl/1)))
total=$(stat -c %s .whl/libs/trt-libs.tar.xz)
[ "$first" -gt 0 ] || { echo "fetch_wheels: .whl/1 alone is over the limit" >&2; exit 1; }
head -c "$first" .whl/libs/trt-libs.tar.xz > .whl/1/trt-libs.tar.xz.part1
tail -c +"$((first + 1))" .whl/libs/trt-libs.tar.xz > .whl/2/trt-libs.tar.xz.part2
rm -rf .whl/libs
for call in 1 2; do
    carried=$((tree + $(bytes ".whl/$call")))
    echo "call $call carries $((carried / 1024 / 1024)) MiB (tree $((tree / 1024 / 1024)) MiB + .whl/$call)"
    if [ "$carried" -gt "$LIMIT" ]; then
        echo "fetch_wheels: call $call would carry over 64 MiB (the libraries: $total bytes)" >&2
        exit 1
    fi
done
