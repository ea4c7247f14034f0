"""``ldm serve``: AUTOMATIC1111's HTTP API and the page, on one loaded model (server/).

FastAPI, uvicorn and torch are imported inside :func:`run`, so ``ldm --help`` stays instant.
SIGTERM: queued jobs are answered 503, the running one finishes (interrupted after ``GRACE_S``),
and the command exits 0 (Ctrl-C does the same and exits 130, as other commands do).
"""
from __future__ import annotations

import argparse
import signal
import sys

from cli.args import CommandError, number

GRACE_S = 30  # how long a running job may take to finish after SIGTERM


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="serve AUTOMATIC1111's HTTP API and a page in the browser",
                       description="Serve AUTOMATIC1111's /sdapi/v1 API and a page at / on one "
                                   "loaded model.")
    net = p.add_argument_group("network")
    net.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    net.add_argument("--port", type=number(int, 0, 65535), default=7860,
                     help="port (default: 7860; 0 picks a free one)")
    net.add_argument("--listen", action="store_true",
                     help="bind 0.0.0.0 (reachable from other machines; use --api-auth)")
    net.add_argument("--api-auth", metavar="USER:PASS[,USER:PASS...]",
                     help="HTTP Basic credentials required on every route and the page")
    net.add_argument("--cors-allow-origins", metavar="ORIGIN[,ORIGIN...]",
                     help="origins allowed to call the API from a browser (default: none)")
    m = p.add_argument_group("models")
    m.add_argument("--checkpoint", metavar="PATH", help="model loaded at start (default: the "
                   "shipped model)")
    m.add_argument("--models-dir", metavar="DIR", help="checkpoints clients may switch to")
    m.add_argument("--lora-dir", metavar="DIR", help="LoRAs for <lora:name:weight> in prompts")
    m.add_argument("--controlnet-dir", metavar="DIR", help="ControlNets for ControlNet units")
    m.add_argument("--embeddings-dir", metavar="DIR", help="textual inversions prompts may name "
                   "(default: embeddings/ beside the checkpoint)")
    m.add_argument("--device", metavar="D[,D...]",
                   help="cpu, cuda, cuda:1, ...; several: one worker each (default: cuda if available)")
    m.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), help="default: fp16 on CUDA, fp32 on CPU")
    lim = p.add_argument_group("limits")
    lim.add_argument("--max-queue", type=number(int, 0), default=0, metavar="N",
                     help="requests allowed to wait; more are answered 503 (default: 0 = no limit)")
    lim.add_argument("--max-pixels", type=number(int, 64), default=2048 * 2048, metavar="N",
                     help="largest width x height (default: 2048x2048)")
    lim.add_argument("--max-images", type=number(int, 1), default=64, metavar="N",
                     help="largest batch_size x n_iter (default: 64)")
    lim.add_argument("--max-steps", type=number(int, 1), default=150, metavar="N",
                     help="most steps (default: 150)")
    lim.add_argument("--max-body-mb", type=number(int, 1), default=64, metavar="MB",
                     help="largest request body (default: 64)")


def _config(args):
    from server.app import ServerConfig
    from server.security import Limits, parse_credentials

    try:
        parse_credentials(args.api_auth)
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    for name in ("models_dir", "lora_dir", "controlnet_dir", "embeddings_dir"):
        folder = getattr(args, name)
        if folder is not None:
            from pathlib import Path
            if not Path(folder).is_dir():
                raise CommandError(f"--{name.replace('_', '-')} {folder}: no such folder")
    devices = [d.strip() for d in args.device.split(",")] if args.device else [None]
    origins = [o.strip() for o in args.cors_allow_origins.split(",")] if args.cors_allow_origins else []
    limits = Limits(max_body_bytes=args.max_body_mb << 20, max_pixels=args.max_pixels,
                    max_images=args.max_images, max_steps=args.max_steps)
    return ServerConfig(checkpoint=args.checkpoint, models_dir=args.models_dir,
                        lora_dir=args.lora_dir, controlnet_dir=args.controlnet_dir,
                        embeddings_dir=args.embeddings_dir,
                        api_auth=args.api_auth, max_queue=args.max_queue, devices=devices,
                        dtype=args.dtype, cors_allow_origins=origins, limits=limits)


def run(args: argparse.Namespace) -> int:
    config = _config(args)
    host = "0.0.0.0" if args.listen else args.host
    if host not in ("127.0.0.1", "localhost", "::1") and not config.api_auth:
        print(f"warning: listening on {host} without --api-auth: anyone who can reach this "
              "machine can use the server", file=sys.stderr)
    import uvicorn

    from server.app import create_app

    app = create_app(config)
    worker = app.state.server.worker

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            worker.close()  # queued jobs get 503 now; the running one may finish
            super().handle_exit(sig, frame)
            # uvicorn re-raises the signal after its shutdown; SIGTERM is a normal stop here
            captured = getattr(self, "_captured_signals", None)
            if isinstance(captured, list) and sig == signal.SIGTERM:
                captured.remove(sig)

    server = Server(uvicorn.Config(app, host=host, port=args.port, log_level="info",
                                   timeout_graceful_shutdown=GRACE_S))
    server.run()
    return 0
