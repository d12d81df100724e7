"""The dashboard and the API's docs page, served from the package itself (no CDN, works offline).

The dashboard is static files (plain HTML, CSS and one script, no build step and no front-end
library: the pages are lists, forms and two SVG charts, which the browser's own DOM does well)
that call the server's public API exactly as any client would: ``/v1`` and the documented
extension endpoints (``/v1/files/{id}/check``, ``/v1/fine_tuning/jobs/{id}/details``). It needs
no key to load; every API call it makes carries the key the user typed, as a Bearer header.

Every page this module serves carries a Content-Security-Policy that allows scripts, styles,
images and connections from this server only, no inline script, and no framing
(``frame-ancestors 'none'``); every response of the server says ``nosniff``. The docs page is
FastAPI's Swagger UI with its script and stylesheet served from here (swagger-ui-dist, vendored
under ``static/docs`` with its licence) and started by a script file, not an inline one, so the
same policy holds there too (Swagger UI sets style attributes, which the policy's
``style-src`` then has to allow).
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

STATIC = Path(__file__).resolve().parent / "static"
DASHBOARD_PATH = "/dashboard"
DOCS_PATH = "/docs"
DOCS_ASSETS = "/docs-assets"
# answered without an API key: the pages and their assets hold no data; the data they show
# comes from /v1, which asks for the key
OPEN_PREFIXES = (DASHBOARD_PATH + "/", DOCS_ASSETS + "/")
OPEN_EXACT = ("/", DASHBOARD_PATH, DOCS_PATH, "/openapi.json")

PAGE_POLICY = "; ".join(
    [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data:",
        "font-src 'self'",
        "connect-src 'self'",
        "manifest-src 'self'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    ]
)
# Swagger UI (React) writes style attributes: allowed there, scripts stay the server's own only
DOCS_POLICY = PAGE_POLICY.replace("style-src 'self'", "style-src 'self' 'unsafe-inline'")

router = APIRouter(include_in_schema=False)


@router.get("/")
def root() -> RedirectResponse:
    return RedirectResponse(DASHBOARD_PATH + "/", status_code=307)


@router.get(DASHBOARD_PATH)
def dashboard_slash() -> RedirectResponse:
    return RedirectResponse(DASHBOARD_PATH + "/", status_code=307)


@router.get(DOCS_PATH)
def docs(request: Request) -> HTMLResponse:
    page = get_swagger_ui_html(
        openapi_url="/openapi.json",
        title="gpt-finetune API",
        swagger_js_url=f"{DOCS_ASSETS}/swagger-ui-bundle.js",
        swagger_css_url=f"{DOCS_ASSETS}/swagger-ui.css",
        swagger_favicon_url=f"{DASHBOARD_PATH}/favicon.svg",
    )
    # FastAPI's page starts Swagger UI with an inline script, which the policy forbids: the same
    # start, from a file of ours
    html = bytes(page.body).decode()
    start = html.find("<script>", html.find("swagger-ui-bundle.js"))
    end = html.find("</script>", start) + len("</script>")
    html = html[:start] + f'<script src="{DOCS_ASSETS}/start.js"></script>' + html[end:]
    return HTMLResponse(html)


def mount(app: FastAPI) -> None:
    """The dashboard at /dashboard/ (and / sends there), the offline docs at /docs."""
    app.include_router(router)
    app.mount(DASHBOARD_PATH, StaticFiles(directory=STATIC / "dashboard", html=True), name="dashboard")
    app.mount(DOCS_ASSETS, StaticFiles(directory=STATIC / "docs"), name="docs-assets")


def is_open(path: str) -> bool:
    return path in OPEN_EXACT or path.startswith(OPEN_PREFIXES)


class SecurityHeaders:
    """``nosniff`` on every response; on the pages, the policy above and no framing."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        policy = DOCS_POLICY if path == DOCS_PATH or path.startswith(DOCS_ASSETS) else PAGE_POLICY

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers") or [])
                headers += [
                    (b"x-content-type-options", b"nosniff"),
                    (b"content-security-policy", policy.encode()),
                    (b"x-frame-options", b"DENY"),
                    (b"referrer-policy", b"no-referrer"),
                ]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, with_headers)
