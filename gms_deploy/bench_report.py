"""``gms-deploy bench`` results out: a plain-text table, JSON with the machine it ran on, a plot.

A benchmark figure is worthless without the GPU, driver and library versions that produced it,
so the JSON carries them beside the records.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gms_deploy.bench import BenchRecord
from gms_deploy.errors import GmsError
from gms_deploy.io.outputs import write_atomic

if TYPE_CHECKING:
    from matplotlib.figure import Figure


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


def plot(path: Path, records: Sequence[BenchRecord], env: Mapping[str, Any]) -> None:
    """Write ``bench_figure`` as a PNG; ``env`` is the machine the records ran on, as the JSON has it."""
    figure = bench_figure(records, env)
    write_atomic(Path(path), lambda f: figure.savefig(f, format="png", dpi=120))


def bench_figure(records: Sequence[BenchRecord], env: Mapping[str, Any]) -> Figure:
    """Latency p50 and throughput against batch size, one line per variant and image size.

    The title names the machine and date, since a timing shared without them cannot be compared.
    matplotlib is the ``bench`` extra, so it is imported only here; without it, one line says so.
    """
    try:
        from matplotlib.figure import Figure
        from matplotlib.ticker import FuncFormatter, LogFormatter
    except ImportError:
        raise GmsError("--plot needs matplotlib: pip install 'gms-deploy[bench]'") from None

    class PlainLogFormatter(LogFormatter):
        """The log axis's choice of which ticks to label, written as 40 rather than 4x10^1."""

        def __call__(self, x: float, pos: int | None = None) -> str:
            return _plain(x) if super().__call__(x, pos) else ""

    lines: dict[str, list[BenchRecord]] = {}
    for r in records:
        if r.status == "ok":
            lines.setdefault(
                f"{r.backend} {r.precision} {r.device} {r.pipeline} {r.image_size}px", []
            ).append(r)
    sizes = sorted({r.batch_size for points in lines.values() for r in points if r.batch_size})
    figure = Figure(figsize=(11, 4.5), layout="constrained")
    figure.suptitle(_machine_and_date(records, env))
    latency, throughput = figure.subplots(1, 2)
    for label, points in lines.items():
        points.sort(key=lambda r: r.batch_size or 0)
        batches = [r.batch_size for r in points]
        latency.plot(batches, [r.latency_ms_p50 for r in points], marker="o", label=label)
        throughput.plot(batches, [r.throughput_img_s for r in points], marker="o", label=label)
    for axes, title, unit in ((latency, "latency p50", "ms"), (throughput, "throughput", "images/s")):
        axes.set(xlabel="batch size", ylabel=unit, title=title, yscale="log")
        axes.yaxis.set_major_formatter(FuncFormatter(lambda x, _: _plain(x)))
        axes.yaxis.set_minor_formatter(PlainLogFormatter(labelOnlyBase=False))
        axes.set_xscale("log", base=2)
        axes.set_xticks(sizes, [str(size) for size in sizes])
        axes.set_xticks([], minor=True)
        axes.grid(True, which="both", alpha=0.3)
    throughput.legend(fontsize="small")
    return figure


def _plain(value: float) -> str:
    """A tick label as a reader writes the number: 40, 0.5, 2000."""
    return f"{value:.0f}" if value >= 10 else f"{value:.4f}".rstrip("0").rstrip(".")


def _machine_and_date(records: Sequence[BenchRecord], env: Mapping[str, Any]) -> str:
    """The GPU's or CPU's name for each device that ran, and the environment's date (UTC)."""
    names = []
    for device in sorted({r.device for r in records if r.status == "ok"}):
        name = env.get("gpu") if device.startswith("cuda") else env.get("cpu")
        names.append(f"{name} ({device})" if name else device)
    date = env.get("date")
    when = datetime.fromisoformat(date).strftime("%Y-%m-%d %H:%M %Z") if date else "date unknown"
    return f"gms-deploy bench: {', '.join(names) or 'nothing ran'}, {when}"
