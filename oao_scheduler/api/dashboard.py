"""The web dashboard: a single page served by the API at ``/``, its files at ``/ui/``.

Everything the page loads ships in this package (``static/``): no CDN, no build step.
The page is plain HTML, CSS and JavaScript over the API's own endpoints (``/runs``,
``/runs/{id}``, ``/runs/{id}/graph``, ``/runs/{id}/nodes/{node}``, ``/runs/{id}/events``
as SSE, ``/runs/{id}/cancel``, ``/workers``, ``/queues``). The files themselves hold no
data and need no token; the page sends the bearer token the user enters (kept in the
tab's ``sessionStorage``) with every API call, so authentication is the API's.

A Content-Security-Policy of ``'self'`` only keeps the page from loading anything from
elsewhere (and from running inline script), which also enforces the no-CDN rule.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from starlette.responses import Response

STATIC_DIR = Path(__file__).parent / "static"

#: Sent with the page and its files: nothing from other origins, no inline script.
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


class _Static(StaticFiles):
    """Static files with :data:`SECURITY_HEADERS`."""

    def file_response(self, *args: Any, **kwargs: Any) -> Response:
        response = super().file_response(*args, **kwargs)
        response.headers.update(SECURITY_HEADERS)
        return response


def mount_dashboard(app: FastAPI) -> None:
    """Serve the dashboard on ``app``: ``GET /`` (the page) and ``/ui/*`` (its files).
    Neither appears in the OpenAPI schema."""

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html", headers=SECURITY_HEADERS)

    app.mount("/ui", _Static(directory=STATIC_DIR), name="ui")
