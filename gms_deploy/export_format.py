"""An export folder's ``manifest.json``: its types, read checked and written atomically, in one place.

The exporter writes it, validation records its verdict in it, ``gms-deploy build`` adds the engines,
and every runner checks its files against it. A manifest that is missing, foreign, of another format
version or hand-edited into nonsense is refused while it is read, in one ``BackendError`` line that
names the file and the field, rather than as a ``KeyError`` deep in a backend or the builder.

Only the standard library and two small modules are imported, so that opening a runner, or checking
an export folder, costs neither the exporter nor ONNX.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import MISSING, asdict, dataclass, fields, replace
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from gms_deploy.config_types import check_types
from gms_deploy.errors import BackendError, UsageError
from gms_deploy.settings import Settings

MANIFEST = "manifest.json"
FORMAT = "gms-deploy-onnx"
FORMAT_VERSION = 1
BATCH = "batch"
"""The name of every graph's dynamic batch axis."""
FILE_NAME = re.compile(r"[\w.+-]+")
# What TensorRT's output depends on: an engine whose recorded values differ in any is rebuilt.
KEY_FIELDS = ("onnx_sha256", "flavour", "version", "targets", "gpu", "precision", "profile")
REBUILD = "run `gms-deploy build {folder}` (or add --rebuild)"
# The manifest's own scalars; the nested records are dataclasses below, checked by ``check_types``.
HEADER = {"created": str, "model": str, "opset": int, "versions": dict}

T = TypeVar("T")


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_file_name(name: str) -> None:
    """A manifest names files inside its folder; a path would let a damaged one point anywhere."""
    if not (FILE_NAME.fullmatch(name) and name.strip(".")):
        raise UsageError(f"{name!r} is not the name of a file in the export folder")


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output as the manifest records it, and as its ONNX file must declare it."""

    name: str
    dtype: str
    shape: tuple[int | str, ...]

    @classmethod
    def batched(cls, name: str, channels: int, size: int) -> TensorSpec:
        """B x channels x size x size float32, the batch dynamic: every tensor a GMS graph takes or gives."""
        return cls(name, "float32", (BATCH, channels, size, size))


@dataclass(frozen=True)
class GraphFile:
    """One written ONNX graph."""

    graph: str
    precision: str
    file: str
    sha256: str
    bytes: int
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    external_data: tuple[str, ...] = ()
    """Files beside it holding its weights, past protobuf's 2 GB limit."""

    def __post_init__(self) -> None:
        for name in (self.file, *self.external_data):
            _check_file_name(name)

    @classmethod
    def from_json(cls, data: object, where: str) -> GraphFile:
        """Tensors are named ``tensor N``, counted across inputs then outputs, as the ONNX file lists them."""
        inputs = data.get("inputs") if isinstance(data, dict) else None
        first_output = len(inputs) if isinstance(inputs, list) else 0
        return _decode(
            cls,
            data,
            where,
            inputs=lambda v: _each(partial(_decode, TensorSpec), v, lambda i: f"{where} tensor {i}"),
            outputs=lambda v: _each(
                partial(_decode, TensorSpec), v, lambda i: f"{where} tensor {first_output + i}"
            ),
        )


@dataclass(frozen=True)
class Latent:
    """The latent the sub-graphs hand on: channels x size x size."""

    channels: int
    size: int


@dataclass(frozen=True)
class Fp16Conversion:
    """How the FP16 graphs were made from the FP32 ones (see ``onnx_export``)."""

    converter: str
    keep_io_types: bool
    op_types_kept_fp32: tuple[str, ...]
    data_max: float
    calibration_images: int


@dataclass(frozen=True)
class ValidationRow:
    """One graph, in one precision, on one image set, against eager PyTorch (see ``validate``)."""

    graph: str
    precision: str
    inputs: str
    max_abs: float
    max_rel: float
    dice: float | None
    finite: bool
    ok: bool
    note: str = ""


@dataclass(frozen=True)
class ValidationReport:
    """Every row of a validation; an export whose report is not ``ok`` is refused by every reader."""

    rows: tuple[ValidationRow, ...]

    @property
    def ok(self) -> bool:
        return all(row.ok for row in self.rows)

    def table(self) -> str:
        header = ("graph", "precision", "inputs", "max abs", "max rel", "mask Dice", "finite", "result")
        lines = [
            (
                r.graph,
                r.precision,
                r.inputs,
                f"{r.max_abs:.2e}",
                f"{r.max_rel:.2e}",
                "-" if r.dice is None else f"{r.dice:.4f}",
                "yes" if r.finite else "NO",
                ("ok" if r.ok else "FAIL") + (f" ({r.note})" if r.note else ""),
            )
            for r in self.rows
        ]
        widths = [max(len(str(c)) for c in column) for column in zip(header, *lines, strict=True)]
        return "\n".join(
            "  ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
            for line in (header, *lines)
        )

    def to_json(self) -> dict[str, Any]:
        """``ok`` is written for people reading the file; reading derives it from the rows again."""
        return {"ok": self.ok, "rows": [asdict(row) for row in self.rows]}

    @classmethod
    def from_json(cls, data: object, where: str) -> ValidationReport:
        rows = partial(_decode, ValidationRow)
        return _decode(cls, data, where, rows=lambda v: _each(rows, v, lambda i: f"{where} rows[{i}]"))


