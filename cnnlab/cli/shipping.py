"""export and serve: a trained model as files, and behind an HTTP API."""

from __future__ import annotations

import argparse
from pathlib import Path

from cnnlab.cli.common import needs_extra, print_json

def add_commands(commands: argparse._SubParsersAction) -> None:
    """export and serve: a trained model as files, and behind an HTTP API."""
    export = commands.add_parser(
        "export",
        help="write a run's model as ONNX, torch.export, TorchScript and safetensors files",
        description="Write the run's best model in each format, with model.json, MODEL_CARD.md and, for ONNX, "
        "a check against PyTorch in ONNX Runtime (model.onnx.check.json).",
    )
    export.add_argument("model", type=Path, metavar="RUN_OR_CHECKPOINT")
    export.add_argument("--format", help="comma-separated: onnx,pt2,torchscript,safetensors (default: all)")
    export.add_argument("--out", type=Path, help="folder for the files; default RUN/export")
    export.add_argument("--json", action="store_true", help="print one JSON object with the files and the check")
    export.set_defaults(handler=_export)

    serve = commands.add_parser(
        "serve",
        help="serve a model over HTTP: POST images, get classes",
        description="Serve a trained model over HTTP (FastAPI + uvicorn): POST images to /v1/predict; "
        "/v1/model, /healthz, /readyz, /metrics, API docs at /docs.",
    )
    serve.add_argument("model", type=Path, metavar="RUN|MODEL.onnx", help="a run, a checkpoint or a model.onnx")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on; default 127.0.0.1 (this machine)")
    serve.add_argument("--port", type=int, default=8000, help="default 8000; 0 picks a free port")
    serve.add_argument("--backend", choices=("onnx", "torch"), default="onnx",
                       help="onnx: ONNX Runtime (default); torch: the checkpoint, cnnlab's fast forward")  # fmt: skip
    serve.add_argument("--max-batch", type=int, default=64, help="images per model call and per request; default 64")
    serve.add_argument("--window-ms", type=float, default=2.0, help="how long a batch waits for requests; default 2")
    serve.add_argument("--max-body-mb", type=float, default=5.0, help="largest request body, MiB; default 5")
    serve.add_argument("--max-pending", type=int, default=256, help="requests waiting before 503; default 256")
    serve.add_argument("--log", type=Path, metavar="FILE", help="append one JSON line per request to FILE")
    serve.add_argument("--workers", type=int, default=1, help="server processes sharing the port; default 1 "
                       "(2 or more: decoding runs on every core, and /metrics adds the workers up)")  # fmt: skip
    serve.set_defaults(handler=_serve)


def _export(args: argparse.Namespace) -> int:
    with needs_extra("export", "export"):
        from cnnlab.tools.export import FORMATS, export_run

        formats = [f.strip() for f in args.format.split(",") if f.strip()] if args.format else list(FORMATS)
        result = export_run(args.model, formats, args.out)
    if args.json:
        files = {f.format: {"path": str(f.path), "sha256": f.sha256} for f in result.files}
        print_json({"out": str(result.out), "files": files, "onnx_check": result.onnx_check})
        return 0
    for f in result.files:
        print(f"{f.format:<12} {f.path}  sha256 {f.sha256[:16]}")
    if result.onnx_check:
        check = result.onnx_check
        print(f"ONNX Runtime vs PyTorch on {check['images']} images ({check['source']}): max |logit diff| "
              f"{check['max_abs_logit_diff']:.2e}, top-1 agreement {100 * check['top1_agreement']:.2f}%")  # fmt: skip
    print(f"model card and model.json in {result.out}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    with needs_extra("serve", "serve"):
        from cnnlab.tools.serve.app import Settings
        from cnnlab.tools.serve.server import serve

        settings = Settings(max_batch=args.max_batch, window_ms=args.window_ms, max_body_mb=args.max_body_mb,
                            max_pending=args.max_pending, log=args.log, workers=args.workers)  # fmt: skip
        serve(args.model, args.backend, args.host, args.port, settings)
    return 0


