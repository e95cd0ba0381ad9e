"""The batch driver: inputs -> frames -> segmenter -> masks on disk, surviving bad files.

Three threads, two bounded queues: a reader decodes and prepares frames a few batches ahead, the
caller's thread runs batches through the segmenter (and so the GPU), a writer encodes and writes
outputs in input order. Every backend shares this file's input and output handling, so they differ
only in how a batch becomes masks. A file that cannot be read, or a batch that fails, is recorded
with a one-line reason and the run goes on; outputs are written atomically and never replaced
unless asked, and ``results.csv`` is rewritten after every batch, so an interrupted run keeps
everything it finished (on Ctrl-C the writer first finishes the masks already computed).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import KW_ONLY, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal

import numpy as np

from gms_deploy.backends.base import Runner
from gms_deploy.errors import UsageError
from gms_deploy.io.frames import Frame, InputError
from gms_deploy.io.inputs import Source, discover, frame_count, read_frames
from gms_deploy.io.outputs import (
    RESULTS,
    OutputPaths,
    ResultRow,
    ResultsTable,
    VideoPaths,
    folder_lock,
    overlay,
    write_npy,
    write_png,
)
from gms_deploy.io.video import VideoWriter
from gms_deploy.messages import one_line, reason, shown
from gms_deploy.postprocess import Area, Box, area_mm2, paste, roi_box
from gms_deploy.segment import Segmentation, Segmenter, segmenter_for
from gms_deploy.stream import Prefetch, Writer

log = logging.getLogger(__name__)

READERS = min(4, os.cpu_count() or 1)
Roi = Literal["none", "dicom"]


@dataclass(frozen=True)
class InferOptions:
    out_dir: Path
    _: KW_ONLY  # adjacent flags of one type are easy to swap by position
    batch_size: int = 4
    threshold: float | None = None
    save_prob: bool = False
    overlay: bool = False
    roi: Roi = "none"
    overwrite: bool = False
    frames_png: bool = False
    """Also each video frame's mask (and overlay) as PNG, named as a cine's frames are."""
    readers: int = READERS
    """Files decoded at once, on as many threads."""


@dataclass
class InferReport:
    """What happened to every input; ``failures`` holds the one-line reasons in order."""

    frames: int = 0
    skipped: int = 0
    files: int = 0
    failures: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failures


def summary_line(report: InferReport, out_dir: Path) -> str:
    """The run in one line, as every driver ends: frames, files, failures, seconds, frames per second."""
    rate = report.frames / report.seconds if report.seconds > 0 else 0.0
    line = (
        f"{report.frames} frame(s) from {report.files} file(s) -> {shown(out_dir)} in {report.seconds:.1f} s "
        f"({rate:.1f} frames/s)"
    )
    if report.skipped:
        line += f"; {report.skipped} skipped (outputs exist; --overwrite replaces them)"
    return line + (f"; {len(report.failures)} FAILED" if report.failures else "")


@dataclass(frozen=True)
class Progress:
    """Where a run stands, for a progress bar: frames counted as soon as a file says how many it holds."""

    frames: int
    """Frames done: segmented, skipped (outputs exist) or failed."""
    frames_total: int
    """The best estimate so far: every opened file's frame count, one frame for each file not yet opened."""
    files: int
    files_total: int
    failures: int


@dataclass
class _Item:
    """A frame on its way through a batch."""

    frame: Frame
    outputs: OutputPaths
    todo: frozenset[str]
    box: Box | None
    prepared: Any
    seconds: float
    warn: Callable[[str], None]
    """Says a warning about the frame's file, once for the file."""
    videos: VideoPaths | None = None
    """A video frame's output videos."""


@dataclass
class _Failed:
    source: Path
    index: int | None
    message: str


@dataclass
class _Skipped:
    """A frame whose outputs all exist already."""


@dataclass
class _FileStart:
    """A file opened: how many frames it holds, where it says (None: one, or unknown)."""

    frames: int | None


@dataclass
class _FileDone:
    """The end of one file's events."""

    source: Path


_Event = _Item | _Failed | _Skipped | _FileStart | _FileDone


