"""Output naming, atomic writers, the overlay and results.csv."""

from __future__ import annotations

import csv
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from io_corpus import random_uint
from PIL import Image

from gms_deploy.io.outputs import (
    EDGE_RGB,
    FIELDS,
    OutputPaths,
    ResultRow,
    ResultsTable,
    Status,
    output_stem,
    overlay,
    write_npy,
    write_png,
)


def test_output_stem_mirrors_rel_and_numbers_frames() -> None:
    out = Path("out")
    assert output_stem(out, Path("scans/a/b.dcm"), None) == Path("out/scans/a/b")
    assert output_stem(out, Path("scans/a/b.dcm"), 7) == Path("out/scans/a/b_f0007")
    assert output_stem(out, Path("x.PNG"), None) == Path("out/x")
    # UID-named DICOM keep their whole name, or 1.2.840.7 and 1.2.840.8 would share one output
    assert output_stem(out, Path("s/1.2.840.7"), 12) == Path("out/s/1.2.840.7_f0012")


def test_output_paths() -> None:
    paths = OutputPaths.for_frame(Path("out"), Path("us/cine.dcm"), 3)
    assert paths == OutputPaths(
        Path("out/us/cine_f0003_mask.png"),
        Path("out/us/cine_f0003_prob.npy"),
        Path("out/us/cine_f0003_overlay.png"),
    )


def files_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_writers_create_folders_and_leave_only_the_result(tmp_path: Path) -> None:
    mask = random_uint((7, 5), np.uint8) > 127
    rgb = random_uint((7, 5, 3), np.uint8)
    prob = np.random.default_rng(0).random((7, 5), dtype=np.float32)
    folder = tmp_path / "a" / "b"
    write_png(folder / "m.png", mask)
    write_png(folder / "o.png", rgb)
    write_npy(folder / "p.npy", prob)
    assert files_in(folder) == ["m.png", "o.png", "p.npy"]
    with Image.open(folder / "m.png") as im:
        assert im.mode == "L"
        np.testing.assert_array_equal(np.asarray(im), mask.astype(np.uint8) * 255)
    with Image.open(folder / "o.png") as im:
        np.testing.assert_array_equal(np.asarray(im), rgb)
    loaded = np.load(folder / "p.npy")
    assert loaded.dtype == np.float32
    np.testing.assert_array_equal(loaded, prob)


def test_rewrite_replaces_the_whole_file(tmp_path: Path) -> None:
    path = tmp_path / "p.npy"
    write_npy(path, np.zeros(1000))
    write_npy(path, np.ones(3))
    np.testing.assert_array_equal(np.load(path), np.ones(3))
    assert files_in(tmp_path) == ["p.npy"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "p.npy"
    write_npy(path, np.arange(4))
    with pytest.raises(ValueError, match="pickle"):
        write_npy(path, np.array([{"not": "numeric"}], dtype=object))  # fails after the temp file is open
    assert files_in(tmp_path) == ["p.npy"]
    np.testing.assert_array_equal(np.load(path), np.arange(4))


def test_a_parent_that_is_a_file_fails_cleanly(tmp_path: Path) -> None:
    blocker = tmp_path / "taken"
    blocker.write_text("a file, not a folder")
    with pytest.raises(OSError):
        write_png(blocker / "m.png", np.zeros((2, 2), bool))
    with pytest.raises(OSError):
        write_npy(blocker / "deeper" / "p.npy", np.zeros(2))
    assert files_in(tmp_path) == ["taken"]
    assert blocker.read_text() == "a file, not a folder"


def test_write_png_refuses_arrays_it_cannot_store_faithfully(tmp_path: Path) -> None:
    for bad in (np.zeros((2, 2), np.float32), np.zeros((2, 2, 5), np.uint8), np.zeros(4, np.uint8)):
        with pytest.raises(ValueError, match="cannot write"):
            write_png(tmp_path / "x.png", bad)
    assert files_in(tmp_path) == []


def test_overlay_fills_and_outlines_only_the_mask() -> None:
    rgb = random_uint((40, 50, 3), np.uint8)
    mask = np.zeros((40, 50), bool)
    mask[10:30, 5:45] = True
    shown = overlay(rgb, mask)
    assert shown.dtype == np.uint8 and shown.shape == rgb.shape
    np.testing.assert_array_equal(shown[~mask], rgb[~mask])
    outline = mask.copy()
    outline[11:29, 6:44] = False
    assert (shown[outline] == EDGE_RGB).all()
    inside = np.zeros_like(mask)
    inside[11:29, 6:44] = True
    assert (shown[inside] != rgb[inside]).any(axis=1).mean() > 0.9
    # the fill is translucent: the image still shows through
    assert np.corrcoef(shown[inside][:, 0], rgb[inside][:, 0])[0, 1] > 0.9


def test_overlay_outline_width_follows_the_shorter_side() -> None:
    """A long strip gets the outline of its height: its length once meant a 1000-step erosion."""
    mask = np.ones((20, 400_000), bool)
    shown = overlay(np.zeros((20, 400_000, 3), np.uint8), mask)
    assert (shown[0] == EDGE_RGB).all() and (shown[1, 1:-1] != EDGE_RGB).any(axis=1).all()


def test_overlay_takes_float_images_and_draws_the_image_border() -> None:
    grey = np.linspace(0, 1, 16 * 16, dtype=np.float32).reshape(16, 16, 1).repeat(3, axis=2)
    full = overlay(grey, np.ones((16, 16), bool))
    assert (full[0] == EDGE_RGB).all() and (full[:, -1] == EDGE_RGB).all()
    empty = overlay(grey, np.zeros((16, 16), bool))
    np.testing.assert_array_equal(empty, (grey * 255 + 0.5).astype(np.uint8))
    with pytest.raises(ValueError, match="does not match"):
        overlay(grey, np.zeros((16, 15), bool))


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames or ()) == FIELDS
        return list(reader)


