"""Where results go and how they are written: a reader never finds half a file, even after a crash.

Every writer goes through one temporary file in the destination folder, fsync and ``os.replace``,
so a file either holds the old content or the whole new one.
"""

from __future__ import annotations

import csv
import fcntl
import io
import os
import secrets
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Literal, get_args

import numpy as np
from PIL import Image

from gms_deploy.errors import UsageError
from gms_deploy.io.dicom import DICOM_SUFFIXES
from gms_deploy.io.images import IMAGE_SUFFIXES, as_rgb
from gms_deploy.io.video import VIDEO_SUFFIXES
from gms_deploy.messages import reason, shown

FORMAT_SUFFIXES = IMAGE_SUFFIXES | DICOM_SUFFIXES | VIDEO_SUFFIXES

FILL_RGB = np.array([0, 255, 0], dtype=np.float32)  # green stands out on grey, pink and brown tissue alike
EDGE_RGB = np.array([255, 255, 0], dtype=np.uint8)
FILL_ALPHA = 0.35


def output_stem(out_dir: Path, rel: Path, index: int | None) -> Path:
    """``out_dir/rel`` without its format suffix, plus ``_fNNNN`` for a cine frame.

    Only image and DICOM suffixes are dropped: scanners name files by UID (``1.2.840.5.7``,
    ``1.2.840.5.8``), and dropping their last "suffix" would make them collide.
    """
    name = rel.stem if rel.suffix.lower() in FORMAT_SUFFIXES else rel.name
    return Path(out_dir) / rel.parent / (name + ("" if index is None else f"_f{index:04d}"))


@dataclass(frozen=True)
class OutputPaths:
    """The files written for one frame."""

    mask: Path
    prob: Path
    overlay: Path

    @classmethod
    def for_frame(cls, out_dir: Path, rel: Path, index: int | None) -> OutputPaths:
        stem = output_stem(out_dir, rel, index)
        return cls(*(stem.with_name(stem.name + end) for end in OUTPUT_ENDINGS))


OUTPUT_ENDINGS = ("_mask.png", "_prob.npy", "_overlay.png")
"""How the files ``OutputPaths`` names end, in its order."""
VIDEO_ENDINGS = ("_mask.mkv", "_overlay.mp4")
"""How the videos ``VideoPaths`` names end, in its order."""


@dataclass(frozen=True)
class VideoPaths:
    """The videos written for one video input: every mask, and (``--overlay``) every overlay."""

    mask: Path
    overlay: Path

    @classmethod
    def for_video(cls, out_dir: Path, rel: Path) -> VideoPaths:
        stem = output_stem(out_dir, rel, None)
        return cls(*(stem.with_name(stem.name + end) for end in VIDEO_ENDINGS))


def write_png(path: Path, array: np.ndarray) -> None:
    """Write a bool mask (as 0/255), a uint8 grey image, or uint8 RGB/RGBA as PNG."""
    array = np.asarray(array)
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    if array.dtype != np.uint8 or not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))):
        raise ValueError(f"cannot write a {array.dtype} array of shape {array.shape} as PNG")
    image = Image.fromarray(array)
    # Level 1: a cine writes a mask and an overlay per frame, and level 6 is 3-4x slower for ~10 % less.
    write_atomic(Path(path), lambda f: image.save(f, format="PNG", compress_level=1))


def write_npy(path: Path, array: np.ndarray) -> None:
    write_atomic(Path(path), lambda f: np.save(f, np.asarray(array), allow_pickle=False))


