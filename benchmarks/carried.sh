# Sourced by fetch_wheels.sh and gpu_twin.sh: what the lent GPU image lacks and travels as wheels,
# at the versions installed in this project's .venv (the set the tests passed with), by the
# `gpu_check.sh` call that first needs it. The image has PyTorch 2.11, onnx, onnxruntime, opencv,
# typer, matplotlib, ...: the device tool's KINDS.md lists it.
FIRST=(diffusers pydicom pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg pylibjpeg-rle)
SECOND=(nvidia-modelopt pydantic pydantic-core annotated-types typing-inspection omegaconf
    onnx-graphsurgeon polygraphy onnxslim lief tensorrt-rtx-cu13-bindings)
# Too large for one call: repacked and split by fetch_wheels.sh.
LIBS=tensorrt-rtx-cu13-libs
# Published as a source archive only (pure Python): built into a wheel.
SOURCE_ONLY=tensorrt-rtx-cu13
version() { .venv/bin/python -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1"; }
