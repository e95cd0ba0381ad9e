"""The export folder's manifest: its types round-trip, write atomically, look up and refuse in one line.

None of this needs an export: a manifest is built from its types here, so these run in a second.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from gms_deploy.bundle import Settings
from gms_deploy.export_format import (
    KEY_FIELDS,
    MANIFEST,
    BackendError,
    BatchProfile,
    EngineRecipe,
    ExportManifest,
    Fp16Conversion,
    GpuInfo,
    GraphFile,
    Latent,
    TensorSpec,
    ValidationReport,
    ValidationRow,
)


def _graph(graph: str, precision: str, size: int = 32) -> GraphFile:
    return GraphFile(
        graph=graph,
        precision=precision,
        file=f"{graph}_{precision}.onnx",
        sha256="0" * 64,
        bytes=1234,
        inputs=(TensorSpec.batched("image", 3, size),),
        outputs=(TensorSpec.batched("prob", 1, size),),
    )


def _engine(graph: str, gpu: GpuInfo | None) -> EngineRecipe:
    return EngineRecipe(
        graph=graph,
        precision="fp16",
        file=f"{graph}_fp16.engine",
        flavour="rtx",
        version="1.2.0",
        targets=("SM86",) if gpu is None else (),
        gpu=gpu,
        profile=BatchProfile(1, 1, 2),
        onnx_sha256="1" * 64,
    )


def _manifest(folder: Path) -> ExportManifest:
    """Every section filled, FP16, a validation with a degenerate-mask row and two engines."""
    rows = (
        ValidationRow("gms", "fp16", "real", 1e-2, 3e-2, 0.995, True, True),
        ValidationRow(
            "gms", "fp16", "random", 2e-2, 5e-2, None, True, True, "2 degenerate mask(s) not in Dice"
        ),
    )
    return ExportManifest(
        folder=folder,
        created="2025-01-01T00:00:00+00:00",
        model="tiny",
        settings=Settings(image_size=32),
        latent=Latent(4, 16),
        opset=17,
        versions={"torch": "2.13.0", "nvidia-modelopt": None},
        graphs=(_graph("gms", "fp32"), _graph("gms", "fp16")),
        fp16=Fp16Conversion("modelopt.onnx.autocast", True, ("Softmax",), 512.0, 4),
        validation=ValidationReport(rows),
        engines=(
            _engine("gms", None).built("2" * 64, 12.5),
            _engine("mapper", GpuInfo("NVIDIA GeForce RTX 4090", 128, "SM89")).built("3" * 64, 1.0),
        ),
    )


def _imported_after(statement: str) -> set[str]:
    """The modules a fresh interpreter holds after ``statement``: what importing it costs a user."""
    script = f"{statement}; import sys, json; print(json.dumps(sorted(sys.modules)))"
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=True
    )
    return set(json.loads(done.stdout))


def _model_code(modules: set[str]) -> set[str]:
    return {m for m in modules if m == "diffusers" or m.startswith("gms_deploy.model")}


def test_the_format_module_imports_nothing_heavy() -> None:
    modules = _imported_after("import gms_deploy.export_format")
    assert not {"torch", "numpy", "onnx", "onnxruntime", "PIL", "pydicom"} & modules
    assert not _model_code(modules) and "gms_deploy.onnx_export" not in modules


def test_the_onnxruntime_runner_does_not_import_the_exporter() -> None:
    """The runner, validation and the exporter imported each other: opening one pulled in all three."""
    modules = _imported_after("import gms_deploy.backends.onnxruntime")
    assert not {"gms_deploy.onnx_export", "gms_deploy.validate"} & modules


def test_the_onnxruntime_runner_does_not_import_the_model_code() -> None:
    assert not _model_code(_imported_after("import gms_deploy.backends.onnxruntime"))


def test_written_then_read_is_the_same_manifest(tmp_path: Path) -> None:
    manifest = _manifest(tmp_path)
    manifest.write()
    assert ExportManifest.read(tmp_path) == manifest
    data = json.loads((tmp_path / MANIFEST).read_text())
    assert data["format"] == "gms-deploy-onnx" and data["format_version"] == 1
    assert data["validation"]["ok"] is True and data["engines"][0]["key"] == manifest.engines[0].key


def _tensor(name: str, channels: int) -> dict:
    return {"name": name, "dtype": "float32", "shape": ["batch", channels, 32, 32]}


# An FP32 export as ``onnx_export`` wrote it before these types existed, validated, keys in its order.
EARLIER = {
    "format": "gms-deploy-onnx",
    "format_version": 1,
    "created": "2025-01-01T00:00:00+00:00",
    "model": "tiny",
    "settings": {"image_size": 32, "scale_factor": 0.18215, "threshold": 0.5},
    "latent": {"channels": 4, "size": 16},
    "opset": 17,
    "versions": {"gms-deploy": "0.1.0", "nvidia-modelopt": None},
    "graphs": [
        {
            "graph": "gms",
            "precision": "fp32",
            "file": "gms_fp32.onnx",
            "sha256": "0" * 64,
            "bytes": 1234,
            "inputs": [_tensor("image", 3)],
            "outputs": [_tensor("prob", 1)],
            "external_data": ["gms_fp32.onnx.data"],
        }
    ],
    "validation": {
        "ok": True,
        "rows": [
            {
                "graph": "gms",
                "precision": "fp32",
                "inputs": "random",
                "max_abs": 2.5e-05,
                "max_rel": 3e-05,
                "dice": None,
                "finite": True,
                "ok": True,
                "note": "2 degenerate mask(s) not in Dice",
            }
        ],
    },
}


def test_a_manifest_as_earlier_versions_wrote_it_reads_and_writes_back_byte_for_byte(tmp_path: Path) -> None:
    earlier = json.dumps(EARLIER, indent=2) + "\n"
    (tmp_path / MANIFEST).write_text(earlier)
    manifest = ExportManifest.read(tmp_path)
    assert manifest.graph("gms", "fp32").external_data == ("gms_fp32.onnx.data",)
    manifest.write()
    assert (tmp_path / MANIFEST).read_text() == earlier


def test_an_engine_recorded_before_portable_existed_keeps_its_cache_key(tmp_path: Path) -> None:
    """``gms-deploy build`` wrote dicts in its own key order, without ``portable`` at first: no rebuild."""
    manifest = _manifest(tmp_path)
    manifest.write()
    data = json.loads((tmp_path / MANIFEST).read_text())
    old = {k: data["engines"][0][k] for k in ("graph", "file", "precision", "flavour", "version", "targets")}
    old |= {k: data["engines"][0][k] for k in ("gpu", "profile", "onnx_sha256", "sha256", "seconds")}
    old["key"] = hashlib.sha256(
        json.dumps({k: old[k] for k in KEY_FIELDS}, sort_keys=True).encode()
    ).hexdigest()
    data["engines"] = [old]
    (tmp_path / MANIFEST).write_text(json.dumps(data))
    (entry,) = ExportManifest.read(tmp_path).engines
    assert entry.portable is False and entry.key == old["key"] == manifest.engines[0].key


def test_an_interrupted_write_leaves_the_old_manifest_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    manifest = _manifest(tmp_path)
    manifest.write()
    before = (tmp_path / MANIFEST).read_bytes()

    def crash(fd: int) -> None:
        raise OSError("disk full")

    monkeypatch.setattr("gms_deploy.io.outputs.os.fsync", crash)
    with pytest.raises(OSError, match="disk full"):
        replace(manifest, engines=()).write()
    assert (tmp_path / MANIFEST).read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [MANIFEST]  # no temporary file left beside it


def test_graph_and_engine_look_ups(tmp_path: Path) -> None:
    manifest = _manifest(tmp_path)
    assert manifest.graph("gms", "fp16") is manifest.graphs[1]
    assert manifest.engine("mapper", "fp16") is manifest.engines[1]
    assert manifest.find_engine("decoder", "fp16") is None
    rebuilt = replace(_engine("mapper", None), targets=("SM120",)).built("4" * 64, 2.0)
    again = manifest.with_engine(rebuilt)
    assert again.engines == (manifest.engines[0], rebuilt)
    for look_up, message in (
        (
            lambda: manifest.graph("decoder", "fp32"),
            "lists no decoder graph in fp32 (it has: gms fp32, gms fp16)",
        ),
        (
            lambda: manifest.engine("gms", "fp32"),
            f"no gms fp32 engine recorded; run `gms-deploy build {tmp_path}`",
        ),
    ):
        with pytest.raises(BackendError) as caught:
            look_up()
        assert str(caught.value).startswith(f"{tmp_path / MANIFEST}: ") and message in str(caught.value)
        assert "\n" not in str(caught.value)


DELETE = object()
# (where in the written JSON, what goes there or DELETE, what the refusal says)
BROKEN: dict[str, tuple[tuple[str | int, ...], object, str]] = {
    "foreign file": (("format",), "something-else", "not a gms-deploy ONNX export manifest"),
    "scalar missing": (("created",), DELETE, "'created' is missing or of the wrong type"),
    "settings wrong": (("settings", "threshold"), 2.0, "invalid settings (threshold must lie strictly"),
    "graph field missing": (("graphs", 0, "sha256"), DELETE, "graphs[0]: 'sha256' is missing"),
    "graph field of the wrong type": (("graphs", 1, "bytes"), "big", "graphs[1] bytes: expected int"),
    "shape of the wrong type": (
        ("graphs", 0, "outputs", 0, "shape"),
        [None],
        "graphs[0] tensor 1 shape: expected tuple[int | str, ...]",
    ),
    "external data outside the folder": (
        ("graphs", 0, "external_data"),
        ["/etc/passwd"],
        "graphs[0]: '/etc/passwd' is not the name of a file in the export folder",
    ),
    "engine gpu not an object": (("engines", 1, "gpu"), "RTX", "engines[1] gpu is not an object"),
    "engine profile impossible": (
        ("engines", 0, "profile"),
        {"min": 4, "opt": 1, "max": 2},
        "engines[0] profile: batch profile needs 1 <= min <= opt <= max",
    ),
    "failed validation": (("validation", "rows", 0, "ok"), False, "this export failed validation"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_a_broken_manifest_is_refused_in_one_line(case: str, tmp_path: Path) -> None:
    (*parents, last), value, message = BROKEN[case]
    _manifest(tmp_path).write()
    data = json.loads((tmp_path / MANIFEST).read_text())
    target = data
    for key in parents:
        target = target[key]
    if value is DELETE:
        del target[last]
    else:
        target[last] = value
    (tmp_path / MANIFEST).write_text(json.dumps(data))
    with pytest.raises(BackendError) as caught:
        ExportManifest.read(tmp_path)
    assert message in str(caught.value) and "\n" not in str(caught.value), str(caught.value)


def test_keys_a_later_writer_adds_are_left_alone(tmp_path: Path) -> None:
    manifest = _manifest(tmp_path)
    manifest.write()
    data = json.loads((tmp_path / MANIFEST).read_text())
    data["graphs"][0]["producer"] = "a later gms-deploy"
    (tmp_path / MANIFEST).write_text(json.dumps(data))
    assert ExportManifest.read(tmp_path) == manifest
