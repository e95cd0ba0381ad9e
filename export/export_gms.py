"""Export a GMS model to validated ONNX graphs (FP32 and strongly typed FP16), from a checkout.

    python export/export_gms.py --model BUNDLE --out export/onnx [--image-size 224]
    python export/export_gms.py --vae VAE.ckpt --mapper best_model.pth --out export/onnx

It is ``gms-deploy export`` itself, flags, messages and exit codes included, for people who run
the exporter from a clone without installing the package's entry point.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout, before any installed copy

from gms_deploy.cli import app

if __name__ == "__main__":
    app(["export", *sys.argv[1:]], prog_name="export_gms.py")
