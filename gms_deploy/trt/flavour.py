"""Which TensorRT is installed, and the few places where its two flavours differ.

``tensorrt`` (TensorRT 10.x on Jetson, 11.x on workstations; from NVIDIA's index) and
``tensorrt_rtx`` (TensorRT for RTX, ``tensorrt-rtx-cu13`` on PyPI) share their builder API. What
differs is hidden here so that everything above this module is one code path:

* strongly typed networks: a creation flag in TensorRT 10.x and TensorRT for RTX; TensorRT 11
  removed weak typing, so there every network is strongly typed and the flag may be gone;
* target GPUs: TensorRT for RTX builds ahead of time for listed compute capabilities (with no GPU
  present); TensorRT builds for the GPU it runs on.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Literal

FlavourName = Literal["tensorrt", "rtx"]
MODULES: dict[FlavourName, str] = {"tensorrt": "tensorrt", "rtx": "tensorrt_rtx"}


class TrtUnavailable(Exception):
    """No usable TensorRT flavour is importable; ``str()`` is one line saying what to install."""


@dataclass(frozen=True)
class Flavour:
    name: FlavourName
    trt: ModuleType

    @property
    def version(self) -> str:
        return str(self.trt.__version__)

    @property
    def label(self) -> str:
        return f"{MODULES[self.name]} {self.version}"

    def network_flags(self) -> int:
        """Creation flags for a strongly typed network (0 where strong typing is the only kind)."""
        flag = getattr(self.trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
        return 0 if flag is None else 1 << int(flag)

    def compute_capabilities(self) -> tuple[str, ...]:
        """Targets TensorRT for RTX can build for with no GPU present (e.g. SM86); none for TensorRT."""
        if self.name != "rtx":
            return ()
        return tuple(n for n in self.trt.ComputeCapability.__members__ if n.startswith("SM"))

    def set_targets(self, config: Any, targets: tuple[str, ...]) -> None:
        """Make ``config`` build for ``targets`` (TensorRT for RTX names such as ``SM86``).

        Only TensorRT for RTX builds for a GPU other than the one present; asking TensorRT to is an error.
        """
        self.check_targets(targets)
        if not targets:
            return
        config.num_compute_capabilities = len(targets)
        for index, target in enumerate(targets):
            config.set_compute_capability(self.trt.ComputeCapability.__members__[target.upper()], index)

    def check_targets(self, targets: tuple[str, ...]) -> None:
        """Refuse targets this flavour cannot build for, before any build starts."""
        if not targets:
            return
        if self.name != "rtx":
            raise TrtUnavailable(
                f"{self.label} builds only for the GPU it runs on; --target-cc needs TensorRT for RTX"
            )
        known = self.compute_capabilities()
        unknown = [t for t in targets if t.upper() not in known]
        if unknown:
            raise TrtUnavailable(
                f"{self.label} cannot target {', '.join(unknown)}; it knows {', '.join(known)}"
            )


def find_flavour(which: Literal["auto", "tensorrt", "rtx"] = "auto") -> Flavour:
    """Import the asked-for TensorRT; ``auto`` prefers full TensorRT, then TensorRT for RTX."""
    names: tuple[FlavourName, ...] = ("tensorrt", "rtx") if which == "auto" else (which,)
    problems = []
    for name in names:
        try:
            module = importlib.import_module(MODULES[name])
        except ImportError as err:  # also covers a wheel whose native libraries fail to load
            problems.append(f"{MODULES[name]}: {err}")
            continue
        if hasattr(module, "Builder"):
            return Flavour(name, module)
        problems.append(f"{MODULES[name]}: a runtime-only package (no Builder)")
    raise TrtUnavailable(
        "no TensorRT builder importable (" + "; ".join(problems) + "); pip install tensorrt-rtx-cu13"
        " or install TensorRT from NVIDIA's index"
    )
