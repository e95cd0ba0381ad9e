"""What every command shares: the same model flags, and errors handled in one place.

Each command that takes a model runs twice on the tiny model, once given as a bundle (``--model``)
and once as its two checkpoints (``--vae``/``--mapper``; these carry no settings, so the model
then runs at the default 224 x 224 rather than the bundle's 32).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from gms_deploy import cli
from gms_deploy.bundle import ModelBundle
from gms_deploy.cli import app

SAMPLES = Path(cli.__file__).parent / "data" / "samples"
IMAGE = SAMPLES / "images" / "phantom_900000.png"
QUICK_BENCH = ["--iterations", "1", "--warmup", "0", "--batch-size", "1", "--no-submodels", "--threads", "1"]
COMMANDS = {
    "infer": (
        ["infer", str(IMAGE), "--out", "{out}", "--backend", "torch", "--device", "cpu"],
        "phantom_900000_mask.png",
    ),
    "bench": (
        ["bench", "--device", "cpu", *QUICK_BENCH, "--image-size", "32", "--json", "{out}/b.json"],
        "b.json",
    ),
    "evaluate": (["evaluate", "--data", "{data}", "--out", "{out}/scores.csv"], "scores.csv"),
    "export": (
        ["export", "--out", "{out}", "--precision", "fp32", "--no-validate", "--image-size", "32"],
        "manifest.json",
    ),
    "bundle": (["bundle", "--out", "{out}", "--threshold", "0.4"], "gms.json"),
}


def _flags(bundle: ModelBundle, way: str) -> list[str]:
    if way == "bundle":
        return ["--model", str(bundle.vae.parent)]
    return ["--vae", str(bundle.vae), "--mapper", str(bundle.mapper)]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_takes_a_bundle_or_its_two_checkpoints(
    command: str, tiny_bundle: ModelBundle, one_thread: None, tmp_path: Path
) -> None:
    args, made = COMMANDS[command]
    data = tmp_path / "data"  # one image and its mask: evaluate scores at 224 as well
    for part in ("images", "masks"):
        (data / part).mkdir(parents=True)
        shutil.copy(SAMPLES / part / IMAGE.name, data / part)
    for way in ("bundle", "checkpoints"):
        out = tmp_path / way
        out.mkdir()
        filled = [a.format(out=out, data=data) for a in args]
        result = CliRunner().invoke(app, filled + _flags(tiny_bundle, way))
        assert result.exit_code == 0, result.output
        assert (out / made).is_file()


def test_train_takes_a_bundle_or_a_vae(tiny_bundle: ModelBundle, one_thread: None, tmp_path: Path) -> None:
    """Training makes the mapper from the model's VAE (a bundle's, or --vae); --mapper fine-tunes one."""
    for name, flags in (
        ("bundle", ["--model", str(tiny_bundle.vae.parent)]),
        ("checkpoints", ["--vae", str(tiny_bundle.vae), "--mapper", str(tiny_bundle.mapper)]),
    ):
        args = [
            "train",
            "--data",
            str(SAMPLES),
            "--out",
            str(tmp_path / name),
            "--epochs",
            "1",
            "--device",
            "cpu",
        ]
        result = CliRunner().invoke(app, [*args, "--image-size", "32", "--batch-size", "2", *flags])
        assert result.exit_code == 0, result.output
        assert (tmp_path / name / "best_model.pth").is_file()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            [
                "infer",
                str(IMAGE),
                "--out",
                "{out}",
                "--backend",
                "tensorrt",
                "--device",
                "cpu",
                "--model",
                "{export}",
            ],
            "needs a CUDA GPU",
        ),
        (["bench", "--model", "{export}", "--device", "cpu"], "bench needs a model's weights"),
        (["bundle", "--out", "{out}", "--model", "{export}"], "bundle needs a model's weights"),
        (
            ["infer", str(IMAGE), "--out", "{out}", "--device", "tpu"],
            "--device tpu: expected auto, cpu or cuda[:N]",
        ),
    ],
)
def test_flags_that_cannot_work_are_one_line(
    args: list[str], message: str, tiny_onnx: Path, tmp_path: Path
) -> None:
    filled = [a.format(out=tmp_path / "out", export=tiny_onnx) for a in args]
    result = CliRunner().invoke(app, filled)
    assert result.exit_code == 2 and message in result.output, result.output
    assert [line for line in result.output.splitlines() if line.strip()][-1].startswith("error:")
    assert "Traceback" not in result.output


def test_a_bug_is_a_traceback_not_an_error_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A KeyError inside a command is gms-deploy's fault: it must not pass for a problem with the input."""

    def broken(*args: object, **kwargs: object) -> None:
        raise KeyError("settings")

    monkeypatch.setattr(cli, "run_inference", broken)
    result = CliRunner().invoke(app, ["infer", str(IMAGE), "--out", str(tmp_path / "out"), "--device", "cpu"])
    assert isinstance(result.exception, KeyError) and result.exit_code == 1
    assert "error:" not in result.output and cli.BUG in result.output


def test_the_export_script_is_the_export_command() -> None:
    """``export/export_gms.py`` has no flag parser of its own: its help is the command's."""
    script = Path(cli.__file__).resolve().parents[1] / "export" / "export_gms.py"
    done = subprocess.run(
        [sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0 and "--vae" in done.stdout and "--calibration" in done.stdout


def test_help_shows_flags_as_flags_and_every_default(tmp_path: Path) -> None:
    """Typer 0.29 has exceptions of its own: --help once ended in the bug line; and flags read
    `--overlay <bool>`, so users wrote `--overlay true`."""
    names = list(typer.main.get_command(app).commands)
    assert {"infer", "export", "build", "bench", "train", "evaluate", "bundle"} <= set(names)
    for name in names:
        done = CliRunner().invoke(app, [name, "--help"])
        assert done.exit_code == 0 and cli.BUG not in done.output, (name, done.output)
        assert "<bool>" not in done.output, name
    top = CliRunner().invoke(app, ["--help"])
    assert "take no value: write --overlay, not --overlay true" in " ".join(top.output.split())
    train = " ".join(CliRunner().invoke(app, ["train", "--help"]).output.split())
    for default in (
        "[default: (1000); x>=1]",
        "[default: (8); x>=1]",
        "[default: (0.002)",
        "(2333)",
        "(224)",
    ):
        assert default in train
    wrong = CliRunner().invoke(app, ["infer", str(IMAGE), "--overlay", "true", "--out", str(tmp_path / "o")])
    assert wrong.exit_code == 1 and "true: no such file or folder (flags take no value" in wrong.output


def test_evaluate_runs_as_infer_does_and_only_reads_its_data(
    tiny_bundle: ModelBundle, one_thread: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One default (`--backend auto`) for every command, and scores.csv in the working folder."""
    data = tmp_path / "data"
    for part in ("images", "masks"):
        (data / part).mkdir(parents=True)
        shutil.copy(SAMPLES / part / IMAGE.name, data / part)
    before = sorted(p.relative_to(data) for p in data.rglob("*"))
    monkeypatch.chdir(tmp_path)
    done = CliRunner().invoke(app, ["evaluate", "--data", str(data), "--model", str(tiny_bundle.vae.parent)])
    assert done.exit_code == 0, done.output
    assert "auto chose torch on cpu" in done.output and (tmp_path / "scores.csv").is_file()
    assert sorted(p.relative_to(data) for p in data.rglob("*")) == before
