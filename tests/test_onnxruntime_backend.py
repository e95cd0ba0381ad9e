"""The ONNX Runtime backend: same masks as PyTorch, and one clear line for every broken export."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pydicom.data import get_testdata_file
from test_export import exported
from typer.testing import CliRunner

from gms_deploy.backends import BackendError, ModelSource, open_runner
from gms_deploy.backends.onnxruntime import OnnxRuntimeRunner
from gms_deploy.bundle import ModelBundle
from gms_deploy.cli import app
from gms_deploy.export_format import MANIFEST, ExportManifest, sha256
from gms_deploy.io.images import read_image
from gms_deploy.metrics import dice
from gms_deploy.preprocess import preprocess

cli = CliRunner()


@pytest.fixture(scope="module")
def parity_onnx(parity_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return exported("parity", tmp_path_factory, parity_dir).out_dir


def test_infer_onnxruntime_masks_match_torch(parity_dir: Path, parity_onnx: Path, tmp_path: Path) -> None:
    """The issue's acceptance test: same files, same masks (Dice >= 0.99) as the PyTorch backend."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    shutil.copy(parity_dir / "input.png", inputs)
    for name in ("examples_rgb_color.dcm", "examples_palette.dcm", "examples_jpeg2k.dcm"):
        shutil.copy(get_testdata_file(name), inputs)
    model = ["--vae", str(parity_dir / "vae_ldm.ckpt"), "--mapper", str(parity_dir / "mapper.pth")]
    for backend, flags in (("torch", model), ("onnxruntime", ["--model", str(parity_onnx)])):
        done = cli.invoke(
            app, ["infer", str(inputs), "--out", str(tmp_path / backend), "--backend", backend, *flags]
        )
        assert done.exit_code == 0, done.output
    torch_masks = sorted((tmp_path / "torch").rglob("*_mask.png"))
    assert len(torch_masks) == 4  # the PNG and three single-frame DICOMs (a cine adds a minute, no coverage)
    for torch_mask in torch_masks:
        ort_mask = tmp_path / "onnxruntime" / torch_mask.relative_to(tmp_path / "torch")
        a, b = (np.asarray(Image.open(p)) > 0 for p in (torch_mask, ort_mask))
        assert dice(a, b, empty=1.0) >= 0.99, torch_mask.name


def test_fp16_graph_runs_as_written(parity_dir: Path, parity_onnx: Path) -> None:
    """Validation marks every tensor an output; the file as written must run too (CUDA users get it)."""
    image = preprocess(read_image(parity_dir / "input.png"), 224)[None]
    fp16 = OnnxRuntimeRunner(parity_onnx, precision="fp16")
    fp32 = OnnxRuntimeRunner(parity_onnx, precision="fp32")
    assert fp16.precision == "fp16" and fp32.precision == "fp32"
    assert dice(fp16(image) > 0.5, fp32(image) > 0.5, empty=1.0) >= 0.99


def test_runner_reads_settings_from_the_manifest(tiny_onnx: Path) -> None:
    runner = open_runner("onnxruntime", tiny_onnx)
    assert isinstance(runner, OnnxRuntimeRunner)
    assert runner.settings.image_size == 32 and runner.precision == "fp32"
    assert "onnxruntime" in runner.description and "CPUExecutionProvider" in runner.description
    prob = runner(np.zeros((2, 3, 32, 32), np.float32))
    assert prob.shape == (2, 32, 32) and prob.dtype == np.float32
    with pytest.raises(BackendError, match="expects B x 3 x 32 x 32"):
        runner(np.zeros((1, 3, 64, 64), np.float32))


def test_checkpoints_are_refused(tiny_onnx: Path, tiny_bundle: ModelBundle) -> None:
    with pytest.raises(BackendError, match="--model EXPORT_DIR"):
        open_runner("onnxruntime", ModelSource.from_flags(vae=tiny_bundle.vae, mapper=tiny_bundle.mapper))
    with pytest.raises(BackendError, match="no CUDA provider"):
        open_runner("onnxruntime", tiny_onnx, device="cuda")


def _edit_manifest(change: Callable[[dict], None]) -> Callable[[Path], None]:
    def edit(export: Path) -> None:
        data = json.loads((export / MANIFEST).read_text())
        change(data)
        (export / MANIFEST).write_text(json.dumps(data))

    return edit


