"""Serve the results browser of an index run: a page and a JSON API.

    python -m jobs.serve --index <run uri> [--port 8000] [--host 127.0.0.1] [--workers 1] [--threads 2]
                         [--max-upload-mb 20] [--max-pixels 100000000]

Open the printed URL: upload a query photo or pick a database image, draw a box, choose a method and its
re-rankings, and browse the ranked thumbnails with their matched regions, the query's saliency overlay and, when
the method verifies them, the matched points. Programs use ``POST /search`` (multipart ``file`` or JSON
``{"image_id": ...}``, with ``bbox``, ``method``, ``rerank``, ``top_k``), ``GET /images/{id}?size=N`` and
``GET /methods`` (see :mod:`service.app`). The server binds 127.0.0.1 unless ``--host`` says otherwise: it
has no authentication, so put it behind a proxy that has one before exposing it.
"""
from __future__ import annotations

import argparse
import socket
import sys

import torch
import uvicorn

from service.app import MAX_UPLOAD_BYTES, create_app
from service.errors import UserError, run_cli
from service.search import SearchService
from storage.images import DEFAULT_MAX_PIXELS


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jobs.serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--index", required=True, help="output root of an index run")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (0: any free one)")
    p.add_argument("--workers", type=int, default=1, help="searches run at once (threads over one service)")
    p.add_argument("--threads", type=int, default=2, help="torch threads per search")
    p.add_argument("--max-upload-mb", type=float, default=MAX_UPLOAD_BYTES / 2**20, help="largest request body")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, help="largest decoded image (pixels)")
    p.add_argument("--device", default=None, help="torch device of the query encoder (default: cuda if present)")
    p.add_argument("-v", "--verbose", action="store_true", help="show tracebacks")
    return p.parse_args(argv)


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (``port`` 0: a free one), so the printed URL is the real one."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.listen(128)
    return sock


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def body() -> int:
        if not 0 <= args.port < 65536 or args.workers < 1 or args.threads < 1 or args.max_upload_mb <= 0:
            raise UserError("--port must be 0..65535 and --workers, --threads, --max-upload-mb positive")
        torch.set_num_threads(args.threads)
        service = SearchService(args.index, device=args.device)
        try:
            app = create_app(args.index, service, max_upload_bytes=int(args.max_upload_mb * 2**20),
                             max_pixels=args.max_pixels, workers=args.workers)
            sock = bind(args.host, args.port)
            port = sock.getsockname()[1]
            host = f"[{args.host}]" if ":" in args.host else args.host
            print(f"jobs.serve: {args.index}: methods {', '.join(service.available_methods())}", flush=True)
            print(f"jobs.serve: open http://{host}:{port}/  (Ctrl-C stops)", flush=True)
            uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False)).run(sockets=[sock])
        finally:
            service.close()
        return 0

    return run_cli(body, args.verbose, "jobs.serve")


if __name__ == "__main__":
    sys.exit(main())
