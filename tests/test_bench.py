"""``gms-deploy bench`` on the CPU: real runs of eager PyTorch and ONNX Runtime on a tiny model.

Only the bookkeeping is checked (fields, orderings, agreement, files, skips, errors); no timing is
asserted, since the figures on a shared CI machine mean nothing.
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from gms_deploy.backends import BackendError, ModelSource
from gms_deploy.bench import BenchConfig, BenchRecord, BenchResult, run_bench
from gms_deploy.bench_report import bench_figure, format_table, plot, write_json
from gms_deploy.bundle import ModelBundle
from gms_deploy.cli import app
from gms_deploy.versions import environment

REQUIRED = ("backend", "precision", "batch_size", "latency_ms_p50", "throughput_img_s", "speedup_vs_eager")
FAST = {"device": "cpu", "warmup": 1, "iterations": 3, "threads": 1}
cli = CliRunner()


def _weights(bundle: ModelBundle) -> ModelSource:
    return ModelSource.from_flags(bundle.vae.parent)


def _ran(records: list[BenchRecord]) -> list[BenchRecord]:
    return [r for r in records if r.status == "ok"]


def _skipped(records: list[BenchRecord]) -> dict[str, str]:
    return {f"{r.label} {r.image_size}": r.reason or "" for r in records if r.status != "ok"}


@pytest.fixture(scope="module")
def torch_records(tiny_bundle: ModelBundle, one_thread: None) -> list[BenchRecord]:
    return run_bench(BenchConfig(source=_weights(tiny_bundle), batch_sizes=(2, 1, 2), **FAST)).records  # 1, 2


@pytest.fixture(scope="module")
def ort_result(tiny_bundle: ModelBundle, tiny_onnx: Path, one_thread: None) -> BenchResult:
    config = BenchConfig(
        source=ModelSource.from_flags(tiny_bundle.vae.parent, export=tiny_onnx),
        backends=("onnxruntime",),
        batch_sizes=(1, 3),
        image_sizes=(32, 48),
        **FAST,
    )
    return run_bench(config)


@pytest.fixture(scope="module")
def ort_records(ort_result: BenchResult) -> list[BenchRecord]:
    return ort_result.records


def test_baseline_records(torch_records: list[BenchRecord]) -> None:
    ran = _ran(torch_records)
    assert [(r.backend, r.precision, r.device, r.batch_size) for r in ran] == [
        ("torch", "fp32", "cpu", 1),
        ("torch", "fp32", "cpu", 2),
    ]
    for r in ran:
        assert all(getattr(r, name) is not None for name in REQUIRED)
        assert r.image_size == 32 and r.iterations == 3
        assert r.speedup_vs_eager == r.speedup_min == r.speedup_max == 1.0  # each round's ratio to itself
        assert r.dice_mean == r.dice_min == 1.0 and r.prob_max_abs == 0.0
        assert 0 < r.latency_ms_p50 <= r.latency_ms_p90 <= r.latency_ms_p99  # type: ignore[operator]
        assert r.throughput_img_s == pytest.approx(r.batch_size * 1e3 / r.latency_ms_p50)  # type: ignore[operator]
        assert set(r.stages_ms) == {"pre", "network", "post", "encoder", "mapper", "decoder"}
        assert r.gflop_per_image and r.gflop_per_image > 0
        assert r.peak_gpu_mem_mib is None and r.roofline_pct is None  # CPU: no GPU memory, no roofline


def test_unrequested_unavailable_variants_are_listed_as_skipped(torch_records: list[BenchRecord]) -> None:
    skipped = _skipped(torch_records)
    assert "compiling on a CPU" in skipped["torch-compiled fp32 cpu host None"]
    assert "--export DIR" in skipped["onnxruntime fp32 cpu host None"]
    assert all(
        "needs a CUDA GPU" in skipped[f"{variant} cuda fused None"]
        for variant in ("torch fp32", "torch fp16", "tensorrt fp16")
    )
    table = format_table(torch_records)
    assert "p50 ms" in table and "skipped tensorrt fp16 cuda fused: needs a CUDA GPU" in table
    assert "TFLOP/s" not in table  # the roofline columns are for GPU runs


def test_onnxruntime_against_eager(ort_records: list[BenchRecord]) -> None:
    """Same frames, same masks; the export runs only at its own size, eager PyTorch at every size."""
    ran = {(r.backend, r.image_size, r.batch_size): r for r in _ran(ort_records)}
    assert set(ran) == {(b, s, n) for b in ("torch", "onnxruntime") for s in (32, 48) for n in (1, 3)} - {
        ("onnxruntime", 48, 1),
        ("onnxruntime", 48, 3),
    }
    for batch in (1, 3):
        ort = ran["onnxruntime", 32, batch]
        assert ort.precision == "fp32" and ort.device == "cpu" and "onnxruntime" in (ort.description or "")
        assert ort.dice_min is not None and ort.dice_min >= 0.99
        assert ort.prob_max_abs is not None and ort.prob_max_abs < 1e-3
        assert ort.speedup_min <= ort.speedup_vs_eager <= ort.speedup_max  # type: ignore[operator]
        assert ort.iterations == ran["torch", 32, batch].iterations == 3  # one ratio per interleaved round
        assert set(ort.stages_ms) == {"pre", "network", "post"}  # one fused graph: no per-stage calls
    skipped = _skipped(ort_records)
    assert "exported at 32 x 32" in skipped["onnxruntime fp32 cpu host 48"]
    assert not any(name.startswith(("torch ", "torch-compiled", "tensorrt")) for name in skipped)  # not asked


def test_json_and_plot(ort_result: BenchResult, ort_records: list[BenchRecord], tmp_path: Path) -> None:
    write_json(tmp_path / "bench.json", ort_records, environment() | ort_result.environment())
    data = json.loads((tmp_path / "bench.json").read_text())
    env = data["environment"]
    assert {"date", "cpu", "torch", "onnxruntime", "gpu", "driver", "cuda"} <= set(env)
    assert env["torch_threads"] == env["onnxruntime_threads"] == 1  # the budget asked for, not the default
    assert env["machine_busy"] in (True, False) and env["cpu_load"]["seconds_measured"] > 0
    assert env["cpu_load"]["other_processes_cores"] >= 0 and env["gpu_process_mem_mib"] is None
    assert len(data["records"]) == len(ort_records)
    for record in data["records"]:
        assert set(REQUIRED) | {"device", "status", "stages_ms"} <= set(record)
    plot(tmp_path / "bench.png", ort_records, environment())
    png = (tmp_path / "bench.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000


def test_plot_names_the_machine_and_date_and_reads_in_plain_numbers(tmp_path: Path) -> None:
    """Latencies within one decade get log-axis minor labels, which matplotlib writes as 4x10^1."""
    records = [
        BenchRecord(
            "torch", "fp32", "cpu", image_size=224, batch_size=batch, latency_ms_p50=ms, throughput_img_s=ips
        )
        for batch, ms, ips in ((1, 31.0, 32.3), (2, 44.0, 45.5), (4, 71.0, 56.3), (8, 120.0, 66.7))
    ]
    env = {"date": "2025-03-04T05:06:07+00:00", "cpu": "Test CPU 9000", "gpu": None}
    figure = bench_figure(records, env)
    figure.savefig(tmp_path / "bench.png")
    assert "Test CPU 9000" in figure.get_suptitle() and "2025-03-04" in figure.get_suptitle()
    latency, throughput = figure.axes
    assert latency.get_ylabel() == "ms" and throughput.get_ylabel() == "images/s"
    for axes in figure.axes:
        labels = [t.get_text() for minor in (False, True) for t in axes.get_yticklabels(minor=minor)]
        shown = [label for label in labels if label]
        assert shown and all(re.fullmatch(r"[0-9.]+", label) for label in shown), labels
    gpu = [replace(r, device="cuda") for r in records]
    assert "NVIDIA H200" in bench_figure(gpu, env | {"gpu": "NVIDIA H200"}).get_suptitle()


def test_version_says_what_a_bug_report_needs() -> None:
    """The same facts as a bench record's environment, for a user to paste."""
    done = cli.invoke(app, ["--version"])
    info, lines = environment(), done.output.splitlines()
    assert done.exit_code == 0 and lines[0] == f"gms-deploy {info['gms_deploy']}"
    assert f"  torch: {info['torch']}" in lines and f"  onnxruntime: {info['onnxruntime']}" in lines
    assert {line.split(":")[0].strip() for line in lines[1:]} >= {"gpu", "driver", "cuda", "tensorrt_rtx"}


