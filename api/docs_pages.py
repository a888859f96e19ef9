"""/docs: Swagger UI over /openapi.json, its script and styles served from the installed
swagger-ui-bundle package, never from a CDN (a page that runs third-party script with an
operator's token in reach). `[server] docs = false` leaves /docs out altogether."""

from __future__ import annotations

from pathlib import Path

import swagger_ui_bundle
from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, Response

ASSETS = Path(swagger_ui_bundle.swagger_ui_path)
ASSET_PATH = "/docs/assets"
# The only files served, with their types: nothing else of the package's directory.
SERVED = {
    "swagger-ui-bundle.js": "text/javascript",
    "swagger-ui.css": "text/css",
    "favicon-32x32.png": "image/png",
}


def install(app: FastAPI) -> None:
    """Public like /openapi.json: the API's description is no secret, its answers are."""

    async def docs(_request: Request) -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=app.openapi_url or "/openapi.json",
            title=f"{app.title} API",
            swagger_js_url=f"{ASSET_PATH}/swagger-ui-bundle.js",
            swagger_css_url=f"{ASSET_PATH}/swagger-ui.css",
            swagger_favicon_url=f"{ASSET_PATH}/favicon-32x32.png",
        )

    async def asset(request: Request) -> Response:
        name = request.path_params["name"]
        if name not in SERVED:
            return Response(status_code=404)
        return FileResponse(
            ASSETS / name, media_type=SERVED[name], headers={"Cache-Control": "max-age=3600"}
        )

    app.add_route("/docs", docs, include_in_schema=False)
    app.add_route(ASSET_PATH + "/{name}", asset, include_in_schema=False)