def overlay(rgb: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The image with the mask as a translucent fill and a solid outline, for a person to check by eye.

    The fill alone vanishes on bright tissue and the outline alone hides holes; together both show.
    """
    base = _as_uint8_rgb(np.asarray(rgb))
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != base.shape[:2]:
        raise ValueError(f"mask {mask.shape} does not match image {base.shape[:2]}")
    out = base.copy()
    out[mask] = (base[mask] * (1.0 - FILL_ALPHA) + FILL_RGB * FILL_ALPHA + 0.5).astype(np.uint8)
    # From the shorter side: a 100-pixel-high strip gets a 1-pixel outline however long it is.
    out[_outline(mask, width=max(1, round(min(mask.shape) / 400)))] = EDGE_RGB
    return out


Status = Literal["ok", "failed", "skipped"]
RESULTS = "results.csv"
FIELDS = (
    "source",
    "frame",
    "time",
    "output",
    "area_px",
    "area_mm2",
    "confidence",
    "uncertain",
    "seconds",
    "status",
    "message",
)


@dataclass(frozen=True)
class ResultRow:
    """One line of results.csv; ``None`` numbers are written as empty cells (unknown, not zero)."""

    source: str | Path
    frame: int | None
    output: str | Path
    area_px: int | None
    area_mm2: float | None
    seconds: float | None
    status: Status
    message: str = ""
    confidence: float | None = None
    """The mean probability inside the mask (``segment.Segmentation``); None where it is empty."""
    time: float | None = None
    """A video frame's presentation time in seconds, from the stream's timestamps."""
    uncertain: float | None = None
    """The share of the network-size probabilities between 0.3 and 0.7."""

    def __post_init__(self) -> None:
        if self.status not in get_args(Status):
            raise ValueError(f"status must be one of {get_args(Status)}, not {self.status!r}")

    def cells(self) -> dict[str, str]:
        return {
            "source": shown(self.source),
            "frame": _cell(self.frame, "d"),
            "time": _cell(self.time, ".6f"),
            "output": shown(self.output),
            "area_px": _cell(self.area_px, "d"),
            "area_mm2": _cell(self.area_mm2, ".3f"),
            "confidence": _cell(self.confidence, ".4f"),
            "uncertain": _cell(self.uncertain, ".4f"),
            "seconds": _cell(self.seconds, ".4f"),
            "status": self.status,
            "message": " ".join(self.message.split()),
        }


class ResultsTable:
    """results.csv for one output folder, rewritten whole (atomically) on every flush.

    A rerun into the same folder keeps the earlier rows and replaces those of the same
    (source, frame), so the table always describes every output file in the folder.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._rows: dict[tuple[str, str], dict[str, str]] = {}
        if self.path.exists():
            self._load()

    def add(self, row: ResultRow) -> None:
        cells = row.cells()
        self._rows[(cells["source"], cells["frame"])] = cells

    def flush(self) -> None:
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=FIELDS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(self._rows.values())
        data = text.getvalue().encode("utf-8", errors="backslashreplace")  # cells are shown(), but be sure
        write_atomic(self.path, lambda f: f.write(data))

    def _load(self) -> None:
        """The earlier run's rows; anything else under this name is refused, never overwritten."""
        try:
            with self.path.open(newline="", encoding="utf-8") as f:
                reader = csv.DictReader(f)
                if reader.fieldnames is None:
                    return
                if not {"source", "frame"} <= set(reader.fieldnames):
                    raise self._refused(f"columns {reader.fieldnames}")
                for record in reader:
                    cells = {field: record.get(field) or "" for field in FIELDS}
                    self._rows[(cells["source"], cells["frame"])] = cells
        except IsADirectoryError:
            raise self._refused("a folder") from None
        except (UnicodeDecodeError, csv.Error):
            raise self._refused("not a UTF-8 CSV table") from None
        except OSError as err:
            raise UsageError(f"{shown(self.path)}: cannot be read: {reason(err)}") from None

    def _refused(self, why: str) -> UsageError:
        return UsageError(
            f"{shown(self.path)}: exists but is not a results table ({why}); "
            "move it away or write to another folder"
        )


def is_output_folder(folder: Path) -> bool:
    """Whether ``folder`` holds this tool's results.csv: what marks a folder as outputs, not inputs."""
    try:
        with (Path(folder) / RESULTS).open(encoding="utf-8") as f:
            return f.readline().rstrip("\r\n") == ",".join(FIELDS)
    except (OSError, UnicodeDecodeError):
        return False


@contextmanager
def folder_lock(folder: Path, name: str) -> Iterator[None]:
    """Held while a run writes into ``folder`` (``name``: as the user gave it). Two runs into one
    folder would each rewrite results.csv whole, and the last would win, so the second is refused
    at once; a folder that cannot be made or written is refused here too, before any frame is read.

    The lock is on the folder itself (``flock`` of its descriptor), so no lock file is left in it.
    """
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as err:
        raise UsageError(f"{name}: cannot be the output folder: {reason(err)}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UsageError(
                f"{name}: another gms-deploy run is writing here; wait for it, or give another --out"
            ) from None
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _cell(value: float | None, spec: str) -> str:
    return "" if value is None else format(value, spec)


def write_atomic(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Call ``write`` on a temporary file beside ``path``, then fsync and rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # Our own unique name rather than mkstemp: mkstemp's 0600 mode would survive the rename.
    temp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.part")
    try:
        with temp.open("xb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def _as_uint8_rgb(rgb: np.ndarray) -> np.ndarray:
    if rgb.dtype != np.uint8:
        rgb = (np.clip(rgb, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    return as_rgb(rgb)


def _outline(mask: np.ndarray, width: int) -> np.ndarray:
    """Mask pixels within ``width`` steps of the background; the image border counts as background."""
    inner = np.pad(mask, width)
    for _ in range(width):
        core = inner[1:-1, 1:-1]
        inner[1:-1, 1:-1] = core & inner[:-2, 1:-1] & inner[2:, 1:-1] & inner[1:-1, :-2] & inner[1:-1, 2:]
    return mask & ~inner[width:-width, width:-width]
