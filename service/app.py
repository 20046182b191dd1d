"""The results browser: an ASGI app (Starlette) over one index run, its page and its JSON API.

Routes:

* ``GET /``: the page (``service/static/browser.html``: vanilla JS, no CDN, no network);
* ``GET /methods``: ``{"methods": [...], "reranks": [...], "images": n}``, the run's published methods;
* ``POST /search``: a multipart upload (``file``) or JSON ``{"image_id": ...}`` (a database image as the query),
  with ``bbox`` (``x0,y0,x1,y1`` in the query's pixels), ``method``, ``rerank`` (repeatable) and ``top_k``;
  the answer is :meth:`service.webapi.BrowserSearch.run`'s JSON;
* ``GET /images/{id}?size=N``: a JPEG of a database image (longest side ``N``, 16..2048, default 256), by its id
  in the run's ``images`` table only;
* ``GET /images?q=text&limit=n``: ``{"images": [{"id", "width", "height"}], "total": n}``, the ids containing
  ``text`` (to pick a database image as the query).

Errors are one-line JSON ``{"error": "..."}``: a malformed request or id 400, an unknown id 404, an oversized
body 413 (from ``Content-Length`` at once, or while streaming a body without one), a decompression bomb 413,
a non-image 415, a corrupt image 400, too many searches queued 503. Uploads are decoded by
:func:`storage.images.decode_image`, with the pipeline's bomb and corrupt-file guards. Searches run in worker
threads (``workers`` at a time) over one shared :class:`service.search.SearchService`.
"""
from __future__ import annotations

import json
import logging
import threading
from pathlib import Path
from typing import Any, Awaitable, Callable

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from service.errors import EXPECTED, UserError, describe
from service.search import SearchService, known_reranks
from service.webapi import LRU, BrowserSearch, ImageCatalog, check_image_id, parse_request, thumbnail_jpeg
from storage.images import DEFAULT_MAX_PIXELS, ImageError
from storage.uri import read_bytes

log = logging.getLogger("indexer")

PAGE = Path(__file__).resolve().parent / "static" / "browser.html"
MAX_UPLOAD_BYTES = 20 * 1024 * 1024
THUMB_SIZES = (16, 2048)
IMAGE_STATUS = {"too_large": 413, "not_image": 415, "unsupported": 415}
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": ("default-src 'none'; img-src 'self' blob: data:; script-src 'unsafe-inline'; "
                                "style-src 'unsafe-inline'; connect-src 'self'; form-action 'none'; "
                                "frame-ancestors 'none'; base-uri 'none'"),
}

ASGIApp = Callable[[dict, Callable[[], Awaitable[dict]], Callable[[dict], Awaitable[None]]], Awaitable[None]]


class BodyTooLarge(Exception):
    """The request body passed the upload limit while it was being read."""


class Busy(UserError):
    """Too many searches are queued: the client should retry later."""

    status = 503


def _status(exc: BaseException) -> int:
    if isinstance(exc, ImageError):
        return IMAGE_STATUS.get(exc.reason, 400)
    if isinstance(exc, UserError):
        return exc.status
    if isinstance(exc, (FileNotFoundError, PermissionError)):
        return 404
    return 500  # the run's storage failed (a StorageError reading a table or an image): not the client's fault


def error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


