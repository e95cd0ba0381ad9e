"""The README's examples, run in order as a reader pastes them, so that the README stays true.

Each command of its ``bash`` blocks runs in a fresh folder that holds only a link to the package
(its demo model and sample images), so outputs land in that folder's ``out/`` and one block may
use what an earlier one wrote, as the README's order intends. Synopses are ``text`` blocks, and a
command with a placeholder in capitals outside its comment (``BUNDLE``, ``DIR``) is left out too.
A command marked ``# on a GPU`` runs, or refuses in one line with exit code 2 as the README
promises: on a machine without a GPU, or (on a GPU) with engines built for another one.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT

README = ROOT / "README.md"
PLACEHOLDER = re.compile(r"(?<![\w-])[A-Z][A-Z_]+(?!\w)")
ON_A_GPU = "# on a GPU"


def readme_commands(text: str) -> list[str]:
    """The README's shell commands, in order, continuation lines joined, comment lines dropped."""
    commands = []
    for block in re.findall(r"^```bash\n(.*?)^```", text, re.S | re.M):
        lines = (line.strip() for line in block.replace("\\\n", " ").splitlines())
        commands += [line for line in lines if line and not line.startswith("#")]
    return commands


def _shell_env() -> dict[str, str]:
    """This interpreter's environment first on PATH, as ``. .venv/bin/activate`` makes it."""
    bin_dir = str(Path(sys.executable).parent)
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}


def _run(command: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, cwd=cwd, env=_shell_env(), capture_output=True, text=True, timeout=900)


def test_readme_examples_run_in_order(tmp_path: Path) -> None:
    pytest.importorskip("tensorrt_rtx", reason="the README's examples need the export extra")
    pytest.importorskip("matplotlib", reason="the README's examples need the bench extra")
    (tmp_path / "gms_deploy").symlink_to(ROOT / "gms_deploy")
    commands = readme_commands(README.read_text())
    examples = [c for c in commands if not c.startswith("make ") and not PLACEHOLDER.search(c.split(" #")[0])]
    for command in examples:
        result = _run(["bash", "-c", command], tmp_path)
        said = f"{command}\nexit {result.returncode}\n{result.stdout}{result.stderr}"
        if ON_A_GPU in command and result.returncode != 0:
            assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, said
            assert torch.cuda.is_available() or "GPU" in result.stderr, said
        else:
            assert result.returncode == 0, said
    assert len(examples) >= 15, examples
    assert sorted(p.name for p in (tmp_path / "out" / "cart").glob("*.engine")) == [
        f"{name}_fp16.engine" for name in ("decoder", "encoder", "gms", "mapper")
    ]


def test_make_demo_segments_the_samples(tmp_path: Path) -> None:
    if _run(["make", "-q", ".venv/.installed"], ROOT).returncode != 0:
        pytest.skip("make demo would set up .venv first (minutes of installing); run it once, or make test")
    result = _run(["make", "demo", f"DEMO_OUT={tmp_path / 'demo'}"], ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    samples = sorted(p.stem for p in (ROOT / "gms_deploy" / "data" / "samples" / "images").glob("*.png"))
    for suffix in ("mask", "overlay"):
        assert sorted(p.name for p in (tmp_path / "demo" / "images").glob(f"*_{suffix}.png")) == [
            f"{stem}_{suffix}.png" for stem in samples
        ]
