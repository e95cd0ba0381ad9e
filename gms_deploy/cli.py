"""The ``gms-deploy`` command line: flags in, one library call, a summary and an exit code out."""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from typer.core import TyperGroup

from gms_deploy.backends import CHOICES, NAMES, ModelSource, Runner, open_auto, open_runner
from gms_deploy.errors import GmsError, UsageError
from gms_deploy.infer import READERS, InferOptions, Progress, Roi, run_inference, summary_line
from gms_deploy.io.outputs import RESULTS
from gms_deploy.messages import first_line, os_reason, shown
from gms_deploy.progress import progress_bar
from gms_deploy.train.config import TrainConfig

if TYPE_CHECKING:
    from gms_deploy.engines import BuildOptions

BUG = (
    "gms-deploy hit a bug, not a problem with your files: please report it with the traceback above "
    "and the output of `gms-deploy --version`"
)


class _Commands(TyperGroup):
    """Every command's errors, handled in this one place.

    A ``GmsError`` (or an ``OSError``: a disk, a permission, a path) is the user's to mend: one
    line, exit 2. Anything else is a bug, and keeps its traceback, with a line asking for a report.
    """

    def invoke(self, ctx: typer.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (typer.Exit, typer.Abort, typer.TyperException):  # --help, usage errors, exit codes
            raise
        except GmsError as err:
            if err.details:
                typer.echo(err.details, err=True)
            raise _fail(str(err)) from None
        except OSError as err:
            raise _fail(os_reason(err)) from None
        except Exception:
            typer.secho(BUG, err=True, fg=typer.colors.RED)
            raise


app = typer.Typer(
    cls=_Commands,
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode=None,  # plain help: no type column that shows flags as `--overlay <bool>`
    help="Segment images and ultrasound DICOM with a GMS model; export it to ONNX and TensorRT; benchmark. "
    "Flags such as --overlay take no value: write --overlay, not --overlay true.",
)

# The model flags, the same on every command that takes a model (``ModelSource.from_flags``).
ModelOpt = Annotated[
    Path | None, typer.Option("--model", help="Model bundle or export folder (default: the demo model).")
]
VaeOpt = Annotated[
    Path | None,
    typer.Option("--vae", help="VAE: LDM .ckpt/.safetensors or diffusers folder (with --mapper)."),
]
MapperOpt = Annotated[
    Path | None, typer.Option("--mapper", help="GMS mapper checkpoint, best_model.pth (with --vae).")
]
# How to run it, the same on every command that segments (``_open``).
BackendOpt = Annotated[
    str, typer.Option(help=f"One of: {', '.join(CHOICES)} (auto: the fastest that runs here).")
]
DeviceOpt = Annotated[str, typer.Option(help="auto (a GPU if there is one), cpu or cuda[:N].")]
PrecisionOpt = Annotated[
    str | None,
    typer.Option(help="fp32 or fp16; default: FP32 for torch and on a CPU, FP16 for the GPU backends."),
]


def _open(backend: str, source: ModelSource, device: str, precision: str | None) -> Runner:
    """The runner asked for; for ``auto``, which one it chose and why the faster ones were passed over."""
    if backend != "auto":
        return open_runner(backend, source, device, precision)
    runner, why = open_auto(source, device, precision)
    typer.echo(why, err=True)
    return runner


def _print_versions(wanted: bool) -> None:
    """What a bug report needs: this package, the libraries that compute, the GPU and its driver."""
    if not wanted:
        return
    from gms_deploy.versions import environment

    info = environment()
    typer.echo(f"gms-deploy {info['gms_deploy'] or '(not installed: run from a checkout)'}")
    for key in ("python", "torch", "cuda", "gpu", "driver", "onnxruntime", "tensorrt", "tensorrt_rtx"):
        typer.echo(f"  {key}: {info[key] or '-'}")
    raise typer.Exit()


class _StderrHandler(logging.Handler):
    """One line per record on the stderr of the moment (a test runner swaps it per invocation)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            typer.echo(self.format(record), err=True)
        except Exception:  # a closed or broken stderr must not fail the run that logs to it
            self.handleError(record)


@app.callback()
def _setup(
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Also say what was ignored or chosen.")
    ] = False,
    version: Annotated[
        bool,
        typer.Option("--version", callback=_print_versions, is_eager=True, help="Versions, GPU and driver."),
    ] = False,
) -> None:
    """One line per problem on stderr, as it happens; ``-v`` adds what was ignored or chosen."""
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    package = logging.getLogger("gms_deploy")
    package.handlers = [handler]
    package.setLevel(logging.INFO if verbose else logging.WARNING)
    package.propagate = False
    # Readers' own complaints name no file and repeat what the file's one error line says.
    logging.getLogger("pydicom").setLevel(logging.CRITICAL)
    if not verbose:
        logging.getLogger("tifffile").setLevel(logging.CRITICAL)
        warnings.filterwarnings("ignore", category=UserWarning, module=r"(pydicom|PIL|tifffile)(\.|$)")


def _fail(message: str) -> typer.Exit:
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    return typer.Exit(2)


@contextmanager
def _writing(path: Path) -> Iterator[None]:
    """An OSError while writing ``path`` said as ``out/x: cannot be written (out: a file, not a folder)``,
    the path once where the error names it; one with no errno is this package's own message."""
    try:
        yield
    except OSError as err:
        if not err.strerror:
            raise _fail(first_line(err)) from None
        in_the_way = isinstance(err, FileExistsError) and err.filename and not Path(err.filename).is_dir()
        why = "a file, not a folder" if in_the_way else err.strerror
        if err.filename is not None and Path(err.filename) == path:
            raise _fail(f"{shown(path)}: cannot be written: {why}") from None
        raise _fail(f"{shown(path)}: cannot be written ({shown(err.filename)}: {why})") from None


def _writable_file(path: Path | None) -> None:
    """Refuse, before the long work whose result goes there, a path that cannot become a file.

    Nothing is created: the nearest existing folder above it must be one, and writable.
    """
    if path is None:
        return
    if path.is_dir():
        raise _fail(f"{shown(path)}: is a folder; name a file")
    above = path.parent
    while not above.exists() and above != above.parent:
        above = above.parent
    if not above.is_dir():
        raise _fail(f"{shown(path)}: cannot be written ({shown(above)}: a file, not a folder)")
    if not os.access(above, os.W_OK):
        raise _fail(f"{shown(path)}: cannot be written ({shown(above)}: not writable)")


@app.command()
def infer(
    inputs: Annotated[
        list[Path], typer.Argument(help="Image, DICOM or video files, and folders (recursive).")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder; mirrors the input tree.")],
    model: ModelOpt = None,
    vae: VaeOpt = None,
    mapper: MapperOpt = None,
    backend: BackendOpt = "auto",
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = 4,
    readers: Annotated[int, typer.Option("--readers", min=1, help="Files decoded at once.")] = READERS,
    threshold: Annotated[
        float | None, typer.Option(min=0.0, max=1.0, help="Default: the model's (0.5).")
    ] = None,
    save_prob: Annotated[bool, typer.Option("--save-prob", help="Also write <stem>_prob.npy.")] = False,
    overlay: Annotated[
        bool, typer.Option("--overlay", help="Also write <stem>_overlay.png (a video's: <stem>_overlay.mp4).")
    ] = False,
    frames_png: Annotated[
        bool, typer.Option("--frames-png", help="Also each video frame's mask as <stem>_f0000_mask.png, ...")
    ] = False,
    roi: Annotated[Roi, typer.Option(help="dicom: crop to the ultrasound region first.")] = "none",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace existing outputs.")] = False,
) -> None:
    """Segment every image and DICOM frame under INPUTS into masks under --out."""
    runner = _open(backend, ModelSource.from_flags(model, vae, mapper), device, precision)
    typer.echo(f"model: {runner.description}", err=True)
    options = InferOptions(
        out,
        batch_size=batch_size,
        threshold=threshold,
        save_prob=save_prob,
        overlay=overlay,
        roi=roi,
        overwrite=overwrite,
        frames_png=frames_png,
        readers=readers,
    )
    last = Progress(0, 0, 0, 0, 0)
    with progress_bar(desc="segmenting", unit="frame") as bar:

        def progress(done: Progress) -> None:
            nonlocal last
            last = done
            bar.total = done.frames_total
            failed = f", {done.failures} failed" if done.failures else ""
            bar.set_postfix_str(f"{done.files}/{done.files_total} files{failed}", refresh=False)
            bar.update(done.frames - bar.n)

        try:
            report = run_inference(inputs, runner, options, progress)
        except KeyboardInterrupt:
            bar.close()
            typer.echo(
                f"interrupted after {last.frames} of {last.frames_total} frame(s): the finished outputs are "
                f"written and listed in {shown(out / RESULTS)}; the same command again resumes (finished "
                "outputs are skipped)",
                err=True,
            )
            raise typer.Exit(130) from None
    typer.echo(summary_line(report, out), err=True)
    if report.failures:
        raise typer.Exit(1)


@app.command()
def bundle(
    out: Annotated[Path, typer.Option("--out", "-o", help="New bundle folder.")],
    model: ModelOpt = None,
    vae: VaeOpt = None,
    mapper: MapperOpt = None,
    image_size: Annotated[
        int | None, typer.Option("--image-size", help="Default: the model's (224).")
    ] = None,
    threshold: Annotated[float | None, typer.Option(help="Default: the model's (0.5).")] = None,
    name: Annotated[str | None, typer.Option(help="Default: the bundle's own, or custom.")] = None,
) -> None:
    """Copy a VAE and a mapper (or a bundle, with new settings) into one bundle folder, checking both load."""
    chosen = ModelSource.from_flags(model, vae, mapper).weights("bundle")
    changes = {"image_size": image_size, "threshold": threshold}
    made = chosen.with_settings(**{key: value for key, value in changes.items() if value is not None})
    made = replace(made, name=name or made.name)
    made.build()
    with _writing(out):
        saved = made.save(out)
    typer.echo(f"bundle written: {saved.vae.parent}", err=True)


@app.command()
def export(
    out: Annotated[Path, typer.Option("--out", "-o", help="Export folder (ONNX graphs + manifest.json).")],
    model: ModelOpt = None,
    vae: VaeOpt = None,
    mapper: MapperOpt = None,
    image_size: Annotated[
        int | None, typer.Option("--image-size", help="A multiple of 8, at most 2048; default: the model's.")
    ] = None,
    precision: Annotated[list[str], typer.Option(help="fp32 and/or fp16 (repeat the flag).")] = [  # noqa: B006
        "fp32",
        "fp16",
    ],
    calibration: Annotated[
        list[Path] | None,
        typer.Option(help="Images or DICOMs for FP16 calibration and validation (default: pydicom's)."),
    ] = None,
    data_max: Annotated[float, typer.Option("--data-max", help="AutoCast keeps larger values FP32.")] = 512.0,
    validate: Annotated[bool, typer.Option(help="Compare every graph with eager PyTorch.")] = True,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing export.")] = False,
    engines: Annotated[
        bool, typer.Option("--engines", help="Then build the FP16 engines for this machine's TensorRT/GPU.")
    ] = False,
) -> None:
    """Export the model to ONNX (FP32 and strongly typed FP16), validated against PyTorch."""
    from gms_deploy.onnx_export import ExportOptions
    from gms_deploy.validate import run_export

    chosen = ModelSource.from_flags(model, vae, mapper).weights("export")
    if image_size is not None:
        chosen = chosen.with_settings(image_size=image_size)
    options = ExportOptions(
        precisions=tuple(precision), calibration=calibration, data_max=data_max, overwrite=overwrite
    )
    with _writing(out):
        result = run_export(chosen, out, options, validate=validate)
    if result.validation is not None:
        typer.echo(result.validation.table(), err=True)
    timings = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in result.seconds.items())
    typer.echo(f"{len(result.graphs)} graph(s) -> {out} ({timings})", err=True)
    if engines:
        _build_engines(out)


@app.command()
def build(
    export_dir: Annotated[Path, typer.Argument(help="A `gms-deploy export` folder; engines go beside it.")],
    trt: Annotated[str, typer.Option("--trt", help="auto, tensorrt or rtx (TensorRT for RTX).")] = "auto",
    precision: Annotated[str, typer.Option(help="Which exported graphs: fp16 or fp32.")] = "fp16",
    min_batch: Annotated[int, typer.Option("--min-batch", min=1)] = 1,
    opt_batch: Annotated[int, typer.Option("--opt-batch", min=1)] = 1,
    max_batch: Annotated[int, typer.Option("--max-batch", min=1)] = 8,
    target_cc: Annotated[
        list[str] | None,
        typer.Option("--target-cc", help="TensorRT for RTX: build for e.g. SM86 (repeat); default: this GPU"),
    ] = None,
    rebuild: Annotated[bool, typer.Option("--rebuild", help="Build even if the cached engine matches.")] = (
        False
    ),
    validate: Annotated[
        bool,
        typer.Option(
            "--validate",
            help="Then run every engine (GPU) against eager PyTorch on the export's weights "
            "(--model BUNDLE or --vae/--mapper; default: the demo model); a failed engine is refused.",
        ),
    ] = False,
    model: Annotated[Path | None, typer.Option("--model", help="With --validate: the model bundle.")] = None,
    vae: VaeOpt = None,
    mapper: MapperOpt = None,
    calibration: Annotated[
        list[Path] | None,
        typer.Option(help="With --validate: real images or DICOMs to compare on (default: pydicom's)."),
    ] = None,
) -> None:
    """Build TensorRT engines for an export's graphs, for the GPU they will run on (cached)."""
    from gms_deploy.engines import BuildOptions
    from gms_deploy.export_format import BatchProfile
    from gms_deploy.validate import check_engines_can_run, validate_engines

    if trt not in ("auto", "tensorrt", "rtx") or precision not in ("fp16", "fp32"):
        raise _fail(f"--trt takes auto, tensorrt or rtx, --precision fp16 or fp32 (got {trt}, {precision})")
    options = BuildOptions(
        flavour=trt,
        precision=precision,
        profile=BatchProfile(min_batch, opt_batch, max_batch),
        targets=tuple(target_cc or ()),
        rebuild=rebuild,
    )
    if validate:  # before the weights load: a machine without a GPU is told at once
        check_engines_can_run()
    reference = ModelSource.from_flags(model, vae, mapper).weights("build --validate") if validate else None
    _build_engines(export_dir, options)
    if reference is not None:
        report = validate_engines(export_dir, reference, options.graphs, precision, calibration)
        typer.echo(report.table(), err=True)


def _build_engines(export_dir: Path, options: BuildOptions | None = None) -> None:
    """``build`` and ``export --engines`` (the defaults): build (or skip) every engine, a line for each."""
    from gms_deploy.engines import build_engines

    records = build_engines(export_dir, options)
    for record in records:
        what = record.status + (f" ({record.reason})" if record.reason else "")
        typer.echo(f"{record.path.name}: {what}, {record.size / 2**20:.1f} MiB, {record.seconds:.1f} s")


@app.command()
def train(
    data: Annotated[Path, typer.Option("--data", help="Folder with images/ and masks/ (matching names).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Run folder: checkpoints, config, state.")],
    model: ModelOpt = None,
    vae: Annotated[Path | None, typer.Option("--vae", help="Frozen VAE (default: the model's).")] = None,
    mapper: Annotated[
        Path | None, typer.Option("--mapper", help="Fine-tune this mapper rather than start afresh.")
    ] = None,
    config: Annotated[Path | None, typer.Option("--config", help="JSON training config.")] = None,
    epochs: Annotated[
        int | None, typer.Option(min=1, help="Training epochs.", show_default=str(TrainConfig.epochs))
    ] = None,
    batch_size: Annotated[
        int | None,
        typer.Option(
            "--batch-size", min=1, help="Images per step.", show_default=str(TrainConfig.batch_size)
        ),
    ] = None,
    lr: Annotated[
        float | None,
        typer.Option(min=0.0, help="AdamW's peak learning rate.", show_default=str(TrainConfig.lr)),
    ] = None,
    image_size: Annotated[
        int | None,
        typer.Option(
            "--image-size",
            help="The network's input size; default: the bundle's, else the paper's.",
            show_default=str(TrainConfig.image_size),
        ),
    ] = None,
    split: Annotated[Path | None, typer.Option("--split", help="Official .pkl or JSON split.")] = None,
    augment: Annotated[
        bool | None,
        typer.Option(
            "--augment/--no-augment",
            help="The official augmentations.",
            show_default="--augment" if TrainConfig.augment else "--no-augment",
        ),
    ] = None,
    cache_latents: Annotated[bool | None, typer.Option("--cache-latents", help="Needs --no-augment.")] = None,
    seed: Annotated[
        int | None, typer.Option(help="Seeds every random choice.", show_default=str(TrainConfig.seed))
    ] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu or cuda[:N].")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --out.")] = False,
) -> None:
    """Train a GMS mapper on a frozen VAE with the paper's objective (defaults as the paper)."""
    from gms_deploy.train.trainer import train_mapper

    if vae is not None and model is not None:
        raise UsageError("give either --model (its VAE is used) or --vae, not both")
    default_size = None  # the paper's 224, or the config file's
    if vae is None:  # a bundle's VAE comes with the image size it was made for
        base = ModelSource.from_flags(model).weights("train")
        vae, default_size = base.vae, base.settings.image_size
    overrides = {
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "augment": augment,
        "seed": seed,
        "cache_latents": cache_latents,
        "device": device,
        "split_file": split and str(split),
        "init_from": mapper and str(mapper),
        "image_size": image_size or (None if config else default_size),
    }
    settings = (
        TrainConfig.from_file(config, **overrides) if config else TrainConfig().with_overrides(**overrides)
    )
    result = train_mapper(settings, data, out, vae, resume=resume)
    typer.echo(
        f"best validation Dice {result.best_dice:.4f} at epoch {result.best_epoch}: {result.best_path}",
        err=True,
    )


