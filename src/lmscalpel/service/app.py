"""The HTTP face of :class:`~lmscalpel.service.engine.EditingService`: a FastAPI app.

:func:`create_app` serves one in-process :class:`~lmscalpel.models.loaded.LoadedModel` under
``/v1`` (OpenAPI schema at ``/openapi.json``, UI at ``/docs``) and the web page at ``/`` from
``service/static/``. Routes only parse, call the service and return. Mutating endpoints need
``Authorization: Bearer <token>``. Every error is JSON, ``{"error": {"type", "message", ...}}``,
never a stack trace: 422 for invalid input (with the field), 400 for a failed edit (the library's
message), 401, 404, 409, 413, and 500 for a server fault (logged, not shown).
"""

from __future__ import annotations

import hmac
import logging
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Query, Request, Response, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException

from lmscalpel.core.version import __version__
from lmscalpel.models.loaded import LoadedModel
from lmscalpel.service.engine import EditingService, Limits, ServiceError
from lmscalpel.service.schemas import CompletionIn, EditIn, GenerateIn, ScoreIn, TraceIn

log = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "static"
STATE_HEADER = "X-Lmscalpel-State"
HTTP_KINDS = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "too_large",
    422: "validation_error",
}


def _error(status: int, kind: str, message: str, **extra: Any) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    body = {"error": {"type": kind, "message": message, **extra}}
    return JSONResponse(body, status_code=status, headers=headers)


class BodyLimit:
    """ASGI middleware: a request body over ``max_body`` bytes is answered 413 (by its declared
    length at once, or when the streamed body grows past it)."""

    def __init__(self, app, max_body: int) -> None:
        self.app = app
        self.max_body = max_body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body:
            response = _error(413, "too_large", self._message())
            return await response(scope, receive, send)
        received = 0

        async def limited():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:
                    raise HTTPException(413, self._message())
            return message

        return await self.app(scope, limited, send)

    def _message(self) -> str:
        return f"request body larger than the limit of {self.max_body} bytes"


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def service_error(request: Request, error: ServiceError) -> JSONResponse:
        extra = dict(error.extra)
        if error.status == 422:
            extra["errors"] = [{"field": error.field or "body", "reason": error.reason}]
        return _error(error.status, error.kind, error.message, **extra)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        errors = []
        for item in error.errors():
            loc = [str(part) for part in item.get("loc", ())]
            if loc and loc[0] in ("body", "query", "path", "header"):
                loc = loc[1:] if loc[0] == "body" else loc
            field = ".".join(loc) or "body"
            reason = str(item.get("msg", "invalid"))
            errors.append({"field": field, "reason": reason})
        first = errors[0] if errors else {"field": "body", "reason": "invalid"}
        message = f"{first['field']}: {first['reason']}"
        return _error(422, "validation_error", message, errors=errors)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        kind = HTTP_KINDS.get(error.status_code, "http_error")
        return _error(error.status_code, kind, str(error.detail))

    @app.exception_handler(Exception)
    async def server_error(request: Request, error: Exception) -> JSONResponse:
        log.error("unexpected error in %s %s", request.method, request.url.path, exc_info=error)
        return _error(500, "internal", "internal error (logged on the server)")


