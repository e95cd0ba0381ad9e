"""``gms-deploy build``: TensorRT engines beside an export's ONNX graphs, cached and checked by its manifest.

Exports are made on a workstation, engines on the machine (or for the GPU) they will run on. Each
engine is recorded in the ``engines`` section of the export's ``manifest.json`` with everything
that went into it; the cache key hashes all of that, as Holoscan keys its engine cache, so an
unchanged build is skipped and a changed ONNX file, TensorRT version, GPU or target list rebuilds
with a one-line reason rather than a hard error from TensorRT at load time. Engines and the manifest
are written atomically: an interrupted build leaves no engine that looks valid.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from gms_deploy.export_format import (
    KEY_FIELDS,
    MANIFEST,
    REBUILD,
    BackendError,
    BatchProfile,
    EngineEntry,
    EngineRecipe,
    ExportManifest,
    GpuInfo,
    sha256,
)
from gms_deploy.io.outputs import write_atomic
from gms_deploy.trt.build import build_engine
from gms_deploy.trt.flavour import ANY_GPU, Flavour, TrtUnavailable, any_gpu, find_flavour

log = logging.getLogger(__name__)
GRAPHS = ("encoder", "mapper", "decoder", "gms")


@dataclass(frozen=True)
class BuildOptions:
    """What to build; the defaults are ``gms-deploy build`` without flags.

    ``targets``: compute capabilities for TensorRT for RTX (``SM86``; empty: this GPU, or with none
    a portable engine); ``rebuild``: build even where the recorded engine matches.
    """

    flavour: Literal["auto", "tensorrt", "rtx"] = "auto"
    precision: str = "fp16"
    profile: BatchProfile = field(default_factory=lambda: BatchProfile(max=8))
    targets: tuple[str, ...] = ()
    rebuild: bool = False
    graphs: tuple[str, ...] = GRAPHS


@dataclass(frozen=True)
class EngineRecord:
    """One graph's outcome: ``built`` or ``skipped`` (cache hit), with why when it rebuilt (empty for
    a first build)."""

    graph: str
    path: Path
    status: Literal["built", "skipped"]
    seconds: float
    size: int
    reason: str


def current_gpu(device: int = 0) -> GpuInfo | None:
    """The GPU PyTorch sees, or None: the key must differ between GPUs but not between runs on one."""
    import torch

    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(device)
    return GpuInfo(props.name, props.multi_processor_count, f"SM{props.major}{props.minor}")


def engine_file(graph: str, precision: str) -> str:
    return f"{graph}_{precision}.engine"


def _stale(old: EngineEntry | None, new: EngineRecipe, export_dir: Path) -> str | None:
    """Why the engine ``old`` describes cannot be reused for ``new``; None when it can."""
    if old is None:
        return "not built yet"
    path = export_dir / new.file
    if not path.is_file():
        return "engine file missing"
    changed = [k for k in KEY_FIELDS if getattr(old, k) != getattr(new, k)]
    if changed:
        names = {"onnx_sha256": "ONNX graph", "version": "TensorRT version", "gpu": "GPU"}
        return f"{', '.join(names.get(k, k) for k in changed)} changed since the last build"
    if sha256(path) != old.sha256:
        return "engine file changed since it was built"
    return None


def build_engines(export_dir: Path, options: BuildOptions | None = None) -> list[EngineRecord]:
    """Build (or reuse) one engine per graph of ``export_dir`` and record them in its manifest.

    Raises ``BackendError`` (bad export), ``TrtUnavailable`` (no TensorRT, bad targets) or
    ``BuildError`` (TensorRT refused a graph); each prints as one line.
    """
    options = options or BuildOptions()
    export_dir = Path(export_dir)
    manifest = ExportManifest.read(export_dir)  # checks format, version and validation before any build
    chosen = find_flavour(options.flavour)
    gpu = current_gpu()
    wanted = tuple(t.upper() for t in options.targets)
    chosen.check_targets(wanted)
    if gpu is not None and not wanted:
        chosen.check_gpu(gpu.name, gpu.compute_capability)
    records = []
    for graph in options.graphs:
        source = manifest.graph(graph, options.precision)
        onnx_path = export_dir / source.file
        if not onnx_path.is_file() or sha256(onnx_path) != source.sha256:
            raise BackendError(f"{onnx_path}: missing or its SHA-256 does not match {MANIFEST}; export again")
        recipe = EngineRecipe(
            graph=graph,
            precision=options.precision,
            file=engine_file(graph, options.precision),
            flavour=chosen.name,
            version=chosen.version,
            targets=wanted,
            # TensorRT for RTX with no target named builds one engine for all its portable targets.
            portable=chosen.name == "rtx" and not wanted,
            gpu=gpu,
            profile=options.profile,
            onnx_sha256=source.sha256,
        )
        old = manifest.find_engine(graph, options.precision)
        path = export_dir / recipe.file
        reason = "--rebuild" if options.rebuild else _stale(old, recipe, export_dir)
        if reason is None:
            log.info("%s: unchanged (cache key %s), skipped", path.name, recipe.key[:12])
            records.append(EngineRecord(graph, path, "skipped", 0.0, path.stat().st_size, "unchanged"))
            continue
        if old is not None:
            log.warning("%s: rebuilding: %s", path.name, reason)
        built = build_engine(chosen, onnx_path, options.profile, wanted, cache_dir=export_dir)
        write_atomic(path, lambda f, data=built.engine: f.write(data))
        manifest = manifest.with_engine(recipe.built(sha256(path), round(built.seconds, 3)))
        manifest.write()
        why = reason if old is not None or options.rebuild else ""  # a first build needs no reason
        records.append(EngineRecord(graph, path, "built", built.seconds, len(built.engine), why))
    return records


def check_engine(
    export_dir: Path,
    graph: str,
    flavour: Flavour,
    precision: str = "fp16",
    gpu: GpuInfo | None = None,
) -> Path:
    """The engine file for ``graph``, after checking it may be loaded by ``flavour`` on ``gpu``.

    Every refusal is one ``BackendError`` line that says to rebuild: a mismatch found here is
    cheap to explain, while TensorRT deserialising a foreign or truncated engine can abort the
    process. ``gpu`` None skips the GPU checks (a build machine without one).
    """
    export_dir = Path(export_dir)
    advice = REBUILD.format(folder=export_dir)
    entry = ExportManifest.read(export_dir).engine(graph, precision)
    path = export_dir / entry.file
    built_with = f"{entry.flavour} {entry.version}"
    if (entry.flavour, entry.version) != (flavour.name, flavour.version):
        raise BackendError(
            f"{path}: built with TensorRT {built_with}, installed is {flavour.name} {flavour.version}; "
            + advice
        )
    if gpu is not None:
        try:
            flavour.check_gpu(gpu.name, gpu.compute_capability)
        except TrtUnavailable as err:
            raise BackendError(str(err)) from None
        allowed = _runs_on(entry, flavour)
        if allowed and gpu.compute_capability not in allowed and not any_gpu():
            raise BackendError(
                f"{path}: built for {', '.join(allowed)}, this GPU ({gpu.name}) is "
                f"{gpu.compute_capability}; {advice}"
            )
    if not path.is_file() or sha256(path) != entry.sha256:
        raise BackendError(f"{path}: missing, truncated or not the engine {MANIFEST} records; {advice}")
    if entry.validation is not None and not entry.validation.ok:
        raise BackendError(
            f"{path}: failed `gms-deploy build --validate` against eager PyTorch (see its 'validation' "
            f"in {MANIFEST}); export and build again"
        )
    if gpu is not None and hasattr(flavour.trt.Runtime, "get_engine_validity"):
        _check_validity(flavour, path, advice)
    return path


def _runs_on(entry: EngineEntry, flavour: Flavour) -> list[str]:
    """The compute capabilities an engine was built for: its targets, all portable ones, or its GPU's."""
    if entry.targets:
        return list(entry.targets)
    if entry.portable:
        return list(flavour.portable_targets())
    return [entry.gpu.compute_capability] if entry.gpu is not None else []


