"""``gms-deploy bench`` results out: a plain-text table, JSON with the machine it ran on, a plot.

A benchmark figure is worthless without the GPU, driver and library versions that produced it,
so the JSON carries them beside the records.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from gms_deploy.bench import BenchRecord
from gms_deploy.errors import GmsError
from gms_deploy.io.outputs import write_atomic


def _number(spec: str, value: float | None) -> str:
    return "-" if value is None else format(value, spec)


def _stage(name: str) -> Callable[[BenchRecord], str]:
    return lambda r: _number(".2f", r.stages_ms.get(name))


COLUMNS: list[tuple[str, Callable[[BenchRecord], str]]] = [
    ("backend", lambda r: r.backend),
    ("prec", lambda r: r.precision),
    ("device", lambda r: r.device),
    ("pipeline", lambda r: r.pipeline),
    ("size", lambda r: str(r.image_size)),
    ("batch", lambda r: str(r.batch_size)),
    ("p50 ms", lambda r: _number(".2f", r.latency_ms_p50)),
    ("p90 ms", lambda r: _number(".2f", r.latency_ms_p90)),
    ("p99 ms", lambda r: _number(".2f", r.latency_ms_p99)),
    ("img/s", lambda r: _number(".1f", r.throughput_img_s)),
    ("x eager", lambda r: _number(".2f", r.speedup_vs_eager)),
    ("peak MiB", lambda r: _number(".0f", r.peak_gpu_mem_mib)),
    *((f"{name} ms", _stage(name)) for name in ("pre", "network", "encoder", "mapper", "decoder", "post")),
    ("Dice mean", lambda r: _number(".4f", r.dice_mean)),
    ("Dice min", lambda r: _number(".4f", r.dice_min)),
    ("prob diff", lambda r: _number(".1e", r.prob_max_abs)),
]
ROOFLINE: list[tuple[str, Callable[[BenchRecord], str]]] = [
    ("TFLOP/s", lambda r: _number(".1f", r.achieved_tflop_s)),
    ("% peak", lambda r: _number(".1f", r.roofline_pct)),
]


def format_table(records: Sequence[BenchRecord]) -> str:
    """One row per variant x image size x batch size, then one line per skipped variant and why.

    The roofline columns appear for GPU runs only: on a CPU, arithmetic is rarely what limits.
    """
    ran = [r for r in records if r.status == "ok"]
    columns = COLUMNS + (ROOFLINE if any(r.device.startswith("cuda") for r in ran) else [])
    rows = [[title for title, _ in columns], *([cell(r) for _, cell in columns] for r in ran)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(columns))]
    lines = ["  ".join(text.rjust(width) for text, width in zip(row, widths, strict=True)) for row in rows]
    for r in records:
        if r.status != "ok":
            at = f" at {r.image_size} px" if r.image_size else ""
            at += f", batch {r.batch_size}" if r.batch_size else ""
            lines.append(f"skipped {r.label}{at}: {r.reason}")
    return "\n".join(lines)


def write_json(path: Path, records: Sequence[BenchRecord], env: dict[str, Any]) -> None:
    """``{"environment": ..., "records": [...]}``, written atomically: no half file if interrupted."""
    text = json.dumps({"environment": env, "records": [r.to_json() for r in records]}, indent=2) + "\n"
    write_atomic(Path(path), lambda f: f.write(text.encode()))


def plot(path: Path, records: Sequence[BenchRecord]) -> None:
    """Latency p50 and throughput against batch size, one line per variant and image size.

    matplotlib is the ``bench`` extra, so it is imported only here; without it, one line says so.
    """
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise GmsError("--plot needs matplotlib: pip install 'gms-deploy[bench]'") from None
    lines: dict[str, list[BenchRecord]] = {}
    for r in records:
        if r.status == "ok":
            lines.setdefault(
                f"{r.backend} {r.precision} {r.device} {r.pipeline} {r.image_size}px", []
            ).append(r)
    sizes = sorted({r.batch_size for points in lines.values() for r in points if r.batch_size})
    figure = Figure(figsize=(11, 4.5), layout="constrained")
    latency, throughput = figure.subplots(1, 2)
    for label, points in lines.items():
        points.sort(key=lambda r: r.batch_size or 0)
        batches = [r.batch_size for r in points]
        latency.plot(batches, [r.latency_ms_p50 for r in points], marker="o", label=label)
        throughput.plot(batches, [r.throughput_img_s for r in points], marker="o", label=label)
    for axes, title in ((latency, "latency p50 (ms)"), (throughput, "throughput (images/s)")):
        axes.set(xlabel="batch size", title=title, yscale="log")
        axes.set_xscale("log", base=2)
        axes.set_xticks(sizes, [str(size) for size in sizes])
        axes.set_xticks([], minor=True)
        axes.grid(True, which="both", alpha=0.3)
    throughput.legend(fontsize="small")
    write_atomic(Path(path), lambda f: figure.savefig(f, format="png", dpi=120))