def create_app(
    lm: LoadedModel,
    journal_dir: str | Path,
    token: str,
    *,
    limits: Limits | None = None,
) -> FastAPI:
    """A FastAPI app serving ``lm`` with the journal in ``journal_dir`` (replayed now, see
    :class:`~lmscalpel.service.engine.EditingService`); ``token`` guards the mutating endpoints.

    The service is ``app.state.service``; closing it (``app.state.service.close()``) releases the
    journal.
    """
    if not isinstance(token, str) or not token:
        raise ValueError("create_app needs a non-empty bearer token")
    service = EditingService(lm, journal_dir, limits)
    app = FastAPI(
        title="lmscalpel",
        version=__version__,
        description="Edit the facts of a running language model, check the effect, revert, "
        "and keep an audit journal. Mutating endpoints need `Authorization: Bearer <token>`.",
    )
    app.state.service = service
    app.add_middleware(BodyLimit, max_body=service.limits.max_body)
    _install_error_handlers(app)
    bearer = HTTPBearer(auto_error=False, description="The server's token.")
    expected = token.encode("utf-8")

    def authorized(credentials: HTTPAuthorizationCredentials | None = Security(bearer)) -> None:
        given = b"" if credentials is None else credentials.credentials.encode("utf-8")
        if not hmac.compare_digest(given, expected):
            raise ServiceError(401, "unauthorized", "a valid bearer token is required")

    def labelled(response: Response, body: dict[str, Any]) -> dict[str, Any]:
        response.headers[STATE_HEADER] = str(body["state"]["version"])
        return body

    @app.get("/v1/health", tags=["service"])
    def health(response: Response) -> dict[str, Any]:
        """Model, base fingerprint, applied edits and limits."""
        return labelled(response, service.health())

    @app.post("/v1/edits", status_code=201, tags=["edits"], dependencies=[Depends(authorized)])
    def create_edit(body: EditIn, response: Response) -> dict[str, Any]:
        """Compute, apply (guarded when a guard is given) and journal an edit."""
        return labelled(
            response,
            service.edit(
                body.method,
                [r.to_request_dict() for r in body.requests],
                body.config,
                None if body.guard is None else body.guard.to_guard_dict(),
                body.note,
            ),
        )

    @app.get("/v1/edits", tags=["edits"])
    def list_edits(response: Response) -> dict[str, Any]:
        """The journal: every edit, oldest first, with its status and digests."""
        return labelled(response, service.edits())

    @app.get("/v1/edits/{edit_id}", tags=["edits"])
    def get_edit(edit_id: str) -> dict[str, Any]:
        """One journal entry with its before/after probes."""
        return service.get_edit(edit_id)

    @app.delete("/v1/edits/{edit_id}", tags=["edits"], dependencies=[Depends(authorized)])
    def revert_edit(
        edit_id: str,
        response: Response,
        cascade: bool = Query(False, description="Also revert later edits of the same weights."),
    ) -> dict[str, Any]:
        """Revert an edit (409 when a later edit changed the same weights, unless cascade)."""
        return labelled(response, service.revert(edit_id, cascade))

    @app.post("/v1/generate", tags=["model"])
    def generate(body: GenerateIn, response: Response) -> dict[str, Any]:
        """Greedy continuations of the prompts."""
        return labelled(response, service.generate(body.all_prompts, body.max_tokens))

    @app.post("/v1/score", tags=["model"])
    def score(body: ScoreIn, response: Response) -> dict[str, Any]:
        """Teacher-forced log-probabilities of each target after its prompt."""
        return labelled(response, service.score([(i.prompt, i.target) for i in body.items]))

    @app.post("/v1/trace", tags=["model"])
    def trace(body: TraceIn, response: Response) -> dict[str, Any]:
        """Causal tracing: restoration heatmaps as PNG (base64) and arrays."""
        return labelled(response, service.trace(**body.model_dump()))

    @app.post("/v1/completions", tags=["openai"])
    def completions(body: CompletionIn, response: Response) -> dict[str, Any]:
        """OpenAI-compatible completions (greedy; prompt, max_tokens, stop)."""
        return labelled(response, service.complete(body.prompts, body.max_tokens, body.stops))

    @app.get("/v1/models", tags=["openai"])
    def models() -> dict[str, Any]:
        """OpenAI-compatible model list: the one served model."""
        return service.models()

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        page = STATIC / "index.html"
        if not page.is_file():
            raise HTTPException(404, "the web page is not installed")
        return FileResponse(page)

    app.mount("/static", StaticFiles(directory=STATIC, check_dir=False), name="static")
    return app
