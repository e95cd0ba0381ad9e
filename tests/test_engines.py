"""``gms-deploy build``: engines of a tiny model's export with TensorRT for RTX, their cache and checks.

The cache and the checks do not depend on the model, so a tiny one serves (and needs no ``../shared``);
the parity fixture's and the full-size architecture's graphs are built in ``test_trt_build``.

TensorRT for RTX builds ahead of time for a listed compute capability with no GPU, so building,
caching and every check that needs no GPU (manifest, versions, hashes) run in CI. Deserialising
and running an engine needs a GPU: that part is tested only where PyTorch sees one.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from test_export import cli

from gms_deploy.backends import BackendError, open_runner
from gms_deploy.bundle import ModelBundle
from gms_deploy.cli import app
from gms_deploy.engines import (
    GRAPHS,
    BuildOptions,
    EngineRecord,
    GpuInfo,
    build_engines,
    check_engine,
    invalidity_reasons,
)
from gms_deploy.export_format import (
    MANIFEST,
    BatchProfile,
    ExportManifest,
    ValidationReport,
    ValidationRow,
    sha256,
)
from gms_deploy.onnx_export import export_model
from gms_deploy.trt import Flavour, TrtUnavailable, find_flavour
from gms_deploy.trt.flavour import ANY_GPU
from gms_deploy.validate import validate_engines

pytest.importorskip(
    "tensorrt_rtx", reason="TensorRT for RTX is not installed (pip install tensorrt-rtx-cu13)"
)

TARGETS = ("SM86",)
BUILD = BuildOptions(flavour="rtx", profile=BatchProfile(max=2), targets=TARGETS)
NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the GPU-less path")


@pytest.fixture(scope="module")
def rtx() -> Flavour:
    return find_flavour("rtx")


@pytest.fixture(scope="module")
def first_build(
    tiny_bundle: ModelBundle, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, list[EngineRecord]]:
    """Every FP16 engine of an export of the tiny model (FP32 and FP16, unvalidated)."""
    root = tmp_path_factory.mktemp("engines") / "export"
    export_model(tiny_bundle, root)
    return root, build_engines(root, BUILD)


@pytest.fixture
def built(first_build: tuple[Path, list[EngineRecord]], tmp_path: Path) -> Path:
    """A private copy of the built export, so that tests which change it stay independent."""
    shutil.copytree(first_build[0], tmp_path / "export")
    return tmp_path / "export"


def engines(export_dir: Path) -> dict[str, dict]:
    return {e["graph"]: e for e in json.loads((export_dir / MANIFEST).read_text())["engines"]}


def test_every_engine_is_built_and_recorded(
    first_build: tuple[Path, list[EngineRecord]], rtx: Flavour
) -> None:
    root, records = first_build
    assert [(r.graph, r.status) for r in records] == [(g, "built") for g in GRAPHS]
    manifest = json.loads((root / MANIFEST).read_text())
    onnx_hashes = {g["graph"]: g["sha256"] for g in manifest["graphs"] if g["precision"] == "fp16"}
    assert len(manifest["graphs"]) == 8 and "settings" in manifest  # the rest of it is kept
    recorded = engines(root)
    assert set(recorded) == set(GRAPHS)
    for graph, entry in recorded.items():
        path = root / f"{graph}_fp16.engine"
        assert entry["file"] == path.name and path.stat().st_size > 0
        assert entry["sha256"] == sha256(path)
        assert entry["onnx_sha256"] == onnx_hashes[graph]
        assert (entry["flavour"], entry["version"]) == ("rtx", rtx.version)
        assert entry["targets"] == list(TARGETS) and entry["precision"] == "fp16"
        assert entry["gpu"] is None  # built without one
        assert entry["profile"] == {"min": 1, "opt": 1, "max": 2}
        assert entry["seconds"] > 0 and len(entry["key"]) == 64
    assert not list(root.glob(".*.part"))  # atomic writes left no temporary files


def test_unchanged_build_is_skipped(built: Path, caplog: pytest.LogCaptureFixture) -> None:
    before = engines(built)
    with caplog.at_level(logging.INFO, "gms_deploy"):
        records = build_engines(built, BUILD)
    assert {r.status for r in records} == {"skipped"}
    assert "skipped" in caplog.text
    assert engines(built) == before


def test_changed_onnx_rebuilds_only_that_engine(built: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = built / "mapper_fp16.onnx"
    model = onnx.load(str(path))
    model.doc_string = "re-exported"
    onnx.save(model, str(path))
    manifest = json.loads((built / MANIFEST).read_text())
    next(g for g in manifest["graphs"] if g["file"] == path.name)["sha256"] = sha256(path)
    (built / MANIFEST).write_text(json.dumps(manifest))
    with caplog.at_level(logging.INFO, "gms_deploy"):
        records = build_engines(built, BUILD)
    assert {r.graph: r.status for r in records} == {
        "encoder": "skipped",
        "mapper": "built",
        "decoder": "skipped",
        "gms": "skipped",
    }
    assert "mapper_fp16.engine: rebuilding: ONNX graph changed since the last build" in caplog.text
    assert engines(built)["mapper"]["onnx_sha256"] == sha256(path)


def test_rebuild_forces_and_other_targets_invalidate(built: Path) -> None:
    (forced,) = build_engines(built, replace(BUILD, rebuild=True, graphs=("mapper",)))
    assert (forced.status, forced.reason) == ("built", "--rebuild")
    (retarget,) = build_engines(built, replace(BUILD, targets=("SM89",), graphs=("mapper",)))
    assert (retarget.status, retarget.reason) == ("built", "targets changed since the last build")
    assert engines(built)["mapper"]["targets"] == ["SM89"]


def test_onnx_not_matching_its_manifest_is_refused(built: Path) -> None:
    (built / "decoder_fp16.onnx").write_bytes(b"not onnx")
    with pytest.raises(BackendError, match="SHA-256 does not match"):
        build_engines(built, replace(BUILD, graphs=("decoder",)))


def test_check_passes_for_a_good_engine(built: Path, rtx: Flavour) -> None:
    assert check_engine(built, "gms", rtx) == built / "gms_fp16.engine"


@pytest.mark.parametrize("damage", ["truncated", "foreign"])
def test_damaged_engine_is_refused_with_one_line(built: Path, rtx: Flavour, damage: str) -> None:
    path = built / "gms_fp16.engine"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\0" * 4096)
    with pytest.raises(BackendError, match="truncated or not the engine") as caught:
        check_engine(built, "gms", rtx)
    assert "\n" not in str(caught.value) and f"gms-deploy build {built}" in str(caught.value)


def test_engine_from_another_tensorrt_or_for_another_gpu_is_refused(built: Path, rtx: Flavour) -> None:
    manifest = json.loads((built / MANIFEST).read_text())
    pristine = json.dumps(manifest)
    next(e for e in manifest["engines"] if e["graph"] == "gms")["version"] = "0.9.0"
    (built / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(BackendError, match=r"built with TensorRT rtx 0\.9\.0, installed is rtx .*--rebuild"):
        check_engine(built, "gms", rtx)
    (built / MANIFEST).write_text(pristine)
    with pytest.raises(BackendError, match=r"built for SM86, this GPU .* is SM89"):
        check_engine(built, "gms", rtx, gpu=GpuInfo("NVIDIA GeForce RTX 4090", 128, "SM89"))
    with pytest.raises(BackendError, match="no gms fp32 engine recorded"):
        check_engine(built, "gms", rtx, precision="fp32")


def test_cli_build_reports_each_engine(built: Path) -> None:
    flags = ["--trt", "rtx", "--max-batch", "2", "--target-cc", "sm86"]
    done = cli.invoke(app, ["build", str(built), *flags])
    assert done.exit_code == 0, done.output
    lines = done.stdout.strip().splitlines()
    assert [line.split(":")[0] for line in lines] == [f"{g}_fp16.engine" for g in GRAPHS]
    assert all("skipped (unchanged)" in line and "MiB" in line for line in lines)
    refused = cli.invoke(app, ["build", str(built), "--trt", "rtx", "--target-cc", "SM90"])
    assert refused.exit_code == 2
    assert "cannot target SM90" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1


H200 = GpuInfo("NVIDIA H200", 132, "SM90")


def test_a_gpu_tensorrt_for_rtx_has_no_target_for_is_refused_up_front(built: Path, rtx: Flavour) -> None:
    """Hopper (SM90) is not in its list: say so and what to use, not "invalid; rebuild" (no rebuild helps)."""
    with pytest.raises(TrtUnavailable, match=r"no SM90 target \(NVIDIA H200\).*--trt tensorrt"):
        rtx.check_gpu(H200.name, H200.compute_capability)
    with pytest.raises(BackendError, match=r"no SM90 target .*--trt tensorrt") as caught:
        check_engine(built, "gms", rtx, gpu=H200)
    assert "\n" not in str(caught.value) and "--rebuild" not in str(caught.value)
    rtx.check_gpu("NVIDIA GeForce RTX 4090", "SM89")  # listed: no complaint


def test_a_portable_build_is_recorded_as_portable(built: Path, rtx: Flavour) -> None:
    """No --target-cc: one engine for Ampere and later, not for the build machine's GPU (it has none)."""
    (record,) = build_engines(
        built, BuildOptions(flavour="rtx", profile=BatchProfile(max=2), graphs=("mapper",))
    )
    assert record.status == "built"
    entry = engines(built)["mapper"]
    assert entry["portable"] is True and entry["targets"] == [] and entry["gpu"] is None
    assert engines(built)["gms"]["portable"] is False  # built for SM86
    with pytest.raises(BackendError, match=r"built for SM80, SM86, SM89, SM120.*this GPU .* is SM75"):
        check_engine(built, "mapper", rtx, gpu=GpuInfo("NVIDIA GeForce RTX 2080 Ti", 68, "SM75"))


