"""/metrics: the Prometheus exposition (controller.services.metrics reads what is recorded)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from starlette.concurrency import run_in_threadpool

from api.deps import requires_viewer_or_scraper
from controller.services.metrics import ServiceMetrics

router = APIRouter(tags=["metrics"])
# The classic text format, which every Prometheus version reads (our names need no escaping).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE: {}}, "description": "Prometheus text"}},
    **requires_viewer_or_scraper(),
)
async def metrics(request: Request) -> Response:
    """Prometheus metrics: a viewer token, or no token from an address in [server] metrics_allow."""
    service: ServiceMetrics = request.app.state.service.metrics
    body = await run_in_threadpool(service.render)
    return Response(body, media_type=CONTENT_TYPE)
