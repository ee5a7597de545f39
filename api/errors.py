"""Every bad input becomes a 4xx whose `detail` names the field; never a 500.

A 404 for a browser (`Accept: text/html`, outside /v1 and /openapi.json) is the HTML 404
page (api/templates/404.html); every other error answers JSON in this shape (FastAPI's own
validation shape, plus a one-line `message`):
{"detail": [{"loc": ["body", "cluster", "num_nodes"], "msg": "...", "type": "..."}],
 "message": "cluster.num_nodes: ..."} ; InvalidMapping locates each error at its field
(["body", "mapping", "ep"], ["body", "training", "fp8_recipe"], ...) and also carries `reasons`.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cost_model.validate import InvalidMapping

from .service import RequestError, foldplan_version

log = logging.getLogger("foldplan.api")


_MODEL_TAGS = {"spec", "preset", "hf_config"}


def untag(errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Drop the model-variant tag pydantic puts after `model` ("model.spec.num_layers" ->
    "model.num_layers"), so locations read like the contract's field names."""
    out = []
    for e in errors:
        loc = list(e.get("loc", ()))
        for i in range(len(loc) - 1):
            if loc[i] == "model" and loc[i + 1] in _MODEL_TAGS and (i == 0 or loc[i - 1] == "body"):
                del loc[i + 1]
                break
        out.append({**e, "loc": tuple(loc)})
    return out


def _loc_text(loc: tuple | list) -> str:
    parts = [str(p) for p in loc if p not in ("body",)]
    return ".".join(parts) or "body"


def error_lines(errors: list[dict[str, Any]]) -> list[str]:
    """'field.path: message' for each pydantic error."""
    return [f"{_loc_text(e.get('loc', ()))}: {e.get('msg', '')}" for e in errors]


def _items(errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {"loc": [p if isinstance(p, int) else str(p) for p in e.get("loc", ())],
         "msg": str(e.get("msg", "")), "type": str(e.get("type", "value_error"))}
        for e in errors
    ]


def _answer(status: int, errors: list[dict[str, Any]], **extra: Any) -> JSONResponse:
    body = {"detail": _items(errors), "message": "; ".join(error_lines(errors))[:2000], **extra}
    return JSONResponse(body, status_code=status)


async def _on_validation(_req: Request, exc: RequestValidationError) -> JSONResponse:
    errs = untag(list(exc.errors()))
    for e in errs:
        if e.get("type") == "json_invalid":
            e["msg"] = f"body is not valid JSON ({e.get('ctx', {}).get('error', 'decode error')})"
    return _answer(422, errs)


async def _on_pydantic(_req: Request, exc: ValidationError) -> JSONResponse:
    return _answer(422, untag([{**e, "loc": ("body", *e["loc"])} for e in exc.errors()]))


async def _on_request_error(_req: Request, exc: RequestError) -> JSONResponse:
    return _answer(422, [{"loc": ("body", *exc.loc), "msg": exc.msg, "type": "value_error"}])


async def _on_invalid_mapping(_req: Request, exc: InvalidMapping) -> JSONResponse:
    """One item per typed error, located at the field to change in its request section
    (("body", "mapping", "ep"), ("body", "training", "fp8_recipe"), ...); `reasons` keeps the
    messages alone."""
    errs = [{"loc": ("body", e.section, e.field), "msg": e.message, "type": "invalid_mapping"}
            for e in exc.errors]
    return _answer(422, errs, reasons=list(exc.reasons))


async def _on_value_error(_req: Request, exc: ValueError) -> JSONResponse:
    return _answer(422, [{"loc": ("body",), "msg": str(exc), "type": "value_error"}])


def is_api_path(path: str) -> bool:
    """Paths whose errors are always JSON, whoever asks: the /v1 API and its OpenAPI schema."""
    return path == "/v1" or path.startswith("/v1/") or path == "/openapi.json"


def wants_html(req: Request) -> bool:
    """A browser navigating: a GET or HEAD that accepts text/html, outside the API paths
    (curl and API clients send `Accept: */*` or application/json and keep the JSON errors)."""
    return (req.method in ("GET", "HEAD") and not is_api_path(req.url.path)
            and "text/html" in req.headers.get("accept", ""))


async def _on_http(req: Request, exc: StarletteHTTPException) -> Response:
    if exc.status_code == 404 and wants_html(req):
        from .routers.pages import templates  # the pages' own (imported late: no cycle)

        return templates.TemplateResponse(req, "404.html", {
            "kind": None, "item_id": None, "path": req.url.path,
            "version": foldplan_version()}, status_code=404)
    return JSONResponse({"detail": exc.detail, "message": str(exc.detail)},
                        status_code=exc.status_code, headers=getattr(exc, "headers", None))


async def _on_arithmetic(req: Request, exc: ArithmeticError) -> JSONResponse:
    # Degenerate but schema-valid numbers (e.g. a bandwidth of 5e-324) that the cost model
    # cannot evaluate. Logged with the traceback: the spec bounds should reject them upstream.
    log.warning("arithmetic error on %s %s", req.method, req.url.path, exc_info=exc)
    msg = (f"the cost model cannot evaluate these values ({type(exc).__name__}: {exc}); "
           "look for degenerate inputs such as near-zero rates, bandwidths or capacity factors")
    return _answer(422, [{"loc": ("body",), "msg": msg, "type": "value_error"}])


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ArithmeticError, _on_arithmetic)
    app.add_exception_handler(StarletteHTTPException, _on_http)
    app.add_exception_handler(RequestValidationError, _on_validation)
    app.add_exception_handler(ValidationError, _on_pydantic)
    app.add_exception_handler(RequestError, _on_request_error)
    app.add_exception_handler(InvalidMapping, _on_invalid_mapping)
    app.add_exception_handler(ValueError, _on_value_error)
    app.add_exception_handler(RecursionError, _on_value_error)


class BodyLimitMiddleware:
    """Refuse bodies over `max_bytes` with 413 before the app sees them (pure ASGI)."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None:
            try:
                too_big = int(length) > self.max_bytes
            except ValueError:
                too_big = True
            if too_big:
                await self._refuse(send)
                return
        # Read the body now (bounded), then replay it to the app.
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            chunk = msg.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._refuse(send)
                return
            chunks.append(chunk)
            more = msg.get("more_body", False)
        body = b"".join(chunks)
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, send: Send) -> None:
        msg = f"request body exceeds the limit of {self.max_bytes} bytes"
        resp = JSONResponse(
            {"detail": [{"loc": ["body"], "msg": msg, "type": "too_large"}], "message": msg},
            status_code=413,
        )
        await resp({"type": "http"}, _never_receive, send)


async def _never_receive() -> Message:  # pragma: no cover - JSONResponse never reads
    return {"type": "http.disconnect"}
