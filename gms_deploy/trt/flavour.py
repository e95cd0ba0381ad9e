"""Which TensorRT is installed, and the few places where its two flavours differ.

``tensorrt`` (TensorRT 10.x on Jetson, 11.x on workstations; from NVIDIA's index) and
``tensorrt_rtx`` (TensorRT for RTX, ``tensorrt-rtx-cu13`` on PyPI) share their builder API. What
differs is hidden here so that everything above this module is one code path:

* strongly typed networks: a creation flag in TensorRT 10.x and TensorRT for RTX; TensorRT 11
  removed weak typing, so there every network is strongly typed and the flag may be gone;
* target GPUs: TensorRT for RTX builds ahead of time for listed compute capabilities (with no GPU
  present), and with none named a portable engine for all of them; TensorRT builds for the GPU it
  runs on. TensorRT for RTX's list has no datacenter Hopper (SM90: H100, H200), so on such a GPU it
  is refused up front with what to use instead, not left to fail as an "invalid engine" that a
  rebuild cannot mend. ``GMS_DEPLOY_TRT_ANY_GPU=1`` lifts that refusal (and the engine validity
  preflight) for a check that wants to see what TensorRT for RTX itself does there.
"""

from __future__ import annotations

import importlib
import logging
import os
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Literal

from gms_deploy.errors import GmsError

log = logging.getLogger(__name__)

FlavourName = Literal["tensorrt", "rtx"]
MODULES: dict[FlavourName, str] = {"tensorrt": "tensorrt", "rtx": "tensorrt_rtx"}
ANY_GPU = "GMS_DEPLOY_TRT_ANY_GPU"
"""Set to 1: neither the up-front GPU refusal nor the validity preflight (for ``gpu_check.sh``)."""
FULL_TENSORRT = "install full TensorRT from NVIDIA's index and use --trt tensorrt"


def any_gpu() -> bool:
    """Whether the user asked to let TensorRT itself judge this GPU (see ``ANY_GPU``)."""
    return os.environ.get(ANY_GPU) == "1"


class TrtUnavailable(GmsError):
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

    def error_logger(self) -> Any:
        """A TensorRT logger that keeps errors (``.errors``), so a failure can say why in one line."""
        trt = self.trt

        class Collecting(trt.ILogger):  # type: ignore[misc,name-defined]
            def __init__(self) -> None:
                trt.ILogger.__init__(self)
                self.errors: list[str] = []

            def log(self, severity: Any, msg: str) -> None:
                if severity in (trt.ILogger.ERROR, trt.ILogger.INTERNAL_ERROR):
                    self.errors.append(" ".join(msg.split()))

        return Collecting()

    def compute_capabilities(self) -> tuple[str, ...]:
        """Targets TensorRT for RTX can build for with no GPU present (e.g. SM86); none for TensorRT."""
        if self.name != "rtx":
            return ()
        return tuple(n for n in self.trt.ComputeCapability.__members__ if n.startswith("SM"))

    def portable_targets(self) -> tuple[str, ...]:
        """What a TensorRT for RTX engine built with no target runs on: Ampere and later, not Turing."""
        return tuple(t for t in self.compute_capabilities() if t != "SM75")

    def set_targets(self, config: Any, targets: tuple[str, ...]) -> None:
        """Make ``config`` build for ``targets`` (TensorRT for RTX names such as ``SM86``).

        Only TensorRT for RTX builds for a GPU other than the one present; asking TensorRT to is an error.
        """
        self.check_targets(targets)
        if not targets:
            return
        config.num_compute_capabilities = len(targets)
        for index, target in enumerate(targets):
            # It answers False, without raising, for a value or index it does not take.
            value = self.trt.ComputeCapability.__members__[target.upper()]
            if not config.set_compute_capability(value, index):
                raise TrtUnavailable(f"{self.label} refused target {target} (index {index})")

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
                f"{self.label} cannot target {', '.join(unknown)}; it knows {', '.join(known)}; "
                f"for another GPU (SM90: H100, H200), {FULL_TENSORRT} on that GPU"
            )

    def check_gpu(self, name: str, compute_capability: str) -> None:
        """Refuse a GPU this flavour has no target for, at build and at load, in one line.

        Only TensorRT for RTX has a list; full TensorRT builds for whatever GPU it runs on.
        """
        known = self.compute_capabilities()
        if self.name != "rtx" or compute_capability in known:
            return
        if any_gpu():
            log.warning("%s has no %s target; trying %s anyway (%s=1)", self.label, compute_capability,
                        name, ANY_GPU)  # fmt: skip
            return
        raise TrtUnavailable(
            f"{self.label} has no {compute_capability} target ({name}): it builds and runs engines for "
            f"{', '.join(known)} only; on this GPU, {FULL_TENSORRT}"
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