@dataclass(frozen=True)
class GpuInfo:
    """A CUDA GPU; its compute capability in TensorRT for RTX's spelling (``SM86``)."""

    name: str
    sm_count: int
    compute_capability: str


@dataclass(frozen=True)
class BatchProfile:
    """The batch sizes an engine accepts (min, opt, max); the spatial size is fixed by the graph."""

    min: int = 1
    opt: int = 1
    max: int = 4

    def __post_init__(self) -> None:
        if not 1 <= self.min <= self.opt <= self.max:
            raise UsageError(
                f"batch profile needs 1 <= min <= opt <= max, got {self.min}, {self.opt}, {self.max}"
            )


@dataclass(frozen=True, kw_only=True)
class EngineRecipe:
    """Everything that goes into one engine build: what ``gms-deploy build`` compares to reuse one."""

    graph: str
    precision: str
    file: str
    flavour: str
    version: str
    targets: tuple[str, ...]
    portable: bool = False
    """TensorRT for RTX with no target named: one engine for all its portable targets."""
    gpu: GpuInfo | None
    """The GPU it was built on; None when built ahead of time without one."""
    profile: BatchProfile
    onnx_sha256: str

    def __post_init__(self) -> None:
        _check_file_name(self.file)

    @property
    def key(self) -> str:
        """A hash of ``KEY_FIELDS``, as Holoscan keys its engine cache: logged, and recorded for people."""
        data = asdict(self)
        return hashlib.sha256(
            json.dumps({k: data[k] for k in KEY_FIELDS}, sort_keys=True).encode()
        ).hexdigest()

    def built(self, sha256: str, seconds: float) -> EngineEntry:
        return EngineEntry(
            **{f.name: getattr(self, f.name) for f in fields(self)}, sha256=sha256, seconds=seconds
        )


@dataclass(frozen=True, kw_only=True)
class EngineEntry(EngineRecipe):
    """A built engine: its recipe, the file that recipe produced, and (``build --validate``) how it
    compared with eager PyTorch; an engine that failed is refused by the TensorRT runner."""

    sha256: str
    seconds: float
    validation: ValidationReport | None = None

    def to_json(self) -> dict[str, Any]:
        data = {**asdict(self), "key": self.key}
        data["validation"] = None if self.validation is None else self.validation.to_json()
        return data

    @classmethod
    def from_json(cls, data: object, where: str) -> EngineEntry:
        return _decode(
            cls,
            data,
            where,
            gpu=lambda v: v if v is None else _decode(GpuInfo, v, f"{where} gpu"),
            profile=lambda v: _decode(BatchProfile, v, f"{where} profile"),
            validation=lambda v: v if v is None else ValidationReport.from_json(v, f"{where} validation"),
        )


