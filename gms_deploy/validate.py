"""Exported graphs and built engines against eager PyTorch on the same frames, through ``compare``.

Every graph (or engine) is run on two image sets: uniform random images and real images
(ultrasound frames). Inputs of the mapper and decoder are what eager PyTorch's earlier stages make
of those images, so each graph sees the values it will see in service.

Pass criteria:
* FP32: max abs error <= 1e-3 (of the probability, or of a latent scaled by max(1, max |ref|)),
  for the fused graph as for each part. The FP32 graphs compute GroupNorm with short sums for
  this (see ``model/graphs.py``): with ONNX Runtime's InstanceNormalization the fused graph was
  1.19e-3 off on the parity fixture's frames.
* FP16: no NaN or Inf in the output nor, for ONNX graphs, in any intermediate tensor (every node
  output is made a graph output and checked at the export's image size: SD VAEs are known to
  overflow FP16 in the decoder's up-blocks), and a probability mask Dice >= 0.99 against FP32
  eager over the set's images whose reference mask is non-degenerate (foreground between 1 % and
  99 % of the pixels: Dice of an almost empty mask measures noise). The Dice pools the set's
  pixels: random weights put 7-14 % of a frame's pixels within 0.01 of the threshold, where FP16's
  ~1e-2 error flips them (GMS.md), so one frame of the random-weight parity model scores
  0.988-0.990 on its own (named in the note) while the set scores 0.992. Latent graphs in FP16
  are reported, judged through the fused graph's masks.
ONNX Runtime's CPU provider runs AutoCast's FP16 graphs as they are (its FP16 kernels, or the
graph's own Casts around FP32 ones), so the same file that TensorRT builds is the one checked.

``run_export`` is the export command's library call and ``validate_engines`` the one of
``build --validate``; both record the verdict in the manifest, where every runner reads it. This
module lives downstream of the exporter and the builder, so that neither imports the other.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gms_deploy.backends.onnxruntime import CPU, open_session
from gms_deploy.bundle import DEMO, ModelBundle
from gms_deploy.compare import Criteria, agree
from gms_deploy.errors import UsageError
from gms_deploy.export_format import MANIFEST, BackendError, ExportManifest, ValidationReport, ValidationRow
from gms_deploy.io.calibration import image_batch, real_images
from gms_deploy.io.staging import staged_folder
from gms_deploy.model.gms import GMSModel
from gms_deploy.model.graphs import FusedGraph, Graph, TracedGraph, graph_specs
from gms_deploy.onnx_export import ExportError, ExportOptions, ExportResult, export_model
from gms_deploy.settings import Settings

GraphRun = Callable[[np.ndarray], tuple[np.ndarray, str]]
"""A graph or engine as validation runs it: input -> (output, the name of a tensor that held NaN or
Inf, empty where none did)."""
Candidate = tuple[str, str, Callable[[], GraphRun]]
"""(graph, precision, how to open it): opened one at a time, so one graph's session is held at once."""

FP32_MAX_ABS = 1e-3
FP16_MIN_DICE = 0.99
NON_DEGENERATE = (0.01, 0.99)


class ValidationError(ExportError):
    """An exported graph that does not reproduce eager PyTorch; ``str()`` names every failing row."""

    def __init__(self, message: str, report: ValidationReport | None = None) -> None:
        super().__init__(message)
        self.report = report
        self.details = report.table() if report is not None else None


def raise_for_failures(report: ValidationReport, checked: str = "exported graphs") -> None:
    failed = [r for r in report.rows if not r.ok]
    if failed:
        what = "; ".join(f"{r.graph} {r.precision} on {r.inputs} images: {r.note}" for r in failed)
        raise ValidationError(f"{checked} do not match eager PyTorch: {what}", report)


