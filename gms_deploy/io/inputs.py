"""What the user named on the command line -> the files to segment -> their frames.

A folder input mirrors into the output tree under its own name (``scans/a/b.dcm`` stays
``scans/a/b.dcm``), so two folders given together cannot write over each other; two inputs that
would still land on the same output name are reported, not silently merged.

Outputs may lie among inputs (``infer scans --out scans``, or ``--out scans/out``): a folder that
this tool's results.csv marks is an output folder, and inside one the walk passes over the files
named as outputs are (``x_mask.png``), and over output subfolders whole, saying so with ``-v``.
Nothing named on the command line is dropped.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from gms_deploy.io.dicom import DICOM_SUFFIXES, dicom_frame_count, has_dicom_preamble, iter_dicom_frames
from gms_deploy.io.frames import Frame, InputError
from gms_deploy.io.images import IMAGE_SUFFIXES, read_image
from gms_deploy.io.outputs import OUTPUT_ENDINGS, VIDEO_ENDINGS, is_output_folder, output_stem
from gms_deploy.io.video import VIDEO_SUFFIXES, iter_video_frames, video_frame_count
from gms_deploy.messages import reason, shown

log = logging.getLogger(__name__)
# What a user who wrote ``--overlay true`` hands over as an input.
FLAG_VALUES = frozenset({"true", "false", "yes", "no", "on", "off", "1", "0"})


@dataclass(frozen=True)
class Source:
    """One file to read; ``rel`` is where its outputs go below the output folder."""

    path: Path
    rel: Path


def discover(inputs: Sequence[Path]) -> tuple[list[Source], list[InputError]]:
    """Files and folders -> sources in a stable order, plus one error per input that cannot be used.

    Inside folders only images and DICOM are taken: known suffixes, and files of any other name
    that carry the DICOM preamble (scanners often write extension-less or UID-named files).
    ``DICOMDIR`` and hidden files are skipped. A file named explicitly is always attempted.
    """
    sources: list[Source] = []
    errors: list[InputError] = []
    claimed: dict[str, Path] = {}
    taken: set[Source] = set()
    for given in map(Path, inputs):
        try:
            kind = _kind(given)
        except OSError as exc:  # a folder on the way that may not be entered: EACCES is not swallowed
            errors.append(InputError(given, f"cannot read: {reason(exc)}"))
            continue
        if kind == "folder":
            found = [Source(path, rel) for path, rel in _walk(given, errors)]
            if not found:
                errors.append(InputError(given, "folder holds no image or DICOM files"))
        elif kind == "file":
            found = [Source(given, Path(given.name))]
        else:
            if kind == "no such file or folder" and given.name.lower() in FLAG_VALUES:
                kind += f" (flags take no value: write --overlay, not --overlay {given.name})"
            errors.append(InputError(given, kind))
            continue
        for source in found:
            # Outputs drop the format suffix and some file systems ignore case: x.png and X.jpg collide.
            first = claimed.setdefault(str(output_stem(Path(), source.rel, None)).casefold(), source.path)
            if first == source.path:
                if source not in taken:
                    taken.add(source)
                    sources.append(source)
            else:
                errors.append(InputError(source.path, f"its outputs would overwrite those of {shown(first)}"))
    return sources, errors


def _kind(given: Path) -> str:
    """``folder``, ``file``, or why it is neither; raises OSError where it cannot even be looked at."""
    try:
        mode = given.stat().st_mode
    except FileNotFoundError:
        if given.is_symlink():
            return "a broken link"
        return "no such file or folder"
    if stat.S_ISDIR(mode):
        return "folder"
    return "file" if stat.S_ISREG(mode) else "not a regular file or folder"


def read_frames(source: Source) -> Iterator[Frame]:
    """Frames of one source, decided by content where it can be: the DICOM preamble (or a DICOM
    suffix) means DICOM, a video suffix a video, anything else an image."""
    kind = _format(source.path)
    if kind == "image":
        yield Frame(source=source.path, rel=source.rel, index=None, pixels=read_image(source.path))
    elif kind == "video":
        for index, pixels, when in iter_video_frames(source.path):
            yield Frame(source=source.path, rel=source.rel, index=index, pixels=pixels, timestamp=when)
    else:
        for index, pixels, regions in iter_dicom_frames(source.path):
            yield Frame(source=source.path, rel=source.rel, index=index, pixels=pixels, regions=regions)


def _format(path: Path) -> str:
    try:
        if has_dicom_preamble(path) or path.suffix.lower() in DICOM_SUFFIXES:
            return "dicom"
    except OSError as exc:
        raise InputError(path, f"cannot read: {reason(exc)}") from exc
    return "video" if path.suffix.lower() in VIDEO_SUFFIXES else "image"


def frame_count(source: Source) -> int | None:
    """How many frames ``read_frames`` will give, where the file says so from its header (a progress
    bar's total); None where it cannot tell before decoding, the reader then says why."""
    try:
        kind = _format(source.path)
    except InputError:
        return None
    if kind == "dicom":
        return dicom_frame_count(source.path)
    return video_frame_count(source.path) if kind == "video" else 1


def _walk(folder: Path, errors: list[InputError]) -> list[tuple[Path, Path]]:
    """(path, rel) of the usable files below ``folder``, following links but never into a loop."""
    top = Path(folder.resolve().name if folder.name in ("", ".", "..") else folder.name)
    found = []
    seen: set[tuple[int, int]] = set()
    outputs = _OutputFolders()

    def unlisted(exc: OSError) -> None:
        errors.append(InputError(exc.filename or folder, f"cannot list folder: {reason(exc)}"))

    for root, dirs, files in os.walk(folder, onerror=unlisted, followlinks=True):
        try:
            info = os.stat(root)
        except OSError as exc:
            unlisted(exc)
            dirs.clear()
            continue
        if (info.st_dev, info.st_ino) in seen:
            dirs.clear()
            continue
        seen.add((info.st_dev, info.st_ino))
        if Path(root) != folder and is_output_folder(Path(root)):
            log.info("%s: skipped, an output folder of gms-deploy (its results.csv)", shown(Path(root)))
            dirs.clear()
            continue
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))  # sorted: which of two links wins is fixed
        among_outputs = outputs.within(Path(root))
        for name in sorted(files):
            path = Path(root, name)
            if among_outputs and name.endswith(OUTPUT_ENDINGS + VIDEO_ENDINGS):
                log.info("%s: skipped, an output of gms-deploy", shown(path))
            elif _wanted(path, errors):
                found.append((path, top / path.relative_to(folder)))
    return sorted(found, key=lambda pair: pair[1].parts)


