#!/usr/bin/env bash
# Rehearses the GPU check here, on the CPU, in the GPU image's own versions, before a lent GPU is
# spent on it: the image's Python 3.12, PyTorch 2.11 and numpy differ from .venv's, and a package
# that fetch_wheels.sh carries at .venv's version may not work beside them. It builds .gpu-twin (a
# venv: the image's pinned versions, the rest of what the image has, then the carried set with
# --no-deps, as gpu_check.sh installs it), runs the whole test suite there, then both GPU-check calls
# as GPU_CHECK_CPU=1 rehearsals (results under out/gpu_twin). About 15 minutes on 2 cores; PyTorch
# 2.11 is a CUDA build from PyPI (some 3 GB) that runs on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
TWIN=${GPU_TWIN:-.gpu-twin}
# The image as the device tool's KINDS.md read it (2026-11): these versions, and these packages at
# versions it did not list (pip takes the newest).
PINNED=(torch==2.11.0 numpy==2.5.2 onnx==1.23.1 onnxruntime==1.30.0 huggingface_hub==1.33.0
    safetensors==0.8.0 onnxscript==0.7.2 onnx-ir==1.0.0)
UNPINNED=(pillow opencv-python-headless tifffile typer tqdm matplotlib pytest regex requests rich
    filelock scipy ninja nvidia-ml-py "setuptools>=77")
. benchmarks/carried.sh
# The first Python 3.12 that runs (a pyenv shim may be on PATH and refuse to run).
for PY312 in "${PY312:-}" python3.12 "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python ""; do
    [ -n "$PY312" ] && "$PY312" -c "" 2> /dev/null && break
done
[ -n "$PY312" ] || { echo "gpu_twin: no Python 3.12 here (set PY312)" >&2; exit 1; }

# Built once, and again when the carried versions change (or a build did not finish).
wanted=$(for name in "${FIRST[@]}" "${SECOND[@]}" "$LIBS" "$SOURCE_ONLY"; do echo "$name==$(version "$name")"; done)
if [ "$(cat "$TWIN/.built" 2> /dev/null)" != "$wanted" ]; then
    [ ! -e "$TWIN" ] || [ -f "$TWIN/pyvenv.cfg" ] || { echo "gpu_twin: $TWIN is no venv to replace" >&2; exit 1; }
    rm -rf "$TWIN"
    "$PY312" -m venv "$TWIN"
    "$TWIN/bin/pip" install -q "${PINNED[@]}" "${UNPINNED[@]}"
    # shellcheck disable=SC2086  # one requirement a line, none with spaces
    "$TWIN/bin/pip" install -q --no-deps $wanted
    "$TWIN/bin/pip" install -q --no-deps --no-build-isolation -e .
    echo "$wanted" > "$TWIN/.built"
fi
"$TWIN/bin/python" -c "import platform, torch, numpy; \
print('twin: python', platform.python_version(), 'torch', torch.__version__, 'numpy', numpy.__version__)"
status=0
"$TWIN/bin/python" -m pytest -q -p no:cacheprovider || status=1
export GPU_CHECK_CPU=1 PYTHON=$TWIN/bin/python OUT=$PWD/out/gpu_twin GPU_CHECK_WORK=/tmp/gms-gpu-twin
rm -rf "$OUT" "$GPU_CHECK_WORK"
bash benchmarks/gpu_check.sh first || status=1
bash benchmarks/gpu_check.sh second || status=1
exit $status
