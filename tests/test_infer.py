"""`gms-deploy infer` end to end: real files in, masks and results.csv out, bad files survived."""

from __future__ import annotations

import csv
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
import torch
from PIL import Image
from pydicom.data import get_testdata_file
from typer.testing import CliRunner

from gms_deploy.backends import open_runner
from gms_deploy.backends.torch_eager import TorchRunner
from gms_deploy.bundle import ModelBundle
from gms_deploy.cli import app
from gms_deploy.infer import InferOptions, Progress, run_inference
from gms_deploy.segment import segmenter_for

cli = CliRunner()


def _rows(out: Path) -> list[dict[str, str]]:
    with (out / "results.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


def _mask(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def _invoke(*args: str | Path) -> tuple[int, str]:
    result = cli.invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


def test_official_parity_through_the_cli(parity_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    code, output = _invoke(
        "infer",
        parity_dir / "input.png",
        "--out",
        out,
        "--vae",
        parity_dir / "vae_ldm.ckpt",
        "--mapper",
        parity_dir / "mapper.pth",
        "--save-prob",
        "--overlay",
    )
    assert code == 0, output
    official = np.load(parity_dir / "prob224.npy")
    prob = np.load(out / "input_prob.npy")
    assert prob.dtype == np.float32 and np.abs(prob - official).max() <= 2e-5
    mask = _mask(out / "input_mask.png")
    assert mask.shape == (300, 260) and set(np.unique(mask)) <= {0, 255}
    expected = cv2.resize(official, (260, 300), interpolation=cv2.INTER_LINEAR) > 0.5
    assert np.mean((mask > 0) != expected) < 1e-3  # only pixels within 2e-5 of the threshold may differ
    assert _mask(out / "input_overlay.png").shape == (300, 260, 3)
    (row,) = _rows(out)
    assert row["status"] == "ok" and int(row["area_px"]) == int((mask > 0).sum())
    assert row["area_mm2"] == ""  # a PNG carries no calibration


@pytest.fixture()
def tree(tmp_path: Path) -> Path:
    """A cart's export folder: nested images, a cine loop, and files that must fail."""
    root = tmp_path / "scans"
    (root / "patient1" / "visit2").mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(root / "patient1" / "a.png")
    Image.fromarray(rng.integers(0, 255, (33, 21), dtype=np.uint8)).save(
        root / "patient1" / "visit2" / "b.jpg"
    )
    shutil.copy(get_testdata_file("examples_ybr_color.dcm"), root / "patient1" / "cine.dcm")
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    (root / "empty.dcm").write_bytes(b"")
    (root / "notes.txt").write_text("not an image, silently ignored in a folder")
    return root


def test_folder_run_mirrors_tree_and_survives_bad_files(
    tree: Path, tiny_bundle: ModelBundle, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    runner = TorchRunner(tiny_bundle)
    report = run_inference([tree], runner, InferOptions(out, batch_size=7))
    assert report.files == 5 and report.frames == 2 + 30
    assert len(report.failures) == 2 and not report.ok
    assert any("broken.png" in f for f in report.failures) and any("empty.dcm" in f for f in report.failures)
    assert all("\n" not in f for f in report.failures)
    assert _mask(out / "scans" / "patient1" / "a_mask.png").shape == (40, 50)
    assert _mask(out / "scans" / "patient1" / "visit2" / "b_mask.png").shape == (33, 21)
    cine = sorted((out / "scans" / "patient1").glob("cine_f*_mask.png"))
    assert [p.name for p in cine[:2]] == ["cine_f0000_mask.png", "cine_f0001_mask.png"] and len(cine) == 30
    assert not list(tree.rglob("*_mask.png")), "nothing may be written beside the inputs"
    rows = _rows(out)
    assert sum(r["status"] == "ok" for r in rows) == 32 and sum(r["status"] == "failed" for r in rows) == 2
    assert {r["frame"] for r in rows if "cine" in r["source"]} == {str(i) for i in range(30)}
    assert not list(out.rglob("*.tmp*")) and not list(out.rglob(".*"))


def test_existing_outputs_are_kept_unless_overwrite(
    tree: Path, tiny_bundle: ModelBundle, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    image = tree / "patient1" / "a.png"
    runner = TorchRunner(tiny_bundle)
    run_inference([image], runner, InferOptions(out))
    (out / "a_mask.png").write_bytes(b"user's own file")
    again = run_inference([image], runner, InferOptions(out, save_prob=True))
    assert again.frames == 1 and again.skipped == 0  # the missing prob map is added...
    assert (out / "a_mask.png").read_bytes() == b"user's own file"  # ...and the mask left alone
    assert (out / "a_prob.npy").is_file()
    third = run_inference([image], runner, InferOptions(out, save_prob=True))
    assert third.skipped == 1 and third.frames == 0
    run_inference([image], runner, InferOptions(out, overwrite=True))
    assert _mask(out / "a_mask.png").shape == (40, 50)
    assert len(_rows(out)) == 1  # one row per frame, replaced, never duplicated


def test_file_names_no_terminal_or_csv_can_hold_are_escaped(tiny_bundle: ModelBundle, tmp_path: Path) -> None:
    """A newline in a name, and a Latin-1 name on a UTF-8 system (Python holds it as a lone surrogate)."""
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "bad\nname.dcm").write_bytes(b"not DICOM" * 20)
    Image.new("L", (16, 12)).save(os.fsencode(folder) + b"/M\xfcller.png", format="PNG")
    out = tmp_path / "out"
    for _ in range(2):  # a rerun finds its own rows again, so it replaces rather than adds them
        report = run_inference([folder], TorchRunner(tiny_bundle), InferOptions(out, overwrite=True))
    assert report.frames == 1 and report.failures == [f"{folder}/bad\\nname.dcm: not DICOM"]
    assert _mask(out / "in" / "M\udcfcller_mask.png").shape == (12, 16)
    rows = sorted(_rows(out), key=lambda row: row["status"])
    assert [row["source"] for row in rows] == [f"{folder}/bad\\nname.dcm", f"{folder}/M\\udcfcller.png"]
    assert (out / "results.csv").read_bytes().decode("utf-8").count("\n") == 3
    Image.new("L", (16, 12)).save(os.fsencode(folder) + b"/M\xfcller.jpg", format="JPEG")
    report = run_inference([folder], TorchRunner(tiny_bundle), InferOptions(out))
    clash = f"{folder}/M\\udcfcller.png: its outputs would overwrite those of {folder}/M\\udcfcller.jpg"
    assert clash in report.failures


class _InterruptedRunner(TorchRunner):
    """Fault injection: Ctrl-C arrives during the second batch."""

    calls = 0

    def __call__(self, images: np.ndarray) -> np.ndarray:
        self.calls += 1
        if self.calls == 2:
            raise KeyboardInterrupt
        return super().__call__(images)


def test_ctrl_c_keeps_finished_outputs_and_their_rows(
    tree: Path, tiny_bundle: ModelBundle, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        run_inference(
            [tree / "patient1" / "cine.dcm"], _InterruptedRunner(tiny_bundle), InferOptions(out, batch_size=4)
        )
    assert len(list(out.glob("*_mask.png"))) == 4 and len(_rows(out)) == 4
    assert not list(out.glob(".*"))


def test_output_folder_inside_input_is_not_read_back(tree: Path, tiny_bundle: ModelBundle) -> None:
    out = tree / "masks"
    runner = TorchRunner(tiny_bundle)
    first = run_inference([tree / "patient1" / "visit2"], runner, InferOptions(out))
    second = run_inference([tree / "patient1" / "visit2"], runner, InferOptions(out, overwrite=True))
    assert first.frames == second.frames == 1


def test_colliding_output_names_fail_the_second_file(tmp_path: Path, tiny_bundle: ModelBundle) -> None:
    (tmp_path / "in").mkdir()
    Image.new("RGB", (16, 16), "white").save(tmp_path / "in" / "x.png")
    Image.new("RGB", (16, 16), "black").save(tmp_path / "in" / "x.bmp")
    report = run_inference([tmp_path / "in"], TorchRunner(tiny_bundle), InferOptions(tmp_path / "out"))
    assert (
        report.frames == 1 and len(report.failures) == 1 and "would overwrite those of" in report.failures[0]
    )


def test_roi_crop_and_physical_area(tmp_path: Path, tiny_bundle: ModelBundle) -> None:
    """The palette example with its 2D region (in cm) mended to end on the image's last row, and its
    Doppler strip removed: cropped to the region, and an area in mm² from its spacing."""
    ds = pydicom.dcmread(get_testdata_file("examples_palette.dcm"))
    tissue = next(r for r in ds.SequenceOfUltrasoundRegions if r.RegionSpatialFormat == 1)
    tissue.RegionLocationMaxY1 = ds.Rows - 1
    ds.SequenceOfUltrasoundRegions = [tissue]
    source = tmp_path / "palette.dcm"
    ds.save_as(source)
    out = tmp_path / "out"
    report = run_inference([source], TorchRunner(tiny_bundle), InferOptions(out, roi="dicom", threshold=0.01))
    assert report.ok and report.frames == 1
    mask = _mask(out / "palette_mask.png") > 0
    assert mask.shape == (ds.Rows, ds.Columns)
    inside = np.zeros_like(mask)
    inside[
        tissue.RegionLocationMinY0 : tissue.RegionLocationMaxY1 + 1,
        tissue.RegionLocationMinX0 : tissue.RegionLocationMaxX1 + 1,
    ] = True
    assert mask.any() and not (mask & ~inside).any()
    (row,) = _rows(out)
    expected = mask.sum() * abs(tissue.PhysicalDeltaX * tissue.PhysicalDeltaY) * 100
    assert float(row["area_mm2"]) == pytest.approx(expected, rel=1e-6) and row["message"] == ""


def test_no_area_from_a_region_that_overruns_the_image(tmp_path: Path, tiny_bundle: ModelBundle) -> None:
    """pydicom's palette example: its tissue region reaches row 518 of 350, so its spacing describes
    other pixels. The mask is written; the area is blank and the row says why."""
    out = tmp_path / "out"
    source = Path(get_testdata_file("examples_palette.dcm"))
    report = run_inference([source], TorchRunner(tiny_bundle), InferOptions(out, roi="dicom"))
    assert report.ok and report.frames == 1
    (row,) = _rows(out)
    assert row["status"] == "ok" and row["area_mm2"] == "" and row["area_px"] != ""
    assert "(120,60)-(800,518) overruns the 800 x 350 image" in row["message"] and "no area" in row["message"]


class _FailingSecondBatch(TorchRunner):
    """Fault injection: the real runner, but its second batch dies as a lost GPU would."""

    calls = 0

    def __call__(self, images: np.ndarray) -> np.ndarray:
        self.calls += 1
        if self.calls == 2:
            raise RuntimeError("CUDA error: an illegal memory access was encountered\nmore detail")
        return super().__call__(images)


def test_a_failing_batch_fails_only_its_frames(tree: Path, tiny_bundle: ModelBundle, tmp_path: Path) -> None:
    report = run_inference(
        [tree / "patient1" / "cine.dcm"],
        _FailingSecondBatch(tiny_bundle),
        InferOptions(tmp_path / "out", batch_size=8),
    )
    assert report.frames == 22 and len(report.failures) == 8
    assert all("illegal memory access" in f and "\n" not in f for f in report.failures)
    assert len(list((tmp_path / "out").glob("*_mask.png"))) == 22


def test_cli_exit_codes_and_messages(tree: Path, tiny_bundle: ModelBundle, tmp_path: Path) -> None:
    model = tiny_bundle.vae.parent
    code, output = _invoke("infer", tree / "patient1" / "a.png", "--out", tmp_path / "o1", "--model", model)
    assert code == 0 and "1 frame(s) from 1 file(s)" in output
    code, output = _invoke(
        "infer", tree, tmp_path / "missing.png", "--out", tmp_path / "o2", "--model", model
    )
    assert code == 1 and "3 FAILED" in output and "missing.png" in output
    code, output = _invoke("infer", tree, "--out", tmp_path / "o3", "--model", tmp_path)
    assert code == 2 and "not a model bundle" in output
    code, output = _invoke("infer", tree, "--out", tmp_path / "o4", "--vae", model / "vae")
    assert code == 2 and "--vae and --mapper go together" in output
    code, output = _invoke("infer", tree, "--out", tmp_path / "o5", "--model", model, "--device", "cuda")
    assert code == 2 and "no CUDA GPU" in output
    (tmp_path / "a_file").write_text("")
    code, output = _invoke("infer", tree, "--out", tmp_path / "a_file", "--model", model)
    assert code == 2 and "exists and is not a folder" in output
    (tmp_path / "o6").mkdir()
    (tmp_path / "o6" / "results.csv").write_text("name,score\nx,1\n")
    code, output = _invoke("infer", tree, "--out", tmp_path / "o6", "--model", model)
    assert code == 2 and "not a results table" in output
    os.symlink(tmp_path / "loop", tmp_path / "loop")
    code, output = _invoke("infer", tree, "--out", tmp_path / "loop" / "o7", "--model", model)
    assert code == 2 and "cannot be the output folder" in output


def test_an_unusable_output_folder_fails_at_once_in_one_line(
    tree: Path, tiny_bundle: ModelBundle, tmp_path: Path
) -> None:
    """Below a file; a folder, or bytes that are no text, where results.csv goes (in a folder whose
    name has braces, which a message template would take for its own): before any frame."""
    (tmp_path / "a_file").write_text("")
    (tmp_path / "o1" / "results.csv").mkdir(parents=True)
    (tmp_path / "o{2}").mkdir()
    (tmp_path / "o{2}" / "results.csv").write_bytes(b"\xff\xfe\x00 not text")
    cases = {
        tmp_path / "a_file" / "out": "out: cannot be the output folder: Not a directory",
        tmp_path / "o1": "results.csv: exists but is not a results table (a folder)",
        tmp_path / "o{2}": "results.csv: exists but is not a results table (not a UTF-8 CSV table)",
    }
    for out, expected in cases.items():
        code, output = _invoke("infer", tree, "--out", out, "--model", tiny_bundle.vae.parent)
        errors = [line for line in output.splitlines() if line.startswith("error:")]
        assert code == 2 and len(errors) == 1 and expected in errors[0], output
    assert not list(tmp_path.rglob("*_mask.png"))
    assert (tmp_path / "o{2}" / "results.csv").read_bytes() == b"\xff\xfe\x00 not text"


def test_results_csv_that_cannot_be_written_mid_run_is_one_failure(
    tree: Path, tiny_bundle: ModelBundle, tmp_path: Path
) -> None:
    """Its place taken by a folder once the run is going: the masks are still written, the run fails."""
    out = tmp_path / "out"

    def block_the_table(done: Progress) -> None:
        if done.files == 1 and not (out / "results.csv").is_dir():
            (out / "results.csv").unlink()
            (out / "results.csv").mkdir()

    report = run_inference([tree / "patient1"], TorchRunner(tiny_bundle), InferOptions(out), block_the_table)
    assert report.frames == 32
    [failure] = report.failures
    assert failure == f"{out / 'results.csv'}: cannot write: Is a directory"
    assert len(list(out.rglob("*_mask.png"))) == 32 and not list(out.rglob(".*.part"))


def test_cli_as_a_subprocess(tiny_bundle: ModelBundle, tmp_path: Path) -> None:
    image = tmp_path / "img.tif"
    Image.fromarray(np.full((20, 30), 60000, dtype=np.uint16)).save(image)
    command = [
        sys.executable,
        "-m",
        "gms_deploy",
        "infer",
        str(image),
        "--out",
        str(tmp_path / "out"),
        "--model",
        str(tiny_bundle.vae.parent),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert _mask(tmp_path / "out" / "img_mask.png").shape == (20, 30)


def test_open_runner_rejects_unknown_backend() -> None:
    with pytest.raises(Exception, match="unknown backend 'nope'"):
        open_runner("nope")


@pytest.mark.parametrize("fused", [False, True])
def test_a_model_that_overflows_fails_each_frame_and_writes_no_mask(
    tree: Path, tiny_bundle: ModelBundle, tmp_path: Path, fused: bool
) -> None:
    """Finite weights whose mask latent overflows float32 once unscaled (/ 0.18215), as an FP16
    engine overflows: NaN probabilities would threshold to empty masks that look like answers."""
    state = torch.load(tiny_bundle.mapper, weights_only=True)
    state["model"]["convds0.0.bias"] = torch.full_like(state["model"]["convds0.0.bias"], 1e38)
    torch.save(state, tmp_path / "overflowing.pth")
    runner = TorchRunner(ModelBundle(tiny_bundle.vae, tmp_path / "overflowing.pth", tiny_bundle.settings))
    out = tmp_path / "out"
    report = run_inference(
        [tree / "patient1" / "a.png"], runner, InferOptions(out), segmenter=segmenter_for(runner, fused)
    )
    assert report.frames == 0
    assert report.failures == [f"{tree / 'patient1' / 'a.png'}: torch gave NaN or Inf probabilities; no mask"]
    assert not list(out.rglob("*.png")) and _rows(out)[0]["status"] == "failed"


def test_nothing_named_is_dropped_and_outputs_among_inputs_are_passed_over(
    tiny_bundle: ModelBundle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An input inside the output folder used to be dropped in silence: `0 frame(s)`, exit 0."""
    same = tmp_path / "same"
    same.mkdir()
    Image.fromarray(np.arange(1200, dtype=np.uint16).reshape(30, 40)).save(same / "grey16.tif")
    Image.new("RGB", (20, 16), "white").save(same / "b.png")
    model = tiny_bundle.vae.parent
    monkeypatch.chdir(tmp_path)
    code, output = _invoke("infer", "same/grey16.tif", "--out", ".", "--model", model)
    assert code == 0 and "1 frame(s) from 1 file(s)" in output, output
    assert (tmp_path / "grey16_mask.png").is_file()
    for _ in range(2):  # the second time, its own masks are outputs, not inputs
        code, output = _invoke("-v", "infer", "same", "--out", "same", "--model", model)
        assert code == 0 and "from 2 file(s)" in output, output
    assert "same/b_mask.png: skipped, an output of gms-deploy" in output
    assert not list(same.rglob("*_mask_mask.png"))
    monkeypatch.chdir(same)
    code, output = _invoke("infer", ".", "--out", "..", "--model", model)
    assert code == 0 and "2 frame(s) from 2 file(s)" in output, output
    assert (same / "same" / "b_mask.png").is_file() or (same / "b_mask.png").is_file()


def test_an_output_folder_below_the_input_is_skipped_and_said_with_v(
    tree: Path, tiny_bundle: ModelBundle
) -> None:
    model = tiny_bundle.vae.parent
    args = (
        "infer",
        tree / "patient1" / "visit2",
        "--out",
        tree / "patient1" / "visit2" / "out",
        "--model",
        model,
    )
    first = _invoke(*args)
    second = _invoke("-v", *args)
    assert first[0] == second[0] == 0 and "1 frame(s) from 1 file(s)" in first[1]
    assert "0 frame(s) from 1 file(s)" in second[1] and "1 skipped (outputs exist" in second[1]
    assert "visit2/out: skipped, an output folder of gms-deploy (its results.csv)" in second[1]


def test_zero_frames_from_named_inputs_is_a_failure(tiny_bundle: ModelBundle, tmp_path: Path) -> None:
    only_outputs = tmp_path / "masks"
    only_outputs.mkdir()
    (only_outputs / "notes.txt").write_text("nothing to segment")
    code, output = _invoke(
        "-v", "infer", only_outputs, "--out", tmp_path / "o", "--model", tiny_bundle.vae.parent
    )
    assert code == 1 and "folder holds no image or DICOM files" in output
    assert "notes.txt: skipped, neither an image nor DICOM" in output  # -v names what it ignored


def test_two_runs_into_one_folder_at_once_are_refused(
    tree: Path, tiny_bundle: ModelBundle, tmp_path: Path
) -> None:
    from gms_deploy.io.outputs import folder_lock

    out = tmp_path / "out"
    with folder_lock(out, "out"):  # what a first run holds while it writes
        code, output = _invoke(
            "infer", tree / "patient1" / "a.png", "--out", out, "--model", tiny_bundle.vae.parent
        )
    assert code == 2 and "another gms-deploy run is writing here" in output
    assert not list(out.iterdir())  # it wrote nothing, not even a results.csv
    code, output = _invoke(
        "infer", tree / "patient1" / "a.png", "--out", out, "--model", tiny_bundle.vae.parent
    )
    assert code == 0 and not list(out.glob(".*"))  # and the lock leaves no file behind


def test_progress_counts_frames_with_the_total_known_early(
    tree: Path, tiny_bundle: ModelBundle, tmp_path: Path
) -> None:
    seen: list[Progress] = []
    cine = tree / "patient1" / "cine.dcm"
    report = run_inference(
        [cine, tree / "patient1" / "a.png"],
        TorchRunner(tiny_bundle),
        InferOptions(tmp_path / "o", batch_size=8),
        seen.append,
    )
    assert report.frames == 31
    assert seen[0].frames == 0 and seen[0].frames_total == 31  # the cine's NumberOfFrames, at once
    assert [p.frames for p in seen if p.frames] == sorted(p.frames for p in seen if p.frames)
    assert seen[-1] == Progress(31, 31, 2, 2, 0)


def test_the_summary_line_and_ctrl_c_line(tree: Path, tiny_bundle: ModelBundle, tmp_path: Path) -> None:
    from gms_deploy import cli as cli_module

    code, output = _invoke(
        "infer", tree / "patient1", "--out", tmp_path / "o", "--model", tiny_bundle.vae.parent
    )
    summary = output.strip().splitlines()[-1]
    assert code == 0 and re.fullmatch(
        r"32 frame\(s\) from 3 file\(s\) -> \S+ in [\d.]+ s \([\d.]+ frames/s\)", summary
    )
    interrupted = CliRunner()
    original = cli_module.run_inference

    def ctrl_c_after_the_first_batch(inputs, runner, options, progress=None):  # type: ignore[no-untyped-def]
        return original(inputs, _InterruptedRunner(tiny_bundle), options, progress)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cli_module, "run_inference", ctrl_c_after_the_first_batch)
        done = interrupted.invoke(
            app,
            ["infer", str(tree / "patient1" / "cine.dcm"), "--out", str(tmp_path / "c"), "--batch-size", "4"],
        )
    assert done.exit_code == 130
    assert (
        "interrupted after 4 of 30 frame(s)" in done.output
        and "the same command again resumes" in done.output
    )
    assert len(_rows(tmp_path / "c")) == 4


def test_a_warning_about_a_file_is_said_once_with_its_frame_count(
    tiny_bundle: ModelBundle, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """`--roi dicom` on a cine whose only region is distrusted said "no region" once per frame."""
    cine = Path(get_testdata_file("examples_ybr_color.dcm"))
    with caplog.at_level("WARNING", logger="gms_deploy"):
        report = run_inference([cine], TorchRunner(tiny_bundle), InferOptions(tmp_path / "o", roi="dicom"))
    assert report.frames == 30
    said = [r.getMessage() for r in caplog.records if "no trusted 2D ultrasound region" in r.getMessage()]
    assert said == [
        f"{cine}: no trusted 2D ultrasound region to crop to; segmenting the whole frame (30-frame file)"
    ]