def test_engine_invalidity_diagnostics_are_words(rtx: Flavour) -> None:
    bits = rtx.trt.EngineInvalidityDiagnostics
    reasons = invalidity_reasons(rtx, int(bits.UNSUPPORTED_CC) | int(bits.OLD_CUDA_DRIVER))
    assert reasons == "not built for this GPU's compute capability; the CUDA driver is too old"


@NO_GPU
def test_tensorrt_runner_says_there_is_no_gpu(built: Path) -> None:
    with pytest.raises(BackendError, match="needs a CUDA GPU") as caught:
        open_runner("tensorrt", built)
    assert "\n" not in str(caught.value)
    with pytest.raises(BackendError, match="--model EXPORT_DIR"):
        open_runner("tensorrt", None)


@pytest.mark.gpu
def test_tensorrt_runner_matches_onnxruntime_on_a_gpu(
    built: Path, rtx: Flavour, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Built for the GPU present (replacing the SM86 engines), run, and compared with ONNX Runtime.

    Where TensorRT for RTX lists no target for this GPU (Hopper's SM90), it is still tried, past the
    up-front refusal and the validity preflight: what it does there is the finding, reported as the
    skip's reason.
    """
    target = "SM{}{}".format(*torch.cuda.get_device_capability())
    if target not in rtx.compute_capabilities():
        monkeypatch.setenv(ANY_GPU, "1")
    size = ExportManifest.read(built).settings.image_size
    images = np.random.default_rng(0).uniform(-1, 1, (3, 3, size, size)).astype(np.float32)
    try:
        build_engines(built, BuildOptions(flavour="rtx", profile=BatchProfile(max=2)))
        runner = open_runner("tensorrt", built, device="cuda")
        for _ in range(3):  # warm-up, CUDA graph capture, replay
            prob = runner(images)
    except Exception as err:
        if target in rtx.compute_capabilities():
            raise
        pytest.skip(f"TensorRT for RTX lists no {target} target; on this GPU: {type(err).__name__}: {err}")
    expected = open_runner("onnxruntime", built)(images)
    assert prob.shape == expected.shape
    mask, want = prob > 0.5, expected > 0.5
    assert 2 * (mask & want).sum() / (mask.sum() + want.sum() + 1e-9) >= 0.99


def test_export_with_engines_builds_them_in_one_command(tmp_path: Path) -> None:
    """Export on the machine that runs the engines: `export --engines` (the demo model, FP16 only)."""
    out = tmp_path / "onnx"
    result = cli.invoke(
        app, ["export", "--out", str(out), "--precision", "fp16", "--no-validate", "--engines"]
    )
    assert result.exit_code == 0, result.output
    engines = json.loads((out / MANIFEST).read_text())["engines"]
    assert sorted(e["graph"] for e in engines) == sorted(GRAPHS)
    assert all((out / e["file"]).is_file() and e["precision"] == "fp16" for e in engines)
    assert result.output.count(": built, ") == len(GRAPHS)  # a first build: no "(not built yet)"


def test_an_engine_that_failed_validation_is_refused(built: Path, rtx: Flavour) -> None:
    """``build --validate`` records each engine's rows; the runner's check reads them back."""
    manifest = ExportManifest.read(built)
    row = ValidationRow("gms", "fp16", "real", 0.4, 0.4, 0.7, True, False, "Dice 0.7000 < 0.99")
    failed = replace(manifest.engine("gms", "fp16"), validation=ValidationReport((row,)))
    manifest.with_engine(failed).write()
    assert ExportManifest.read(built).engine("gms", "fp16") == failed  # round trip
    with pytest.raises(BackendError, match=r"failed `gms-deploy build --validate`") as caught:
        check_engine(built, "gms", rtx)
    assert "\n" not in str(caught.value)
    assert check_engine(built, "mapper", rtx) == built / "mapper_fp16.engine"  # the others still load


@NO_GPU
def test_build_validate_without_a_gpu_says_so_before_building(built: Path) -> None:
    before = {p.name: sha256(p) for p in built.glob("*.engine")}
    done = cli.invoke(
        app, ["build", str(built), "--trt", "rtx", "--target-cc", "SM86", "--rebuild", "--validate"]
    )
    assert done.exit_code == 2 and "build --validate runs the engines, which needs a CUDA GPU" in done.stderr
    assert {p.name: sha256(p) for p in built.glob("*.engine")} == before  # nothing was rebuilt


@pytest.mark.gpu
def test_build_validate_compares_every_engine_with_pytorch(
    built: Path, tiny_bundle: ModelBundle, rtx: Flavour, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Built for the GPU present, each engine against eager PyTorch; each verdict in the manifest."""
    target = "SM{}{}".format(*torch.cuda.get_device_capability())
    if target not in rtx.compute_capabilities():
        monkeypatch.setenv(ANY_GPU, "1")
    try:
        build_engines(built, BuildOptions(flavour="rtx", profile=BatchProfile(max=2)))
        report = validate_engines(built, tiny_bundle, GRAPHS)
    except Exception as err:
        if target in rtx.compute_capabilities():
            raise
        pytest.skip(f"TensorRT for RTX lists no {target} target; on this GPU: {type(err).__name__}: {err}")
    assert report.ok, report.table()
    assert {(r.graph, r.inputs) for r in report.rows} == {(g, i) for g in GRAPHS for i in ("random", "real")}
    recorded = ExportManifest.read(built)
    assert all(recorded.engine(g, "fp16").validation is not None for g in GRAPHS)