@dataclass
class _Ledger:
    """The run's report and results table.

    The writer thread records into it; the caller's thread flushes it at the end. Those overlap
    when a second Ctrl-C cuts short the wait for the writer, hence the lock.
    """

    report: InferReport
    table: ResultsTable
    uncertain_limit: float
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _videos: dict[Path, dict[str, VideoWriter]] = field(default_factory=dict)
    """The open output videos of each video input, by kind; the writer thread's alone."""

    def videos_done(self, source: Path) -> None:
        """A video input's last frame is written: its videos are finished and renamed into place."""
        for video in self._videos.pop(source, {}).values():
            try:
                video.close()
            except Exception as err:  # a full disk at the last packet: the video alone fails
                video.abort()
                self.fail(_Failed(source, None, f"{shown(video.path)}: cannot be written: {one_line(err)}"))

    def drop_videos(self) -> None:
        """Ctrl-C or a crash: no video that was not finished reaches its name, so a rerun redoes it."""
        for videos in self._videos.values():
            for video in videos.values():
                video.abort()
        self._videos.clear()

    def _video(self, item: _Item, kind: str) -> VideoWriter:
        frame = item.frame
        assert frame.timestamp is not None and item.videos is not None
        opened = self._videos.setdefault(frame.source, {})
        if kind not in opened:
            path = getattr(item.videos, kind)
            opened[kind] = VideoWriter(path, kind, frame.timestamp, frame.height, frame.width)
        return opened[kind]

    def _record(self, row: ResultRow) -> None:
        with self._lock:
            if row.status == "ok":
                self.report.frames += 1
            else:
                log.error("%s", row.message)
                self.report.failures.append(row.message)
            self.table.add(row)

    def fail(self, failed: _Failed) -> None:
        self._record(
            ResultRow(
                source=str(failed.source),
                frame=failed.index,
                output="",
                area_px=None,
                area_mm2=None,
                seconds=None,
                status="failed",
                message=failed.message,
            )
        )

    def flush(self) -> None:
        """Rewrite results.csv. Where that fails (a full disk), it is one failure and the run goes on."""
        with self._lock:
            try:
                self.table.flush()
            except OSError as err:
                message = f"{shown(self.table.path)}: cannot write: {reason(err)}"
                if message not in self.report.failures:
                    log.error("%s", message)
                    self.report.failures.append(message)

    def _write(self, item: _Item, result: Segmentation) -> tuple[int, Area]:
        frame = item.frame
        mask = result.mask if item.box is None else paste(result.mask, item.box, frame.height, frame.width)
        drawn = overlay(frame.pixels, mask) if {"overlay", "overlay_video"} & item.todo else None
        if "prob" in item.todo and result.prob is not None:
            write_npy(item.outputs.prob, np.asarray(result.prob, dtype=np.float32))
        if "overlay" in item.todo:
            write_png(item.outputs.overlay, drawn)
        if "mask" in item.todo:
            write_png(item.outputs.mask, mask)
        for kind, image in (("mask", mask), ("overlay", drawn)):
            if f"{kind}_video" in item.todo:
                assert frame.timestamp is not None
                self._video(item, kind).add(image, frame.timestamp)
        return int(mask.sum()), area_mm2(mask, frame.regions)

    def finish(self, item: _Item, result: Segmentation, share: float) -> None:
        """One frame's outputs on disk, then its row."""
        begin = time.perf_counter()
        frame = item.frame
        try:
            area_px, area = self._write(item, result)
        except Exception as err:  # a full disk, or a frame its overlay cannot be drawn on: it alone fails
            message = f"{shown(frame.source)}: cannot write outputs: {one_line(err)}"
            self.fail(_Failed(frame.source, frame.index, message))
            return
        notes = [area.why] if area.why else []
        if result.uncertain > self.uncertain_limit:
            notes.append(
                f"{result.uncertain:.0%} of its probabilities uncertain, over {self.uncertain_limit:.0%}"
            )
            item.warn(
                f"{shown(frame.source)}: looks unlike the images the model was trained on (over "
                f"{self.uncertain_limit:.0%} of its probabilities between 0.3 and 0.7); check its mask by eye"
            )
        self._record(
            ResultRow(
                source=str(frame.source),
                frame=frame.index,
                time=None if frame.timestamp is None else frame.timestamp.seconds,
                output=str(item.outputs.mask if item.videos is None else item.videos.mask),
                area_px=area_px,
                area_mm2=area.mm2,
                seconds=item.seconds + share + time.perf_counter() - begin,
                status="ok",
                message="; ".join(notes),
                confidence=result.confidence,
                uncertain=result.uncertain,
            )
        )


