"""Where a command's model comes from, read once from the flags every command that takes one shares.

``--model`` is a bundle folder or an export folder, ``--vae`` with ``--mapper`` are the two
checkpoints a user trained or downloaded, and nothing at all is the embedded demo model. Bench
also takes ``--export`` beside the weights, since it times both against each other. Each backend
then asks for what it runs: the weights, or the export.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gms_deploy.backends.base import EXPORT_MANIFEST, BackendError
from gms_deploy.bundle import ModelBundle, demo_bundle
from gms_deploy.errors import UsageError


def is_export(path: Path) -> bool:
    return (Path(path) / EXPORT_MANIFEST).is_file()


@dataclass(frozen=True)
class ModelSource:
    """The weights (None where only an export was given) and the export folder (None without one)."""

    bundle: ModelBundle | None = None
    export: Path | None = None

    @classmethod
    def from_flags(
        cls,
        model: Path | None = None,
        vae: Path | None = None,
        mapper: Path | None = None,
        export: Path | None = None,
    ) -> ModelSource:
        """Refuses flags that contradict each other; a bundle that does not open is a CheckpointError."""
        if model is not None and (vae is not None or mapper is not None):
            raise UsageError("give either --model or --vae with --mapper, not both")
        if (vae is None) != (mapper is None):
            raise UsageError("--vae and --mapper go together")
        if model is not None and is_export(model):
            if export is not None:
                raise UsageError(
                    f"--model {model} is an export folder, and so is --export: give the weights as "
                    "--model BUNDLE or --vae/--mapper"
                )
            return cls(None, Path(model))
        if vae is not None and mapper is not None:
            return cls(ModelBundle(vae, mapper), export)
        return cls(ModelBundle.load(model) if model is not None else demo_bundle(), export)

    @classmethod
    def of(cls, source: ModelSource | Path | None) -> ModelSource:
        """A library caller's shorthand: a path is what ``--model`` would be given, None the demo."""
        return source if isinstance(source, ModelSource) else cls.from_flags(source)

    def weights(self, user: str) -> ModelBundle:
        """``user`` names who asks, for the message: ``--backend torch``, ``export``, ..."""
        if self.bundle is None:
            raise BackendError(
                f"{user} needs a model's weights: give a bundle as --model BUNDLE, or --vae with "
                f"--mapper; {self.export} is an export folder (for onnxruntime or tensorrt)"
            )
        return self.bundle

    def export_dir(self, backend: str) -> Path:
        if self.export is None:
            raise BackendError(
                f"--backend {backend} runs a `gms-deploy export` folder (and the engines `gms-deploy build` "
                "put there): give it as --model EXPORT_DIR; --vae/--mapper are PyTorch checkpoints"
            )
        return self.export