def row(
    source: str,
    frame: int | None,
    status: Status = "ok",
    *,
    area_px: int | None = 10,
    area_mm2: float | None = None,
    seconds: float | None = 0.5,
    message: str = "",
) -> ResultRow:
    return ResultRow(source, frame, f"out/{source}", area_px, area_mm2, seconds, status, message)


def test_results_table_writes_every_row_with_empty_unknowns(tmp_path: Path) -> None:
    table = ResultsTable(tmp_path / "results.csv")
    table.add(replace(row("a.png", None, area_mm2=12.3456), confidence=0.91234, uncertain=0.0123))
    table.add(replace(row("cine.dcm", 0, area_mm2=None), uncertain=0.5))
    table.add(row("bad.dcm", None, "failed", area_px=None, seconds=None, message="bad.dcm: broken\nfile"))
    table.flush()
    blank = dict.fromkeys(FIELDS, "")
    assert read_csv(tmp_path / "results.csv") == [
        {**blank, "source": "a.png", "output": "out/a.png", "area_px": "10", "area_mm2": "12.346",
         "confidence": "0.9123", "uncertain": "0.0123", "seconds": "0.5000", "status": "ok"},
        {**blank, "source": "cine.dcm", "frame": "0", "output": "out/cine.dcm", "area_px": "10",
         "uncertain": "0.5000", "seconds": "0.5000", "status": "ok"},
        {**blank, "source": "bad.dcm", "output": "out/bad.dcm", "status": "failed",
         "message": "bad.dcm: broken file"},
    ]  # fmt: skip
    assert files_in(tmp_path) == ["results.csv"]


def test_a_rerun_keeps_old_rows_and_replaces_same_keys(tmp_path: Path) -> None:
    path = tmp_path / "results.csv"
    first = ResultsTable(path)
    for frame in (0, 1, 2):
        first.add(row("cine.dcm", frame, area_px=frame))
    first.add(row("a.png", None, "failed", area_px=None))
    first.flush()

    second = ResultsTable(path)
    second.add(row("a.png", None, area_px=99))
    second.add(row("cine.dcm", 1, "skipped", area_px=None))
    second.add(row("new.png", None))
    second.flush()
    keys = [(r["source"], r["frame"], r["status"], r["area_px"]) for r in read_csv(path)]
    assert keys == [
        ("cine.dcm", "0", "ok", "0"),
        ("cine.dcm", "1", "skipped", ""),
        ("cine.dcm", "2", "ok", "2"),
        ("a.png", "", "ok", "99"),
        ("new.png", "", "ok", "10"),
    ]


def test_flush_after_every_batch_keeps_finished_rows(tmp_path: Path) -> None:
    path = tmp_path / "results.csv"
    table = ResultsTable(path)
    table.add(row("a.png", None))
    table.flush()
    table.add(row("b.png", None))
    assert [r["source"] for r in read_csv(path)] == ["a.png"]  # a crash here loses only b
    table.flush()
    assert [r["source"] for r in read_csv(path)] == ["a.png", "b.png"]


def test_a_foreign_csv_is_not_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "results.csv"
    path.write_text("name,score\nx,1\n")
    with pytest.raises(ValueError, match="not a results table"):
        ResultsTable(path)
    assert path.read_text() == "name,score\nx,1\n"


def test_status_is_checked() -> None:
    with pytest.raises(ValueError, match="status"):
        row("a.png", None, "done")  # type: ignore[arg-type]
