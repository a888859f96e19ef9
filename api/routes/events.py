from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Header, Query, Request
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.concurrency import run_in_threadpool

from api.deps import CtxDep, SessionDep, requires
from api.routes.jobs import event_public
from api.schemas import MAX_ID, EventPublic
from controller.cycle.runtime import Runtime
from controller.services.event_log import events_after, stream_start
from controller.services.tokens import Role
from controller.store.db import unit_of_work

router = APIRouter(prefix="/api/v1/events", tags=["events"])
POLL_SECONDS = 0.25
BATCH = 500


@router.get("", response_model=list[EventPublic], **requires(Role.VIEWER))
def list_events(
    session: SessionDep,
    after: Annotated[int, Query(ge=0, le=MAX_ID)] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 200,
) -> list[EventPublic]:
    """Events with an id greater than `after`, oldest first."""
    return [event_public(e) for e in events_after(session, after=after, limit=limit)]


def _fetch(ctx: Runtime, after: int) -> list[EventPublic]:
    with unit_of_work(ctx.session_factory) as s:
        return [event_public(e) for e in events_after(s, after=after, limit=BATCH)]


@router.get(
    "/stream",
    response_class=EventSourceResponse,
    responses={200: {"content": {"text/event-stream": {}}, "description": "Server-Sent Events"}},
    **requires(Role.VIEWER),
)
async def stream_events(
    request: Request,
    ctx: CtxDep,
    after: Annotated[int | None, Query(ge=0, le=MAX_ID)] = None,
    last_event_id: Annotated[str | None, Header(alias="Last-Event-ID", max_length=20)] = None,
    typed: Annotated[
        bool,
        Query(
            description="false: no event field, so a browser's EventSource.onmessage gets "
            "every kind (the kind is in the data)"
        ),
    ] = True,
) -> EventSourceResponse:
    """Server-Sent Events; each id is the event row id, so Last-Event-ID resumes without loss."""
    start = stream_start(after=after, last_event_id=last_event_id)

    async def events() -> AsyncIterator[ServerSentEvent]:
        cursor = start
        while not await request.is_disconnected():
            batch = await run_in_threadpool(_fetch, ctx, cursor)
            for e in batch:
                cursor = e.id
                yield ServerSentEvent(
                    id=str(e.id),
                    event=e.kind if typed else None,
                    data=json.dumps(e.model_dump(mode="json")),
                )
            if len(batch) < BATCH:
                await asyncio.sleep(POLL_SECONDS)

    return EventSourceResponse(events(), ping=15)
