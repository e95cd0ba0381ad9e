#!/usr/bin/env bash
# The GPU checks of everything landed, on a bare lent GPU machine, in two `run` calls sized for the
# 15 minutes of device time a session has, the machine's start included (benchmarks/README.md):
#
#   bash benchmarks/gpu_check.sh first    # carry .whl/1: install, GPU tests, bench eager and compiled
#   bash benchmarks/gpu_check.sh second   # carry .whl/2, while the machine is warm: TensorRT for RTX
#                                         # on this GPU (the demo model built and run once, then,
#                                         # where that worked, the engine tests)
#   bash benchmarks/gpu_check.sh engines  # only where `second` says TensorRT works here: the
#                                         # full-size engines against eager FP32
#
# Before them, here: `bash benchmarks/fetch_wheels.sh` (fills .whl/1 and .whl/2). The second call
# finds what the first left in $GPU_CHECK_WORK, which a warm machine keeps.
# Every step has a time limit of its own, so a hung one costs its limit and the rest still run; each
# result lands under $OUT (default out/gpu_check) as its step ends: gpu_check.log, environment.txt,
# tests.log, bench-eager.{json,png}, bench-compiled.{json,png}; tests-trt.log; export.log,
# bench-trt.{json,png}.
# GPU_CHECK_CPU=1 rehearses it on a machine without a GPU, with this project's .venv and nothing
# installed: the demo model, batch 1, one iteration (GPU tests skip, bench times the CPU).
set -uo pipefail
shopt -s nullglob
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/out/gpu_check}
WORK=${GPU_CHECK_WORK:-/tmp/gms-gpu-check}
REHEARSAL=${GPU_CHECK_CPU:-0}
if [ "$REHEARSAL" = 1 ]; then
    PY=${PYTHON:-.venv/bin/python} BATCHES=(--batch-size 1) ITERATIONS=1 MODEL=$PWD/gms_deploy/data/demo
else
    PY=${PYTHON:-python3} BATCHES=(--batch-size 1 --batch-size 32) ITERATIONS=10 MODEL=$WORK/full
fi
mkdir -p "$OUT" "$WORK"
# Everything into the log as well: the script runs again as the left side of a pipe that this shell
# waits for, so no last line is lost (an `exec > >(tee ...)` may exit before tee has written it).
if [ -z "${GPU_CHECK_LOGGING:-}" ]; then
    GPU_CHECK_LOGGING=1 bash "$0" "$@" 2>&1 | tee -a "$OUT/gpu_check.log"
    exit "${PIPESTATUS[0]}"
fi
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
status=0

# step NAME SECONDS COMMAND...: run it under its limit, log how long it took, remember a failure.
# A shell function (unpacking, installing: local work) cannot run under `timeout` and runs unlimited.
step() {
    local name=$1 limit=$2 start=$SECONDS rc
    shift 2
    echo "== $name (limit ${limit} s) $(date -u +%H:%M:%S)"
    if declare -F "$1" > /dev/null; then
        "$@"
    else
        timeout --kill-after=10 "$limit" "$@"
    fi
    rc=$?
    echo "== $name: rc $rc after $((SECONDS - start)) s$([ $rc = 124 ] && echo ', out of time')"
    [ $rc = 0 ] || status=1
    return $rc
}

