"""A model bundle: one folder that holds the VAE, the mapper and the settings they were trained with.

Users pass one path instead of three flags that must agree. The manifest ``gms.json`` names the
files relative to itself, so a bundle folder can be copied to a cart as it is.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gms_deploy.errors import CheckpointError
from gms_deploy.io.staging import staged_folder
from gms_deploy.settings import Settings

if TYPE_CHECKING:
    from gms_deploy.model.gms import GMSModel

MANIFEST = "gms.json"
FORMAT = "gms-deploy-bundle"
VERSION = 1
DEMO = "demo"


@dataclass(frozen=True)
class ModelBundle:
    vae: Path
    mapper: Path
    settings: Settings = field(default_factory=Settings)
    name: str = "custom"

    @classmethod
    def load(cls, path: Path) -> ModelBundle:
        """Open a bundle folder, or its ``gms.json``."""
        path = Path(path)
        if not path.exists():  # a mistyped path, not a folder that lacks its manifest
            raise CheckpointError(path, "no such file or folder")
        manifest = path / MANIFEST if path.is_dir() else path
        if not manifest.is_file():
            raise CheckpointError(path, f"not a model bundle (no {MANIFEST})")
        if manifest.suffix != ".json":
            raise CheckpointError(path, "a file, not a model bundle: give its folder (a bundle or an export)")
        try:
            data = json.loads(manifest.read_text())
            if data.get("format") != FORMAT:
                raise ValueError(f"format is {data.get('format')!r}, expected {FORMAT!r}")
            if data.get("version") != VERSION:
                raise ValueError(f"bundle version {data.get('version')!r}; this gms-deploy reads {VERSION}")
            settings = Settings(**data.get("settings", {}))
            root = manifest.parent
            bundle = cls(root / data["vae"], root / data["mapper"], settings, data.get("name", root.name))
        except (ValueError, TypeError, KeyError, AttributeError) as err:
            raise CheckpointError(manifest, f"invalid bundle manifest ({err})") from None
        for part in (bundle.vae, bundle.mapper):
            if not part.exists():
                raise CheckpointError(manifest, f"names {part.name}, which is not in the bundle")
        return bundle

    def with_settings(self, **changes: Any) -> ModelBundle:
        return replace(self, settings=replace(self.settings, **changes))

    def build(self) -> GMSModel:
        """Load both networks (CPU, eval mode, frozen): the model code is imported here, not by reading
        a bundle, so that naming a model costs no network import."""
        from gms_deploy.model.gms import GMSModel
        from gms_deploy.model.mapper import load_mapper
        from gms_deploy.model.vae import load_vae

        model = GMSModel(load_vae(self.vae), load_mapper(self.mapper), self.settings.scale_factor)
        return model.eval().requires_grad_(False)

    def save(self, out_dir: Path) -> ModelBundle:
        """Copy the VAE and mapper into ``out_dir`` with a manifest; returns the saved bundle.

        The folder is assembled beside its destination and renamed into place (``staged_folder``).
        """
        from gms_deploy.model.mapper import config_path

        out_dir = Path(out_dir)
        with staged_folder(out_dir, MANIFEST, "a bundle", hint="") as staging:
            names = {}
            for role, source in (("vae", self.vae), ("mapper", self.mapper)):
                names[role] = f"{role}{'' if source.is_dir() else ''.join(source.suffixes)}"
                copy = shutil.copytree if source.is_dir() else shutil.copy2
                copy(source, staging / names[role])
            if (mapper_config := config_path(self.mapper)).is_file():  # the config the shapes cannot tell
                shutil.copy2(mapper_config, config_path(staging / names["mapper"]))
            manifest = {
                "format": FORMAT,
                "version": VERSION,
                "name": self.name,
                **names,
                "settings": self.settings.to_json(),
            }
            (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        return ModelBundle.load(out_dir)


def demo_bundle() -> ModelBundle:
    """The model shipped inside the package, used when no model is given."""
    return ModelBundle.load(Path(str(resources.files("gms_deploy") / "data" / DEMO)))