def _corrupt(export: Path) -> None:
    """Garbage that the manifest vouches for: only parsing can tell."""
    (export / "gms_fp32.onnx").write_bytes(b"\x08\x07not a protobuf")
    _edit_manifest(lambda d: d["graphs"][-1].update(sha256=sha256(export / "gms_fp32.onnx")))(export)


BROKEN = {
    "no manifest": (lambda e: (e / MANIFEST).unlink(), f"{MANIFEST}: missing"),
    "bad json": (lambda e: (e / MANIFEST).write_text("{"), "unreadable manifest"),
    "missing graph": (lambda e: (e / "gms_fp32.onnx").unlink(), "gms_fp32.onnx: missing"),
    "hash mismatch": (
        lambda e: (e / "gms_fp32.onnx").write_bytes((e / "gms_fp32.onnx").read_bytes() + b"\0"),
        "gms_fp32.onnx: SHA-256 does not match",
    ),
    "corrupt onnx": (_corrupt, "gms_fp32.onnx: corrupt ONNX"),
    "wrong image size": (
        _edit_manifest(lambda d: d["settings"].update(image_size=64)),
        "gms_fp32.onnx: takes 32 x 32 images, but the model's image size is 64",
    ),
    "future format": (
        _edit_manifest(lambda d: d.update(format_version=99)),
        "format version 99, this gms-deploy reads version 1",
    ),
    "graphs not a list": (_edit_manifest(lambda d: d.update(graphs=5)), "'graphs' is not a list"),
    "file outside the folder": (
        _edit_manifest(lambda d: d["graphs"][-1].update(file="../gms_fp32.onnx")),
        "'../gms_fp32.onnx' is not the name of a file in the export folder",
    ),
    "tensor not an object": (
        _edit_manifest(lambda d: d["graphs"][-1].update(inputs=[5])),
        "] tensor 0 is not an object",
    ),
    "engine record damaged": (
        _edit_manifest(lambda d: d.update(engines=[{"graph": "gms"}])),
        "engines[0]: 'precision' is missing or of the wrong type",
    ),
    "unlisted graph": (
        _edit_manifest(lambda d: d.update(graphs=[g for g in d["graphs"] if g["graph"] != "gms"])),
        "lists no gms graph in fp32",
    ),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_exports_fail_in_one_line(case: str, tiny_onnx: Path, tmp_path: Path) -> None:
    breaker, message = BROKEN[case]
    export = tmp_path / "export"
    shutil.copytree(tiny_onnx, export)
    breaker(export)
    with pytest.raises(BackendError) as caught:
        open_runner("onnxruntime", export)
    assert message in str(caught.value) and "\n" not in str(caught.value)
    done = cli.invoke(
        app,
        [
            "infer",
            str(tmp_path),
            "--out",
            str(tmp_path / "o"),
            "--backend",
            "onnxruntime",
            "--model",
            str(export),
        ],
    )
    assert done.exit_code == 2 and "Traceback" not in done.output


def test_a_provider_that_did_not_load_is_refused_not_run_on_the_cpu(tiny_onnx: Path) -> None:
    """ONNX Runtime drops a provider it cannot load and runs on the CPU; CPU timings must not pass as CUDA.

    This onnxruntime has no CUDA provider at all, which is what a broken onnxruntime-gpu looks like
    to the session.
    """
    import onnxruntime as ort

    from gms_deploy.backends.onnxruntime import CPU, CUDA, open_session

    manifest = ExportManifest.read(tiny_onnx)
    entry = manifest.graph("gms", "fp32")
    if CUDA in ort.get_available_providers():
        pytest.skip("this onnxruntime has a CUDA provider")
    with pytest.raises(BackendError, match=f"did not load {CUDA}.*would run on {CPU}") as caught:
        open_session(manifest, entry, [(CUDA, {"device_id": 0}), CPU])
    assert "\n" not in str(caught.value)
    assert open_session(manifest, entry, [CPU]).get_providers() == [CPU]


def test_sessions_take_the_process_thread_budget(tiny_onnx: Path) -> None:
    """``bench --threads`` gives PyTorch and ONNX Runtime the same budget, and ``infer`` keeps one too."""
    from gms_deploy.backends.onnxruntime import CPU, open_session

    manifest = ExportManifest.read(tiny_onnx)
    entry = manifest.graph("gms", "fp32")
    held = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            session = open_session(manifest, entry, [CPU])
            assert session.get_session_options().intra_op_num_threads == threads
    finally:
        torch.set_num_threads(held)
