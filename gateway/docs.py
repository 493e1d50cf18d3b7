"""/api-docs: Swagger UI over the generated OpenAPI document, served without any CDN.

These are the only routes of the gateway that are not transcoded from the descriptor set: a
static page, the assets of the ``swagger-ui-dist`` npm package (``node_modules/``) and the
OpenAPI document generated from ``protos/`` (``gen/openapi/azora.swagger.json``). Both are
looked up at request time, so the gateway starts before they exist and answers a 404
google.rpc.Status until they do. In production Envoy routes /api-docs to the gateway the same way.
"""

from __future__ import annotations

import re
from pathlib import Path

from aiohttp import web
from google.rpc import code_pb2

from gateway.errors import GatewayError
from gateway.keys import ROUTE_KEY

# Our page, not the package's index.html (which loads the petstore demo through
# swagger-initializer.js). <base> makes "./x" resolve under /api-docs/ with or without the
# trailing slash; validatorUrl null stops the badge that would call an online validator.
INDEX_HTML = """<!DOCTYPE html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <title>Azora Email Hosting API</title>
  <base href="/api-docs/">
  <link rel="stylesheet" href="./swagger-ui.css">
  <link rel="icon" type="image/png" href="./favicon-32x32.png" sizes="32x32">
  <link rel="icon" type="image/png" href="./favicon-16x16.png" sizes="16x16">
</head>
<body>
  <div id="swagger-ui"></div>
  <script src="./swagger-ui-bundle.js" charset="UTF-8"></script>
  <script src="./swagger-ui-standalone-preset.js" charset="UTF-8"></script>
  <script>{init_script}</script>
</body>
</html>
"""
"""Our page; `{init_script}` is `INIT_SCRIPT`, whose hash the Content-Security-Policy allows."""

INIT_SCRIPT = """
    window.onload = function () {
      window.ui = SwaggerUIBundle({
        url: "/api-docs/openapi.json",
        dom_id: "#swagger-ui",
        deepLinking: true,
        validatorUrl: null,
        presets: [SwaggerUIBundle.presets.apis, SwaggerUIStandalonePreset],
        plugins: [SwaggerUIBundle.plugins.DownloadUrl],
        layout: "StandaloneLayout"
      });
    };
  """

# Asset names are plain file names of the package; anything else is not ours to serve.
_ASSET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_NOT_SERVED = frozenset({"index.html", "swagger-initializer.js", "package.json"})
_REQUIRED_ASSET = "swagger-ui-bundle.js"

ROUTE_INDEX = "/api-docs"
ROUTE_OPENAPI = "/api-docs/openapi.json"
ROUTE_ASSET = "/api-docs/{asset}"


def _not_found(message: str, *, reason: str) -> GatewayError:
    return GatewayError(code_pb2.NOT_FOUND, message, reason=reason)


class ApiDocs:
    """Handlers of the /api-docs routes."""

    def __init__(self, *, openapi_path: Path, swagger_ui_dir: Path) -> None:
        self._openapi = openapi_path
        self._assets = swagger_ui_dir

    def add_routes(self, app: web.Application) -> None:
        """Register the routes (before the transcoding catch-all)."""
        app.router.add_get(ROUTE_INDEX, self.index)
        app.router.add_get(ROUTE_INDEX + "/", self.index)
        app.router.add_get(ROUTE_INDEX + "/index.html", self.index)
        app.router.add_get(ROUTE_OPENAPI, self.openapi)
        app.router.add_get(ROUTE_ASSET, self.asset)

    def _require_assets(self) -> None:
        if not (self._assets / _REQUIRED_ASSET).is_file():
            raise _not_found(
                "Swagger UI assets are not installed (npm package swagger-ui-dist; run make deps)",
                reason="SWAGGER_UI_NOT_INSTALLED",
            )

    async def index(self, request: web.Request) -> web.StreamResponse:
        """The Swagger UI page."""
        request[ROUTE_KEY] = ROUTE_INDEX
        self._require_assets()
        page = INDEX_HTML.replace("{init_script}", INIT_SCRIPT)
        return web.Response(text=page, content_type="text/html", charset="utf-8")

    async def openapi(self, request: web.Request) -> web.StreamResponse:
        """The generated OpenAPI document."""
        request[ROUTE_KEY] = ROUTE_OPENAPI
        if not self._openapi.is_file():
            raise _not_found(
                "the OpenAPI document has not been generated yet (make generate)",
                reason="OPENAPI_NOT_GENERATED",
            )
        return web.FileResponse(self._openapi, headers={"Content-Type": "application/json"})

    async def asset(self, request: web.Request) -> web.StreamResponse:
        """A file of the swagger-ui-dist package."""
        request[ROUTE_KEY] = ROUTE_ASSET
        name = request.match_info["asset"]
        path = self._assets / name
        if not _ASSET_NAME.match(name) or name in _NOT_SERVED or not path.is_file():
            raise _not_found(f"no such Swagger UI asset: {name[:100]}", reason="ASSET_NOT_FOUND")
        return web.FileResponse(path)