@app.command()
def evaluate(
    data: Annotated[Path, typer.Option("--data", help="Folder with images/ and masks/ (matching names).")],
    model: ModelOpt = None,
    vae: VaeOpt = None,
    mapper: MapperOpt = None,
    backend: BackendOpt = "auto",
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = None,
    split: Annotated[Path | None, typer.Option("--split", help="Score only its test names.")] = None,
    threshold: Annotated[
        float | None, typer.Option(min=0.0, max=1.0, help="Default: the model's (0.5).")
    ] = None,
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Per-image CSV (the data folder is only read).")
    ] = Path("scores.csv"),
) -> None:
    """Dice, IoU and HD95 per image, at 224 (the paper's protocol) and at each image's own size."""
    from gms_deploy.evaluate import evaluate as score
    from gms_deploy.evaluate import summarise, write_scores
    from gms_deploy.train.data import read_split

    _writable_file(out)
    runner = _open(backend, ModelSource.from_flags(model, vae, mapper), device, precision)
    names = read_split(split).test if split else None
    result = score(data, runner, names, threshold)
    if result.scores:  # a table of NaN averages would read as a result
        write_scores(out, result.scores)
    for failure in result.failures:
        typer.secho(f"ERROR: {failure}", err=True, fg=typer.colors.RED)
    typer.echo(f"{len(result.scores)} image(s), {runner.description}", err=True)
    if result.scores:
        for metric, (mean, std) in summarise(result.scores).items():
            typer.echo(f"{metric:>9}  {mean:.4f} +- {std:.4f}")
        typer.echo(f"per-image scores: {out}", err=True)
    if result.failures:
        typer.echo(f"{len(result.failures)} FAILED", err=True)
        raise typer.Exit(1)