def run_inference(
    inputs: Sequence[Path],
    runner: Runner,
    options: InferOptions,
    progress: Callable[[Progress], None] | None = None,
    segmenter: Segmenter | None = None,
) -> InferReport:
    """Segment every frame under ``inputs``; ``progress`` is told after every batch and file.

    ``segmenter`` defaults to the fused pipeline for a torch runner on a GPU, the host one otherwise.
    Ctrl-C is raised on once the outputs already computed are written and listed.
    """
    if options.batch_size < 1 or options.readers < 1:
        raise UsageError(
            f"batch size and readers must be at least 1: {options.batch_size}, {options.readers}"
        )
    try:
        out_dir = options.out_dir.resolve()
    except (OSError, RuntimeError) as err:  # RuntimeError: a symlink loop
        raise UsageError(f"{shown(options.out_dir)}: cannot be the output folder: {reason(err)}") from None
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"{options.out_dir}: exists and is not a folder")
    with folder_lock(out_dir, shown(options.out_dir)):
        return _run(inputs, runner, options, out_dir, progress, segmenter)


def _run(
    inputs: Sequence[Path],
    runner: Runner,
    options: InferOptions,
    out_dir: Path,
    progress: Callable[[Progress], None] | None,
    segmenter: Segmenter | None,
) -> InferReport:
    started = time.perf_counter()
    table = ResultsTable(out_dir / RESULTS)
    try:
        table.flush()
    except OSError as err:
        raise UsageError(f"{shown(options.out_dir)}: cannot be the output folder: {reason(err)}") from None
    segmenter = segmenter or segmenter_for(runner)
    threshold = runner.settings.threshold if options.threshold is None else options.threshold
    report = InferReport()
    ledger = _Ledger(report, table, runner.settings.uncertain_limit)
    sources, errors = discover(inputs)
    counter = _Counter(len(sources), report, progress)
    # Frames held ahead of the network: about two batches, however many files are read at once.
    depth = max(2, options.batch_size // options.readers)
    produce = partial(_file_events, segmenter=segmenter, options=options)
    batch: list[_Item] = []
    ended: list[Path] = []  # files read to their end, whose last frames may still wait in the batch
    try:
        with (
            Writer(2 * options.batch_size) as writer,
            Prefetch(sources, produce, options.readers, depth) as reader,
        ):
            for error in errors:
                writer.submit(partial(ledger.fail, _Failed(error.path, None, str(error))))
            for event in reader:
                if isinstance(event, _Item):
                    batch.append(event)
                    if len(batch) == options.batch_size:
                        _run_batch(batch, ended, segmenter, threshold, options.save_prob, ledger, writer)
                        counter.frames_done(options.batch_size)
                elif isinstance(event, _Failed):
                    writer.submit(partial(ledger.fail, event))
                    counter.frames_done(1)
                elif isinstance(event, _Skipped):
                    report.skipped += 1
                    counter.frames_done(1)
                elif isinstance(event, _FileStart):
                    counter.file_opened(event.frames)
                else:
                    ended.append(event.source)
                    report.files += 1
                    counter.file_done()
            done = len(batch)
            _run_batch(batch, ended, segmenter, threshold, options.save_prob, ledger, writer)
            counter.frames_done(done)
    finally:  # Ctrl-C included: the rows of every finished output reach results.csv
        ledger.drop_videos()
        ledger.flush()
    if not (report.frames or report.skipped or report.failures):
        report.failures.append(f"no frame segmented from {', '.join(shown(Path(i)) for i in inputs)}")
    report.seconds = time.perf_counter() - started
    return report


class _Counter:
    """``Progress`` kept up to date from the main loop's events, and handed to the caller's callback."""

    def __init__(self, files: int, report: InferReport, callback: Callable[[Progress], None] | None) -> None:
        self.report, self.callback = report, callback
        self.files_total, self.frames_total, self.frames = files, files, 0

    def file_opened(self, frames: int | None) -> None:
        self.frames_total += (frames or 1) - 1
        self._tell()

    def frames_done(self, count: int) -> None:
        if count:
            self.frames += count
            self._tell()

    def file_done(self) -> None:
        self._tell()

    def _tell(self) -> None:
        if self.callback is not None:
            self.frames_total = max(self.frames_total, self.frames)
            done = Progress(
                self.frames, self.frames_total, self.report.files, self.files_total, len(self.report.failures)
            )
            self.callback(done)


def _file_events(source: Source, segmenter: Segmenter, options: InferOptions) -> Iterator[_Event]:
    """A reader thread's work for one file: its frame count, every frame prepared, then the file's end.

    A warning about the file is said once, with its frame count, however many frames it concerns.
    """
    count = frame_count(source)
    yield _FileStart(count)
    said: set[str] = set()

    def warn(message: str) -> None:
        if message not in said:
            said.add(message)
            log.warning("%s", message + (f" ({count}-frame file)" if count and count > 1 else ""))

    frames = read_frames(source)
    while True:
        start = time.perf_counter()
        try:
            frame = next(frames, None)
        except InputError as err:
            yield _Failed(source.path, None, str(err))
            break
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as err:  # a reader's bug, or a Rust decoder's panic: this file alone fails
            yield _Failed(source.path, None, f"{shown(source.path)}: cannot read: {one_line(err)}")
            break
        if frame is None:
            break
        try:
            event: _Event = _prepare(frame, segmenter, options, start, warn)
        except Exception as err:  # a frame the reader took but preparing it failed: it alone fails
            message = f"{shown(frame.source)}: cannot prepare frame {frame.index or 0}: {one_line(err)}"
            event = _Failed(frame.source, frame.index, message)
        yield event
    yield _FileDone(source.path)


def _prepare(
    frame: Frame, segmenter: Segmenter, options: InferOptions, start: float, warn: Callable[[str], None]
) -> _Item | _Skipped:
    outputs = OutputPaths.for_frame(options.out_dir, frame.rel, frame.index)
    videos = None if frame.timestamp is None else VideoPaths.for_video(options.out_dir, frame.rel)
    pngs = videos is None or options.frames_png
    wanted = ("mask",) * pngs + ("prob",) * options.save_prob + ("overlay",) * (options.overlay and pngs)
    todo = {k for k in wanted if options.overwrite or not getattr(outputs, k).exists()}
    if videos is not None:  # a video is written whole, from its first frame, or left as it is
        kinds = ("mask", "overlay") if options.overlay else ("mask",)
        if options.overwrite or not all(getattr(videos, k).exists() for k in kinds):
            todo |= {f"{k}_video" for k in kinds}
    if not todo:
        return _Skipped()
    box = roi_box(frame.regions) if options.roi == "dicom" else None
    if options.roi == "dicom" and box is None:
        warn(f"{shown(frame.source)}: no trusted 2D ultrasound region to crop to; segmenting the whole frame")
    pixels = frame.pixels if box is None else frame.pixels[box[1] : box[3], box[0] : box[2]]
    prepared = segmenter.prepare(pixels)
    return _Item(frame, outputs, frozenset(todo), box, prepared, time.perf_counter() - start, warn, videos)


def _run_batch(
    batch: list[_Item],
    ended: list[Path],
    segmenter: Segmenter,
    threshold: float,
    keep_prob: bool,
    ledger: _Ledger,
    writer: Writer,
) -> None:
    """Segment ``batch`` (then empty it) and hand its outputs to the writer, then the ``ended`` files'
    videos to be finished (then empty it too): their last frames were in this batch or before."""
    items = list(batch)
    batch.clear()
    start = time.perf_counter()
    broken = f"{segmenter.runner.name} gave NaN or Inf probabilities; no mask"
    try:
        results: list[Segmentation | None] = (
            list(segmenter([item.prepared for item in items], threshold, keep_prob)) if items else []
        )
    except Exception as err:  # a backend fault fails its batch, never the run
        broken = f"{segmenter.runner.name} failed on this batch: {one_line(err)}"
        results = [None] * len(items)
    share = (time.perf_counter() - start) / max(1, len(items))
    for item, result in zip(items, results, strict=True):
        if result is not None and result.finite:
            writer.submit(partial(ledger.finish, item, result, share))
        else:
            message = f"{shown(item.frame.source)}: {broken}"
            writer.submit(partial(ledger.fail, _Failed(item.frame.source, item.frame.index, message)))
    for source in ended:
        writer.submit(partial(ledger.videos_done, source))
    ended.clear()
    writer.submit(ledger.flush)