@dataclass(frozen=True)
class ExportManifest:
    """An export folder's manifest; ``folder`` is where it was read from or will be written."""

    folder: Path
    created: str
    model: str
    settings: Settings
    latent: Latent
    opset: int
    versions: Mapping[str, str | None]
    graphs: tuple[GraphFile, ...]
    fp16: Fp16Conversion | None = None
    """None where no FP16 graph was exported."""
    validation: ValidationReport | None = None
    """None where the export was not validated."""
    engines: tuple[EngineEntry, ...] = ()

    @property
    def path(self) -> Path:
        return self.folder / MANIFEST

    def graph(self, name: str, precision: str) -> GraphFile:
        for entry in self.graphs:
            if (entry.graph, entry.precision) == (name, precision):
                return entry
        present = ", ".join(f"{g.graph} {g.precision}" for g in self.graphs)
        raise BackendError(f"{self.path}: lists no {name} graph in {precision} (it has: {present or 'none'})")

    def find_engine(self, name: str, precision: str) -> EngineEntry | None:
        """The engine recorded for ``name`` in ``precision``, or None where none was built yet."""
        return next((e for e in self.engines if (e.graph, e.precision) == (name, precision)), None)

    def engine(self, name: str, precision: str) -> EngineEntry:
        entry = self.find_engine(name, precision)
        if entry is None:
            advice = REBUILD.format(folder=self.folder)
            raise BackendError(f"{self.path}: no {name} {precision} engine recorded; {advice}")
        return entry

    def with_engine(self, entry: EngineEntry) -> ExportManifest:
        """This manifest with ``entry`` in place of any engine recorded for its graph and precision."""
        others = tuple(e for e in self.engines if (e.graph, e.precision) != (entry.graph, entry.precision))
        return replace(self, engines=(*others, entry))

    def to_json(self) -> dict[str, Any]:
        """Keys in the order every gms-deploy has written them; the optional sections only when present."""
        data: dict[str, Any] = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "created": self.created,
            "model": self.model,
            "settings": self.settings.to_json(),
            "latent": asdict(self.latent),
            "opset": self.opset,
            "versions": dict(self.versions),
            "graphs": [asdict(g) for g in self.graphs],
        }
        if self.fp16 is not None:
            data["fp16"] = asdict(self.fp16)
        if self.validation is not None:
            data["validation"] = self.validation.to_json()
        if self.engines:
            data["engines"] = [e.to_json() for e in self.engines]
        return data

    def write(self) -> None:
        """Atomically: a reader (a runner, a second build) never finds half a manifest."""
        # Imported here: its module decodes images (PIL, pydicom), which readers of a manifest never need.
        from gms_deploy.io.outputs import write_atomic

        text = (json.dumps(self.to_json(), indent=2) + "\n").encode()
        write_atomic(self.path, lambda f: f.write(text))

    @classmethod
    def read(cls, folder: Path) -> ExportManifest:
        """The manifest of ``folder``; one that records a failed validation is refused too."""
        folder = Path(folder)
        path = folder / MANIFEST
        if not path.is_file():
            raise BackendError(f"{path}: missing; is {folder} a gms-deploy export directory?")
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise BackendError(f"{path}: unreadable manifest ({err})") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise BackendError(f"{path}: not a gms-deploy ONNX export manifest")
        if data.get("format_version") != FORMAT_VERSION:
            raise BackendError(
                f"{path}: written in export format version {data.get('format_version')!r}, this gms-deploy "
                f"reads version {FORMAT_VERSION}; export the model again"
            )
        for key, kind in HEADER.items():
            if isinstance(data.get(key), bool) or not isinstance(data.get(key), kind):
                raise BackendError(f"{path}: '{key}' is missing or of the wrong type")
        lists = {}
        for key in ("graphs", "engines"):
            lists[key] = data.get(key, [])
            if not isinstance(lists[key], list):
                raise BackendError(f"{path}: '{key}' is not a list")
        fp16, validation = data.get("fp16"), data.get("validation")
        manifest = cls(
            folder=folder,
            created=data["created"],
            model=data["model"],
            settings=_settings(data.get("settings"), path),
            latent=_decode(Latent, data.get("latent"), f"{path}: latent"),
            opset=data["opset"],
            versions=data["versions"],
            graphs=_each(GraphFile.from_json, lists["graphs"], lambda i: f"{path}: graphs[{i}]"),
            fp16=None if fp16 is None else _decode(Fp16Conversion, fp16, f"{path}: fp16"),
            validation=None
            if validation is None
            else ValidationReport.from_json(validation, f"{path}: validation"),
            engines=_each(EngineEntry.from_json, lists["engines"], lambda i: f"{path}: engines[{i}]"),
        )
        if manifest.validation is not None and not manifest.validation.ok:
            raise BackendError(
                f"{path}: this export failed validation against PyTorch (see its 'validation')"
            )
        return manifest


def _settings(data: object, path: Path) -> Settings:
    if not isinstance(data, dict):
        raise BackendError(f"{path}: invalid settings (not an object)")
    try:
        return Settings(**data)
    except (TypeError, ValueError) as err:
        raise BackendError(f"{path}: invalid settings ({err})") from None


def _decode(cls: type[T], data: object, where: str, **nested: Callable[[Any], Any]) -> T:
    """``data`` as a ``cls``, or one ``BackendError`` line saying where it is not one.

    Every field without a default must be there; ``nested`` builds the fields that are records
    themselves; JSON lists become tuples; ``check_types`` then judges every value, and ``cls``
    its own invariants. Keys the type does not know are left: they are a later writer's.
    """
    if not isinstance(data, dict):
        raise BackendError(f"{where} is not an object")
    values: dict[str, Any] = {}
    for spec in fields(cls):
        if spec.name in data:
            value = data[spec.name]
            values[spec.name] = nested[spec.name](value) if spec.name in nested else _tuple(value)
        elif spec.default is MISSING and spec.default_factory is MISSING:
            raise BackendError(f"{where}: '{spec.name}' is missing or of the wrong type")
    try:
        check_types(cls, values, where)
    except ValueError as err:
        raise BackendError(str(err)) from None
    try:
        return cls(**values)
    except ValueError as err:
        raise BackendError(f"{where}: {err}") from None


def _each(read: Callable[[object, str], T], values: object, where: Callable[[int], str]) -> Any:
    """A JSON list as a tuple, item ``i`` read as ``read(item, where(i))``; anything else as it is, for
    ``check_types`` to name."""
    if not isinstance(values, list):
        return values
    return tuple(read(value, where(i)) for i, value in enumerate(values))


def _tuple(value: object) -> object:
    return tuple(value) if isinstance(value, list) else value