@app.command()
def bench(
    model: ModelOpt = None,
    vae: VaeOpt = None,
    mapper: MapperOpt = None,
    export: Annotated[
        Path | None, typer.Option("--export", help="A `gms-deploy export` folder (ONNX Runtime, TensorRT).")
    ] = None,
    backend: Annotated[
        list[str] | None,
        typer.Option(help=f"Only these (repeat), beside eager FP32: {', '.join(NAMES)}."),
    ] = None,
    batch_size: Annotated[
        list[int] | None, typer.Option("--batch-size", min=1, help="Repeat; default 1 4 (CPU), 1 8 32 (GPU).")
    ] = None,
    image_size: Annotated[
        list[int] | None, typer.Option("--image-size", help="Repeat; default: the model's.")
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda[:N].")] = "auto",
    warmup: Annotated[int | None, typer.Option(min=0, help="Untimed batches first (default 3).")] = None,
    iterations: Annotated[
        int | None, typer.Option(min=1, help="Timed batches (default 5 on a CPU, 20 on a GPU).")
    ] = None,
    frames: Annotated[
        Path | None, typer.Option("--frames", help="Images or DICOM to batch (default: the samples).")
    ] = None,
    submodels: Annotated[
        bool,
        typer.Option(
            help="Also time encoder, mapper and decoder apart (torch-compiled compiles each once more)."
        ),
    ] = True,
    threads: Annotated[
        int | None,
        typer.Option(min=1, help="CPU threads for every backend alike (default: the cores this may use)."),
    ] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write records + environment here.")] = None,
    plot_out: Annotated[
        Path | None, typer.Option("--plot", help="Latency and throughput plot (PNG).")
    ] = None,
) -> None:
    """Time every backend that runs here against eager FP32: latency, throughput, stages, accuracy."""
    from gms_deploy.bench import BenchConfig, run_bench
    from gms_deploy.bench_report import format_table, plot, write_json
    from gms_deploy.versions import environment

    _writable_file(json_out)
    _writable_file(plot_out)
    config = BenchConfig(
        source=ModelSource.from_flags(model, vae, mapper, export),
        backends=tuple(backend or ()),
        batch_sizes=tuple(batch_size) if batch_size else None,
        image_sizes=tuple(image_size) if image_size else None,
        device=device,
        warmup=warmup,
        iterations=iterations,
        frames=frames,
        submodels=submodels,
        threads=threads,
    )
    with progress_bar(desc="benchmarking", unit="run") as bar:

        def progress(done: int, total: int, running: str) -> None:
            bar.total = total
            bar.set_postfix_str(running)
            bar.update(done - bar.n)

        result = run_bench(config, progress)
    typer.echo(format_table(result.records))
    warning = result.load.warning()
    if warning:
        typer.echo(f"warning: {warning}", err=True)
    env = environment() | result.environment()
    if json_out is not None:
        write_json(json_out, result.records, env)
    if plot_out is not None:
        plot(plot_out, result.records, env)


def main() -> None:
    app()