class _OutputFolders:
    """Whether a folder is, or lies inside, an output folder; each folder looked at once per walk."""

    def __init__(self) -> None:
        self._known: dict[Path, bool] = {}

    def within(self, folder: Path) -> bool:
        try:
            folder = folder.resolve()
        except (OSError, RuntimeError):
            return False
        for place in (folder, *folder.parents):
            if place not in self._known:
                self._known[place] = is_output_folder(place)
            if self._known[place]:
                return True
        return False


def _wanted(path: Path, errors: list[InputError]) -> bool:
    """An image or DICOM file to take. One named as such that cannot be read is an error, not silence.

    A broken link, a FIFO or a device under an image's name would otherwise vanish from the run (or,
    read, block it); of unnamed files only those with the DICOM preamble are wanted, so the rest of
    a folder's odd entries stay quiet but for ``-v``.
    """
    if path.name.startswith(".") or path.name.upper() == "DICOMDIR":
        return False
    named = path.suffix.lower() in IMAGE_SUFFIXES | DICOM_SUFFIXES | VIDEO_SUFFIXES
    try:
        kind = _kind(path)
        if kind == "file":
            if named or has_dicom_preamble(path):
                return True
            log.info("%s: skipped, neither an image nor DICOM", shown(path))
            return False
    except OSError as exc:
        kind = f"cannot read: {reason(exc)}"
    # Gone, or a folder now, since the folder was listed: another program's doing, not bad input.
    if named and kind not in ("no such file or folder", "folder"):
        errors.append(InputError(path, kind))
    return False