install_wheels() {
    [ "$REHEARSAL" = 1 ] && return 0
    local wheels=("$@")
    [ ${#wheels[@]} -gt 0 ] || return 0
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$WORK/site" "${wheels[@]}"
}

environment() {
    date -u +"%Y-%m-%dT%H:%M:%SZ"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1
    $PY - "$@" <<'PY'
import importlib.metadata as m, platform, sys, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
if torch.cuda.is_available():
    print("gpu", torch.cuda.get_device_name(), torch.cuda.get_device_capability())
for name in sys.argv[1:]:
    try:
        print(name, m.version(name))
    except m.PackageNotFoundError:
        print(name, "absent")
PY
}

# The released architecture with random weights: speed does not depend on the weights.
make_model() {
    [ -f "$MODEL/gms.json" ] && return 0
    $PY tests/full_size.py "$WORK/src" "$MODEL"
}

# Frames as a cart sees them: the 30-frame ultrasound cine pydicom ships (one size, 320 x 240).
cine() {
    $PY -c "from pydicom.data import get_testdata_file; print(get_testdata_file('examples_ybr_color.dcm'))"
}

first() {
    # Half of TensorRT for RTX's libraries waits here for the second call.
    cp .whl/1/trt-libs.tar.xz.part1 "$WORK/" 2>/dev/null
    step install 60 install_wheels .whl/1/*.whl || return 1
    if [ "$REHEARSAL" != 1 ]; then  # this checkout too, so that records carry its version
        $PY -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --upgrade \
            --target "$WORK/site" . || echo "(the checkout's version goes unrecorded)"
    fi
    environment gms-deploy diffusers pydicom onnx onnxruntime opencv-python-headless numpy \
        | tee "$OUT/environment.txt"
    step tests 210 bash -o pipefail -c "$PY -m pytest -m gpu -v -rs --durations=0 -p no:cacheprovider \
        | tee '$OUT/tests.log'"
    step model 40 make_model || return 1
    local common=(--model "$MODEL" --frames "$(cine)" --iterations "$ITERATIONS")
    step bench-eager 100 "$PY" -m gms_deploy bench "${common[@]}" "${BATCHES[@]}" --backend torch \
        --json "$OUT/bench-eager.json" --plot "$OUT/bench-eager.png"
    # Compiling costs a minute or more per batch size: the whole network only, not each sub-model,
    # and at batch 1 only, where its target is (>= 3x eager FP32); batch 32's target is TensorRT's.
    step bench-compiled 190 "$PY" -m gms_deploy bench "${common[@]}" --batch-size 1 --backend torch-compiled \
        --no-submodels --json "$OUT/bench-compiled.json" --plot "$OUT/bench-compiled.png"
}

unpack_trt_libs() {
    [ "$REHEARSAL" = 1 ] && return 0
    if [ ! -f "$WORK/trt-libs.tar.xz.part1" ]; then
        echo "no $WORK/trt-libs.tar.xz.part1: this machine did not run \`first\` (it went cold?)"
        return 1
    fi
    cat "$WORK/trt-libs.tar.xz.part1" .whl/2/trt-libs.tar.xz.part2 | $PY -c "import sys, tarfile; \
tarfile.open(fileobj=sys.stdin.buffer, mode='r|xz').extractall(sys.argv[1], filter='tar')" "$WORK/site"
}

second() {
    step unpack 60 unpack_trt_libs || return 1
    step install 60 install_wheels .whl/2/*.whl || return 1
    environment tensorrt-rtx-cu13-bindings tensorrt-rtx-cu13-libs nvidia-modelopt polygraphy \
        | tee -a "$OUT/environment.txt"
    # TensorRT for RTX lists no Hopper target, so on an H100 or H200 gms-deploy refuses to build or
    # load its engines, in one line. Whether that refusal, or TensorRT's own validity verdict, is
    # right is the finding: the demo model says it in seconds, so it comes first, in four steps so
    # that the line names the one that failed (a step out of time, rc 124, is no finding). A step
    # refused is tried again with GMS_DEPLOY_TRT_ANY_GPU=1, which lifts both preflights for this
    # check alone and logs TensorRT's verdict in words; the engine tests run only where an engine ran.
    step probe-export 60 "$PY" -m gms_deploy export --out "$WORK/probe" --precision fp16 --no-validate \
        --overwrite || return 1
    probe build "$PY" -m gms_deploy build "$WORK/probe" || return 1
    if [ "$REHEARSAL" != 1 ]; then  # a CPU has no GPU to run an engine on
        probe run "$PY" -m gms_deploy infer gms_deploy/data/samples/images/phantom_900000.png \
            --model "$WORK/probe" --backend tensorrt --out "$WORK/probe-masks" --overwrite || return 1
        # Every engine against eager PyTorch (the demo model) on pydicom's ultrasound frames.
        probe validate "$PY" -m gms_deploy build "$WORK/probe" --validate || return 1
    fi
    step tests-trt 120 "${BYPASS[@]}" bash -o pipefail -c "$PY -m pytest -m gpu -v -rs -p no:cacheprovider \
        tests/test_engines.py | tee '$OUT/tests-trt.log'"
    if [ ${#BYPASS[@]} = 0 ]; then
        echo "TensorRT for RTX works here: \`gpu_check.sh engines\` benches the full-size engines"
    else
        echo "finding: the preflight refuses this GPU, yet with it lifted the engine builds and runs;" \
            "\`GMS_DEPLOY_TRT_ANY_GPU=1 gpu_check.sh engines\` benches the full-size engines"
    fi
}

# probe NAME COMMAND...: one TensorRT step; where gms-deploy refuses it (not out of time), once more
# with the preflights lifted, which every later step then keeps.
BYPASS=()
probe() {
    local name=$1 rc
    shift
    step "probe-$name" 60 "${BYPASS[@]}" "$@"
    rc=$?
    if [ $rc != 0 ] && [ $rc != 124 ] && [ ${#BYPASS[@]} = 0 ]; then
        echo "finding: gms-deploy refuses to $name a TensorRT for RTX engine here (its line above);" \
            "again with GMS_DEPLOY_TRT_ANY_GPU=1"
        BYPASS=(env GMS_DEPLOY_TRT_ANY_GPU=1)
        step "probe-$name-any-gpu" 60 "${BYPASS[@]}" "$@"
        rc=$?
    fi
    if [ $rc != 0 ] && [ $rc != 124 ]; then
        echo "finding: TensorRT for RTX cannot $name this engine on this GPU, even with the preflights lifted"
    fi
    return $rc
}

engines() {
    step model 60 make_model || return 1
    step export 200 bash -o pipefail -c "$PY -m gms_deploy export --model '$MODEL' --out '$WORK/export' \
        --precision fp16 --no-validate --overwrite 2>&1 | tee '$OUT/export.log' \
        && $PY -m gms_deploy build '$WORK/export' --opt-batch 32 --max-batch 32 2>&1 | tee -a '$OUT/export.log'" || return 1
    step bench-trt 150 "$PY" -m gms_deploy bench --model "$MODEL" --export "$WORK/export" \
        --frames "$(cine)" "${BATCHES[@]}" --iterations "$ITERATIONS" --backend tensorrt \
        --json "$OUT/bench-trt.json" --plot "$OUT/bench-trt.png"
}

case "${1:-}" in
    first) first || status=1 ;;
    second) second || status=1 ;;
    engines) engines || status=1 ;;
    *) echo "usage: $0 first|second|engines" >&2; exit 2 ;;
esac
echo "gpu_check $1: $([ $status = 0 ] && echo ok || echo FAILED)"
exit $status
