"""The batch driver: inputs -> frames -> runner -> masks on disk, surviving bad files.

Every backend shares this file's input and output handling, so they differ only in how a batch
of preprocessed images becomes probability maps. A file that cannot be read, or a batch that
fails, is recorded with a one-line reason and the run goes on; outputs are written atomically and
never replaced unless asked, and ``results.csv`` is rewritten after every batch, so an interrupted
run keeps everything it finished.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from gms_deploy.backends.base import Runner
from gms_deploy.io.frames import Frame, InputError
from gms_deploy.io.inputs import Source, discover, read_frames
from gms_deploy.io.outputs import OutputPaths, ResultRow, ResultsTable, overlay, write_npy, write_png
from gms_deploy.postprocess import Box, area_mm2, paste, roi_box, to_mask, upsample
from gms_deploy.preprocess import preprocess

log = logging.getLogger(__name__)

RESULTS = "results.csv"
Roi = Literal["none", "dicom"]


@dataclass(frozen=True)
class InferOptions:
    out_dir: Path
    batch_size: int = 4
    threshold: float | None = None
    save_prob: bool = False
    overlay: bool = False
    roi: Roi = "none"
    overwrite: bool = False


@dataclass
class InferReport:
    """What happened to every input; ``failures`` holds the one-line reasons in order."""

    frames: int = 0
    skipped: int = 0
    files: int = 0
    failures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures


@dataclass
class _Item:
    """A frame on its way through a batch."""

    frame: Frame
    outputs: OutputPaths
    todo: frozenset[str]
    box: Box | None
    image: np.ndarray
    seconds: float


def run_inference(
    inputs: Sequence[Path],
    runner: Runner,
    options: InferOptions,
    progress: Callable[[int, int], None] | None = None,
) -> InferReport:
    """Segment every frame under ``inputs``; ``progress(done, total)`` is called per file."""
    if options.batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {options.batch_size}")
    out_dir = options.out_dir.resolve()
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"{options.out_dir}: exists and is not a folder")
    threshold = runner.settings.threshold if options.threshold is None else options.threshold
    table = ResultsTable(out_dir / RESULTS)
    report = InferReport()
    sources, errors = discover(inputs)
    sources = [s for s in sources if not s.path.resolve().is_relative_to(out_dir)]
    for error in errors:
        _fail(report, table, error.path, None, str(error))

    def flush(batch: list[_Item]) -> None:
        if batch:
            _run_batch(batch, runner, threshold, report, table)
            batch.clear()
            table.flush()

    batch: list[_Item] = []
    try:
        for done, source in enumerate(sources, start=1):
            report.files += 1
            for item in _prepare(source, runner, options, report, table):
                batch.append(item)
                if len(batch) == options.batch_size:
                    flush(batch)
            if progress is not None:
                progress(done, len(sources))
        flush(batch)
    finally:  # Ctrl-C included: the rows of every finished output reach results.csv
        table.flush()
    return report


def _prepare(
    source: Source,
    runner: Runner,
    options: InferOptions,
    report: InferReport,
    table: ResultsTable,
) -> Iterator[_Item]:
    """Frames of one file, ready to batch; a bad file ends here with its reason recorded."""
    wanted = ("mask",) + ("prob",) * options.save_prob + ("overlay",) * options.overlay
    frames = read_frames(source)
    while True:
        start = time.perf_counter()
        try:
            frame = next(frames, None)
        except InputError as err:
            _fail(report, table, source.path, None, str(err))
            return
        if frame is None:
            return
        outputs = OutputPaths.for_frame(options.out_dir, frame.rel, frame.index)
        todo = frozenset(k for k in wanted if options.overwrite or not getattr(outputs, k).exists())
        if not todo:
            report.skipped += 1
            continue
        box = roi_box(frame.regions) if options.roi == "dicom" else None
        if options.roi == "dicom" and box is None:
            log.warning("%s: no 2D ultrasound region to crop to; segmenting the whole frame", frame.source)
        pixels = frame.pixels if box is None else frame.pixels[box[1] : box[3], box[0] : box[2]]
        image = preprocess(pixels, runner.settings.image_size)
        yield _Item(frame, outputs, todo, box, image, time.perf_counter() - start)


def _run_batch(
    batch: list[_Item],
    runner: Runner,
    threshold: float,
    report: InferReport,
    table: ResultsTable,
) -> None:
    start = time.perf_counter()
    try:
        probs = runner(np.stack([item.image for item in batch]))
    except Exception as err:  # a backend fault fails its batch, never the run
        for item in batch:
            _fail(
                report,
                table,
                item.frame.source,
                item.frame.index,
                f"{item.frame.source}: {runner.name} failed on this batch: {_one_line(err)}",
            )
        return
    share = (time.perf_counter() - start) / len(batch)
    for item, prob in zip(batch, probs, strict=True):
        begin = time.perf_counter()
        try:
            area_px, area = _write(item, prob, threshold)
        except OSError as err:
            _fail(
                report,
                table,
                item.frame.source,
                item.frame.index,
                f"{item.frame.source}: cannot write outputs: {_one_line(err)}",
            )
            continue
        report.frames += 1
        seconds = item.seconds + share + time.perf_counter() - begin
        table.add(
            ResultRow(
                source=str(item.frame.source),
                frame=item.frame.index,
                output=str(item.outputs.mask),
                area_px=area_px,
                area_mm2=area,
                seconds=seconds,
                status="ok",
                message="",
            )
        )


def _write(item: _Item, prob: np.ndarray, threshold: float) -> tuple[int, float | None]:
    frame = item.frame
    if item.box is None:
        mask = to_mask(upsample(prob, frame.height, frame.width), threshold)
    else:
        x0, y0, x1, y1 = item.box
        mask = paste(
            to_mask(upsample(prob, y1 - y0, x1 - x0), threshold), item.box, frame.height, frame.width
        )
    if "prob" in item.todo:
        write_npy(item.outputs.prob, prob.astype(np.float32, copy=False))
    if "overlay" in item.todo:
        write_png(item.outputs.overlay, overlay(frame.pixels, mask))
    if "mask" in item.todo:
        write_png(item.outputs.mask, mask)
    return int(mask.sum()), area_mm2(mask, frame.regions)


def _fail(report: InferReport, table: ResultsTable, source: Path, index: int | None, message: str) -> None:
    log.error("%s", message)
    report.failures.append(message)
    table.add(
        ResultRow(
            source=str(source),
            frame=index,
            output="",
            area_px=None,
            area_mm2=None,
            seconds=None,
            status="failed",
            message=message,
        )
    )


def _one_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__
