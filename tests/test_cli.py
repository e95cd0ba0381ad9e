"""Every command that writes: an output path it cannot use fails in one line, exit 2, before the work."""

from __future__ import annotations

from pathlib import Path

import pytest
from torch.utils.data import DataLoader, Dataset
from typer.testing import CliRunner

from gms_deploy.cli import app
from gms_deploy.messages import os_reason
from gms_deploy.train import demo_model

DEMO = Path(demo_model.__file__).resolve().parents[1] / "data" / "demo"
SAMPLES = DEMO.parent / "samples"
COMMANDS = {
    "export": ["export", "--out", "{out}", "--no-validate"],
    "bundle": ["bundle", "--vae", str(DEMO / "vae"), "--mapper", str(DEMO / "mapper.pth"), "--out", "{out}"],
    "bench --json": ["bench", "--iterations", "1", "--warmup", "0", "--batch-size", "1", "--json", "{out}"],
    "bench --plot": ["bench", "--iterations", "1", "--warmup", "0", "--batch-size", "1", "--plot", "{out}"],
    "evaluate": ["evaluate", "--data", str(SAMPLES), "--out", "{out}"],
    "train": ["train", "--data", str(SAMPLES), "--out", "{out}", "--epochs", "1"],
}


@pytest.mark.parametrize("command", COMMANDS)
def test_an_output_below_a_file_is_one_line_exit_2(command: str, tmp_path: Path) -> None:
    (tmp_path / "a_file").write_text("")
    out = tmp_path / "a_file" / "out"
    result = CliRunner().invoke(app, [a.format(out=out) for a in COMMANDS[command]])
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert result.exit_code == 2 and len(lines) == 1 and "Traceback" not in result.output, result.output
    assert str(tmp_path / "a_file") in lines[0]
    assert "a file, not a folder" in lines[0] or "Not a directory" in lines[0]
    assert "backend" not in result.output  # refused before bench timed anything


def test_a_folder_where_a_file_goes_is_named(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["evaluate", "--data", str(SAMPLES), "--out", str(tmp_path)])
    assert result.exit_code == 2 and f"error: {tmp_path}: is a folder; name a file" in result.output


def test_an_output_that_is_a_file_and_a_bad_calibration_image(tmp_path: Path) -> None:
    (tmp_path / "a_file").write_text("")
    (tmp_path / "bad.png").write_bytes(b"not an image")
    cases = {
        (
            "--out",
            str(tmp_path / "a_file"),
        ): f"{tmp_path / 'a_file'}: cannot be written: a file, not a folder",
        (
            "--out",
            str(tmp_path / "e"),
            "--calibration",
            str(tmp_path / "bad.png"),
        ): f"{tmp_path / 'bad.png'}: ",
    }
    for flags, expected in cases.items():
        result = CliRunner().invoke(app, ["export", *flags, "--no-validate", "--precision", "fp16"])
        assert result.exit_code == 2 and expected in result.output and "Traceback" not in result.output
    assert not (tmp_path / "e").exists()  # a failed export leaves no folder behind


def test_a_dataloader_workers_error_keeps_the_file_it_names() -> None:
    """Training with DataLoader workers: torch wraps the worker's error, whose last line names the file."""

    class Unreadable(Dataset):
        def __len__(self) -> int:
            return 1

        def __getitem__(self, index: int) -> None:
            raise OSError("data/masks/x.png: cannot be read as an image")

    with pytest.raises(OSError) as caught:
        next(iter(DataLoader(Unreadable(), num_workers=1)))
    assert str(caught.value).startswith("Caught OSError in DataLoader worker process 0")
    assert os_reason(caught.value) == "OSError: data/masks/x.png: cannot be read as an image"
