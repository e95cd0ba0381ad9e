#!/usr/bin/env bash
# The GPU checks of everything landed, on a bare lent GPU machine, phase by phase (each fits in one
# 10-minute `run` call; the machine keeps /tmp between warm calls):
#
#   bash benchmarks/gpu_check.sh setup    # join and install the carried wheels, record the machine
#   bash benchmarks/gpu_check.sh tests    # the test suite, GPU tests included
#   bash benchmarks/gpu_check.sh export   # full-size random-weight model -> ONNX -> engines (if a TensorRT can)
#   bash benchmarks/gpu_check.sh bench    # gms-deploy bench over every backend: JSON, plot, table
#   bash benchmarks/gpu_check.sh all      # all four, for a machine with no 10-minute limit
#
# Wheels: benchmarks/fetch_wheels.sh, run beforehand on a machine with pip, fills .whl/1, .whl/2 and
# .whl/3 (each under the 64 MiB a call carries). Everything lands under $OUT (default out/gpu_check):
# gpu_check.log, environment.txt, tests.log, bench.json, bench.png, bench.txt.
# The same script runs on a machine without a GPU (GPU tests skip, bench times the CPU), which is how
# it is checked here; BENCH_ARGS adds `gms-deploy bench` options (e.g. "--iterations 5").
set -uo pipefail
shopt -s nullglob
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/out/gpu_check}
WORK=${GPU_CHECK_WORK:-/tmp/gms-gpu-check}
PY=${PYTHON:-python3}
mkdir -p "$OUT" "$WORK"
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:$WORK/site${PYTHONPATH:+:$PYTHONPATH}"

setup() {
    local part name
    for part in .whl/1/*.part1; do
        name=$(basename "$part" .part1)
        cat "$part" ".whl/2/$name.part2" > "$WORK/$name" || return 1
    done
    local wheels=(.whl/3/*.whl "$WORK"/*.whl)
    if [ ${#wheels[@]} -gt 0 ]; then
        $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target "$WORK/site" "${wheels[@]}" || return 1
    fi
    # This checkout too, so that its version is recorded (setuptools is in the image).
    $PY -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --upgrade \
        --target "$WORK/site" . || return 1
    {
        date -u +"%Y-%m-%dT%H:%M:%SZ"
        nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1
        $PY - <<'PY'
import importlib.metadata as m, platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
if torch.cuda.is_available():
    print("gpu", torch.cuda.get_device_name(), torch.cuda.get_device_capability())
for name in ("onnx", "onnxruntime", "onnxruntime-gpu", "diffusers", "nvidia-modelopt", "tensorrt",
             "tensorrt-rtx-cu13-bindings", "opencv-python-headless", "numpy"):
    try:
        print(name, m.version(name))
    except m.PackageNotFoundError:
        print(name, "absent")
PY
    } | tee "$OUT/environment.txt"
}

tests() {
    $PY -m pytest -q -rs -p no:cacheprovider 2>&1 | tee "$OUT/tests.log"
}

export_model() {
    rm -rf "$WORK/src" "$WORK/full" "$WORK/export" && mkdir -p "$WORK/src"
    $PY -c "from pathlib import Path; from gms_deploy.bundle import random_full_size as r; \
r(Path('$WORK/src')).save(Path('$WORK/full'))" || return 1
    $PY -m gms_deploy export --model "$WORK/full" --out "$WORK/export" 2>&1 | tee "$OUT/export.log" || return 1
    # TensorRT for RTX has no Hopper target: on an H100 this build is expected to fail, and says why.
    $PY -m gms_deploy build "$WORK/export" --opt-batch 8 --max-batch 32 2>&1 | tee -a "$OUT/export.log"
}

bench() {
    local export_args=()
    [ -f "$WORK/export/manifest.json" ] && export_args=(--export "$WORK/export")
    # shellcheck disable=SC2086  # BENCH_ARGS is a list of options
    $PY -m gms_deploy bench --model "$WORK/full" "${export_args[@]}" \
        --json "$OUT/bench.json" --plot "$OUT/bench.png" ${BENCH_ARGS:-} | tee "$OUT/bench.txt"
}

status=0
case "${1:-all}" in
    setup) setup || status=1 ;;
    tests) tests || status=1 ;;
    export) export_model || status=1 ;;
    bench) bench || status=1 ;;
    all) for phase in setup tests export_model bench; do $phase || status=1; done ;;
    *) echo "usage: $0 [setup|tests|export|bench|all]" >&2; exit 2 ;;
esac
echo "gpu_check ${1:-all}: $([ $status = 0 ] && echo ok || echo FAILED)"
exit $status
