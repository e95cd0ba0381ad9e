"""discover() on real folder trees, and read_frames() choosing the reader by content."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from io_corpus import dicom_dataset, dicom_example, random_uint, write_dicom
from PIL import Image

from gms_deploy.io.frames import InputError
from gms_deploy.io.inputs import Source, discover, read_frames


def png(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(random_uint((7, 5, 3), np.uint8)).save(path, format="PNG")
    return path


def dicom(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_dicom(path, dicom_dataset(random_uint((7, 5), np.uint8)))


@pytest.fixture
def scans(tmp_path: Path) -> Path:
    """A folder as a scanner export and a person leave it, created in an unsorted order."""
    root = tmp_path / "scans"
    dicom(root / "b" / "IM0001")  # no suffix: taken for its preamble
    dicom(root / "b" / "1.2.840.99.7")  # UID name: taken for its preamble
    png(root / "b" / "a.PNG")
    png(root / "a.jpg")  # content is PNG: the reader sniffs, discover only looks at names
    dicom(root / "z.dcm")
    png(root / "c" / "d" / "deep.tiff")
    png(root / ".hidden.png")
    png(root / ".git" / "inside.png")
    dicom(root / "DICOMDIR")
    (root / "notes.txt").write_text("not an image")
    (root / "README").write_text("no suffix and no preamble")
    return root


EXPECTED = [
    "scans/a.jpg",
    "scans/b/1.2.840.99.7",
    "scans/b/IM0001",
    "scans/b/a.PNG",
    "scans/c/d/deep.tiff",
    "scans/z.dcm",
]


def test_folder_mirrors_under_its_own_name_sorted_and_filtered(scans: Path) -> None:
    sources, errors = discover([scans])
    assert errors == []
    assert [str(s.rel) for s in sources] == EXPECTED
    assert all(s.path == scans.parent / s.rel for s in sources)
    assert discover([scans]) == (sources, [])


def test_a_named_file_is_always_attempted(scans: Path) -> None:
    sources, errors = discover([scans / "notes.txt", scans / ".hidden.png"])
    assert errors == []
    assert sources == [
        Source(scans / "notes.txt", Path("notes.txt")),
        Source(scans / ".hidden.png", Path(".hidden.png")),
    ]
    with pytest.raises(InputError, match="not a readable"):
        list(read_frames(sources[0]))


def test_missing_or_empty_inputs_are_errors_and_the_rest_still_runs(scans: Path, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    sources, errors = discover([missing, scans / "z.dcm", empty])
    assert [s.rel for s in sources] == [Path("z.dcm")]
    assert [str(e) for e in errors] == [
        f"{missing}: no such file or folder",
        f"{empty}: folder holds no image or DICOM files",
    ]


def test_two_folders_of_one_name_cannot_overwrite_each_other(tmp_path: Path) -> None:
    png(tmp_path / "site1" / "scans" / "x.png")
    png(tmp_path / "site1" / "scans" / "y.png")
    png(tmp_path / "site2" / "scans" / "x.png")
    png(tmp_path / "site2" / "scans" / "z.png")
    sources, errors = discover([tmp_path / "site1" / "scans", tmp_path / "site2" / "scans"])
    assert [str(s.path.relative_to(tmp_path)) for s in sources] == [
        "site1/scans/x.png",
        "site1/scans/y.png",
        "site2/scans/z.png",
    ]
    [error] = errors
    assert error.path == tmp_path / "site2" / "scans" / "x.png"
    assert "overwrite" in str(error) and str(tmp_path / "site1" / "scans" / "x.png") in str(error)


def test_names_that_differ_only_by_format_or_case_collide(tmp_path: Path) -> None:
    png(tmp_path / "scans" / "x.png")
    png(tmp_path / "scans" / "X.jpg")
    sources, errors = discover([tmp_path / "scans"])
    assert len(sources) == 1 and len(errors) == 1


def test_one_file_named_twice_is_read_once(scans: Path) -> None:
    sources, errors = discover([scans / "z.dcm", scans / "z.dcm", scans])
    assert errors == []
    assert [str(s.rel) for s in sources] == ["z.dcm", *EXPECTED]


def test_symlink_loops_end(scans: Path) -> None:
    os.symlink(scans, scans / "c" / "loop")
    os.symlink(scans / "c", scans / "c" / "d" / "up")
    sources, errors = discover([scans])
    assert errors == []
    assert [str(s.rel) for s in sources] == EXPECTED


def test_image_names_that_are_no_files_are_errors_other_odd_entries_stay_quiet(scans: Path) -> None:
    """A broken link, a FIFO (reading it would block the run) and a device under image names."""
    if not hasattr(os, "mkfifo"):
        pytest.skip("POSIX FIFOs")
    os.symlink(scans / "gone.png", scans / "broken.png")
    os.mkfifo(scans / "pipe.dcm")
    os.symlink(os.devnull, scans / "null.jpg")
    os.symlink(scans / "gone", scans / "broken-no-suffix")
    os.mkfifo(scans / "pipe")
    sources, errors = discover([scans])
    assert [str(s.rel) for s in sources] == EXPECTED
    assert sorted(str(e) for e in errors) == [
        f"{scans / 'broken.png'}: a broken link",
        f"{scans / 'null.jpg'}: not a regular file or folder",
        f"{scans / 'pipe.dcm'}: not a regular file or folder",
    ]


_DISCOVER = """
import json, sys
from pathlib import Path
from gms_deploy.io.inputs import discover
sources, errors = discover([Path(a) for a in sys.argv[1:]])
print(json.dumps({"sources": [str(s.rel) for s in sources], "errors": [str(e) for e in errors]}))
"""


def _discover_as_a_user_permissions_stop(*inputs: Path) -> dict[str, list[str]]:
    """``discover`` in a process that file permissions apply to: root drops its bypass (setpriv)."""
    if os.name != "posix":
        pytest.skip("POSIX permissions")
    drop = []
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("running as root, and no setpriv to drop root's permission bypass")
        drop = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search"]
    command = [*drop, sys.executable, "-c", _DISCOVER, *map(str, inputs)]
    return json.loads(subprocess.run(command, capture_output=True, text=True, check=True).stdout)


def test_unreadable_folders_and_files_are_errors_and_the_rest_goes_on(scans: Path) -> None:
    """A folder that cannot be listed, one that can be listed but not entered, and a file inside it."""
    unlisted, unentered = scans / "c", scans / "b"
    unlisted.chmod(0)
    unentered.chmod(0o444)
    try:
        found = _discover_as_a_user_permissions_stop(scans, unentered / "a.PNG")
    finally:
        unlisted.chmod(0o755)
        unentered.chmod(0o755)
    locked_png = f"{unentered / 'a.PNG'}: cannot read: Permission denied"
    assert found["errors"] == [locked_png, f"{unlisted}: cannot list folder: Permission denied", locked_png]
    assert found["sources"] == ["scans/a.jpg", "scans/z.dcm"]


def test_dot_names_the_current_folder(scans: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(scans)
    sources, _ = discover([Path(".")])
    assert [str(s.rel) for s in sources] == EXPECTED


def test_read_frames_sniffs_content(scans: Path, tmp_path: Path) -> None:
    sources, _ = discover([scans])
    by_rel = {str(s.rel): s for s in sources}
    [image] = read_frames(by_rel["scans/a.jpg"])
    assert (image.index, image.rel, image.source) == (None, Path("scans/a.jpg"), scans / "a.jpg")
    assert image.pixels.shape == (7, 5, 3) and image.regions == ()
    [extensionless] = read_frames(by_rel["scans/b/IM0001"])
    assert extensionless.index is None and extensionless.pixels.dtype == np.uint8
    dicom_named_png = tmp_path / "scan.png"
    dicom_named_png.write_bytes(dicom_example("examples_rgb_color.dcm").read_bytes())
    [frame] = read_frames(Source(dicom_named_png, Path("scan.png")))
    assert frame.pixels.shape == (240, 320, 3)


def test_read_frames_yields_cine_frames_with_regions() -> None:
    path = dicom_example("examples_ybr_color.dcm")
    cine = list(read_frames(Source(path, Path("us/cine.dcm"))))
    assert [f.index for f in cine] == list(range(30))
    assert {f.rel for f in cine} == {Path("us/cine.dcm")}
    assert all(len(f.regions) == 1 and f.height == 240 and f.width == 320 for f in cine)


def test_read_frames_errors_are_input_errors(tmp_path: Path) -> None:
    missing = Source(tmp_path / "gone.png", Path("gone.png"))
    with pytest.raises(InputError, match="cannot read"):
        list(read_frames(missing))
    fake = tmp_path / "fake.dcm"
    png(fake)
    with pytest.raises(InputError, match="not DICOM"):
        list(read_frames(Source(fake, Path("fake.dcm"))))
