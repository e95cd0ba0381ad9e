"""Where a command's model comes from, read once from the flags every command that takes one shares.

``--model`` is a bundle folder or an export folder, ``--vae`` with ``--mapper`` are the two
checkpoints a user trained or downloaded, and nothing at all is the embedded demo model. Bench
also takes ``--export`` beside the weights, since it times both against each other. Each backend
then asks for what it runs: the weights, or the export.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gms_deploy.bundle import ModelBundle, demo_bundle
from gms_deploy.errors import BackendError, UsageError
from gms_deploy.export_format import MANIFEST


def is_export(path: Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


@dataclass(frozen=True)
class ModelSource:
    """What the flags named, resolved when a backend asks: the weights, or the export folder.

    ``--model`` is read only then, so that a folder that is neither a bundle nor an export gets the
    complaint of what was asked of it (a bundle's, or an export's).
    """

    bundle: ModelBundle | None = None
    """Weights already at hand: ``--vae`` with ``--mapper``, or a library caller's bundle."""
    model: Path | None = None
    """``--model``: a bundle folder or an export folder."""
    export: Path | None = None
    """Bench's ``--export``, beside the weights."""

    @classmethod
    def from_flags(
        cls,
        model: Path | None = None,
        vae: Path | None = None,
        mapper: Path | None = None,
        export: Path | None = None,
    ) -> ModelSource:
        """Refuses flags that contradict each other, before anything is loaded."""
        if model is not None and (vae is not None or mapper is not None):
            raise UsageError("give either --model or --vae with --mapper, not both")
        if (vae is None) != (mapper is None):
            raise UsageError("--vae and --mapper go together")
        if model is not None and export is not None and is_export(model):
            raise UsageError(
                f"--model {model} is an export folder, and so is --export: give the weights as "
                "--model BUNDLE or --vae/--mapper"
            )
        bundle = ModelBundle(vae, mapper) if vae is not None and mapper is not None else None
        return cls(bundle, None if model is None else Path(model), export)

    @classmethod
    def of(cls, source: ModelSource | ModelBundle | Path | None) -> ModelSource:
        """A library caller's shorthand: a path is what ``--model`` would be given, None the demo."""
        if isinstance(source, ModelSource):
            return source
        return cls(bundle=source) if isinstance(source, ModelBundle) else cls.from_flags(source)

    @property
    def exported(self) -> bool:
        """Whether ``--model`` named an export folder (what ``auto`` runs with ONNX Runtime or TensorRT)."""
        return self.model is not None and is_export(self.model)

    def weights(self, user: str) -> ModelBundle:
        """``user`` names who asks, for the message: ``--backend torch``, ``export``, ..."""
        if self.bundle is not None:
            return self.bundle
        if self.model is None:
            return demo_bundle()
        if self.exported:
            raise BackendError(
                f"{user} needs a model's weights: give a bundle as --model BUNDLE, or --vae with "
                f"--mapper; {self.model} is an export folder (for --backend onnxruntime or tensorrt, "
                "or bench's --export)"
            )
        return ModelBundle.load(self.model)

    def export_dir(self, backend: str) -> Path:
        if self.export is not None:
            return self.export
        if self.model is None:
            raise BackendError(
                f"--backend {backend} runs a `gms-deploy export` folder (and the engines `gms-deploy build` "
                "put there): give it as --model EXPORT_DIR; --vae/--mapper are PyTorch checkpoints"
            )
        return self.model
