"""ONNX export: the parity fixture and the 128-wide SD-VAE architecture, their manifest and validation.

The two expensive exports are made once per test session by ``exported`` and shared with the
ONNX Runtime and TensorRT tests, which import it from here.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from full_size import random_full_size
from typer.testing import CliRunner

from gms_deploy import onnx_export, validate
from gms_deploy.backends import BackendError, open_runner
from gms_deploy.backends.onnxruntime import CPU, open_session
from gms_deploy.bundle import ModelBundle, Settings
from gms_deploy.cli import app
from gms_deploy.errors import UsageError
from gms_deploy.export_format import FORMAT_VERSION, MANIFEST, ExportManifest, sha256
from gms_deploy.io.calibration import default_image_paths, real_images
from gms_deploy.model import graphs
from gms_deploy.onnx_export import FP32_OP_TYPES, ExportError, ExportOptions, ExportResult
from gms_deploy.validate import ValidationError, run_export

# 128-wide at 64 x 64 keeps the session's test time near a minute for that export; the 224 x 224
# figure is measured by hand (see the README) since it does not change what the graphs contain.
SD_IMAGE_SIZE = 64
PARITY_IMAGE_SIZE = 224

_EXPORTS: dict[str, ExportResult | Exception] = {}
cli = CliRunner()


def parity_bundle(parity_dir: Path) -> ModelBundle:
    return ModelBundle(
        parity_dir / "vae_ldm.ckpt", parity_dir / "mapper.pth", Settings(PARITY_IMAGE_SIZE), "parity"
    )


def exported(
    which: str, tmp_path_factory: pytest.TempPathFactory, parity_dir: Path | None = None
) -> ExportResult:
    """Export ``parity`` (give ``parity_dir``) or ``sd`` once per session, validated.

    The parity export is calibrated and validated on pydicom's ultrasound frames plus the fixture's
    own input image; the 128-wide one on the default frames.
    """
    if which not in _EXPORTS:
        root = tmp_path_factory.mktemp(f"export-{which}")
        if parity_dir is not None:
            bundle = parity_bundle(parity_dir)
            calibration = [*default_image_paths(), parity_dir / "input.png"]
        else:
            bundle, calibration = random_full_size(root / "src", SD_IMAGE_SIZE), None
        try:
            _EXPORTS[which] = run_export(bundle, root / "onnx", ExportOptions(calibration=calibration))
        except Exception as err:  # kept, so the tests sharing it fail at once instead of exporting again
            _EXPORTS[which] = err
    done = _EXPORTS[which]
    if isinstance(done, Exception):
        raise done
    return done


@pytest.fixture(scope="module")
def parity_export(parity_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> ExportResult:
    return exported("parity", tmp_path_factory, parity_dir)


@pytest.fixture(scope="module")
def sd_export(tmp_path_factory: pytest.TempPathFactory) -> ExportResult:
    return exported("sd", tmp_path_factory)


@pytest.fixture(params=["parity", "sd"])
def result(request: pytest.FixtureRequest) -> ExportResult:
    return request.getfixturevalue(f"{request.param}_export")


def test_every_graph_in_both_precisions_with_a_verifiable_manifest(result: ExportResult) -> None:
    manifest = json.loads(result.manifest.read_text())
    assert manifest["format_version"] == FORMAT_VERSION
    assert manifest["opset"] == graphs.OPSET
    assert set(manifest["versions"]) >= {"torch", "diffusers", "onnx", "nvidia-modelopt"}
    assert all(manifest["versions"][k] for k in ("torch", "diffusers", "onnx", "nvidia-modelopt"))
    size = manifest["settings"]["image_size"]
    assert manifest["settings"]["scale_factor"] == pytest.approx(0.18215)
    pairs = {(g["graph"], g["precision"]) for g in manifest["graphs"]}
    assert pairs == {(g, p) for g in ("encoder", "mapper", "decoder", "gms") for p in ("fp32", "fp16")}
    for entry in manifest["graphs"]:
        path = result.out_dir / entry["file"]
        assert sha256(path) == entry["sha256"]
        model = onnx.load(str(path))
        declared = {t["name"]: t["shape"] for t in entry["inputs"] + entry["outputs"]}
        actual = {
            v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in (*model.graph.input, *model.graph.output)
        }
        assert actual == declared
        assert all(v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT for v in model.graph.input)
        assert all(v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT for v in model.graph.output)
        assert "Einsum" not in {n.op_type for n in model.graph.node}
    gms = next(g for g in manifest["graphs"] if g["graph"] == "gms")
    assert gms["inputs"][0]["shape"] == ["batch", 3, size, size]
    assert gms["outputs"][0]["shape"] == ["batch", 1, size, size]


def test_fp16_graph_is_mixed_with_explicit_casts_and_fp32_statistics(result: ExportResult) -> None:
    model = onnx.load(str(result.out_dir / "gms_fp16.onnx"))
    ops = [n.op_type for n in model.graph.node]
    assert "Cast" in ops
    weights = {init.data_type for init in model.graph.initializer}
    assert onnx.TensorProto.FLOAT16 in weights
    typed = {
        v.name: v.type.tensor_type.elem_type
        for v in onnx.shape_inference.infer_shapes(model).graph.value_info
    }
    for node in model.graph.node:
        if node.op_type in FP32_OP_TYPES:
            assert typed.get(node.output[0], onnx.TensorProto.FLOAT) == onnx.TensorProto.FLOAT, node.name


def test_validation_table_is_printed_and_passes(result: ExportResult) -> None:
    report = result.validation
    assert report is not None and report.ok
    table = report.table()
    assert table.splitlines()[0].split()[:3] == ["graph", "precision", "inputs"]
    assert len(report.rows) == 16  # 4 graphs x 2 precisions x (random, real)
    assert all(row.finite for row in report.rows)
    for row in report.rows:
        if row.precision == "fp32":
            assert row.max_abs <= 1e-3  # the fused graph too: its GroupNorms sum precisely
        if row.graph == "gms" and row.precision == "fp16":
            assert row.dice is not None and row.dice >= 0.99  # at least one non-degenerate mask
    recorded = json.loads(result.manifest.read_text())["validation"]
    assert recorded["ok"] and len(recorded["rows"]) == 16
    print(f"\n{result.out_dir.parent.name}:\n{table}")


def test_fp32_graphs_sum_groupnorm_in_short_rows_fp16_keep_instancenorm(result: ExportResult) -> None:
    """ONNX Runtime's InstanceNormalization sums a whole group in one float32 accumulator."""
    for graph in ("encoder", "decoder", "gms"):
        fp32 = onnx.load(str(result.out_dir / onnx_export.file_name(graph, "fp32")), load_external_data=False)
        fp16 = onnx.load(str(result.out_dir / onnx_export.file_name(graph, "fp16")), load_external_data=False)
        assert not [n for n in fp32.graph.node if n.op_type == "InstanceNormalization"]
        assert [n for n in fp16.graph.node if n.op_type == "InstanceNormalization"]


