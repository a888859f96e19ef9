from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Response
from sqlalchemy import select

from api.deps import PrincipalDep, SessionDep, requires
from api.schemas import MAX_ID, TokenCreate, TokenCreated, TokenPublic
from controller.errors import Conflict, NotFound
from controller.events import record_event
from controller.models import ApiToken, utcnow
from controller.tokens import Role, create_token

router = APIRouter(prefix="/api/v1/tokens", tags=["tokens"])


def _public(t: ApiToken) -> TokenPublic:
    return TokenPublic.model_validate(t)


@router.get("", response_model=list[TokenPublic], **requires(Role.ADMIN))
def list_tokens(session: SessionDep) -> list[TokenPublic]:
    """Tokens, without their secrets (admin)."""
    return [_public(t) for t in session.scalars(select(ApiToken).order_by(ApiToken.id))]


@router.post("", response_model=TokenCreated, status_code=201, **requires(Role.ADMIN))
def add_token(body: TokenCreate, session: SessionDep, who: PrincipalDep) -> TokenCreated:
    """Create a token; its secret is in this response only (admin)."""
    row, secret = create_token(session, name=body.name, role=body.role, actor=who.name)
    return TokenCreated(**_public(row).model_dump(), token=secret)


@router.delete("/{token_id}", status_code=204, response_class=Response, **requires(Role.ADMIN))
def revoke_token(
    token_id: Annotated[int, Path(ge=1, le=MAX_ID)], session: SessionDep, who: PrincipalDep
) -> Response:
    """Revoke a token (admin); not the one making the request, which would lock you out."""
    row = session.get(ApiToken, token_id)
    if row is None:
        raise NotFound(f"token {token_id} does not exist")
    if row.id == who.token_id:
        raise Conflict("a token cannot revoke itself: use another admin token")
    if row.revoked_at is None:
        row.revoked_at = utcnow()
        record_event(session, "token_revoked", f"token {row.name}", actor=who.name, token_id=row.id)
    return Response(status_code=204)