def _eager_pairs(specs: dict[str, Graph], images: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(input, eager output) per graph: each part fed by the eager parts before it, the fused graph by images.

    Computed once per image set and shared by both precisions: eager 128-wide VAEs are the slow part.
    """
    fused = specs[FusedGraph.name]
    assert isinstance(fused, FusedGraph)
    pairs = {}
    with torch.inference_mode():
        x = torch.from_numpy(images)
        for part in fused.parts:
            spec = specs[part.name]
            assert isinstance(spec, TracedGraph)
            y = spec.reference(x)
            pairs[part.name] = (x.numpy(), y.numpy())
            x = y
    pairs[fused.name] = (images, pairs[fused.parts[-1].name][1])
    return pairs


def _judge(
    spec: Graph, precision: str, inputs: str, got: np.ndarray, ref: np.ndarray, bad: str, threshold: float
) -> ValidationRow:
    """One table row, through the comparison layer; ``bad`` names a tensor that held NaN or Inf
    (empty when all were finite).

    Dice pools all pixels of the set's non-degenerate images (a flipped pixel counts the same
    wherever it is); an image below the bar on its own is named in the note.
    """
    criteria = Criteria(  # FP32 must reproduce eager PyTorch's numbers, FP16 its masks
        max_abs=FP32_MAX_ABS if precision == "fp32" else None,
        min_dice=FP16_MIN_DICE if precision == "fp16" else None,
        threshold=threshold if spec.output_is_probability else None,
        judged_coverage=NON_DEGENERATE,
    )
    row = agree(list(got), list(ref), criteria, non_finite=bad)
    notes = []
    if row.dice_min is not None and row.dice_min < FP16_MIN_DICE:
        notes.append(f"worst image {row.dice_min:.4f}")
    if row.unjudged:
        notes.append(f"{row.unjudged} degenerate mask(s) not in Dice")
    note = "; ".join((*row.failures, *notes))
    return ValidationRow(
        spec.name, precision, inputs, row.max_abs, row.max_rel, row.dice, row.finite, row.ok, note
    )


def _onnx_run(session: Any, spec: Graph, layerwise: bool, x: np.ndarray) -> tuple[np.ndarray, str]:
    """Graph output for ``x``, and the name of a tensor (the output or, ``layerwise``, any) holding NaN/Inf.

    Layer by layer runs one image at a time, so a large decoder's intermediates never pile up.
    """
    outputs = []
    bad = ""
    names = [o.name for o in session.get_outputs()]
    step = 1 if layerwise else len(x)
    for start in range(0, len(x), step):
        values = dict(zip(names, session.run(None, {spec.input.name: x[start : start + step]}), strict=True))
        for tensor_name, value in values.items():
            if not bad and np.issubdtype(value.dtype, np.floating) and not np.isfinite(value).all():
                bad = tensor_name
        outputs.append(values[spec.output.name])
    return np.concatenate(outputs), bad


def compare_graphs(
    settings: Settings,
    model: GMSModel,
    real: list[np.ndarray],
    candidates: Sequence[Candidate],
    random_images: int = 2,
    seed: int = 0,
) -> ValidationReport:
    """Every candidate against ``model`` on random and ``real`` (H x W x 3) images: two rows each."""
    size = settings.image_size
    specs = graph_specs(model, settings)
    rng = np.random.default_rng(seed)
    image_sets = {
        "random": rng.uniform(-1.0, 1.0, (random_images, 3, size, size)).astype(np.float32),
        "real": image_batch(real, size),
    }
    eager = {inputs: _eager_pairs(specs, images) for inputs, images in image_sets.items()}
    rows = []
    for graph, precision, open_graph in candidates:
        spec = specs[graph]
        try:
            run = open_graph()
        except BackendError as err:
            raise ValidationError(str(err)) from None
        for inputs in image_sets:
            x, ref = eager[inputs][spec.name]
            got, bad = run(x)
            rows.append(_judge(spec, precision, inputs, got, ref, bad, settings.threshold))
    return ValidationReport(tuple(rows))


def validate_export(
    manifest: ExportManifest, model: GMSModel, real: list[np.ndarray], random_images: int = 2, seed: int = 0
) -> ValidationReport:
    """Check every graph ``manifest`` lists, through ONNX Runtime's CPU provider; FP16 layer by layer."""
    specs = graph_specs(model, manifest.settings)

    def opener(entry: Any) -> Callable[[], GraphRun]:
        layerwise = entry.precision == "fp16"
        return lambda: partial(
            _onnx_run, open_session(manifest, entry, [CPU], layerwise), specs[entry.graph], layerwise
        )

    candidates = [(entry.graph, entry.precision, opener(entry)) for entry in manifest.graphs]
    return compare_graphs(manifest.settings, model, real, candidates, random_images, seed)