def invalidity_reasons(flavour: Flavour, diagnostics: int) -> str:
    """TensorRT for RTX's ``EngineInvalidityDiagnostics`` bit mask in words."""
    words = {
        "VERSION_MISMATCH": "built by another TensorRT for RTX version",
        "UNSUPPORTED_CC": "not built for this GPU's compute capability",
        "OLD_CUDA_DRIVER": "the CUDA driver is too old",
        "OLD_CUDA_RUNTIME": "the CUDA runtime is too old",
        "INSUFFICIENT_GPU_MEMORY": "not enough free GPU memory",
        "MALFORMED_ENGINE": "the file is damaged or no engine",
        "CUDA_ERROR": "a CUDA error while checking",
    }
    members = getattr(flavour.trt, "EngineInvalidityDiagnostics", None)
    flags = members.__members__.items() if members is not None else ()
    found = [words.get(name, name.lower()) for name, bit in flags if int(diagnostics) & int(bit)]
    return "; ".join(found) or f"diagnostics {int(diagnostics)}"


def _check_validity(flavour: Flavour, path: Path, advice: str) -> None:
    """TensorRT for RTX's own verdict on an engine for this GPU and driver (needs a GPU)."""
    trt = flavour.trt
    runtime = trt.Runtime(trt.Logger(trt.Logger.ERROR))
    validity, diagnostics = runtime.get_engine_validity(path.read_bytes())
    reasons = invalidity_reasons(flavour, diagnostics)
    if validity == trt.EngineValidity.INVALID:
        if any_gpu():
            log.warning("%s: %s says it is invalid here (%s); loading it anyway (%s=1)", path,
                        flavour.label, reasons, ANY_GPU)  # fmt: skip
            return
        raise BackendError(f"{path}: {flavour.label} says it is invalid here ({reasons}); {advice}")
    if validity == trt.EngineValidity.SUBOPTIMAL:
        log.warning("%s: %s says it runs here but suboptimally (%s)", path, flavour.label, reasons)
