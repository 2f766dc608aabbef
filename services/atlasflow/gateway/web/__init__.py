"""The review app: static files the gateway serves at ``/app/`` (docs/gateway.md, "Review app").

``index.html`` and ``app.css`` are committed here; the JavaScript (``src/``, NiiVue from npm) is
bundled by esbuild into ``build/`` (git-ignored) by ``scripts/bootstrap.sh`` (``npm ci && npm run
build`` in this folder). Without the bundle ``/app/`` answers 503 with a page that says how to
build it, rather than a blank page. ``GatewaySettings.web_dir`` points elsewhere (an image that
copies the built folder).
"""

from __future__ import annotations

from pathlib import Path

from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

HERE = Path(__file__).resolve().parent

_NOT_BUILT = """<!doctype html><html><head><meta charset="utf-8"><title>atlasflow review: not built</title>
</head><body style="font-family: sans-serif; max-width: 40em; margin: 4em auto">
<h1>The review app is not built</h1>
<p>This gateway has no review-app bundle (<code>{bundle}</code> is missing). Build it with
<code>scripts/bootstrap.sh</code>, or by hand:</p>
<pre>cd services/atlasflow/gateway/web &amp;&amp; npm ci &amp;&amp; npm run build</pre>
<p>A container image copies the built folder (docs/gateway.md). The JSON API
(<code>/api/v1</code>) and DICOMweb (<code>/dicomweb</code>) work without it.</p></body></html>"""

_NO_CACHE = {"Cache-Control": "no-cache"}


def review_app_routes(web_dir: str = "") -> list[BaseRoute]:
    """``/`` -> ``/app/``; ``/app/`` (index.html), ``/app/app.css``, ``/app/build/*`` (the bundle)."""
    root = Path(web_dir) if web_dir else HERE
    build = root / "build"
    bundle = build / "app.js"

    async def home(request: Request) -> Response:
        return RedirectResponse("/app/", status_code=302)

    async def index(request: Request) -> Response:
        if not bundle.is_file():
            return HTMLResponse(_NOT_BUILT.format(bundle=bundle), status_code=503, headers=_NO_CACHE)
        return FileResponse(root / "index.html", media_type="text/html", headers=_NO_CACHE)

    async def css(request: Request) -> Response:
        return FileResponse(root / "app.css", media_type="text/css", headers=_NO_CACHE)

    return [
        Route("/", home, methods=["GET"]),
        Route("/app", home, methods=["GET"]),
        Route("/app/", index, methods=["GET"]),
        Route("/app/app.css", css, methods=["GET"]),
        Mount("/app/build", app=StaticFiles(directory=build, check_dir=False), name="review-app-build"),
    ]
