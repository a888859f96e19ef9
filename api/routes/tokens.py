from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Response

from api.deps import PrincipalDep, SessionDep, requires
from api.schemas import MAX_ID, TokenCreate, TokenCreated, TokenPublic
from controller.services import tokens as token_service
from controller.services.tokens import Role
from controller.store.models import ApiToken, utcnow

router = APIRouter(prefix="/api/v1/tokens", tags=["tokens"])


def _public(t: ApiToken) -> TokenPublic:
    return TokenPublic.model_validate(t)


@router.get("", response_model=list[TokenPublic], **requires(Role.ADMIN))
def list_tokens(session: SessionDep) -> list[TokenPublic]:
    """Tokens, without their secrets (admin)."""
    return [_public(t) for t in token_service.list_tokens(session)]


@router.post("", response_model=TokenCreated, status_code=201, **requires(Role.ADMIN))
def add_token(body: TokenCreate, session: SessionDep, who: PrincipalDep) -> TokenCreated:
    """Create a token; its secret is in this response only (admin)."""
    row, secret = token_service.create_token(
        session, name=body.name, role=body.role, actor=who.name
    )
    return TokenCreated(**_public(row).model_dump(), token=secret)


@router.delete("/{token_id}", status_code=204, response_class=Response, **requires(Role.ADMIN))
def revoke_token(
    token_id: Annotated[int, Path(ge=1, le=MAX_ID)], session: SessionDep, who: PrincipalDep
) -> Response:
    """Revoke a token (admin); not the one making the request, which would lock you out."""
    token_service.revoke_token(session, token_id=token_id, revoker=who, now=utcnow())
    return Response(status_code=204)
