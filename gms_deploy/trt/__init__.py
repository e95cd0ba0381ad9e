"""TensorRT: the only package that imports ``tensorrt`` or ``tensorrt_rtx`` (lazily, in ``flavour``)."""

from gms_deploy.export_format import BatchProfile
from gms_deploy.trt.build import BuildError, BuiltEngine, build_engine
from gms_deploy.trt.flavour import Flavour, TrtUnavailable, find_flavour

__all__ = [
    "BatchProfile",
    "BuildError",
    "BuiltEngine",
    "Flavour",
    "TrtUnavailable",
    "build_engine",
    "find_flavour",
]