@pytest.mark.parametrize(("channels", "groups", "size"), [(32, 32, 224), (64, 16, 28), (12, 4, 7)])
def test_two_level_group_norm_is_group_norm(channels: int, groups: int, size: int) -> None:
    torch.manual_seed(0)
    norm = torch.nn.GroupNorm(groups, channels, eps=1e-6).double()
    torch.nn.init.normal_(norm.weight)
    torch.nn.init.normal_(norm.bias)
    x = torch.randn(2, channels, size, size, dtype=torch.float64) * 5 + 3
    assert torch.allclose(graphs._two_level_group_norm(norm, x), norm(x), atol=1e-12)


def test_validation_fails_loudly_and_the_export_is_refused(
    tiny_bundle: ModelBundle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(validate, "FP32_MAX_ABS", 0.0)
    with pytest.raises(ValidationError, match="fp32 on random images: max abs") as caught:
        run_export(tiny_bundle, tmp_path / "onnx", ExportOptions(precisions=("fp32",)))
    assert caught.value.report is not None and not caught.value.report.ok
    with pytest.raises(BackendError, match="failed validation"):
        open_runner("onnxruntime", tmp_path / "onnx")


def test_external_data_past_the_size_limit(
    tiny_bundle: ModelBundle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_BYTES", 0)
    result = run_export(tiny_bundle, tmp_path / "onnx", ExportOptions(precisions=("fp32",)))
    gms = next(g for g in result.graphs if g.graph == "gms")
    assert list(gms.external_data) == ["gms_fp32.onnx.data"]
    assert (tmp_path / "onnx" / "gms_fp32.onnx.data").stat().st_size > 0
    runner = open_runner("onnxruntime", tmp_path / "onnx")
    assert runner(np.zeros((1, 3, 32, 32), np.float32)).shape == (1, 32, 32)


def test_existing_export_is_kept_unless_overwrite(
    tiny_bundle: ModelBundle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "onnx"
    run_export(tiny_bundle, out, ExportOptions(precisions=("fp32",)), validate=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(UsageError, match=r"already holds an export \(--overwrite replaces it\)"):
        run_export(tiny_bundle, out, ExportOptions(precisions=("fp32",)), validate=False)
    with pytest.raises(ExportError, match="precisions"):
        ExportOptions(precisions=("int8",), overwrite=True)

    def interrupted(*args: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(onnx_export, "_sanitise", interrupted)  # Ctrl-C in the middle of the graphs
    with pytest.raises(KeyboardInterrupt):
        run_export(tiny_bundle, out, ExportOptions(precisions=("fp32",), overwrite=True), validate=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the old export, whole
    assert [p.name for p in tmp_path.iterdir()] == ["onnx"]  # and no half-made one beside it
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(UsageError, match="a folder of other files, not an export"):
        run_export(tiny_bundle, tmp_path / "other", ExportOptions(precisions=("fp32",)), validate=False)


def test_cli_export_prints_the_table(tiny_bundle: ModelBundle, tmp_path: Path) -> None:
    out = tmp_path / "onnx"
    args = ["export", "--model", str(tiny_bundle.vae.parent), "--out", str(out), "--image-size", "48"]
    done = cli.invoke(app, args)
    assert done.exit_code == 0, done.output
    assert "graph" in done.output and "8 graph(s)" in done.output
    assert json.loads((out / MANIFEST).read_text())["settings"]["image_size"] == 48
    again = cli.invoke(app, args)
    assert again.exit_code == 2 and "already holds an export" in again.output


def test_engines_are_judged_by_the_layer_export_validation_uses(
    tiny_bundle: ModelBundle, tiny_onnx: Path, tmp_path: Path
) -> None:
    """``build --validate``'s comparison, on the CPU: ONNX Runtime runs each graph where the GPU would
    run its engine, judged by the engines' FP16 criteria. A faithful graph passes; against another
    model's weights, or with a NaN in its output, it is refused."""
    from conftest import make_tiny_bundle

    manifest = ExportManifest.read(tiny_onnx)
    model = tiny_bundle.build()
    specs = graphs.graph_specs(model, manifest.settings)

    def in_place_of_an_engine(graph: str) -> Callable[[], validate.GraphRun]:
        session = open_session(manifest, manifest.graph(graph, "fp32"), [CPU], False)
        return lambda: partial(validate._onnx_run, session, specs[graph], False)

    names = [spec.name for spec in specs.values()]
    real = real_images()
    good = validate.compare_graphs(
        manifest.settings, model, real, [(g, "fp16", in_place_of_an_engine(g)) for g in names]
    )
    assert good.ok, good.table()
    assert {r.graph for r in good.rows if r.dice is not None} == {"decoder", "gms"}  # masks judged
    other = make_tiny_bundle(tmp_path, seed=1).build()
    wrong = validate.compare_graphs(
        manifest.settings, other, real, [("gms", "fp16", in_place_of_an_engine("gms"))]
    )
    assert not wrong.ok and all("Dice" in r.note for r in wrong.rows if not r.ok)
    with pytest.raises(ValidationError, match="engines do not match eager PyTorch: gms fp16 on"):
        validate.raise_for_failures(wrong, "engines")

    def nan(x: np.ndarray) -> tuple[np.ndarray, str]:
        return np.full((len(x), 1, *x.shape[2:]), np.nan, np.float32), ""

    broken = validate.compare_graphs(manifest.settings, model, real, [("gms", "fp16", lambda: nan)])
    assert all(not r.ok and r.note.startswith("NaN/Inf at the output") for r in broken.rows)


def test_export_keeps_library_noise_out_unless_v(tiny_bundle: ModelBundle, tmp_path: Path) -> None:
    """torch's Constant folding UserWarnings and ModelOpt's warnings used to fill every export's log."""
    import subprocess
    import sys

    command = [sys.executable, "-m", "gms_deploy", "export", "--model", str(tiny_bundle.vae.parent)]
    command += ["--out", str(tmp_path / "onnx"), "--precision", "fp16", "--no-validate"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "graph(s) ->" in lines[0], done.stderr
