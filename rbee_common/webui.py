"""The web UI's files: plain HTML, ES modules and CSS, served from the package (no build step).

`/` is the daemon's page (`<package>/ui/index.html`); `/ui/<name>` is a file of
the daemon's own `ui/` folder, else of the shared one (`rbee_common/ui/`: the
API client, the job stream reader, the stylesheet). These files hold no data
and are served without the token: the page asks for it once, keeps it in the
browser's session storage, and sends it with every API call it makes.
"""

from __future__ import annotations

from importlib import resources
from importlib.resources.abc import Traversable

from quart import Response
from quart_trio import QuartTrio

from rbee_common.errors import RouteNotFound

_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}
_HEADERS = {
    "Cache-Control": "no-cache",
    # Only our own files run; the page talks to this daemon only (same origin).
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
}


def _files(package: str) -> dict[str, Traversable]:
    folder = resources.files(package) / "ui"
    if not folder.is_dir():
        return {}
    return {item.name: item for item in folder.iterdir()
            if item.is_file() and any(item.name.endswith(suffix) for suffix in _TYPES)}


def _serve(item: Traversable) -> Response:
    suffix = item.name[item.name.rfind("."):]
    return Response(item.read_bytes(), status=200, content_type=_TYPES[suffix], headers=_HEADERS)


def add_ui_routes(app: QuartTrio, package: str) -> tuple[str, ...]:
    """Serve `package`'s page at `/` and the UI files under `/ui/`; return their paths (public)."""
    files = {**_files("rbee_common"), **_files(package)}
    if "index.html" not in files:
        return ()
    index = files["index.html"]

    @app.get("/")
    async def page() -> Response:
        return _serve(index)

    @app.get("/ui/<name>")
    async def ui_file(name: str) -> Response:
        item = files.get(name)
        if item is None:
            raise RouteNotFound("No such file in the web UI.")
        return _serve(item)

    return ("/", *(f"/ui/{name}" for name in sorted(files)))
