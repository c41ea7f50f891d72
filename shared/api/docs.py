"""The docs page (/api/docs): Swagger UI from files installed with the app, so that it works where there is
no internet, as on many factory networks.

The assets come from the `fastapi-offline` package (pinned in requirements.txt; it ships Swagger UI 5,
which renders the OpenAPI 3.1 document FastAPI writes). The page loads nothing from anywhere else: its
scripts, stylesheet and icon are served here, the online validator is switched off, and a
Content-Security-Policy tells the browser to refuse any other origin.
"""

from collections.abc import Awaitable, Callable
from importlib.resources import files
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse, HTMLResponse, Response

DOCS_PATH = "/api/docs"
ASSETS_PATH = f"{DOCS_PATH}/assets"
ASSETS = Path(str(files("fastapi_offline") / "static"))
_ASSET_TYPES = {
    "swagger-ui-bundle.js": "text/javascript",
    "swagger-ui.css": "text/css",
    "favicon.png": "image/png",
}

# Scripts and styles from this origin only (no inline code), pictures from here or data: URIs (Swagger
# UI's icons), requests ("Try it out" and the OpenAPI document) to this origin only.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)

PAGE = f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Device CA - API</title>
<link rel="stylesheet" href="{ASSETS_PATH}/swagger-ui.css">
<link rel="icon" type="image/png" href="{ASSETS_PATH}/favicon.png">
</head>
<body>
<div id="swagger-ui"></div>
<script src="{ASSETS_PATH}/swagger-ui-bundle.js"></script>
<script src="{DOCS_PATH}/start.js"></script>
</body>
</html>
"""

START = """window.ui = SwaggerUIBundle({
  url: "/api/openapi.json",
  dom_id: "#swagger-ui",
  deepLinking: true,
  validatorUrl: null,
  presets: [SwaggerUIBundle.presets.apis, SwaggerUIBundle.SwaggerUIStandalonePreset],
  layout: "BaseLayout",
});
"""

_SECURITY_HEADERS = {"Content-Security-Policy": CONTENT_SECURITY_POLICY, "X-Content-Type-Options": "nosniff"}
_CACHE = {"Cache-Control": "public, max-age=3600"}


def install(app: FastAPI) -> None:
    """Add the docs page, its start script and its assets to `app` (public, like the OpenAPI document)."""

    @app.get(DOCS_PATH, include_in_schema=False)
    async def docs_page() -> HTMLResponse:
        return HTMLResponse(PAGE, headers=_SECURITY_HEADERS)

    @app.get(f"{DOCS_PATH}/start.js", include_in_schema=False)
    async def docs_start() -> Response:
        return Response(START, media_type="text/javascript", headers=_SECURITY_HEADERS)

    for name, media_type in _ASSET_TYPES.items():
        app.add_api_route(f"{ASSETS_PATH}/{name}", _asset(ASSETS / name, media_type), include_in_schema=False)


def _asset(path: Path, media_type: str) -> Callable[[], Awaitable[FileResponse]]:
    async def asset() -> FileResponse:
        return FileResponse(path, media_type=media_type, headers={**_SECURITY_HEADERS, **_CACHE})

    return asset