def test_cli(tiny_bundle: ModelBundle, one_thread: None, tmp_path: Path) -> None:
    model = ["--model", str(tiny_bundle.vae.parent), "--device", "cpu", "--warmup", "0", "--iterations", "1"]
    out = ["--json", str(tmp_path / "b.json"), "--plot", str(tmp_path / "b.png")]
    done = cli.invoke(app, ["bench", *model, "--batch-size", "2", "--no-submodels", "--threads", "2", *out])
    assert done.exit_code == 0, done.output
    assert "p50 ms" in done.output and "skipped onnxruntime fp32 cpu" in done.output
    data = json.loads((tmp_path / "b.json").read_text())
    assert data["environment"]["torch_threads"] == 2 and torch.get_num_threads() == 1  # given back
    records = data["records"]
    assert [r["batch_size"] for r in records if r["status"] == "ok"] == [2]
    assert [set(r["stages_ms"]) for r in records if r["status"] == "ok"] == [{"pre", "network", "post"}]
    assert (tmp_path / "b.png").stat().st_size > 10_000


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--backend", "tensorrt"], "--backend tensorrt cannot run here: needs a CUDA GPU"),
        (["--backend", "onnxruntime"], "--backend onnxruntime cannot run here: needs --export DIR"),
        (["--backend", "tvm"], "unknown backend tvm"),
        (["--device", "cuda"], "PyTorch sees no CUDA GPU"),
        (["--export", "{tmp}"], "manifest.json: missing; is {tmp} a gms-deploy export directory?"),
        (["--frames", "{tmp}/gone"], "{tmp}/gone: no such file or folder"),
    ],
)
def test_cli_refuses_what_cannot_run(
    tiny_bundle: ModelBundle, flags: list[str], message: str, tmp_path: Path
) -> None:
    flags, message = [f.format(tmp=tmp_path) for f in flags], message.format(tmp=tmp_path)
    done = cli.invoke(app, ["bench", "--model", str(tiny_bundle.vae.parent), "--device", "cpu", *flags])
    assert done.exit_code == 2 and message in done.output
    assert len(done.output.strip().splitlines()) == 1, done.output


