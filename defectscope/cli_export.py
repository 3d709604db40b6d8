"""``defectscope export <run_dir> --format onnx|openvino``: a trained model as one file that runs
without PyTorch (defectscope.deploy), with a JSON beside it."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "export a trained model to ONNX or OpenVINO (runs without PyTorch: defectscope.deploy)"


def add_parser(sub, formatter_class=argparse.ArgumentDefaultsHelpFormatter) -> argparse.ArgumentParser:
    """The ``export`` sub-command's parser, added to ``sub`` (build_parser's subparsers)."""
    p = sub.add_parser("export", help=HELP, formatter_class=formatter_class)
    p.add_argument("run_dir", help="run folder (or its models/<n> folder) written by `defectscope train`")
    p.add_argument("--format", choices=["onnx", "openvino"], default="onnx",
                   help="onnx: one .onnx file (onnxruntime, OpenVINO); openvino: .xml + .bin IR")
    p.add_argument("--output", default=None,
                   help="folder for <name>.onnx / .xml and <name>.json; None: <run_dir>/export[/<category>]")
    p.add_argument("--category", default=None, help="which model of a multi-category run")
    p.add_argument("--precision", choices=["f32", "bf16", "int8"], default="f32",
                   help="inference precision; bf16 and int8 for --format openvino only (int8 needs nncf), and "
                        "only when asked: they move maps (the JSON records by how much)")
    p.add_argument("--exporter", choices=["dynamo", "legacy"], default="dynamo",
                   help="torch.onnx exporter: dynamo (torch.export) or legacy (TorchScript tracer); both exact")
    p.add_argument("--name", default="model", help="file name stem of the exported files")
    return p


def cmd_export(args) -> int:
    from defectscope.cli import UsageError
    from defectscope.deploy.export import MissingExportDependency, export_model

    run_dir = Path(args.run_dir)
    if not run_dir.exists():
        raise UsageError(f"run folder '{run_dir}' does not exist; pass a folder written by `defectscope train` "
                         "(results/<project>/<group>/<run_name>) or its models/<n> folder")
    if args.format == "onnx" and args.precision != "f32":
        raise UsageError(f"--precision {args.precision} is for --format openvino; ONNX exports are f32")
    output = Path(args.output) if args.output else (run_dir if run_dir.is_dir() else run_dir.parent) / "export"
    if args.output is None and args.category:
        output = output / args.category
    try:
        target = export_model(run_dir, output, format=args.format, precision=args.precision,
                              category=args.category, name=args.name, exporter=args.exporter)
    except MissingExportDependency as err:
        raise UsageError(str(err)) from err
    import json

    meta = json.loads(target.with_suffix(".json").read_text())
    parity = meta.get("parity") or {}
    print(f"exported {meta['model']} ({args.format}, {args.precision}) to {target} and {target.with_suffix('.json')}; "
          f"input uint8 [batch, {meta['image_size'][0]}, {meta['image_size'][1]}, 3] RGB, threshold "
          f"{meta['threshold']:.4g}; max difference from PyTorch: map {parity.get('max_abs_map', float('nan')):.2g}, "
          f"score {parity.get('max_abs_score', float('nan')):.2g}")
    return 0
