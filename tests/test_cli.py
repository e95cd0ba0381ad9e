"""Every command that writes: an output path it cannot use fails in one line, exit 2, before the work."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from gms_deploy.cli import app
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
