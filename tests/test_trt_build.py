"""Every exported graph, FP32 and FP16, parses and builds in TensorRT for RTX as a strongly typed network.

TensorRT for RTX builds ahead of time with no GPU, so this is the CI proof that TensorRT accepts
the graphs; passing ONNX Runtime proves nothing about that (GMS.md).
"""

from __future__ import annotations

import sys
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper
from test_export import exported

from gms_deploy.onnx_export import ExportResult
from gms_deploy.trt import BatchProfile, BuildError, Flavour, TrtUnavailable, build_engine, find_flavour

pytest.importorskip(
    "tensorrt_rtx", reason="TensorRT for RTX is not installed (pip install tensorrt-rtx-cu13)"
)

PROFILE = BatchProfile(min=1, opt=1, max=2)
GRAPHS = [f"{g}_{p}.onnx" for g in ("encoder", "mapper", "decoder", "gms") for p in ("fp32", "fp16")]


@pytest.fixture(scope="module")
def rtx() -> Flavour:
    return find_flavour("rtx")


@pytest.fixture(scope="module", params=["parity", "sd"])
def export(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> ExportResult:
    parity = request.getfixturevalue("parity_dir") if request.param == "parity" else None
    return exported(request.param, tmp_path_factory, parity)


@pytest.mark.parametrize("graph", GRAPHS)
def test_graph_builds_strongly_typed_with_a_batch_profile(
    export: ExportResult, graph: str, rtx: Flavour
) -> None:
    assert rtx.network_flags() != 0  # TensorRT for RTX still has the flag: the network is strongly typed
    built = build_engine(rtx, export.out_dir / graph, PROFILE)
    assert len(built.engine) > 0
    (shape,) = built.inputs.values()
    assert shape[0] == -1 and all(d > 0 for d in shape[1:])


def test_build_for_listed_compute_capabilities(export: ExportResult, rtx: Flavour) -> None:
    assert "SM86" in rtx.compute_capabilities()
    assert build_engine(rtx, export.out_dir / "mapper_fp16.onnx", PROFILE, ("SM86", "SM120")).engine
    with pytest.raises(TrtUnavailable, match="cannot target SM90"):
        build_engine(rtx, export.out_dir / "mapper_fp16.onnx", PROFILE, ("SM90",))


def test_mixed_type_graph_is_refused_naming_the_node(tmp_path: Path, rtx: Flavour) -> None:
    """What onnxconverter-common writes (Half x Float elementwise) must fail with the node's name."""
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["y"], name="mixed_add")],
        "mixed",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor("w", TensorProto.FLOAT, [4], [1.0] * 4)],
    )
    path = tmp_path / "mixed.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    with pytest.raises(BuildError, match="mixed_add") as caught:
        build_engine(rtx, path, PROFILE)
    assert "\n" not in str(caught.value) and str(path) in str(caught.value)


def test_unknown_flavour_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    assert find_flavour("auto").name == "rtx"
    with pytest.raises(TrtUnavailable, match="pip install tensorrt-rtx-cu13"):
        find_flavour("tensorrt")