def test_explicit_unavailable_backend_raises_before_timing(tiny_bundle: ModelBundle) -> None:
    with pytest.raises(BackendError, match="needs a CUDA GPU"):
        run_bench(BenchConfig(source=_weights(tiny_bundle), backends=("tensorrt",), device="cpu"))


@pytest.mark.gpu
def test_gpu_records_memory_roofline_and_fused_agreement(tiny_bundle: ModelBundle) -> None:
    """Eager FP32 (host OpenCV, as the official code) against eager FP16 and compiled, fused on the GPU.

    Without the per-sub-model timings, which the CPU tests cover: compiled, each sub-model would
    compile once more per batch size, minutes of the GPU check's budget.
    """
    config = BenchConfig(
        source=_weights(tiny_bundle),
        batch_sizes=(1, 4),
        device="cuda",
        warmup=2,
        iterations=3,
        submodels=False,
    )
    records = _ran(run_bench(config))
    assert {r.backend for r in records} >= {"torch", "torch-compiled"}
    assert {(r.precision, r.pipeline) for r in records if r.backend == "torch"} >= {
        ("fp32", "host"),
        ("fp32", "fused"),
    }
    for r in records:
        assert r.device.startswith("cuda") and r.peak_gpu_mem_mib is not None and r.peak_gpu_mem_mib > 0
        assert r.achieved_tflop_s is not None and r.achieved_tflop_s > 0
        assert r.dice_min is not None and r.dice_min >= 0.99
        assert {"pre", "network", "post"} <= set(r.stages_ms)
    assert "TFLOP/s" in format_table(records)