class BodyLimit:
    """ASGI middleware: refuses bodies over ``limit`` bytes with 413, from ``Content-Length`` before reading any
    of it, or as soon as a streamed body (chunked, or lying about its length) passes the limit: reading it then
    raises :class:`BodyTooLarge`, which the app's exception handler answers with 413."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Callable[[], Awaitable[dict]],
                       send: Callable[[dict], Awaitable[None]]) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        too_large = error(413, f"request body over the {self.limit} byte limit")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            return await too_large(scope, receive, send)
        seen = 0

        async def limited_receive() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise BodyTooLarge(f"request body over the {self.limit} byte limit")
            return message

        await self.app(scope, limited_receive, send)


class Browser:
    """The routes' state: the search, the catalogue, the limits and the worker threads' gate."""

    def __init__(self, search: BrowserSearch, max_pixels: int, workers: int, max_pending: int) -> None:
        self.search = search
        self.catalog = search.catalog
        self.max_pixels = max_pixels
        self.gate = threading.BoundedSemaphore(max(1, workers))
        self.max_pending = max_pending
        self._pending = 0
        self._count_lock = threading.Lock()
        self._thumbs = LRU(1024)  # (id, size) -> JPEG bytes
        self._thumbs_lock = threading.Lock()
        self._page = PAGE.read_text(encoding="utf-8")

    async def guarded(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn`` in a worker thread, ``workers`` at a time; 503 when ``max_pending`` are already waiting."""
        with self._count_lock:
            if self._pending >= self.max_pending:
                raise Busy("too many searches queued, retry later")
            self._pending += 1
        try:
            def gated() -> Any:
                with self.gate:
                    return fn(*args)
            return await run_in_threadpool(gated)
        finally:
            with self._count_lock:
                self._pending -= 1

    # ------------------------------------------------------------------ routes
    async def page(self, request: Request) -> Response:
        return HTMLResponse(self._page, headers=SECURITY_HEADERS)

    async def methods(self, request: Request) -> Response:
        return JSONResponse({"methods": self.search.service.available_methods(), "reranks": known_reranks(),
                             "images": len(self.catalog), "box_sources": sorted(self.search.sources - {"full"})})

    async def list_images(self, request: Request) -> Response:
        try:
            limit = min(500, max(1, int(request.query_params.get("limit", "50"))))
        except ValueError:
            return error(400, "limit must be an integer")
        ids = self.catalog.find(request.query_params.get("q", ""), limit)
        return JSONResponse({"images": [{"id": i, "width": self.catalog.size(i)[0], "height": self.catalog.size(i)[1]}
                                        for i in ids], "total": len(self.catalog)})

    def _thumbnail(self, image_id: str, size: int) -> bytes:
        with self._thumbs_lock:
            data = self._thumbs.get_((image_id, size))
        if data is None:
            data = thumbnail_jpeg(read_bytes(self.catalog.uri(image_id)), size, self.max_pixels)
            with self._thumbs_lock:
                self._thumbs.put((image_id, size), data)
        return data

    async def image(self, request: Request) -> Response:
        image_id = check_image_id(request.path_params["image_id"])
        self.catalog.uri(image_id)  # 404 before any work
        raw = request.query_params.get("size", "256")
        if not raw.isdigit() or not THUMB_SIZES[0] <= int(raw) <= THUMB_SIZES[1]:
            raise UserError(f"size must be an integer between {THUMB_SIZES[0]} and {THUMB_SIZES[1]}")
        data = await run_in_threadpool(self._thumbnail, image_id, int(raw))
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600",
                                                                "X-Content-Type-Options": "nosniff"})

    async def _fields(self, request: Request) -> tuple[dict[str, Any], bytes | None]:
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype == "application/json":
            try:
                body = json.loads(await request.body())
            except (ValueError, UnicodeDecodeError):
                raise UserError("the body is not valid JSON") from None
            if not isinstance(body, dict):
                raise UserError("the JSON body must be an object")
            return body, None
        if ctype != "multipart/form-data":
            raise UserError("send multipart/form-data (a file upload) or application/json")
        form = await request.form(max_files=1, max_fields=16)
        fields: dict[str, Any] = {k: v for k, v in form.multi_items() if isinstance(v, str) and k != "rerank"}
        fields["rerank"] = [v for v in form.getlist("rerank") if isinstance(v, str)]
        upload = form.get("file")
        data = await upload.read() if isinstance(upload, UploadFile) else None
        await form.close()
        return fields, data

    async def search_route(self, request: Request) -> Response:
        fields, data = await self._fields(request)
        req = parse_request(fields, data)
        return JSONResponse(await self.guarded(self.search.run, req))


def _handler(exc_type: type[BaseException]) -> Callable[[Request, Exception], Awaitable[Response]]:
    async def handle(request: Request, exc: Exception) -> Response:
        status = _status(exc)
        if status >= 500:
            log.warning("%s %s failed: %s", request.method, request.url.path, describe(exc))
        return error(status, describe(exc))
    return handle


async def _too_large(request: Request, exc: Exception) -> Response:
    return error(413, str(exc))


def create_app(root: str, service: SearchService | None = None, max_upload_bytes: int = MAX_UPLOAD_BYTES,
               max_pixels: int = DEFAULT_MAX_PIXELS, workers: int = 1, max_pending: int = 64,
               preload: bool = True) -> ASGIApp:
    """The results browser over the index run at ``root`` (``service``: an already opened one, else opened here).

    ``max_upload_bytes`` bounds a request body, ``max_pixels`` a decoded image (decompression bombs),
    ``workers`` the searches run at once, ``max_pending`` the searches admitted (running or waiting)."""
    service = service if service is not None else SearchService(root)
    search = BrowserSearch(service, ImageCatalog.load(root), max_pixels=max_pixels)
    if preload:
        search.preload()
    b = Browser(search, max_pixels, workers, max_pending)
    routes = [Route("/", b.page), Route("/methods", b.methods), Route("/search", b.search_route, methods=["POST"]),
              Route("/images", b.list_images), Route("/images/{image_id:path}", b.image)]
    handlers: dict[Any, Any] = {t: _handler(t) for t in EXPECTED}
    handlers[BodyTooLarge] = _too_large
    app = Starlette(routes=routes, exception_handlers=handlers)
    app.state.browser = b
    return BodyLimit(app, max_upload_bytes)


__all__ = ["create_app", "BodyLimit", "MAX_UPLOAD_BYTES"]
