"""`gms-deploy evaluate`: the demo model scored on the shipped phantoms, both protocols."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from gms_deploy.backends.torch_eager import TorchRunner
from gms_deploy.bundle import ModelBundle, demo_bundle
from gms_deploy.cli import app
from gms_deploy.evaluate import ImageScores, evaluate, summarise, write_scores

SAMPLES = Path(__file__).resolve().parents[1] / "gms_deploy" / "data" / "samples"


@pytest.fixture(scope="module")
def scores() -> list[ImageScores]:
    result = evaluate(SAMPLES, TorchRunner(demo_bundle()))
    assert result.failures == []
    return result.scores


def test_demo_model_scores_well_on_the_shipped_phantoms(scores: list[ImageScores]) -> None:
    assert len(scores) == len(list((SAMPLES / "images").glob("*.png"))) >= 5
    summary = summarise(scores)
    assert summary["dsc"][0] >= 0.85 and summary["dsc_224"][0] >= 0.85
    # picked for variety before training: the widest (224 x 300, squashed to a square) is weakest
    assert min(s.dsc for s in scores) >= 0.75 and sum(s.dsc >= 0.8 for s in scores) >= len(scores) - 1
    assert all(0.0 <= s.iou <= s.dsc <= 1.0 for s in scores)
    assert all(np.isfinite(s.hd95) for s in scores)


def test_scores_csv_has_official_avg_and_std_rows(scores: list[ImageScores], tmp_path: Path) -> None:
    write_scores(tmp_path / "scores.csv", scores)
    with (tmp_path / "scores.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["name"] for r in rows[-2:]] == ["Avg", "Std"]
    dsc = [s.dsc for s in scores]
    assert float(rows[-2]["dsc"]) == pytest.approx(np.mean(dsc))
    assert float(rows[-1]["dsc"]) == pytest.approx(np.std(dsc, ddof=1))


def test_empty_ground_truth_follows_the_official_convention(tmp_path: Path) -> None:
    """An image whose mask is empty scores 0 Dice unless the model also predicts nothing (still 0)."""
    data = tmp_path / "data"
    shutil.copytree(SAMPLES, data)
    first = sorted((data / "masks").glob("*.png"))[0]
    Image.fromarray(np.zeros_like(np.asarray(Image.open(first)))).save(first)
    (score,) = [s for s in evaluate(data, TorchRunner(demo_bundle())).scores if s.name == first.stem]
    assert score.dsc == score.iou == 0.0 and score.hd95 == float("inf")


def test_cli_evaluate_prints_the_summary(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["evaluate", "--data", str(SAMPLES), "--out", str(tmp_path / "s.csv")])
    assert result.exit_code == 0, result.output
    assert "dsc_224" in result.output and (tmp_path / "s.csv").is_file()
    missing = CliRunner().invoke(app, ["evaluate", "--data", str(tmp_path / "nowhere")])
    assert missing.exit_code == 2 and "nowhere" in missing.output


def test_bad_pairs_fail_alone_and_the_rest_is_scored(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A mask that is no image, an image with no mask, a split name with no files; and a mask at
    another size than its image, scored as the official code does (both resized to 224 apart)."""
    data = tmp_path / "data"
    shutil.copytree(SAMPLES, data)
    masks = sorted((data / "masks").glob("*.png"))
    masks[0].write_bytes(b"not an image")
    masks[1].unlink()
    with Image.open(masks[2]) as mask:
        mask.resize((mask.width // 2, mask.height // 2), Image.NEAREST).save(masks[2])
    with caplog.at_level("WARNING", logger="gms_deploy"):
        result = evaluate(data, TorchRunner(demo_bundle()))
    assert f"1 with no mask of the same name, left out: {masks[1].stem}" in caplog.text
    assert f"{masks[2]}: mask is" in caplog.text and "resized to the image (NEAREST)" in caplog.text
    assert [s.name for s in result.scores] == [m.stem for m in masks[2:]]
    assert result.failures == [f"{masks[0]}: cannot read the mask: cannot identify image file '{masks[0]}'"]
    assert result.scores[0].dsc_224 > 0.8 and result.scores[0].dsc > 0.8
    named = evaluate(data, TorchRunner(demo_bundle()), ["nobody", masks[3].stem])
    assert named.failures == [f"{data / 'images' / 'nobody'}.*: no such image"] and len(named.scores) == 1

    cli = CliRunner().invoke(app, ["evaluate", "--data", str(data), "--out", str(tmp_path / "scores.csv")])
    assert cli.exit_code == 1 and "1 FAILED" in cli.output
    assert (tmp_path / "scores.csv").is_file() and not (data / "scores.csv").exists()


def test_no_pairs_at_all_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    result = CliRunner().invoke(app, ["evaluate", "--data", str(tmp_path)])
    assert result.exit_code == 2 and "no image with a mask of the same name" in result.output


def test_nan_probabilities_fail_their_image(tmp_path: Path) -> None:
    demo = demo_bundle()
    state = torch.load(demo.mapper, weights_only=True)
    state["model"]["convds0.0.bias"] = torch.full_like(state["model"]["convds0.0.bias"], 1e38)
    torch.save(state, tmp_path / "overflowing.pth")
    runner = TorchRunner(ModelBundle(demo.vae, tmp_path / "overflowing.pth", demo.settings))
    result = evaluate(SAMPLES, runner, ["phantom_900000"])
    assert result.scores == []
    image = SAMPLES / "images" / "phantom_900000.png"
    assert result.failures == [f"{image}: torch gave NaN or Inf probabilities"]