def run_export(
    bundle: ModelBundle, out_dir: Path, options: ExportOptions | None = None, *, validate: bool = True
) -> ExportResult:
    """``export_model``, then (``validate``) every graph against eager PyTorch, its verdict in the manifest.

    Both happen in a folder beside ``out_dir`` that is renamed into place once they are done, so an
    interrupted or failed export leaves nothing behind (or the previous export, where it replaces
    one). A failed validation is recorded too and the folder kept, so that every runner refuses the
    export and its report can be read, and then raised as a ``ValidationError`` that carries it.
    """
    options = options or ExportOptions()
    out_dir = Path(out_dir)
    with staged_folder(out_dir, MANIFEST, "an export", replace=options.overwrite) as staging:
        result = export_model(bundle, staging, options)
        if validate:
            tick = time.perf_counter()
            manifest = ExportManifest.read(staging)
            result.validation = validate_export(manifest, result.model, result.frames)
            result.seconds["validate"] = time.perf_counter() - tick
            replace(manifest, validation=result.validation).write()
    result.out_dir = out_dir
    if result.validation is not None:
        raise_for_failures(result.validation)
    return result


def check_engines_can_run() -> None:
    """Said before a build, so that ``build --validate`` on a machine without a GPU fails at once."""
    if not torch.cuda.is_available():
        raise BackendError(
            "build --validate runs the engines, which needs a CUDA GPU: PyTorch sees none here"
        )


def validate_engines(
    export_dir: Path,
    bundle: ModelBundle,
    graphs: Sequence[str],
    precision: str = "fp16",
    calibration: Sequence[Path] | None = None,
) -> ValidationReport:
    """``build --validate``: each engine of ``graphs`` run on the GPU against ``bundle`` in eager
    PyTorch (FP16 criteria), each engine's verdict recorded in the manifest, failures raised.

    Only the engines' outputs are checked for NaN and Inf: TensorRT fuses layers, and its
    intermediate tensors are not the ONNX graph's.
    """
    from gms_deploy.backends.tensorrt import load_engine, run_sliced
    from gms_deploy.engines import current_gpu
    from gms_deploy.trt import find_flavour

    check_engines_can_run()
    manifest = ExportManifest.read(export_dir)
    if bundle.name == DEMO != manifest.model:
        raise UsageError(
            f"{export_dir} was exported from {manifest.model!r}: give its weights to compare with "
            "(--model BUNDLE or --vae/--mapper)"
        )
    gpu, device = current_gpu(), torch.device("cuda", 0)

    def opener(graph: str) -> Callable[[], GraphRun]:
        def open_engine() -> GraphRun:
            flavour = find_flavour(manifest.engine(graph, precision).flavour)
            engine = load_engine(Path(export_dir), graph, flavour, precision, gpu, device)
            return lambda x: (run_sliced(engine, torch.from_numpy(x).to(device)).cpu().numpy(), "")

        return open_engine

    model = bundle.with_settings(image_size=manifest.settings.image_size).build()
    candidates = [(graph, precision, opener(graph)) for graph in graphs]
    report = compare_graphs(manifest.settings, model, real_images(calibration), candidates)
    for graph in graphs:
        rows = tuple(row for row in report.rows if row.graph == graph)
        checked = replace(manifest.engine(graph, precision), validation=ValidationReport(rows))
        manifest = manifest.with_engine(checked)
    manifest.write()
    raise_for_failures(report, "engines")
    return report
