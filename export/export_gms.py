"""Export a GMS model to validated ONNX graphs (FP32 and strongly typed FP16), by hand.

    python export/export_gms.py --model BUNDLE --out export/onnx [--image-size 224]
    python export/export_gms.py --vae VAE.ckpt --mapper best_model.pth --out export/onnx

The same as ``gms-deploy export``; this script exists for people who run the exporter from a
checkout. It prints the validation table and each stage's time, and exits 1 if validation fails.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gms_deploy.backends import resolve_bundle
from gms_deploy.onnx_export import PRECISIONS, export_model
from gms_deploy.validate import ValidationError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", type=Path, help="model bundle folder (default: the demo model)")
    parser.add_argument("--vae", type=Path)
    parser.add_argument("--mapper", type=Path)
    parser.add_argument("--image-size", type=int, help="any multiple of 8 (default: the model's)")
    parser.add_argument("--precision", nargs="+", default=list(PRECISIONS), choices=PRECISIONS)
    parser.add_argument("--calibration", type=Path, nargs="+", help="images or DICOMs (default: pydicom's)")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)

    bundle = resolve_bundle(args.model, args.vae, args.mapper)
    if args.image_size is not None:
        bundle = bundle.with_settings(image_size=args.image_size)
    try:
        result = export_model(
            bundle, args.out, tuple(args.precision), args.calibration, overwrite=args.overwrite
        )
    except ValidationError as err:
        if err.report is not None:
            print(err.report.table())
        print(f"error: {err}", file=sys.stderr)
        return 1
    assert result.validation is not None
    print(result.validation.table())
    for stage, seconds in result.seconds.items():
        print(f"{stage:>14}: {seconds:6.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
